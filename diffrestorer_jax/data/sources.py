"""Where a training run's batches come from: `make_data(config)` by `config.data.kind`.

  'skimage' / 'hq_folder'  `StepIndexedImages`: random crops (+ flips) of a small in-memory image set;
                           the batch at step s is a pure function of (seed, s).
  'tfds'                   `PipelineBatches`: the grain pipeline (data/pipeline.py) over datasets
                           built by `diffrestorer-build-dataset`, one kind or a weighted mixture.

Either source gives `next(data)` -> batch, `get_state` / `set_state` (checkpointed with the model, so
a resumed run sees exactly the batches of an uninterrupted one), `example_batch()` (zeros laid out
like a batch: what the step is compiled for) and `sample_hq(n)` (fixed crops for periodic samples).
Batches carry global example ids step * batch + i ('index'), the keys of per-example randomness.
"""
import logging
from typing import Any, Callable, Dict, Optional

import jax
import ml_collections
import numpy as np

from diffrestorer_jax import paths
from diffrestorer_jax.data import context_crop
from diffrestorer_jax.data import pipeline as pl
from diffrestorer_jax.data.image_io import IMAGE_EXTENSIONS

# The step's batch keys for the dataset kinds it reads (see `PipelineBatches`).
HQ_ONLY_KEYS = ("hq", "index")
PAIRED_KEYS = ("hq", "lq", "type_id", "index")
MIXED_KEYS = ("hq", "lq", "type_id", "has_lq", "index")


class DataConfigError(ValueError):
    """A data setting that cannot work; the message names the setting and how to fix it."""


def example_ids(step: int, batch_size: int) -> np.ndarray:
    """Global example ids of step's batch, step * batch + i (int32): the per-example RNG keys."""
    return np.arange(batch_size, dtype=np.int32) + np.int32(step * batch_size % (2 ** 31 - 1))


def example_batch(keys, batch_size: int, size: int) -> Dict[str, np.ndarray]:
    """Zeros laid out like a real batch with `keys` (what a train step is compiled for)."""
    image, one = (batch_size, size, size, 3), (batch_size,)
    layout = {"hq": (image, np.float32), "lq": (image, np.float32), "type_id": (one, np.int32),
              "has_lq": (one, np.bool_), "index": (one, np.int32)}
    return {k: np.zeros(*layout[k]) for k in keys}


def global_batch(host_batch: Dict[str, np.ndarray], shardings) -> Dict[str, jax.Array]:
    """Every process holds the whole (small) global batch; each device takes its slice. Values that
    are jax.Arrays already (the grain pipeline's, made from per-process data) pass through."""
    return {k: v if isinstance(v, jax.Array) else
            jax.make_array_from_callback(v.shape, shardings[k], lambda idx, v=v: v[idx])
            for k, v in host_batch.items()}


class StepIndexedImages:
    """Batches of random crops (+ flips) of in-memory HQ images; batch(step) depends only on
    (seed, step). State = {'step': next step}."""

    def __init__(self, images: np.ndarray, batch_size: int, crop: int, seed: int, flip: bool = True,
                 step: int = 0):
        if images.shape[1] < crop or images.shape[2] < crop:
            raise ValueError(f"training images are {images.shape[1:3]}, smaller than the {crop}px crop")
        self.images, self.batch_size, self.crop = images.astype(np.float32), batch_size, crop
        self.seed, self.flip, self.step = seed, flip, step

    def batch(self, step: int) -> Dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, step])
        n, h, w, _ = self.images.shape
        idx = rng.integers(0, n, self.batch_size)
        top = rng.integers(0, h - self.crop + 1, self.batch_size)
        left = rng.integers(0, w - self.crop + 1, self.batch_size)
        flips = rng.random(self.batch_size) < 0.5 if self.flip else np.zeros(self.batch_size, bool)
        hq = np.stack([self.images[i, y:y + self.crop, x:x + self.crop] for i, y, x in zip(idx, top, left)])
        hq = np.where(flips[:, None, None, None], hq[:, :, ::-1], hq)
        return {"hq": np.ascontiguousarray(hq, np.float32), "index": example_ids(step, self.batch_size)}

    def example_batch(self) -> Dict[str, np.ndarray]:
        return example_batch(HQ_ONLY_KEYS, self.batch_size, self.crop)

    def sample_hq(self, n: int) -> np.ndarray:
        """Fixed crops for the periodic sample restorations (a step no run reaches)."""
        return self.batch(2 ** 31 - 1)["hq"][:n]

    def __next__(self):
        out = self.batch(self.step)
        self.step += 1
        return out

    def get_state(self) -> Dict[str, Any]:
        return {"step": int(self.step)}

    def set_state(self, state: Dict[str, Any]) -> None:
        self.step = int(state["step"])


def load_training_images(config) -> np.ndarray:
    """HQ images for the in-memory source: scikit-image's photos ('skimage') or a folder."""
    size = context_crop.data_size(config)
    load = int(round(size * 1.5))
    kind = config.data.kind
    if kind == "skimage":
        from diffrestorer_jax.data import demo_photos  # never the held-out coffee / rocket
        return demo_photos.train_photos(load)
    if kind == "hq_folder":
        from diffrestorer_jax.data.image_io import ImageReadError, decode_image, read_image, square
        folder = paths.path(config.data.hq_dir) if config.data.hq_dir else None  # local or gs://...
        files = sorted((f for f in folder.iterdir() if f.name.lower().endswith(IMAGE_EXTENSIONS)),
                       key=lambda f: f.name) if folder is not None and folder.is_dir() else []
        images = []
        for f in files:
            try:  # a local file through read_image: a broken link, a folder or a FIFO is named, not opened
                image = decode_image(f.read_bytes(), str(f)) if paths.is_url(f) else read_image(f)
                images.append(square(image, load))
            except ImageReadError as e:
                logging.warning("skipping unreadable training image %s: %s", e.path, e.reason)
            except OSError as e:  # an object of a bucket gone or unreadable
                logging.warning("skipping unreadable training image %s: %s", f, e)
        if len(images) < len(files):
            print(f"{len(files) - len(images)} of {len(files)} images in {folder} could not be read and "
                  "are skipped (named in the warnings above)", flush=True)
        if not images:
            raise FileNotFoundError(f"config.data.hq_dir={config.data.hq_dir!r} holds no readable images "
                                    f"({', '.join(IMAGE_EXTENSIONS)})")
        return np.stack(images)
    raise DataConfigError(f"config.data.kind={kind!r}: use 'skimage', 'hq_folder' or 'tfds'")


class PipelineBatches:
    """The grain input pipeline as the loop's data: global batches placed with the step's shardings.

    Keys by dataset kinds: hq_folder {'hq', 'index'} (LQ synthesised in the step, the same program
    as the in-memory source); paired {'hq', 'lq', 'type_id', 'index'} (the stored LQ as given, no
    degradation ops compiled); a mixture adds 'has_lq' = type_id >= 0, so paired records keep their
    LQ and HQ-only ones are degraded on device. 'index' is `example_ids(step)`, laid out from the
    whole global array on every process, so ids never depend on how hosts split a batch.
    State: {'step', 'pipeline': grain's position of the next batch (device prefetch accounted)}.
    """

    def __init__(self, source, pipeline_config, keys, shardings=None, *, process_index=None,
                 process_count=None):
        self.source, self.pipeline_config, self.keys = source, pipeline_config, tuple(keys)
        self.batch_size, self.crop = int(pipeline_config.global_batch_size), int(pipeline_config.crop_size)
        self.shardings = shardings
        index = jax.process_index() if process_index is None else process_index
        count = jax.process_count() if process_count is None else process_count
        dataset = pl.build_dataset(source, pipeline_config, process_index=index, process_count=count)
        placed = None if shardings is None else {k: shardings[k] for k in self.keys if k != "index"}
        self.pipeline = pl.InputPipeline(dataset.map(self._select), placed, pipeline_config.device_prefetch)
        self.step = 0

    def _select(self, batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        out = {k: batch[k] for k in ("hq", "lq", "type_id") if k in self.keys}
        if "has_lq" in self.keys:
            out["has_lq"] = batch["type_id"] >= 0
        return out

    def __next__(self):
        batch = dict(next(self.pipeline))
        ids = {"index": example_ids(self.step, self.batch_size)}
        batch.update(ids if self.shardings is None else global_batch(ids, self.shardings))
        self.step += 1
        return batch

    def get_state(self) -> Dict[str, Any]:
        return {"step": int(self.step), "pipeline": self.pipeline.get_state()}

    def set_state(self, state: Dict[str, Any]) -> None:
        if "pipeline" not in state:
            raise DataConfigError(f"the checkpoint's data state {state} is not the grain pipeline's: "
                                  "was this run started with another config.data.kind?")
        self.step = int(state["step"])
        self.pipeline.set_state(state["pipeline"])

    def example_batch(self) -> Dict[str, np.ndarray]:
        return example_batch(self.keys, self.batch_size, self.crop)

    def sample_hq(self, n: int) -> np.ndarray:
        """Fixed crops for the periodic sample restorations: the first batch of the pipeline with
        another seed, read as one host (so every process gets the same)."""
        cfg = self.pipeline_config.copy_and_resolve_references()
        cfg.seed, cfg.device_prefetch, cfg.num_threads = cfg.seed + 1, 1, 1
        first = next(PipelineBatches(self.source, cfg, ("hq",), process_index=0, process_count=1))
        return np.asarray(first["hq"][:n])


def pipeline_config(config) -> ml_collections.ConfigDict:
    """The grain pipeline's settings from the run config (crop, global batch, seed, flip, threads)."""
    c = pl.default_pipeline_config()
    c.crop_size, c.global_batch_size = context_crop.data_size(config), int(config.train.batch_size)
    c.seed, c.flip = int(config.seed), bool(config.data.flip)
    c.num_threads, c.prefetch_buffer = int(config.data.num_threads), int(config.data.prefetch)
    c.device_prefetch = int(config.data.device_prefetch)
    return c


def tfds_source(config):
    """(source, kinds): the built dataset of config.data.tfds_kinds in tfds_dir, or a `Mixture`."""
    from diffrestorer_jax.data.tfds.build import load_source
    d = config.data
    kinds = [k.strip() for k in str(d.tfds_kinds).split(",") if k.strip()]
    if not kinds:
        raise DataConfigError("config.data.tfds_kinds is empty: name 'hq_folder', 'paired' or both "
                              "('hq_folder,paired')")
    if not d.tfds_dir:
        raise DataConfigError("config.data.kind='tfds' needs config.data.tfds_dir: the --out folder of "
                              "diffrestorer-build-dataset")
    try:
        sources = [load_source(str(d.tfds_dir), k, str(d.split)) for k in kinds]
    except (ValueError, FileNotFoundError) as e:
        raise DataConfigError(f"config.data (tfds_dir={d.tfds_dir!r}, tfds_kinds={d.tfds_kinds!r}): "
                              f"{e}") from None
    if len(sources) == 1:
        return sources[0], kinds
    try:
        weights = [float(w) for w in str(d.mix_weights).split(",")] if str(d.mix_weights).strip() else None
        return pl.Mixture(sources, weights), kinds
    except ValueError as e:
        raise DataConfigError(f"config.data.mix_weights={d.mix_weights!r} for tfds_kinds="
                              f"{d.tfds_kinds!r}: {e}") from None


def batch_keys(kinds) -> tuple:
    """The step's batch keys for these dataset kinds (see `PipelineBatches`)."""
    if set(kinds) == {"hq_folder"}:
        return HQ_ONLY_KEYS
    if set(kinds) == {"paired"}:
        return PAIRED_KEYS
    return MIXED_KEYS


def make_data(config, batch_layout: Optional[Callable[[Dict[str, np.ndarray]], Dict[str, Any]]] = None):
    """The loop's data for config.data.kind (see the module docstring).

    `batch_layout(example_batch) -> shardings`: the grain pipeline places its batches with these (the
    train run fixes them, so the compiled step gets the very same objects); without, it yields host
    numpy batches. The in-memory source always yields host batches.
    """
    b, size = int(config.train.batch_size), context_crop.data_size(config)
    if config.data.kind != "tfds":
        return StepIndexedImages(load_training_images(config), b, size, int(config.seed),
                                 bool(config.data.flip))
    source, kinds = tfds_source(config)
    keys = batch_keys(kinds)
    shardings = None if batch_layout is None else batch_layout(example_batch(keys, b, size))
    return PipelineBatches(source, pipeline_config(config), keys, shardings)
