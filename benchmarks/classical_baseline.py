"""The classical anchor of `make demo`: type-aware scikit-image restoration of the very images the demo
degrades (same photos, size, seed and degradation config), per type the best of several methods.

    python benchmarks/classical_baseline.py                    # the held-out photos at the demo's size
    python benchmarks/classical_baseline.py --photos camera coins moon clock   # the validation photos

Methods and the oracle rule: `diffrestorer_jax/metrics/classical.py`. Prints a markdown table (and
every method's mean PSNR per type); `--out` also writes it with a JSON copy. The images are exactly
those `diffrestorer-demo` degrades and scores (`tools.demo.degrade_photos`, the same PSNR/SSIM), so
its table compares row by row with demo_out/metrics.md.
"""
import argparse
import json
import os
import sys



def table(rows, methods):
    lines = ["| type | best method | PSNR degraded | PSNR classical | gain | SSIM degraded | SSIM classical | "
             + " | ".join(methods) + " |",
             "|---|---|---:|---:|---:|---:|---:|" + "---:|" * len(methods)]
    for r in rows:
        lines.append(f"| {r['type']} | {r['method']} | {r['psnr_degraded']:.2f} | {r['psnr']:.2f} | "
                     f"{r['psnr'] - r['psnr_degraded']:+.2f} | {r['ssim_degraded']:.3f} | {r['ssim']:.3f} | "
                     + " | ".join(f"{r['per_method'][m]:.2f}" for m in methods) + " |")
    eight = [r for r in rows if r["type"] != "mixed"]
    mean = sum(r["psnr"] - r["psnr_degraded"] for r in eight) / len(eight)
    lines += ["", f"Mean PSNR gain over the {len(eight)} single types: {mean:+.2f} dB "
              "(best method per type, chosen on these images: an oracle)."]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--photos", nargs="*", default=None, help="default: the held-out photos (coffee, rocket)")
    ap.add_argument("--size", type=int, default=None, help="default: the demo's size (tools.demo.DEMO_SIZE)")
    ap.add_argument("--seed", type=int, default=0, help="degradation seed (the demo's default: 0)")
    ap.add_argument("--out", default=None, help="also write <out>/classical.md and classical.json")
    args = ap.parse_args(argv)
    from diffrestorer_jax.data import demo_photos
    from diffrestorer_jax.metrics import classical
    from diffrestorer_jax.tools import demo
    photos = tuple(args.photos) if args.photos else demo_photos.HELD_OUT
    size = args.size or demo.DEMO_SIZE
    clean, lq, names = demo.degrade_photos(photos, size, args.seed)
    rows = classical.anchor(clean, lq, names)
    methods = list(classical.METHODS)
    text = (f"# Classical anchor: {', '.join(photos)} at {size}x{size}, degradation seed {args.seed}\n\n"
            + table(rows, methods) + "\n")
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "classical.md"), "w") as f:
            f.write(text)
        with open(os.path.join(args.out, "classical.json"), "w") as f:
            json.dump(dict(photos=list(photos), size=size, seed=args.seed, rows=rows), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
