"""diffrestorer-evaluate: restore a paired test set and measure it, per degradation type and on average.

    diffrestorer-evaluate --checkpoint EXPORT_DIR --data DATA --out DIR [--crop-border 4]
                          [--lpips-vgg vgg16.pth --lpips-lin lpips_vgg_lin.pth]
                          [--fid-inception pt_inception-2015-12-05-6726825d.pth] [restore options]

DATA is either a folder in the DA-CLIP layout (<type>/LQ/*, <type>/GT/*, files paired by name) or a
TFDS data_dir holding a `paired` dataset built by diffrestorer-build-dataset (--split picks the
split). Writes DIR/metrics.json (every number, plus the exact protocol: settings, seeds, metric
conventions, package versions) and DIR/metrics.md (a Markdown table). PSNR/SSIM are given on RGB
and on Y; LPIPS when both weight files are given; FID (restored vs GT, per type) when
--fid-inception is given.
"""
import argparse
import os
import sys

from diffrestorer_jax import paths
from diffrestorer_jax.cli import restore_options, startup


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="diffrestorer-evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="export directory (config.json + params/)")
    p.add_argument("--data", required=True, help="DA-CLIP layout folder, or TFDS data_dir with 'paired'")
    p.add_argument("--split", default="test", help="TFDS split (default: test)")
    p.add_argument("--out", required=True, help="folder for metrics.json and metrics.md")
    p.add_argument("--crop-border", type=int, default=0, help="pixels removed from each side for PSNR/SSIM")
    p.add_argument("--lpips-vgg", help="torchvision vgg16 weights (.pth / .safetensors)")
    p.add_argument("--lpips-lin", help="lpips package linear heads (vgg.pth)")
    p.add_argument("--fid-inception", help="FID Inception-v3 weights (pytorch-fid's "
                   "pt_inception-2015-12-05-6726825d.pth, or a .safetensors copy)")
    p.add_argument("--max-per-type", type=int, help="evaluate at most this many pairs per type")
    p.add_argument("--save-images", action="store_true", help="also write the restored images to OUT/images")
    p.add_argument("--no-progress", action="store_true")
    restore_options.add_options(p)
    return p


def main(argv=None) -> int:
    args, rest = build_parser().parse_known_args(argv)
    startup.prepare_process(restore=True)
    startup.quiet_console()
    from diffrestorer_jax.infer.restorer import Restorer, RestoreError
    from diffrestorer_jax.tools import evaluate as ev
    if bool(args.lpips_vgg) != bool(args.lpips_lin):
        print("error: LPIPS needs both --lpips-vgg and --lpips-lin", file=sys.stderr)
        return 2
    for flag, value, least in (("--crop-border", args.crop_border, 0), ("--max-per-type", args.max_per_type, 1)):
        if value is not None and value < least:
            print(f"error: {flag} must be {least} or more, got {value}", file=sys.stderr)
            return 2
    try:
        restore_options.enable_compile_cache(args)
        overrides = restore_options.parse_overrides(rest)
        for flag, path in (("--data", args.data), ("--out", args.out)):
            if paths.is_url(path):  # os.path would make <cwd>/gs:/... of it
                raise ev.EvaluateError(f"{flag} {path}: the test set and the reports are on local disk "
                                       "(only --checkpoint may be a gs:// or other URL)")
        kind, entries, problems = ev.load_pairs(args.data, args.split, args.max_per_type)
        for path, reason in problems:
            print(f"skipped: {path}: {reason}", file=sys.stderr)
        lpips = None
        if args.lpips_vgg:
            from diffrestorer_jax.convert.lpips import load_lpips
            try:
                lpips = load_lpips(args.lpips_vgg, args.lpips_lin)
            except Exception as e:  # noqa: BLE001  the loader names the file and the bad keys
                raise ev.EvaluateError(f"cannot load LPIPS weights: {e}") from None
        fid = None
        if args.fid_inception:
            from diffrestorer_jax.convert.inception import load_fid_inception
            from diffrestorer_jax.metrics.fid import inception_features
            try:
                fid = inception_features(*load_fid_inception(args.fid_inception))
            except Exception as e:  # noqa: BLE001  the loader names the file and the bad keys
                raise ev.EvaluateError(f"cannot load FID Inception weights: {e}") from None
        restorer = Restorer.from_export(args.checkpoint, restore_options.options_from_args(args), overrides)
        results = ev.evaluate(restorer, entries, crop_border=args.crop_border, lpips=lpips, fid_features=fid,
                              save_dir=os.path.join(args.out, "images") if args.save_images else None,
                              progress=not args.no_progress)
        proto = ev.protocol(restorer, args.data, args.split, kind, args.crop_border,
                            [args.lpips_vgg, args.lpips_lin] if lpips else None, args.fid_inception)
        proto["config_overrides"] = overrides
        jpath, mpath = ev.write_reports(args.out, results, proto)
    except (RestoreError, ev.EvaluateError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(ev.markdown_table(results))
    print(f"wrote {jpath} and {mpath}", file=sys.stderr)
    return 1 if results["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
