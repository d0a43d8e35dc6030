"""Batch restoration driver: files or arrays in, restored images out (the CLI, evaluation, the demo).

    restorer = Restorer.from_export(dir, Options(...), overrides)   # or Restorer(config, nets, params, ...)
    restorer.restore_images([img, ...], ids)       # arrays [H, W, 3] in [0, 1], any sizes
    restore_files(restorer, find_inputs(spec), out_dir)   # one PNG + one JSON sidecar per input file

Image ids and reproducibility. An image's noise is keyed by fold_in(PRNGKey(seed), image_id), and its
padded size depends only on its own size (`buckets`), so its output is identical, bit for bit, whatever
the batch size, the order of the files, the other images in its batch, or the number of devices. The
id of a file is `path_image_id(path relative to the input root)`: the first 31 bits of the SHA-256 of
that '/'-separated path. The input root is the folder for `--input DIR`, the file's folder for
`--input FILE`, and the glob's directory part for `--input 'DIR/*.jpg'`, so `--input photos` and
`--input photos/a.png` give a.png the same id. A hash (rather than the index in sorted order) keeps
an image's output unchanged when other files are added to or removed from the folder.

Parallelism. The batch is split over this process's local devices (shard_map over the 'data' axis of a mesh from
`make_mesh`); the batch size is rounded up to a multiple of their count. On several hosts each
process takes every process_count-th file of the sorted list and restores it on its own devices; no
step needs the other hosts, so the same command runs on every host of a pod slice.
"""
import ast
import dataclasses
import functools
import glob as globlib
import hashlib
import json
import os
import sys
import tempfile
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from diffrestorer_jax.data.image_io import ImageReadError, read_image, write_png
from diffrestorer_jax.diffusion import schedules
from diffrestorer_jax.infer import buckets
from diffrestorer_jax.infer.colorfix import DEGRADATION_TYPES, color_fix, should_color_fix
from diffrestorer_jax.infer.pipeline import Knobs, RestoreSettings, restore, size_multiple
from diffrestorer_jax.parallel.mesh import make_mesh
from diffrestorer_jax.parallel.sharding import replicated

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".gif")
COLOR_FIX_METHODS = ("none", "wavelet", "adain", "auto")


class RestoreError(Exception):
    """A foreseeable problem with the whole run (bad checkpoint, no inputs, bad option): a message."""


def path_image_id(relpath: str) -> int:
    """Stable id of a file from its path relative to the input root."""
    rel = relpath.replace(os.sep, "/")
    return int.from_bytes(hashlib.sha256(rel.encode("utf-8")).digest()[:4], "big") & 0x7FFFFFFF


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
    tile: Optional[int] = None  # latent tile; None: config.image_size // vae factor; 0: never tile
    tile_overlap: Optional[int] = None  # latent pixels; None: a quarter of the tile
    batch_size: int = 1
    num_devices: Optional[int] = None  # None: all local devices


def add_options(parser) -> None:
    """The restoration flags shared by launch/restore.py and launch/evaluate.py."""
    p = parser
    p.add_argument("--steps", type=int, help="sampler steps (default: config.sampler.steps)")
    p.add_argument("--sampler", choices=("ddim", "ddpm", "dpmpp_2m"), help="default: config.sampler.name")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=1, help="rounded up to a multiple of the device count")
    p.add_argument("--devices", type=int, help="use the first N local devices (default: all)")
    p.add_argument("--tile", type=int, help="latent tile size, used for images larger than it (default: "
                   "the config's training size / VAE factor; 0: never tile)")
    p.add_argument("--tile-overlap", type=int, help="latent pixels (default: a quarter of the tile)")
    p.add_argument("--color-fix", default="none", choices=COLOR_FIX_METHODS,
                   help="auto: wavelet, except for images predicted hazy or low-light")
    p.add_argument("--fidelity", type=float, help="decoder fidelity weight w (default: config)")
    p.add_argument("--control-scale", type=float, help="default: config.model.control.control_scale")
    p.add_argument("--cfg", type=float, help="classifier-free guidance scale (1: off; default: config)")
    p.add_argument("--eta", type=float, help="DDIM eta (default: config.sampler.eta)")
    p.add_argument("--strength", type=float, help="< 1: start from the noised LQ latent")
    p.add_argument("--samples", type=int, default=1,
                   help="posterior samples averaged per image: more fidelity (PSNR), less generated "
                        "detail, K times the sampling time (default: 1)")


def options_from_args(args) -> "Options":
    return Options(seed=args.seed, sampler=args.sampler, steps=args.steps, strength=args.strength,
                   cfg=args.cfg, eta=args.eta, control_scale=args.control_scale, fidelity=args.fidelity,
                   samples=args.samples, color_fix=args.color_fix, tile=args.tile, tile_overlap=args.tile_overlap,
                   batch_size=args.batch_size, num_devices=args.devices)


# ----------------------------------------------------------------------------------------- config
def _get(config, path: str, default):
    node = config
    for part in path.split("."):
        try:
            node = node[part]
        except (KeyError, TypeError, AttributeError):
            return default
    return default if node is None else node


def make_schedule(config) -> schedules.Schedule:
    return schedules.make_schedule(
        _get(config, "diffusion.schedule", "scaled_linear"), int(_get(config, "diffusion.num_train_timesteps", 1000)),
        float(_get(config, "diffusion.beta_start", 0.00085)), float(_get(config, "diffusion.beta_end", 0.012)),
        _get(config, "diffusion.prediction_type", "epsilon"),
        bool(_get(config, "diffusion.rescale_zero_terminal_snr", False)))


def parse_overrides(args: Sequence[str]) -> List[Tuple[str, Any]]:
    """['--config.a.b=3', ...] -> [('a.b', 3), ...]; values as Python literals, else strings."""
    out = []
    for arg in args:
        if not arg.startswith("--config.") or "=" not in arg:
            raise RestoreError(f"unrecognised argument {arg!r} (config overrides are --config.path=value)")
        key, text = arg[len("--config."):].split("=", 1)
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        out.append((key, value))
    return out


def apply_overrides(config, overrides: Sequence[Tuple[str, Any]]):
    """Set dotted config fields; an unknown field or a wrong type is a RestoreError naming it."""
    for key, value in overrides:
        *parents, leaf = key.split(".")
        node = config
        try:
            for p in parents:
                node = node[p]
            if leaf not in node:
                raise KeyError(leaf)
            node[leaf] = value
        except (KeyError, TypeError, AttributeError) as e:
            raise RestoreError(f"--config.{key}={value!r}: {'no such config field' if isinstance(e, KeyError) else e}") from None
    return config


# ----------------------------------------------------------------------------------------- restorer
@functools.lru_cache(maxsize=64)
def _program(nets, settings: RestoreSettings, color_method: str, mesh):
    """restore + colour fix for one bucket's settings, as one SPMD program over the mesh's 'data'
    axis (shard_map): every device runs the single-device program on its own rows, so a row's result
    cannot depend on the device count and no step communicates. Remembered per process, so later
    Restorers with the same networks, settings and devices reuse the compiled programs."""
    def body(params, lq, key, schedule, knobs, ids):
        out = restore(nets, params, lq, key, schedule, settings, knobs, image_ids=ids)
        images, probs = out["image"], out["type_probs"]
        if color_method == "none":
            fixed = jnp.zeros(lq.shape[0], bool)
        elif color_method == "auto":
            images = color_fix(images, lq, "wavelet", probs)
            fixed = should_color_fix(probs)
        else:
            images = color_fix(images, lq, color_method)
            fixed = jnp.ones(lq.shape[0], bool)
        return images, probs, fixed

    body.__name__ = "restore_bucket"  # what CompileCounter("restore_bucket") counts
    rows, rep = PartitionSpec("data"), PartitionSpec()
    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(rep, rows, rep, rep, rep, rows),
                                 out_specs=(rows, rows, rows), check_vma=False))


def _stamp(directory: str):
    """Changes whenever the export is rewritten (save_export replaces config.json and params/)."""
    return tuple(os.stat(os.path.join(directory, n)).st_mtime_ns for n in ("config.json", "params"))


@functools.lru_cache(maxsize=1)
def _load_export(directory: str, stamp) -> Tuple[Any, Any, Any]:
    """load_export, remembered per process for the last export (the demo and tests restore many times
    from one export; one, so a full-size model is never held twice)."""
    del stamp
    from diffrestorer_jax.train import export
    return export.load_export(directory)


class Restorer:
    """Restores images of any size in fixed-shape batches on this process's devices."""

    def __init__(self, config, nets, params, options: Options = Options(), source: str = ""):
        if options.color_fix not in COLOR_FIX_METHODS:
            raise RestoreError(f"--color-fix must be one of {', '.join(COLOR_FIX_METHODS)}, got {options.color_fix!r}")
        local = jax.local_devices()
        n = options.num_devices or len(local)
        if not 1 <= n <= len(local):
            raise RestoreError(f"{n} devices asked for, {len(local)} available")
        self.config, self.nets, self.options, self.source = config, nets, options, source
        self.mesh = make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, local[:n])
        self.num_devices = n
        self.batch_size = buckets.round_batch(options.batch_size, n)
        self.multiple = size_multiple(nets)
        self._replicated = replicated(self.mesh)
        self._rows = NamedSharding(self.mesh, PartitionSpec("data"))
        self._programs: Dict[RestoreSettings, Any] = {}
        self.params = jax.device_put(params, self._replicated)
        self.schedule = make_schedule(config)
        self.key = jax.device_put(jax.random.PRNGKey(int(options.seed)), self._replicated)
        self.base_settings, self.knobs = self._resolve(options)
        self.latent_tile = self._latent_tile(options)
        self.tile_overlap = options.tile_overlap if options.tile_overlap is not None else max(1, self.latent_tile // 4)

    @classmethod
    def from_export(cls, directory: str, options: Options = Options(), overrides: Sequence[Tuple[str, Any]] = ()):
        from diffrestorer_jax.models.diffrestorer import build_networks
        from diffrestorer_jax.train import export
        try:
            config = export.load_config(directory)
        except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, OSError) as e:
            raise RestoreError(f"--checkpoint {directory}: {e}") from None
        try:
            _, nets, params = _load_export(os.path.abspath(directory), _stamp(directory))
        except Exception as e:  # noqa: BLE001  orbax/tensorstore raise many types for a damaged export
            raise RestoreError(f"--checkpoint {directory}: cannot load the parameters "
                               f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        apply_overrides(config, overrides)
        if any(k.startswith("model.") for k, _ in overrides):
            nets = build_networks(config.model)  # dtype / attention changes; parameter shapes must not change
        return cls(config, nets, params, options, source=os.path.abspath(directory))

    def _resolve(self, o: Options) -> Tuple[RestoreSettings, Knobs]:
        c = self.config
        guidance = float(o.cfg if o.cfg is not None else _get(c, "sampler.guidance_scale", 1.0))
        settings = RestoreSettings(
            sampler=o.sampler or _get(c, "sampler.name", "ddim"),
            steps=int(o.steps if o.steps is not None else _get(c, "sampler.steps", 50)),
            strength=float(o.strength if o.strength is not None else _get(c, "sampler.strength", 1.0)),
            use_cfg=guidance != 1.0, context_mode=_get(c, "model.control.context", "degradation"),
            samples=int(o.samples))
        knobs = Knobs(guidance_scale=guidance,
                      control_scale=float(o.control_scale if o.control_scale is not None
                                          else _get(c, "model.control.control_scale", 1.0)),
                      fidelity_weight=float(o.fidelity if o.fidelity is not None
                                            else _get(c, "model.decoder.fidelity_weight", 1.0)),
                      eta=float(o.eta if o.eta is not None else _get(c, "sampler.eta", 0.0)))
        if settings.sampler not in ("ddim", "ddpm", "dpmpp_2m"):
            raise RestoreError(f"--sampler must be ddim, ddpm or dpmpp_2m, got {settings.sampler!r}")
        if settings.samples < 1:
            raise RestoreError(f"--samples must be >= 1, got {settings.samples}")
        if settings.steps < 1 or not 0 < settings.strength <= 1:
            raise RestoreError(f"--steps must be >= 1 and --strength in (0, 1], got {settings.steps}, {settings.strength}")
        return settings, knobs

    def _latent_tile(self, o: Options) -> int:
        """0 = never tile; else the latent tile (a multiple of the UNet's downsampling)."""
        step = self.multiple // self.nets.vae_factor
        if o.tile is not None:
            if o.tile and o.tile % step:
                raise RestoreError(f"--tile {o.tile} must be a multiple of {step} (latent pixels)")
            return int(o.tile)
        native = int(_get(self.config, "image_size", 512)) // self.nets.vae_factor
        return max(step, native // step * step)

    def settings_for(self, bucket: buckets.Bucket) -> RestoreSettings:
        """The bucket's program: tiled when its latent is larger than the tile."""
        f = self.nets.vae_factor
        tile = self.latent_tile
        if tile and max(bucket) // f > tile:
            if not 0 <= self.tile_overlap < tile:
                raise RestoreError(f"--tile-overlap {self.tile_overlap} must be smaller than the tile {tile}")
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
                "num_devices": self.num_devices, "checkpoint": self.source}

    def program(self, settings: RestoreSettings):
        """The jitted program of a bucket's settings (compiled on first use, once per bucket shape)."""
        if settings not in self._programs:
            self._programs[settings] = _program(self.nets, settings, self.options.color_fix, self.mesh)
        return self._programs[settings]

    def compile_count(self) -> int:
        """Programs compiled so far (one per bucket shape)."""
        return sum(p._cache_size() for p in self._programs.values())

    def restore_batch(self, batch: np.ndarray, ids: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """[B, H, W, 3] (B = batch_size, H, W a bucket) -> (images, type probabilities, colour fixed?)."""
        program = self.program(self.settings_for(batch.shape[1:3]))
        lq = jax.device_put(np.asarray(batch, np.float32), self._rows)
        image_ids = jax.device_put(np.asarray(ids, np.int32), self._rows)
        images, probs, fixed = program(self.params, lq, self.key, self.schedule, self.knobs, image_ids)
        return np.asarray(images), np.asarray(probs), np.asarray(fixed)

    def restore_stream(self, items: Iterable[Tuple[Any, np.ndarray, int]]) -> Iterator[Tuple[Any, np.ndarray, Dict]]:
        """(tag, image [H, W, 3], image id) -> (tag, restored [H, W, 3], info), batched per bucket
        (at most one partly filled batch per bucket is held); results come when a batch is full."""
        queues: Dict[buckets.Bucket, List] = {}
        for item in items:
            image = item[1]
            b = self.bucket(*image.shape[:2])
            queue = queues.setdefault(b, [])
            queue.append(item)
            if len(queue) == self.batch_size:
                yield from self._flush(b, queue)
                queues[b] = []
        for b, queue in sorted(queues.items()):
            if queue:
                yield from self._flush(b, queue)

    def _flush(self, bucket, queue):
        batch, n = buckets.fill_batch([buckets.pad_to(img, bucket) for _, img, _ in queue], self.batch_size)
        ids = np.array([i for _, _, i in queue] + [queue[0][2]] * (self.batch_size - n), np.int64)
        images, probs, fixed = self.restore_batch(batch, ids)
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


# ----------------------------------------------------------------------------------------- files
@dataclasses.dataclass
class InputSet:
    root: str
    files: List[str]  # sorted, absolute


_GLOB_CHARS = "*?["


def find_inputs(spec: str) -> InputSet:
    """FILE, DIR (recursive, image extensions, hidden files skipped) or GLOB -> InputSet."""
    spec = os.path.expanduser(spec)
    if os.path.isdir(spec):
        root = spec
        files = [os.path.join(d, f) for d, _, fs in os.walk(spec) for f in fs
                 if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)]
        if not files:
            raise RestoreError(f"--input {spec}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in this folder")
    elif os.path.exists(spec):
        root, files = os.path.dirname(spec) or ".", [spec]
    elif any(c in spec for c in _GLOB_CHARS):
        files = [p for p in globlib.glob(spec, recursive=True) if os.path.isfile(p)]
        if not files:
            raise RestoreError(f"--input {spec}: the pattern matches no files")
        parts = spec.replace(os.sep, "/").split("/")
        fixed = []
        for part in parts:
            if any(c in part for c in _GLOB_CHARS):
                break
            fixed.append(part)
        root = "/".join(fixed) or "."
    else:
        raise RestoreError(f"--input {spec}: no such file or folder")
    root = os.path.abspath(root)
    return InputSet(root, sorted(os.path.abspath(f) for f in files))


def output_paths(inputs: InputSet, out_dir: str) -> Dict[str, str]:
    """Input -> output PNG: same relative path and name, extension .png; where two inputs would
    collide (a.jpg, a.png) both keep their extension in the name (a.jpg.png, a.png.png)."""
    rel = {f: os.path.relpath(f, inputs.root) for f in inputs.files}
    stem = {f: os.path.splitext(r)[0] for f, r in rel.items()}
    counts: Dict[str, int] = {}
    for s in stem.values():
        counts[s] = counts.get(s, 0) + 1
    return {f: os.path.join(out_dir, (stem[f] if counts[stem[f]] == 1 else rel[f]) + ".png") for f in inputs.files}


def sidecar_path(png_path: str) -> str:
    return os.path.splitext(png_path)[0] + ".json"


def _write_json(path: str, data) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp_", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


@dataclasses.dataclass
class Summary:
    written: List[str] = dataclasses.field(default_factory=list)
    skipped: List[str] = dataclasses.field(default_factory=list)  # outputs already there
    failed: List[Tuple[str, str]] = dataclasses.field(default_factory=list)  # (input, reason)


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def restore_files(restorer: Restorer, inputs: InputSet, out_dir: str, *, overwrite: bool = False,
                  progress: bool = True, extra: Optional[Dict[str, Any]] = None,
                  process_index: Optional[int] = None, process_count: Optional[int] = None,
                  log: Callable[[str], None] = _stderr) -> Summary:
    """Restore this process's share of `inputs` into `out_dir` (PNG + JSON sidecar per image).
    A file that cannot be read or written is logged (one line naming it and why) and skipped."""
    from tqdm import tqdm
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    out_root = os.path.join(os.path.abspath(out_dir), "")
    inside = [f for f in inputs.files if f.startswith(out_root)]
    if inside:  # --output inside --input: earlier outputs are not inputs
        log(f"ignoring {len(inside)} input file(s) inside the output folder {out_dir}")
        inputs = InputSet(inputs.root, [f for f in inputs.files if not f.startswith(out_root)])
    outputs = output_paths(inputs, os.path.abspath(out_dir))
    summary = Summary()
    todo = []
    for f in inputs.files[pi::pc]:
        if not overwrite and os.path.exists(outputs[f]) and os.path.exists(sidecar_path(outputs[f])):
            summary.skipped.append(outputs[f])
        else:
            todo.append(f)
    if summary.skipped:
        log(f"{len(summary.skipped)} output(s) already exist, skipped (--overwrite redoes them)")
    bar = tqdm(total=len(todo), unit="img", desc="restoring", disable=not progress, file=sys.stderr)
    say = (lambda m: bar.write(m, file=sys.stderr)) if progress else log

    def fail(path, reason):
        summary.failed.append((path, reason))
        say(f"error: {path}: {reason}")
        bar.update(1)

    def items():
        for f in todo:
            try:
                image = read_image(f)
            except ImageReadError as e:
                fail(f, e.reason)
                continue
            rel = os.path.relpath(f, inputs.root)
            yield f, image, path_image_id(rel)

    common = restorer.describe()
    for f, image, info in restorer.restore_stream(items()):
        out = outputs[f]
        record = {"input": f, "relative_path": os.path.relpath(f, inputs.root).replace(os.sep, "/"),
                  "output": out, **info, **common, **(extra or {})}
        try:
            write_png(out, image)
            _write_json(sidecar_path(out), record)
        except OSError as e:
            fail(f, f"cannot write {out}: {e.strerror or e}")
            continue
        summary.written.append(out)
        bar.update(1)
    bar.close()
    return summary
