"""The restorer: images of any size in, restored images out, in fixed-shape batches on this
process's devices (the restore and evaluate commands, the demo, the web app).

    restorer = Restorer.from_export(dir, Options(steps=20, batch_size=8))
    restorer.restore_images([img, ...], ids)     # arrays [H, W, 3] in [0, 1] -> [(restored, info)]

Images are padded into shape buckets (`buckets`: one compiled program per bucket) and their noise is
keyed by fold_in(PRNGKey(seed), image id), so an image's output does not depend on the other images
in its batch. The batch is split over the local devices (`program.restore_program`), and each device
restores its rows as one batch; with `Options(exact=True)` one at a time instead, and then an
image's output is identical, bit for bit, whatever the batch size or the number of devices (the
batched result equals it to float rounding). On several hosts each process restores its own files.

Weights are cast to the inference dtype (bfloat16 on TPU and GPU, float32 on CPU, unless asked) and
replicated on every device, or sharded over them when the replicated model would take more than
half of a device's memory (`choose_weights`); `placement_note()` says what was chosen and why.
"""
import dataclasses
import functools
import hashlib
import os
import time
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from diffrestorer_jax import paths
from diffrestorer_jax.data.degradations import DEGRADATION_TYPES
from diffrestorer_jax.diffusion import schedules
from diffrestorer_jax.infer import buckets
from diffrestorer_jax.infer.compile_cache import CompileClock
from diffrestorer_jax.infer.pipeline import Knobs, RestoreSettings, size_multiple
from diffrestorer_jax.infer.program import (COLOR_FIX_METHODS, WEIGHTS, cast_weights, place_weights,
                                            restore_program, weight_bytes)
from diffrestorer_jax.parallel.mesh import make_mesh
from diffrestorer_jax.parallel.sharding import replicated

SAMPLERS = ("ddim", "ddpm", "dpmpp_2m")
DTYPES = ("float32", "bfloat16")
DEFAULT_MAX_PIXELS = 8192 * 8192
GiB = 1024 ** 3


class RestoreError(Exception):
    """A foreseeable problem with the whole run (bad checkpoint, no inputs, bad option): a message."""


def path_image_id(relpath: str) -> int:
    """Stable id of a file from its '/'-separated path relative to the input root: the first 31 bits
    of the SHA-256 of its bytes as on disk (`os.fsencode`: UTF-8, and names that are not valid UTF-8
    too), so an output does not change when other files are added or removed."""
    rel = relpath.replace(os.sep, "/")
    return int.from_bytes(hashlib.sha256(os.fsencode(rel)).digest()[:4], "big") & 0x7FFFFFFF


@dataclasses.dataclass
class Options:
    """Everything that decides the outputs (None: the config's value) and how the work is spread."""
    seed: int = 0
    sampler: Optional[str] = None
    steps: Optional[int] = None
    strength: Optional[float] = None
    cfg: Optional[float] = None  # guidance scale; != 1 turns classifier-free guidance on
    eta: Optional[float] = None
    control_scale: Optional[float] = None
    fidelity: Optional[float] = None
    samples: int = 1  # posterior samples averaged per image (higher PSNR, softer detail, K x the time)
    color_fix: str = "none"  # none | wavelet | adain | auto (wavelet, never for haze / low light)
    tile: Optional[int] = None  # latent tile; None: the config's sampler.tile; 0: never tile
    tile_overlap: Optional[int] = None  # latent pixels; None: a quarter of the tile
    tile_batch: int = 4  # tiles per network call (memory: one chunk of tiles, whatever the image)
    batch_size: int = 1
    num_devices: Optional[int] = None  # None: all local devices
    exact: bool = False  # images one at a time: outputs bit-identical whatever the batch / devices
    dtype: Optional[str] = None  # weights and compute; None: bfloat16 on TPU/GPU, float32 on CPU
    weights: str = "auto"  # auto | replicated | sharded (see choose_weights)
    max_pixels: Optional[int] = DEFAULT_MAX_PIXELS  # larger input files are refused from their header


def default_dtype(platform: str) -> str:
    """bfloat16 where the hardware computes it natively (TPU, GPU); float32 on CPU, where bfloat16
    convolutions and matmuls are emulated and slower."""
    return "float32" if platform == "cpu" else "bfloat16"


def device_memory(device) -> Optional[int]:
    """Bytes a device's allocator may use (None where the backend does not say, e.g. the CPU)."""
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001  backends without memory stats raise various errors
        return None
    return int(stats["bytes_limit"]) if stats and stats.get("bytes_limit") else None


def choose_weights(asked: str, nbytes: int, memory: Optional[int], num_devices: int) -> Tuple[str, str]:
    """(placement, why). 'auto' replicates while the weights take at most half of one device's
    memory (the other half is for activations) and shards them over the devices beyond that."""
    if asked not in ("auto",) + WEIGHTS:
        raise RestoreError(f"--weights must be auto, {' or '.join(WEIGHTS)}, got {asked!r}")
    size = f"{nbytes / GiB:.2f} GiB of weights"
    room = "" if memory is None else f" of {memory / GiB:.1f} GiB"
    if asked != "auto":
        return asked, f"{size}, as asked"
    if memory is None:
        return "replicated", f"{size}; the device reports no memory limit"
    if nbytes <= memory / 2 or num_devices == 1:
        why = "at most half" if nbytes <= memory / 2 else "more than half, but one device has nothing to share with"
        return "replicated", f"{size} per device{room} ({why})"
    return "sharded", f"{size}, more than half{room} per device: split over {num_devices} devices"


def checkpoint_id(directory: str) -> str:
    """A short id of an export's contents (local or a URL): its config and the commit record of its
    parameters (rewritten by every save, with the commit time in ns), so outputs can tell which
    export made them."""
    h = hashlib.sha256()
    root = paths.path(directory)
    for name in ("config.json", "params/_CHECKPOINT_METADATA"):
        try:
            h.update((root / name).read_bytes())
        except OSError:
            h.update(b"-")
    return h.hexdigest()[:16]


def _stamp(directory: str):
    """Changes whenever the export is rewritten (save_export replaces config.json and params/). On
    local disk: the two entries' mtimes in ns. On a URL (gs://...) a folder has no mtime and an
    object's is in whole seconds, so the stamp is `checkpoint_id` instead: the contents of
    config.json and of Orbax's commit record, whose commit time (ns) changes with every save."""
    if paths.is_url(directory):
        return checkpoint_id(directory)
    root = paths.local(directory)
    return tuple(os.stat(os.path.join(root, n)).st_mtime_ns for n in ("config.json", "params"))


@functools.lru_cache(maxsize=1)
def _cached_export(directory: str, stamp) -> Tuple[Any, Any, Any]:
    """load_export, remembered per process for the last export (the demo and tests restore many times
    from one export; one, so a full-size model is never held twice). Read into host memory: the
    restorer casts and places the weights on the accelerators itself, and a float32 copy kept on
    the first device would take its memory from the batches."""
    del stamp
    from diffrestorer_jax import export
    return export.load_export(directory, device=_host_device())


def _host_device():
    try:
        return jax.devices("cpu")[0]
    except RuntimeError:  # JAX_PLATFORMS without cpu
        return jax.local_devices()[0]


class Restorer:
    """Restores images of any size in fixed-shape batches on this process's devices."""

    def __init__(self, config, nets, params, options: Options = Options(), source: str = ""):
        if options.color_fix not in COLOR_FIX_METHODS:
            raise RestoreError(f"--color-fix must be one of {', '.join(COLOR_FIX_METHODS)}, got {options.color_fix!r}")
        local = jax.local_devices()
        n = options.num_devices or len(local)
        if not 1 <= n <= len(local):
            raise RestoreError(f"{n} devices asked for, {len(local)} available")
        self.dtype = options.dtype or default_dtype(local[0].platform)
        if self.dtype not in DTYPES:
            raise RestoreError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if str(config.model.dtype) != self.dtype:  # the compute dtype is the networks' own
            config = config.copy_and_resolve_references()
            config.model.dtype = self.dtype
            from diffrestorer_jax.models.diffrestorer import build_networks
            nets = build_networks(config.model)
        self.config, self.nets, self.options, self.source = config, nets, options, source
        self.mesh = make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, local[:n])
        self.num_devices = n
        self.batch_size = buckets.round_batch(options.batch_size, n)
        self.multiple = size_multiple(nets)
        self._replicated = replicated(self.mesh)
        self._rows = NamedSharding(self.mesh, PartitionSpec("data"))
        params = cast_weights(params, self.dtype)
        self.weight_bytes = weight_bytes(params)
        self.weights, self._weights_why = choose_weights(options.weights, self.weight_bytes,
                                                         device_memory(local[0]), n)
        self.params = place_weights(params, self.mesh, self.weights)
        self.clock = CompileClock()  # compile (or cache-load) seconds of this restorer's batches
        self.run_seconds = 0.0  # wall time of its batches, compilation included
        self.first_result_at: Optional[float] = None  # time.perf_counter() when the first batch was done
        self.schedule = schedules.from_config(config.diffusion)
        self.key = jax.device_put(jax.random.PRNGKey(int(options.seed)), self._replicated)
        self.base_settings, self.knobs = self._resolve(options)
        self.latent_tile = self._latent_tile(options)
        self.tile_overlap = options.tile_overlap if options.tile_overlap is not None else max(1, self.latent_tile // 4)
        if self.latent_tile and not 0 <= self.tile_overlap < self.latent_tile:  # before any image is read
            raise RestoreError(f"--tile-overlap {self.tile_overlap} must be at least 0 and smaller than the "
                               f"tile {self.latent_tile} (latent pixels)")

    @classmethod
    def from_export(cls, directory: str, options: Options = Options(), overrides: Mapping[str, Any] = None):
        """A restorer for an export directory; `overrides` {'sampler.eta': 0.5, ...} change its
        config first (a `model.*` override rebuilds the networks: dtype, attention, not shapes)."""
        from diffrestorer_jax import export
        from diffrestorer_jax.models.diffrestorer import build_networks
        overrides = dict(overrides or {})
        try:
            config = export.load_config(directory)
        except (FileNotFoundError, NotADirectoryError, ValueError, OSError) as e:
            raise RestoreError(f"--checkpoint {directory}: {e}") from None
        source = str(paths.path(directory))  # a URL as given, a local path absolute
        try:
            _, nets, params = _cached_export(source, _stamp(source))
        except Exception as e:  # noqa: BLE001  orbax/tensorstore raise many types for a damaged export
            raise RestoreError(f"--checkpoint {directory}: cannot load the parameters "
                               f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        try:
            config.update_from_flattened_dict(overrides)
        except (KeyError, TypeError, AttributeError) as e:
            raise RestoreError(f"config overrides {overrides}: {e}") from None
        if any(k.startswith("model.") for k in overrides):
            nets = build_networks(config.model)
        if options.dtype is None and "model.dtype" in overrides:  # --config.model.dtype asks for one too
            options = dataclasses.replace(options, dtype=str(overrides["model.dtype"]))
        return cls(config, nets, params, options, source=source)

    def _resolve(self, o: Options) -> Tuple[RestoreSettings, Knobs]:
        c = self.config
        pick = lambda given, default: default if given is None else given  # noqa: E731
        guidance = float(pick(o.cfg, c.sampler.guidance_scale))
        settings = RestoreSettings(
            sampler=str(pick(o.sampler, c.sampler.name)), steps=int(pick(o.steps, c.sampler.steps)),
            strength=float(pick(o.strength, c.sampler.strength)), use_cfg=guidance != 1.0,
            context_mode=str(c.model.control.context), samples=int(o.samples),
            tile_batch=int(o.tile_batch), batch_mode="exact" if o.exact else "batched")
        knobs = Knobs(guidance_scale=guidance,
                      control_scale=float(pick(o.control_scale, c.model.control.control_scale)),
                      fidelity_weight=float(pick(o.fidelity, c.model.decoder.fidelity_weight)),
                      eta=float(pick(o.eta, c.sampler.eta)))
        if settings.sampler not in SAMPLERS:
            raise RestoreError(f"--sampler must be {', '.join(SAMPLERS)}, got {settings.sampler!r}")
        if settings.samples < 1:
            raise RestoreError(f"--samples must be >= 1, got {settings.samples}")
        if settings.tile_batch < 1:
            raise RestoreError(f"--tile-batch must be >= 1, got {settings.tile_batch}")
        if o.max_pixels is not None and o.max_pixels < 1:
            raise RestoreError(f"--max-pixels must be >= 1, got {o.max_pixels}")
        if settings.steps < 1 or not 0 < settings.strength <= 1:
            raise RestoreError(f"--steps must be >= 1 and --strength in (0, 1], got {settings.steps}, {settings.strength}")
        return settings, knobs

    def _latent_tile(self, o: Options) -> int:
        """0 = never tile; else the latent tile (a multiple of the UNet's downsampling): the given one,
        else the config's `sampler.tile`, else (-1, also what `export.load_config` gives exports written
        before the key) the training size over the VAE factor."""
        step = self.multiple // self.nets.vae_factor
        given = o.tile is not None
        tile = int(o.tile) if given else int(self.config.sampler.tile)
        source = "--tile" if given else "the checkpoint's sampler.tile"
        if tile < (0 if given else -1):
            raise RestoreError(f"{source} {tile} must be >= 0 (0: never tile)")
        if tile >= 0:
            if tile and tile % step:
                raise RestoreError(f"{source} {tile} must be a multiple of {step} (latent pixels)")
            return tile
        native = int(self.config.image_size) // self.nets.vae_factor
        return max(step, native // step * step)

    def settings_for(self, bucket: buckets.Bucket) -> RestoreSettings:
        """The bucket's program: tiled when its latent is larger than the tile."""
        f = self.nets.vae_factor
        tile = self.latent_tile
        if tile and max(bucket) // f > tile:  # tile_overlap < tile: checked in __init__
            return dataclasses.replace(self.base_settings, tile=tile, tile_overlap=self.tile_overlap)
        return self.base_settings

    def bucket(self, height: int, width: int) -> buckets.Bucket:
        return buckets.bucket_for(height, width, self.multiple)

    def describe(self) -> Dict[str, Any]:
        """The settings that decide every output (for sidecars and metrics.json)."""
        return {"seed": int(self.options.seed), "settings": dataclasses.asdict(self.base_settings),
                "knobs": {k: float(v) for k, v in dataclasses.asdict(self.knobs).items()},
                "color_fix": self.options.color_fix, "latent_tile": self.latent_tile,
                "tile_overlap": self.tile_overlap, "batch_size": self.batch_size,
                "num_devices": self.num_devices, "dtype": self.dtype, "weights": self.weights,
                "checkpoint": self.source, "checkpoint_id": checkpoint_id(self.source) if self.source else ""}

    def placement_note(self) -> str:
        """One line for the console: dtype, where the weights are and why, the batch mode."""
        mode = "exact (one image at a time)" if self.options.exact else "batched"
        return (f"{self.dtype} weights, {self.weights} on {self.num_devices} {self.mesh.devices.flat[0].platform} "
                f"device(s) ({self._weights_why}); {mode}, batch {self.batch_size}")

    def program(self, settings: RestoreSettings):
        """The jitted program of a bucket's settings (compiled on first use, once per bucket shape)."""
        return restore_program(self.nets, settings, self.options.color_fix, self.mesh, self.weights)

    def restore_batch(self, batch: np.ndarray, ids: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """[B, H, W, 3] (B = batch_size, H, W a bucket) -> (images, type probabilities, colour fixed?)."""
        start = time.perf_counter()
        with self.clock:
            program = self.program(self.settings_for(batch.shape[1:3]))
            lq = jax.device_put(np.asarray(batch, np.float32), self._rows)
            image_ids = jax.device_put(np.asarray(ids, np.int32), self._rows)
            images, probs, fixed = program(self.params, lq, self.key, self.schedule, self.knobs, image_ids)
            out = np.asarray(images), np.asarray(probs), np.asarray(fixed)
        self.run_seconds += time.perf_counter() - start
        if self.first_result_at is None:
            self.first_result_at = time.perf_counter()
        return out

    def restore_stream(self, items: Iterable[Tuple[Any, np.ndarray, int]], on_error: str = "raise"
                       ) -> Iterator[Tuple[Any, Optional[np.ndarray], Dict]]:
        """(tag, image [H, W, 3], image id) -> (tag, restored [H, W, 3], info), batched per bucket
        (at most one partly filled batch per bucket is held); results come when a batch is full.

        A batch that fails (out of device memory, anything unexpected) raises a RestoreError with
        `on_error='raise'`; with 'yield' its images come out as (tag, None, {'error': reason}) and
        the stream goes on with the next batch."""
        queues: Dict[buckets.Bucket, List] = {}
        for item in items:
            image = item[1]
            b = self.bucket(*image.shape[:2])
            queue = queues.setdefault(b, [])
            queue.append(item)
            if len(queue) == self.batch_size:
                yield from self._flush(b, queue, on_error)
                queues[b] = []
        for b, queue in sorted(queues.items()):
            if queue:
                yield from self._flush(b, queue, on_error)

    def _flush(self, bucket, queue, on_error="raise"):
        batch, n = buckets.fill_batch([buckets.pad_to(img, bucket) for _, img, _ in queue], self.batch_size)
        ids = np.array([i for _, _, i in queue] + [queue[0][2]] * (self.batch_size - n), np.int64)
        try:
            images, probs, fixed = self.restore_batch(batch, ids)
        except Exception as e:  # noqa: BLE001  XLA, out-of-memory and anything else: this batch fails
            reason = _batch_error(e, bucket, self.batch_size)
            if on_error != "yield":
                raise RestoreError(reason) from e
            for tag, _, _ in queue:
                yield tag, None, {"error": reason}
            return
        settings = self.settings_for(bucket)
        for k, (tag, img, image_id) in enumerate(queue):
            p = probs[k].astype(float)
            info = {"image_id": int(image_id), "size": list(img.shape[:2]), "bucket": list(bucket),
                    "tile": settings.tile, "color_fix_applied": bool(fixed[k]),
                    "type_probs": {name: float(v) for name, v in zip(DEGRADATION_TYPES, p)},
                    "predicted_type": DEGRADATION_TYPES[int(np.argmax(p))]}
            yield tag, buckets.crop_to(images[k], img.shape[:2]), info

    def restore_images(self, images: Sequence[np.ndarray], ids: Optional[Sequence[int]] = None):
        """In-memory images (any sizes) -> [(restored, info)] in the given order."""
        ids = range(len(images)) if ids is None else ids
        results = {tag: (img, info) for tag, img, info in
                   self.restore_stream((k, np.asarray(x, np.float32), int(i)) for k, (x, i) in enumerate(zip(images, ids)))}
        return [results[k] for k in range(len(images))]


def _batch_error(e: Exception, bucket, batch_size: int) -> str:
    """One readable line for a failed batch (the first line of the error, and what to try)."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    reason = f"restoring a batch of {batch_size} at {bucket[0]}x{bucket[1]} failed ({type(e).__name__}: {text[:300]})"
    if "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower():
        reason += "; try a smaller --batch-size or --tile"
    return reason
