"""Host input pipeline: grain over a random-access source -> global, sharded batches for the step.

  source (TFDS data source, or `InMemorySource` of numpy images), or a `Mixture` of several
    -> this host's shard of each (records process_index, process_index + count, ...; equal sizes)
    -> shuffle (per epoch, seeded) -> repeat -> [mixture: grain's deterministic weighted interleave]
    -> example dict -> random crop + flip (seeded per record)
    -> local batch -> float32 in [0, 1] -> grain read threads + prefetch
    -> `InputPipeline`: global `jax.Array`s via `jax.make_array_from_process_local_data`, a small
       device prefetch queue, and `get_state` / `set_state` for checkpoints.

Every batch is a dict {'lq', 'hq': float32 [B, S, S, 3], 'type_id': int32 [B]}. Paired records carry
their LQ and type; HQ-only records have lq = hq and type_id = -1 (degradations.RANDOM), meaning
"degrade on device" in the train step; so both kinds (and mixtures of them) have one structure.

Determinism: the order, crops and flips depend only on (seed, process_index, process_count, record
index, mixture weights), never on thread timing, so a run and its resume see identical batches.
Each host keeps len(source) // process_count records (the remainder is dropped) so all hosts run
the same number of steps per epoch and never wait on each other in a collective.
"""
import collections
import copy
import functools
import logging
from typing import Any, Dict, Mapping, Optional, Sequence, Union

import grain
import jax
import ml_collections
import numpy as np
from PIL import Image

from diffrestorer_jax.data.degradations import RANDOM
from diffrestorer_jax.data.image_io import ImageReadError, decode_image, to_uint8

Batch = Dict[str, Any]


def default_pipeline_config() -> ml_collections.ConfigDict:
    """Input pipeline settings; global_batch_size is split evenly over hosts."""
    c = ml_collections.ConfigDict()
    c.crop_size = 512          # SD1.5's native resolution
    c.global_batch_size = 16   # paper, stage 1
    c.seed = 0
    c.shuffle = True
    c.flip = True
    c.num_epochs = None        # None: repeat forever (the train loop counts steps)
    c.num_threads = 4          # grain read/transform threads per host
    c.prefetch_buffer = 8      # grain's host-side prefetch (elements)
    c.device_prefetch = 2      # global batches put on device ahead of the step
    return c


class InMemorySource:
    """A random-access source over numpy images, for the demo and tests (no dataset to build).

    images: HQ images [H, W, 3] (uint8 or float in [0, 1], sizes may differ). With `lq` (same
    length, same sizes) and `type_ids`, records are paired; otherwise HQ-only.
    """

    def __init__(self, images: Sequence[np.ndarray], lq: Optional[Sequence[np.ndarray]] = None,
                 type_ids: Optional[Sequence[int]] = None):
        if lq is not None and len(lq) != len(images):
            raise ValueError(f"{len(lq)} LQ images for {len(images)} HQ images")
        self._hq = [to_uint8(im) for im in images]
        self._lq = None if lq is None else [to_uint8(im) for im in lq]
        self._types = None if type_ids is None else [int(t) for t in type_ids]

    def __len__(self) -> int:
        return len(self._hq)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        if self._lq is None:
            return {"image": self._hq[index]}
        t = RANDOM if self._types is None else self._types[index]
        return {"hq": self._hq[index], "lq": self._lq[index], "type_id": t}


class Mixture:
    """Several sources sampled by weight: `make_pipeline(Mixture([hq, paired], [1, 1]), ...)`.

    grain's `MapDataset.mix` interleaves the (each shuffled and repeated) sources deterministically
    in proportion to the weights (1:1 alternates; 3:1 gives three of the first per one of the
    second), so each batch's composition is fixed by its position and the mixture is as
    reproducible and checkpointable as a single source. With a finite `num_epochs` it stops when
    the first source runs out.
    """

    def __init__(self, sources: Sequence[Any], weights: Optional[Sequence[float]] = None):
        weights = [1.0] * len(sources) if weights is None else [float(w) for w in weights]
        if not sources or len(weights) != len(sources):
            raise ValueError(f"a mixture needs one weight per source: {len(sources)} source(s), "
                             f"{len(weights)} weight(s)")
        if any(not np.isfinite(w) or w <= 0 for w in weights):
            raise ValueError(f"mixture weights must be positive, got {weights}")
        self.sources, self.weights = list(sources), weights


def _pixels(value, name: str) -> np.ndarray:
    """A record's image as uint8 [H, W, 3], decoding PNG bytes when the source did not."""
    if isinstance(value, (bytes, np.bytes_)):
        return to_uint8(decode_image(bytes(value), name))
    arr = np.asarray(value)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, -1)
    return to_uint8(arr[..., :3])


def to_example(record: Dict[str, Any]) -> Dict[str, Any]:
    """A source record (HQ-only {'image'} or paired {'lq', 'hq', 'type_id'}) -> the common example."""
    name = str(record.get("file_name", "record"))
    if "image" in record:
        hq = _pixels(record["image"], name)
        return {"hq": hq, "lq": hq, "type_id": np.int32(RANDOM)}
    return {"hq": _pixels(record["hq"], name), "lq": _pixels(record["lq"], name),
            "type_id": np.int32(record["type_id"])}


class ReadableExamples:
    """A source's records as examples (`to_example`), an unreadable record (corrupt or truncated
    image bytes) replaced by the next readable one: the same replacement every time, so a resumed run
    sees the batches an uninterrupted one did, and one bad record is never fatal. Each is reported
    once, with the running count (`skipped`: index -> reason)."""

    def __init__(self, source):
        self.source = source
        self.skipped: Dict[int, str] = {}

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        n = len(self.source)
        for k in range(n):
            i = (int(index) + k) % n
            try:
                return to_example(self.source[i])
            except ImageReadError as e:
                if i not in self.skipped:
                    self.skipped[i] = e.reason
                    logging.warning("skipping unreadable record %d (%s): %s; %d skipped so far", i, e.path,
                                    e.reason, len(self.skipped))
        raise ImageReadError(f"all {n} records", "no record of this dataset can be read")


def _resize(image: np.ndarray, hw) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize((hw[1], hw[0]), Image.BICUBIC))


def crop_and_flip(example: Dict[str, Any], rng: np.random.Generator, size: int, flip: bool) -> Dict[str, Any]:
    """The same random size x size crop (and flip) of LQ and HQ; images smaller than the crop are
    resized up (aspect kept) first, and an LQ of another size is resized to its HQ."""
    hq, lq = example["hq"], example["lq"]  # HQ-only examples: lq is hq (one resize, not two)
    if lq.shape != hq.shape:
        lq = _resize(lq, hq.shape[:2])
    h, w = hq.shape[:2]
    if min(h, w) < size:
        scale = size / min(h, w)
        hw = (max(size, round(h * scale)), max(size, round(w * scale)))
        hq, lq = _resize(hq, hw), (None if lq is hq else _resize(lq, hw))
        lq = hq if lq is None else lq
        h, w = hw
    top, left = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
    hq, lq = hq[top:top + size, left:left + size], lq[top:top + size, left:left + size]
    if flip and rng.random() < 0.5:
        hq, lq = hq[:, ::-1], lq[:, ::-1]
    return {"hq": np.ascontiguousarray(hq), "lq": np.ascontiguousarray(lq), "type_id": example["type_id"]}


def _to_float(batch: Batch) -> Batch:
    return {"hq": batch["hq"].astype(np.float32) / 255.0, "lq": batch["lq"].astype(np.float32) / 255.0,
            "type_id": batch["type_id"].astype(np.int32)}


def host_shard(source, process_index: int, process_count: int) -> grain.MapDataset:
    """This host's records: every process_count-th from process_index, equal sizes on all hosts."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    per_host = len(source) // process_count
    if per_host == 0:
        raise ValueError(f"{len(source)} records cannot be shared by {process_count} hosts")
    ds = grain.MapDataset.source(source)
    return ds[: per_host * process_count][process_index::process_count]


def host_records(source: Union[Any, Mixture], config: ml_collections.ConfigDict, *, process_index: int,
                 process_count: int) -> grain.MapDataset:
    """This host's records in training order: its shard of the source, shuffled and repeated; for a
    `Mixture`, each source so (shuffle seed config.seed + its position), then interleaved by weight."""
    parts = source.sources if isinstance(source, Mixture) else [source]
    datasets = []
    for k, part in enumerate(parts):
        ds = host_shard(ReadableExamples(part), process_index, process_count)
        if config.shuffle:
            ds = ds.shuffle(seed=config.seed + k)
        datasets.append(ds.repeat(config.num_epochs))
    if not isinstance(source, Mixture):
        return datasets[0]
    return grain.MapDataset.mix(datasets, source.weights)


def build_dataset(source, config: ml_collections.ConfigDict, *, process_index: int,
                  process_count: int) -> grain.IterDataset:
    """The host-side grain dataset of local batches (numpy dicts) for one host; `source` is one
    random-access source or a `Mixture` of them."""
    if config.global_batch_size % process_count:
        raise ValueError(f"global_batch_size {config.global_batch_size} is not divisible by "
                         f"{process_count} hosts")
    local_batch = config.global_batch_size // process_count
    ds = host_records(source, config, process_index=process_index, process_count=process_count)
    crop = functools.partial(crop_and_flip, size=config.crop_size, flip=config.flip)
    ds = ds.random_map(crop, seed=(config.seed * 1_000_003 + process_index) % 2**31)
    ds = ds.batch(local_batch, drop_remainder=True).map(_to_float)
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=config.num_threads,
                                                prefetch_buffer_size=config.prefetch_buffer))


class InputPipeline:
    """Iterator of global batches with a checkpointable position.

    `get_state()` describes the next batch *this object will return* (batches already prefetched to
    the device are not counted as consumed), so saving it with the model after step n and calling
    `set_state` on a fresh pipeline resumes at batch n + 1 exactly. The state is a small dict of
    plain Python values (grain's), fit for Orbax's JSON handler.

    `sharding`: None (host numpy batches), one NamedSharding for the images (other arrays get its
    leading axis), or a dict key -> NamedSharding used as given (the train step's own objects).
    """

    def __init__(self, dataset: grain.IterDataset,
                 sharding: Union[None, jax.sharding.NamedSharding, Mapping[str, Any]] = None,
                 device_prefetch: int = 2):
        self._it = iter(dataset)
        self._sharding = sharding
        self._depth = max(1, device_prefetch)
        self._queue = collections.deque()

    def __iter__(self):
        return self

    def _globalise(self, batch: Batch) -> Batch:
        if self._sharding is None:
            return batch
        if isinstance(self._sharding, Mapping):
            return {k: jax.make_array_from_process_local_data(self._sharding[k], v) for k, v in batch.items()}
        spec = self._sharding.spec
        batch_only = jax.sharding.NamedSharding(self._sharding.mesh,
                                                jax.sharding.PartitionSpec(spec[0] if len(spec) else None))
        return {k: jax.make_array_from_process_local_data(self._sharding if v.ndim == 4 else batch_only, v)
                for k, v in batch.items()}

    def _fill(self) -> None:
        while len(self._queue) < self._depth:
            state = copy.deepcopy(self._it.get_state())
            self._queue.append((state, self._globalise(next(self._it))))

    def __next__(self) -> Batch:
        if not self._queue:
            self._fill()
        _, batch = self._queue.popleft()
        try:
            self._fill()
        except StopIteration:
            pass
        return batch

    def get_state(self) -> Dict[str, Any]:
        return copy.deepcopy(self._queue[0][0]) if self._queue else copy.deepcopy(self._it.get_state())

    def set_state(self, state: Dict[str, Any]) -> None:
        self._queue.clear()
        self._it.set_state(copy.deepcopy(state))


def make_pipeline(source, config: Optional[ml_collections.ConfigDict] = None, *,
                  sharding: Optional[jax.sharding.NamedSharding] = None,
                  process_index: Optional[int] = None, process_count: Optional[int] = None) -> InputPipeline:
    """The pipeline for this host (index/count default to jax's; pass them to simulate hosts)."""
    config = default_pipeline_config() if config is None else config
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    dataset = build_dataset(source, config, process_index=process_index, process_count=process_count)
    return InputPipeline(dataset, sharding, config.device_prefetch)
