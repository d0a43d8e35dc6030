"""The restoration flags shared by diffrestorer-restore and diffrestorer-evaluate, and their
`--config.path=value` overrides of the export's config (ml_collections' config_flags, the mechanism
diffrestorer-train uses, typed against the base config's fields)."""
import argparse
from typing import Any, Dict, Sequence

from absl import flags
from ml_collections import config_flags

from diffrestorer_jax.config_base import base_config
from diffrestorer_jax.infer import compile_cache
from diffrestorer_jax.infer.program import COLOR_FIX_METHODS
from diffrestorer_jax.infer.restorer import DEFAULT_MAX_PIXELS, DTYPES, SAMPLERS, Options, RestoreError


def add_options(parser: argparse.ArgumentParser) -> None:
    p = parser
    p.add_argument("--steps", type=int, help="sampler steps (default: config.sampler.steps)")
    p.add_argument("--sampler", choices=SAMPLERS, help="default: config.sampler.name")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=1, help="rounded up to a multiple of the device count")
    p.add_argument("--exact", action="store_true",
                   help="restore the images of a batch one at a time: an image's output is then the "
                        "same bit for bit whatever the batch size or device count (slower; the default "
                        "batched mode equals it to float rounding)")
    p.add_argument("--dtype", choices=DTYPES, help="weights and compute (default: bfloat16 on TPU/GPU, "
                   "float32 on CPU)")
    p.add_argument("--weights", default="auto", choices=("auto", "replicated", "sharded"),
                   help="replicate the weights on every device or shard them over the devices (auto: "
                        "shard only when they would take more than half of a device's memory)")
    p.add_argument("--devices", type=int, help="use the first N local devices (default: all)")
    p.add_argument("--tile", type=int, help="latent tile size, used for images larger than it (default: "
                   "the checkpoint's sampler.tile, else its training size / VAE factor; 0: never tile)")
    p.add_argument("--tile-overlap", type=int, help="latent pixels (default: a quarter of the tile)")
    p.add_argument("--tile-batch", type=int, default=4,
                   help="tiles per network call: memory holds this many tiles' work, whatever the image "
                        "size (default: 4)")
    p.add_argument("--color-fix", default="none", choices=COLOR_FIX_METHODS,
                   help="auto: wavelet, except for images predicted hazy or low-light")
    p.add_argument("--fidelity", type=float, help="decoder fidelity weight w (default: config)")
    p.add_argument("--control-scale", type=float, help="default: config.model.control.control_scale")
    p.add_argument("--cfg", type=float, help="classifier-free guidance scale (1: off; default: config)")
    p.add_argument("--eta", type=float, help="DDIM eta (default: config.sampler.eta)")
    p.add_argument("--strength", type=float, help="< 1: start from the noised LQ latent")
    p.add_argument("--compile-cache", metavar="DIR",
                   help="JAX's persistent compilation cache: a second run of the same command loads its "
                        "programs from here instead of compiling them ('off' to disable; default: "
                        f"${compile_cache.ENV} or {compile_cache.default_folder()})")
    p.add_argument("--samples", type=int, default=1,
                   help="posterior samples averaged per image: more fidelity (PSNR), less generated "
                        "detail, K times the sampling time (default: 1)")


def enable_compile_cache(args):
    """Turn JAX's persistent compilation cache on as the flags say (before anything compiles); the
    folder, or None when it is off."""
    try:
        return compile_cache.enable(compile_cache.cache_folder(args.compile_cache))
    except OSError as e:
        raise RestoreError(f"--compile-cache: cannot use {e.filename}: {e.strerror}") from None


def timing_line(restorer, start: float, cache) -> str:
    """Compile vs restore time of a run, and when its first image was done (seconds since `start`,
    a time.perf_counter() at the command's start)."""
    clock = restorer.clock
    where = f"{clock.cache_hits} loaded from the cache {cache}" if cache else "the compilation cache is off"
    first = ("" if restorer.first_result_at is None
             else f"; first image {restorer.first_result_at - start:.1f} s after start")
    return (f"time: compiling {clock.seconds:.1f} s (tracing and lowering {clock.seconds - clock.backend_seconds:.1f} s, "
            f"XLA {clock.backend_seconds:.1f} s: {clock.programs} program(s), {where}), restoring "
            f"{restorer.run_seconds - clock.seconds:.1f} s{first}")


def options_from_args(args) -> Options:
    return Options(seed=args.seed, sampler=args.sampler, steps=args.steps, strength=args.strength,
                   cfg=args.cfg, eta=args.eta, control_scale=args.control_scale, fidelity=args.fidelity,
                   samples=args.samples, color_fix=args.color_fix, tile=args.tile,
                   tile_overlap=args.tile_overlap, tile_batch=args.tile_batch, batch_size=args.batch_size,
                   num_devices=args.devices, exact=args.exact, dtype=args.dtype, weights=args.weights,
                   max_pixels=getattr(args, "max_pixels", DEFAULT_MAX_PIXELS))


def parse_overrides(args: Sequence[str]) -> Dict[str, Any]:
    """['--config.sampler.eta=0.5', ...] -> {'sampler.eta': 0.5}; anything else is a RestoreError."""
    argv = ["diffrestorer", *args]
    values = flags.FlagValues()
    try:  # the flag reads the overrides from `argv` as it is defined, then parses them
        config_flags.DEFINE_config_dict("config", base_config(), flag_values=values, lock_config=False,
                                        sys_argv=argv)
        rest = values(argv)
    except KeyError as e:
        raise RestoreError(f"{' '.join(args)}: no such config field {e}") from None
    except flags.Error as e:
        raise RestoreError(f"{e} (config overrides are --config.path=value)") from None
    if rest[1:]:
        raise RestoreError(f"unrecognised argument(s) {' '.join(rest[1:])}")
    return dict(values["config"].override_values)
