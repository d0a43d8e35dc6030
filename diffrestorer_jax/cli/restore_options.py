"""The restoration flags shared by diffrestorer-restore and diffrestorer-evaluate, and their
`--config.path=value` overrides of the export's config (ml_collections' config_flags, the mechanism
diffrestorer-train uses, typed against the base config's fields)."""
import argparse
from typing import Any, Dict, Sequence

from absl import flags
from ml_collections import config_flags

from diffrestorer_jax.config_base import base_config
from diffrestorer_jax.infer.program import COLOR_FIX_METHODS
from diffrestorer_jax.infer.restorer import SAMPLERS, Options, RestoreError


def add_options(parser: argparse.ArgumentParser) -> None:
    p = parser
    p.add_argument("--steps", type=int, help="sampler steps (default: config.sampler.steps)")
    p.add_argument("--sampler", choices=SAMPLERS, help="default: config.sampler.name")
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


def options_from_args(args) -> Options:
    return Options(seed=args.seed, sampler=args.sampler, steps=args.steps, strength=args.strength,
                   cfg=args.cfg, eta=args.eta, control_scale=args.control_scale, fidelity=args.fidelity,
                   samples=args.samples, color_fix=args.color_fix, tile=args.tile,
                   tile_overlap=args.tile_overlap, batch_size=args.batch_size, num_devices=args.devices)


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
