"""The demo: degrade held-out photos, restore them with the shipped tiny checkpoint, and show and
measure the result (`make demo`, `diffrestorer-demo`).

    run_held_out(checkpoint, out_dir)      # gallery.png, metrics.md, metrics.json
    run_inputs(checkpoint, specs, out_dir)  # a user's own images -> out_dir/restored/

The held-out photos (coffee, rocket; never trained on) are centre-cropped, resized, degraded with each
of the eight types and one mixed composition (fixed seed) and restored; the gallery has a row per
type and, per photo, the columns degraded | restored | clean; metrics.md has PSNR/SSIM of degraded and
of restored against the clean photo, per type, with the settings used.
"""
import json
import os
import time

import numpy as np

from diffrestorer_jax.data import demo_photos
from diffrestorer_jax.data.gallery import degrade_each_type
from diffrestorer_jax.data.image_io import write_png
from diffrestorer_jax.export import load_config
from diffrestorer_jax.infer import files, restorer as restorer_lib
from diffrestorer_jax.metrics.psnr_ssim import psnr, ssim

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_CHECKPOINT = os.path.join(REPO, "demo", "checkpoint")


# The settings the shipped checkpoint is demonstrated with (metrics.md states them), chosen on the
# validation photos (never trained on, never the held-out ones); demo/README.md says how.
DEMO_SETTINGS = dict(steps=10, strength=1.0, fidelity=1.0, control_scale=None, color_fix="none", samples=1)


def demo_settings(**given):
    """The demo's settings with every given (not None) value in place of its own."""
    return {k: default if given.get(k) is None else given[k] for k, default in DEMO_SETTINGS.items()}


def make_restorer(checkpoint, settings, seed):
    options = restorer_lib.Options(
        seed=seed, steps=settings["steps"], strength=settings["strength"], fidelity=settings["fidelity"],
        control_scale=settings["control_scale"], samples=settings["samples"],
        color_fix=settings["color_fix"], batch_size=1, num_devices=1)
    return restorer_lib.Restorer.from_export(checkpoint, options)


def degrade_photos(photos, size: int, seed: int):
    """(clean [P, S, S, 3], lq [P, T, S, S, 3], row names) for the photos x (types + mixed)."""
    clean = demo_photos.load_photos(photos, size)
    lq, names = degrade_each_type(clean, seed)
    return clean, lq, names


def gallery_image(columns, row_names, groups, pad: int = 2):
    """columns: list of [R, H, W, 3] arrays, three per photo (degraded | restored | clean) -> one
    uint8 grid with the photo names and column names on top and the row names on the left."""
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


def type_metrics(clean, lq, restored, names):
    """Per-type mean PSNR/SSIM (RGB, no border crop) of degraded and restored vs clean, and the PSNR of
    restored vs degraded (`psnr_change`: how far the restorer moved the input; high = left nearly as is)."""
    rows = []
    for t, name in enumerate(names):
        c, d, r = clean, lq[:, t], restored[:, t]
        rows.append(dict(type=name,
                         psnr_degraded=float(np.mean(psnr(d, c))), psnr_restored=float(np.mean(psnr(r, c))),
                         ssim_degraded=float(np.mean(ssim(d, c))), ssim_restored=float(np.mean(ssim(r, c))),
                         psnr_change=float(np.mean(psnr(r, d)))))
    return rows


def _shown_path(path: str) -> str:
    return os.path.relpath(path, REPO) if path.startswith(REPO) else path


def metrics_markdown(rows, settings, checkpoint, size, seed, photos, seconds):
    """metrics.md's text, and the number of single types where restored beats degraded in PSNR."""
    seen = [p for p in photos if p in demo_photos.TRAIN]
    held = "held out: never trained on" if not seen else f"TRAINING photos: {', '.join(seen)}"
    if not seen and set(photos) <= set(demo_photos.VALIDATION):
        held = "validation photos: never trained on, used to choose the demo's settings"
    s = settings
    lines = [
        "# Demo metrics: degraded vs restored, per degradation type",
        "",
        f"Photos: {', '.join(photos)} ({held}), centre-cropped and resized to {size}x{size}; "
        f"degradation seed {seed}. PSNR (dB) and SSIM on RGB in [0, 1], no border crop, mean over the "
        f"{len(photos)} photos. Checkpoint: `{_shown_path(checkpoint)}`.",
        "",
        f"Restore settings: sampler DDIM, {s['steps']} steps, strength {s['strength']}"
        + (" (sampling starts from the noised LQ latent)" if s["strength"] < 1 else " (from pure noise)")
        + f", fidelity weight {s['fidelity'] if s['fidelity'] is not None else 'config default'}"
        + f", control scale {s['control_scale'] if s['control_scale'] is not None else 'config default'}"
        + (f", mean of {s['samples']} posterior samples per image" if s["samples"] > 1 else "")
        + (", no colour fix" if s["color_fix"] == "none" else f", colour fix {s['color_fix']}")
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


def run_held_out(checkpoint: str, out_dir: str, settings, size=None, photos=None, seed: int = 0):
    """Degrade, restore and measure the held-out photos (or `photos`); writes gallery.png,
    metrics.md and metrics.json into out_dir and prints the table."""
    size = size or int(load_config(checkpoint).image_size)
    photos = tuple(photos) if photos else demo_photos.HELD_OUT
    clean, lq, names = degrade_photos(photos, size, seed)
    restorer = make_restorer(checkpoint, settings, seed)
    flat = list(lq.reshape((-1,) + lq.shape[2:]))
    print(f"restoring {len(flat)} degraded images ({len(clean)} photos x {len(names)}) at {size}x{size} ...",
          flush=True)
    t0 = time.time()
    out = restorer.restore_images(flat, list(range(len(flat))))
    seconds = time.time() - t0
    restored = np.stack([img for img, _ in out]).reshape(lq.shape)
    os.makedirs(out_dir, exist_ok=True)
    columns = []
    for p in range(len(photos)):
        columns += [lq[p], restored[p], np.repeat(clean[p][None], len(names), 0)]
    write_png(os.path.join(out_dir, "gallery.png"), gallery_image(columns, names, photos) / 255.0)
    rows = type_metrics(clean, lq, restored, names)
    text, wins = metrics_markdown(rows, settings, os.path.abspath(checkpoint), size, seed, photos, seconds)
    with open(os.path.join(out_dir, "metrics.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(dict(settings=settings, size=size, seed=seed, rows=rows, psnr_wins=wins), f, indent=2)
    print(text)
    print(f"wrote {os.path.join(out_dir, 'gallery.png')} and {os.path.join(out_dir, 'metrics.md')}")


def run_inputs(checkpoint: str, specs, out_dir: str, settings, seed: int = 0):
    """Restore a user's own images (files, folders or globs) into out_dir/restored/."""
    restorer = make_restorer(checkpoint, settings, seed)
    restored_dir = os.path.join(out_dir, "restored")
    for spec in specs:
        files.restore_files(restorer, files.find_inputs(spec), restored_dir, overwrite=True)
    print(f"restored images in {restored_dir}")
