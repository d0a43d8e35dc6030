"""The demo: degrade held-out photos, restore them with the shipped tiny checkpoint, and show and
measure the result (`make demo`, `diffrestorer-demo`).

    run_held_out(checkpoint, out_dir)      # gallery.png, metrics.md, metrics.json
    run_inputs(checkpoint, specs, out_dir)  # a user's own images -> out_dir/restored/

The held-out photos (coffee, rocket; never trained on) are centre-cropped, resized to DEMO_SIZE,
degraded with each of the eight types and one mixed composition (fixed seed) and restored (whole:
the shipped checkpoint's tile is larger than the photos); the gallery has a row per type and, per
photo, the columns degraded | restored | clean, with the type the model predicted under each
restored image; metrics.md has PSNR/SSIM of degraded, restored and the classical anchor
(`metrics/classical.py`) against the clean photo, per type, with the settings used and the counts
issue #25 sets as the demo's goal.
"""
import json
import os
import time

import numpy as np

from diffrestorer_jax.data import demo_photos
from diffrestorer_jax.data.gallery import degrade_each_type
from diffrestorer_jax.data.image_io import write_png
from diffrestorer_jax.infer import files, restorer as restorer_lib
from diffrestorer_jax.metrics import classical
from diffrestorer_jax.metrics.psnr_ssim import psnr, ssim

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_CHECKPOINT = os.path.join(REPO, "demo", "checkpoint")


# The settings the shipped checkpoint is demonstrated with (metrics.md states them), chosen on the
# validation photos (never trained on, never the held-out ones); demo/README.md says how.
# tile (latent pixels): None is the checkpoint's `sampler.tile`; the shipped one's is 64 (256 px), so the
# demo photos go through whole: its decoder restores a photo better whole than by tiles of its 64-px
# training size (demo/README.md, 2026-12-06).
DEMO_SETTINGS = dict(steps=10, strength=1.0, fidelity=1.0, control_scale=None, color_fix="none", samples=1,
                     tile=None)
# Side of the demo photos: large enough to see.
DEMO_SIZE = 128


def demo_settings(**given):
    """The demo's settings with every given (not None) value in place of its own."""
    return {k: default if given.get(k) is None else given[k] for k, default in DEMO_SETTINGS.items()}


def make_restorer(checkpoint, settings, seed):
    options = restorer_lib.Options(
        seed=seed, steps=settings["steps"], strength=settings["strength"], fidelity=settings["fidelity"],
        control_scale=settings["control_scale"], samples=settings["samples"],
        color_fix=settings["color_fix"], tile=settings["tile"], batch_size=1, num_devices=1)
    return restorer_lib.Restorer.from_export(checkpoint, options)


def degrade_photos(photos, size: int, seed: int):
    """(clean [P, S, S, 3], lq [P, T, S, S, 3], row names) for the photos x (types + mixed)."""
    clean = demo_photos.load_photos(photos, size)
    lq, names = degrade_each_type(clean, seed)
    return clean, lq, names


def gallery_image(columns, row_names, groups, pad: int = 2, captions=None):
    """columns: list of [R, H, W, 3] arrays, three per photo (degraded | restored | clean) -> one
    uint8 grid with the photo names and column names on top and the row names on the left.
    captions: optional {column index: [R] strings}, written under that column's images (the demo puts
    the degradation type the model predicted under each restored image)."""
    from PIL import Image, ImageDraw
    rows, h, w = columns[0].shape[:3]
    label_w, label_h = 76, 26
    row_h = h + (12 if captions else 0) + pad
    grid = np.full((label_h + rows * row_h, label_w + len(columns) * (w + pad), 3), 255, np.uint8)
    for c, col in enumerate(columns):
        for r in range(rows):
            y, x = label_h + r * row_h, label_w + c * (w + pad)
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
        draw.text((2, label_h + r * row_h + h // 2 - 5), name, fill=(0, 0, 0))
    for c, texts in (captions or {}).items():
        for r, text in enumerate(texts):
            draw.text((label_w + c * (w + pad) + 2, label_h + r * row_h + h), text, fill=(0, 0, 0))
    return np.asarray(img)


def type_metrics(clean, lq, restored, names, predicted=None, classical_rows=None):
    """Per-type mean PSNR/SSIM (RGB, no border crop) of degraded and restored vs clean, and the PSNR of
    restored vs degraded (`psnr_change`: how far the restorer moved the input; high = left nearly as is).
    predicted: [P][T] the type the model predicted per photo and row; classical_rows: the classical
    anchor's rows (`metrics.classical.anchor`), merged in as classical_*."""
    rows = []
    for t, name in enumerate(names):
        c, d, r = clean, lq[:, t], restored[:, t]
        row = dict(type=name,
                   psnr_degraded=float(np.mean(psnr(d, c))), psnr_restored=float(np.mean(psnr(r, c))),
                   ssim_degraded=float(np.mean(ssim(d, c))), ssim_restored=float(np.mean(ssim(r, c))),
                   psnr_change=float(np.mean(psnr(r, d))))
        if predicted is not None:
            row["predicted"] = [per_photo[t] for per_photo in predicted]
        if classical_rows is not None:
            k = classical_rows[t]
            row.update(classical_method=k["method"], classical_psnr=k["psnr"], classical_ssim=k["ssim"])
        rows.append(row)
    return rows


def goal_summary(rows):
    """The demo's goal (issue #25) counted from the rows: PSNR wins over the eight single types, rows
    (the eight and mixed) won by >= 0.5 dB with SSIM up, the mean gain, and, with the classical anchor's
    columns, the types where the model is ahead of it and the anchor's mean gain."""
    eight = [r for r in rows if r["type"] != "mixed"]
    gain = lambda r: r["psnr_restored"] - r["psnr_degraded"]  # noqa: E731
    out = dict(psnr_wins=sum(gain(r) > 0 for r in eight),
               clear_wins=sum(gain(r) >= 0.5 and r["ssim_restored"] > r["ssim_degraded"] for r in rows),
               rows=len(rows), mean_gain=float(np.mean([gain(r) for r in eight])))
    if all("classical_psnr" in r for r in rows):
        out["ahead_of_classical"] = sum(r["psnr_restored"] > r["classical_psnr"] for r in eight)
        out["classical_mean_gain"] = float(np.mean([r["classical_psnr"] - r["psnr_degraded"] for r in eight]))
    return out


def _shown_path(path: str) -> str:
    return os.path.relpath(path, REPO) if path.startswith(REPO) else path


def metrics_markdown(rows, settings, checkpoint, size, seed, photos, seconds, tiled=None, tile=0):
    """metrics.md's text, and `goal_summary(rows)`. tiled: the latent tile the images were restored
    by, None when each went through whole; tile: the restorer's latent tile (0: never tiles)."""
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
        + ", no guidance; "
        + (f"by tiles of {tiled} latent pixels." if tiled else "each image whole"
           + (f" (tiles of {tile} latent pixels only for larger images)." if tile else ".")),
    ]
    g = goal_summary(rows)
    classical = "ahead_of_classical" in g  # every row has the anchor's columns
    if classical:
        lines += ["", "Classical anchor: per type, the best of seven scikit-image methods on these very images "
                  "(an oracle that knows the type; `diffrestorer_jax/metrics/classical.py`, "
                  "`benchmarks/classical_baseline.py`)."]
    head = "| type | predicted type (per photo) | PSNR degraded | PSNR restored | gain |"
    rule = "|---|---|---:|---:|---:|"
    if classical:
        head += " PSNR classical (method) | classical gain |"
        rule += "---:|---:|"
    head += " SSIM degraded | SSIM restored |" + (" SSIM classical |" if classical else "")
    rule += "---:|---:|" + ("---:|" if classical else "")
    lines += ["", head + " change (PSNR restored vs degraded) |", rule + "---:|"]
    for r in rows:
        line = (f"| {r['type']} | {', '.join(r.get('predicted', [])) or '-'} | {r['psnr_degraded']:.2f} | "
                f"{r['psnr_restored']:.2f} | {r['psnr_restored'] - r['psnr_degraded']:+.2f} |")
        if classical:
            line += (f" {r['classical_psnr']:.2f} ({r['classical_method']}) | "
                     f"{r['classical_psnr'] - r['psnr_degraded']:+.2f} |")
        line += f" {r['ssim_degraded']:.3f} | {r['ssim_restored']:.3f} |"
        if classical:
            line += f" {r['classical_ssim']:.3f} |"
        lines.append(line + f" {r['psnr_change']:.1f} |")
    n = len([r for r in rows if r["type"] != "mixed"])
    lines += ["", f"Mean PSNR gain over the {n} single types: {g['mean_gain']:+.2f} dB"
              + (f" (classical anchor: {g['classical_mean_gain']:+.2f} dB)" if classical else "")
              + " (goal: at least +4 dB" + (", and ahead of the anchor)." if classical else ")."),
              f"Restored beats degraded by >= 0.5 dB with SSIM up on {g['clear_wins']} of {g['rows']} rows "
              f"(the {n} types and mixed; goal: all); in PSNR at all on {g['psnr_wins']} of {n} types."]
    if classical:
        lines.append(f"Ahead of the classical anchor on {g['ahead_of_classical']} of {n} types (goal: at least 6).")
    lines += [f"Restoration took {seconds:.0f} s.", ""]
    return "\n".join(lines), g


def run_held_out(checkpoint: str, out_dir: str, settings, size=None, photos=None, seed: int = 0,
                 classical_anchor: bool = True):
    """Degrade, restore and measure the held-out photos (or `photos`) at `size` (default DEMO_SIZE);
    writes gallery.png, metrics.md and metrics.json into out_dir and prints the table.
    classical_anchor: also restore the same images with the classical anchor and show it beside."""
    size = size or DEMO_SIZE
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
    predicted = [[out[p * len(names) + t][1]["predicted_type"] for t in range(len(names))]
                 for p in range(len(photos))]
    classical_rows = None
    if classical_anchor:
        print("classical anchor (scikit-image, the best method per type) ...", flush=True)
        classical_rows = classical.anchor(clean, lq, names)
    os.makedirs(out_dir, exist_ok=True)
    columns, captions = [], {}
    for p in range(len(photos)):
        captions[len(columns) + 1] = [f"model: {t}" for t in predicted[p]]
        columns += [lq[p], restored[p], np.repeat(clean[p][None], len(names), 0)]
    write_png(os.path.join(out_dir, "gallery.png"),
              gallery_image(columns, names, photos, captions=captions) / 255.0)
    rows = type_metrics(clean, lq, restored, names, predicted, classical_rows)
    text, goals = metrics_markdown(rows, settings, os.path.abspath(checkpoint), size, seed, photos, seconds,
                                   tiled=out[0][1]["tile"], tile=restorer.latent_tile)
    with open(os.path.join(out_dir, "metrics.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(dict(settings=settings, size=size, seed=seed, tiled=out[0][1]["tile"], rows=rows, goals=goals,
                       seconds=seconds),
                  f, indent=2)
    print(text)
    print(f"wrote {os.path.join(out_dir, 'gallery.png')} and {os.path.join(out_dir, 'metrics.md')}")


def run_inputs(checkpoint: str, specs, out_dir: str, settings, seed: int = 0):
    """Restore a user's own images (files, folders or globs) into out_dir/restored/, replacing what
    is there; every input and the folder are checked first, as `diffrestorer-restore` does (an
    output never replaces an input)."""
    restored_dir = os.path.join(out_dir, "restored")
    inputs = [files.find_inputs(spec) for spec in specs]
    for found in inputs:
        files.check_output_folder(found, restored_dir)
    restorer = make_restorer(checkpoint, settings, seed)
    for found in inputs:
        files.restore_files(restorer, found, restored_dir, overwrite=True)
    print(f"restored images in {restored_dir}")
