"""The demo: restore degraded held-out photos with the shipped tiny checkpoint (`make demo`).

    python launch/demo.py                         # held-out photos x (8 types + mixed) -> demo_out/
    python launch/demo.py --input my.png dir/     # your own images -> demo_out/restored/ (no metrics)

Without --input: the held-out photos (coffee, rocket; never trained on) are centre-cropped, resized
to --size, degraded with each of the eight synthetic types and one mixed composition (fixed seed),
and restored with the checkpoint. Writes demo_out/gallery.png (a row per type; for each photo the
columns degraded | restored | clean), demo_out/metrics.md (PSNR/SSIM of degraded and of restored
against the clean photo, per type, with the settings used) and demo_out/metrics.json.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The tiny model runs a few dozen small steps: compiling dominates, and XLA's CPU backend
# optimisations (LLVM passes) would double it for no visible speed-up.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CHECKPOINT = os.path.join(REPO, "demo", "checkpoint")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="export directory (default: the shipped demo)")
    p.add_argument("--input", nargs="*", default=None,
                   help="your own images (files, folders or globs) instead of the held-out photos")
    p.add_argument("--out", default="demo_out", help="output directory (default: demo_out)")
    p.add_argument("--size", type=int, default=None,
                   help="side of the held-out photos in pixels (default: the checkpoint's training size)")
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
    p.add_argument("--color-fix", default=None, choices=("none", "wavelet", "adain", "auto"),
                   help="colour correction towards the input (auto: wavelet, except where the input is "
                        "classified hazy or dark)")
    return p.parse_args(argv)


# The settings the shipped checkpoint is demonstrated with (metrics.md states them), chosen on the
# validation photos (camera, coins, moon, clock; `--photos`: never trained on, never the held-out ones)
# by the number of types where restored beats degraded, then mean PSNR. 4 posterior samples gained
# 0.03 dB for 2.6x the time, so 1 (demo/README.md). Earlier checkpoints were chosen on training photos.
DEMO_SETTINGS = dict(steps=10, strength=1.0, fidelity=1.0, control_scale=None, color_fix="none", samples=1)


def settings_from_args(args):
    out = {}
    for k, default in DEMO_SETTINGS.items():
        v = getattr(args, k)
        out[k] = default if v is None else v
    return out


def make_restorer(checkpoint, settings, seed):
    from diffrestorer_jax.infer import runner
    options = runner.Options(seed=seed, steps=settings["steps"], strength=settings["strength"],
                             fidelity=settings["fidelity"], control_scale=settings["control_scale"],
                             samples=settings["samples"], color_fix=settings["color_fix"], batch_size=1, num_devices=1)
    return runner.Restorer.from_export(checkpoint, options)


def degrade_photos(photos, size: int, seed: int):
    """(clean [P, S, S, 3], lq [P, T, S, S, 3], row names) for the photos x (types + mixed)."""
    import jax
    import numpy as np
    from diffrestorer_jax.data import degradations, demo_photos
    clean = demo_photos.load_photos(photos, size)
    ids = list(range(degradations.NUM_TYPES)) + [degradations.MIXED]
    names = list(degradations.DEGRADATION_TYPES) + ["mixed"]
    batch = np.repeat(clean, len(ids), 0)
    type_ids = np.tile(np.array(ids, np.int32), len(clean))
    fn = degradations.make_degrade_fn(degradations.default_degradation_config())
    lq, _ = fn(jax.random.key(seed), batch, type_ids)
    lq = np.asarray(lq, np.float32).reshape((len(clean), len(ids)) + clean.shape[1:])
    return clean, lq, names


def gallery_image(columns, row_names, groups, pad: int = 2):
    """columns: list of [R, H, W, 3] arrays, three per photo (degraded | restored | clean) -> one
    uint8 grid with the photo names and column names on top and the row names on the left."""
    import numpy as np
    from PIL import Image, ImageDraw
    rows, h, w = columns[0].shape[:3]
    label_w, label_h = 76, 26
    grid = np.full((label_h + rows * (h + pad), label_w + len(columns) * (w + pad), 3), 255, np.uint8)
    for c, col in enumerate(columns):
        for r in range(rows):
            y, x = label_h + r * (h + pad), label_w + c * (w + pad)
            grid[y:y + h, x:x + w] = np.round(np.clip(col[r], 0, 1) * 255).astype(np.uint8)
    img = Image.fromarray(grid)
    draw = ImageDraw.Draw(img)
    short = {"degraded": "degraded", "restored": "restored", "clean": "clean"}
    if w < 56:
        short = {"degraded": "LQ", "restored": "out", "clean": "HQ"}
    for g, name in enumerate(groups):
        draw.text((label_w + 3 * g * (w + pad) + 2, 1), name, fill=(0, 0, 0))
        for k, col in enumerate(("degraded", "restored", "clean")):
            draw.text((label_w + (3 * g + k) * (w + pad) + 2, 13), short[col], fill=(90, 90, 90))
    for r, name in enumerate(row_names):
        draw.text((2, label_h + r * (h + pad) + h // 2 - 5), name, fill=(0, 0, 0))
    return np.asarray(img)


def evaluate(clean, lq, restored, names):
    """Per-type mean PSNR/SSIM (RGB, no border crop) of degraded and restored vs clean, and the PSNR of
    restored vs degraded (`psnr_change`: how far the restorer moved the input; high = left nearly as is)."""
    import numpy as np
    from diffrestorer_jax.metrics.psnr_ssim import psnr, ssim
    rows = []
    for t, name in enumerate(names):
        c, d, r = clean, lq[:, t], restored[:, t]
        rows.append(dict(type=name,
                         psnr_degraded=float(np.mean(psnr(d, c))), psnr_restored=float(np.mean(psnr(r, c))),
                         ssim_degraded=float(np.mean(ssim(d, c))), ssim_restored=float(np.mean(ssim(r, c))),
                         psnr_change=float(np.mean(psnr(r, d)))))
    return rows


def metrics_markdown(rows, settings, checkpoint, size, seed, photos, seconds):
    from diffrestorer_jax.data import demo_photos
    seen = [p for p in photos if p in demo_photos.TRAIN]
    held = "held out: never trained on" if not seen else f"TRAINING photos: {', '.join(seen)}"
    if not seen and set(photos) <= set(demo_photos.VALIDATION):
        held = "validation photos: never trained on, used to choose the demo's settings"
    lines = [
        "# Demo metrics: degraded vs restored, per degradation type",
        "",
        f"Photos: {', '.join(photos)} ({held}), centre-cropped and resized to {size}x{size}; "
        f"degradation seed {seed}. PSNR (dB) and SSIM on RGB in [0, 1], no border crop, mean over the "
        f"{len(photos)} photos. Checkpoint: `{os.path.relpath(checkpoint, REPO) if checkpoint.startswith(REPO) else checkpoint}`.",
        "",
        f"Restore settings: sampler DDIM, {settings['steps']} steps, strength {settings['strength']}"
        + (" (sampling starts from the noised LQ latent)" if settings["strength"] < 1 else " (from pure noise)")
        + f", fidelity weight {settings['fidelity'] if settings['fidelity'] is not None else 'config default'}"
        + f", control scale {settings['control_scale'] if settings['control_scale'] is not None else 'config default'}"
        + (f", mean of {settings['samples']} posterior samples per image" if settings["samples"] > 1 else "")
        + (", no colour fix" if settings["color_fix"] == "none" else f", colour fix {settings['color_fix']}")
        + ", no guidance.",
        "",
        "| type | PSNR degraded | PSNR restored | SSIM degraded | SSIM restored | PSNR better? | change (PSNR restored vs degraded) |",
        "|---|---:|---:|---:|---:|:---:|---:|",
    ]
    for r in rows:
        better = "yes" if r["psnr_restored"] > r["psnr_degraded"] else "no"
        lines.append(f"| {r['type']} | {r['psnr_degraded']:.2f} | {r['psnr_restored']:.2f} | "
                     f"{r['ssim_degraded']:.3f} | {r['ssim_restored']:.3f} | {better} | {r['psnr_change']:.1f} |")
    eight = [r for r in rows if r["type"] != "mixed"]
    wins = sum(r["psnr_restored"] > r["psnr_degraded"] for r in eight)
    lines += ["", f"Restored beats degraded in PSNR for {wins} of {len(eight)} single types"
              f" (goal: at least 6). Restoration took {seconds:.0f} s.", ""]
    return "\n".join(lines), wins


def run_held_out(args):
    import json
    import numpy as np
    from diffrestorer_jax.data import demo_photos
    from diffrestorer_jax.data.image_io import write_png
    from diffrestorer_jax.train.export import load_config
    settings = settings_from_args(args)
    size = args.size or int(load_config(args.checkpoint).image_size)
    photos = tuple(args.photos) if args.photos else demo_photos.HELD_OUT
    clean, lq, names = degrade_photos(photos, size, args.seed)
    restorer = make_restorer(args.checkpoint, settings, args.seed)
    flat = list(lq.reshape((-1,) + lq.shape[2:]))
    print(f"restoring {len(flat)} degraded images ({len(clean)} photos x {len(names)}) at {size}x{size} ...",
          flush=True)
    t0 = time.time()
    out = restorer.restore_images(flat, list(range(len(flat))))
    seconds = time.time() - t0
    restored = np.stack([img for img, _ in out]).reshape(lq.shape)
    os.makedirs(args.out, exist_ok=True)
    columns = []
    for p in range(len(photos)):
        columns += [lq[p], restored[p], np.repeat(clean[p][None], len(names), 0)]
    write_png(os.path.join(args.out, "gallery.png"), gallery_image(columns, names, photos) / 255.0)
    rows = evaluate(clean, lq, restored, names)
    text, wins = metrics_markdown(rows, settings, os.path.abspath(args.checkpoint), size, args.seed,
                                  photos, seconds)
    with open(os.path.join(args.out, "metrics.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(dict(settings=settings, size=size, seed=args.seed, rows=rows, psnr_wins=wins), f, indent=2)
    print(text)
    print(f"wrote {os.path.join(args.out, 'gallery.png')} and {os.path.join(args.out, 'metrics.md')}")


def run_inputs(args):
    from diffrestorer_jax.infer import runner
    settings = settings_from_args(args)
    restorer = make_restorer(args.checkpoint, settings, args.seed)
    out_dir = os.path.join(args.out, "restored")
    for spec in args.input:
        inputs = runner.find_inputs(spec)
        runner.restore_files(restorer, inputs, out_dir, overwrite=True)
    print(f"restored images in {out_dir}")


def main(argv=None):
    args = parse_args(argv)
    from diffrestorer_jax.infer.runner import RestoreError
    if not os.path.isdir(args.checkpoint):
        print(f"error: --checkpoint {args.checkpoint} does not exist (make demo-train recreates the demo "
              "checkpoint)", file=sys.stderr)
        return 2
    try:
        if args.input:
            run_inputs(args)
        else:
            run_held_out(args)
    except RestoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
