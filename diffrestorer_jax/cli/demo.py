"""diffrestorer-demo (`make demo`): restore degraded held-out photos with the shipped tiny checkpoint.

    diffrestorer-demo                         # held-out photos x (8 types + mixed) -> demo_out/
    diffrestorer-demo --input my.png dir/     # your own images -> demo_out/restored/ (no metrics)

Without --input: the held-out photos (coffee, rocket; never trained on) are degraded with each of the
eight synthetic types and one mixed composition (fixed seed) at 128x128 and restored (whole, with the
shipped checkpoint); writes demo_out/gallery.png (a row per type; for each photo degraded | restored
| clean, the type the model predicted under each restored image), demo_out/metrics.md and
demo_out/metrics.json (PSNR/SSIM of degraded, restored and the classical scikit-image anchor against
the clean photo, per type).
"""
import argparse
import os
import sys

from diffrestorer_jax.cli import startup


def parse_args(argv=None):
    from diffrestorer_jax.tools.demo import DEFAULT_CHECKPOINT
    p = argparse.ArgumentParser(prog="diffrestorer-demo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="export directory (default: the shipped demo)")
    p.add_argument("--input", nargs="*", default=None,
                   help="your own images (files, folders or globs) instead of the held-out photos")
    p.add_argument("--out", default="demo_out", help="output directory (default: demo_out)")
    p.add_argument("--size", type=int, default=None,
                   help="side of the held-out photos in pixels (default: 128)")
    p.add_argument("--photos", nargs="*", default=None,
                   help="skimage demo photos to degrade instead of the held-out ones (e.g. the validation "
                        "photos camera coins moon clock, to choose settings without looking at the "
                        "held-out set)")
    p.add_argument("--seed", type=int, default=0, help="degradation and sampling seed")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the demo's setting)")
    p.add_argument("--strength", type=float, default=None,
                   help="< 1 starts sampling from the noised LQ latent (default: the demo's setting)")
    p.add_argument("--fidelity", type=float, default=None, help="decoder fidelity weight")
    p.add_argument("--control-scale", type=float, default=None, help="control module scale")
    p.add_argument("--samples", type=int, default=None,
                   help="posterior samples averaged per image (default: the demo's setting)")
    p.add_argument("--tile", type=int, default=None,
                   help="latent tile, used for images larger than it (default: the checkpoint's; the "
                        "shipped one's, 64, restores the demo photos whole; 0: never tile)")
    p.add_argument("--no-classical", dest="classical", action="store_false",
                   help="leave the classical scikit-image anchor out of metrics.md (faster)")
    p.add_argument("--color-fix", default=None, choices=("none", "wavelet", "adain", "auto"),
                   help="colour correction towards the input (auto: wavelet, except where the input is "
                        "classified hazy or dark)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    # XLA CPU's LLVM at -O1: 18 photos of 128 px go through the networks for 10 sampler steps; at -O0
    # (fastest to compile) the restoration took 56 s against 14 s at -O1 (2-core VM, 2026-12-06).
    startup.prepare_process(backend_optimization_level=1, restore=True)
    startup.quiet_console()
    from diffrestorer_jax.infer.restorer import RestoreError
    from diffrestorer_jax.tools import demo
    if not os.path.isdir(args.checkpoint):
        print(f"error: --checkpoint {args.checkpoint} does not exist (make demo-train recreates the demo "
              "checkpoint)", file=sys.stderr)
        return 2
    settings = demo.demo_settings(steps=args.steps, strength=args.strength, fidelity=args.fidelity,
                                  control_scale=args.control_scale, color_fix=args.color_fix,
                                  samples=args.samples, tile=args.tile)
    try:
        if args.input:
            demo.run_inputs(args.checkpoint, args.input, args.out, settings, args.seed)
        else:
            demo.run_held_out(args.checkpoint, args.out, settings, args.size, args.photos, args.seed,
                              classical_anchor=args.classical)
    except RestoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
