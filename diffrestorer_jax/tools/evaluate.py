"""Restore a paired test set and measure it: PSNR/SSIM (RGB and Y), LPIPS, FID, per degradation type.

    kind, entries, problems = load_pairs(data_dir_or_folder, split)  # DA-CLIP folders or a TFDS `paired` set
    results = evaluate(restorer, entries, crop_border=0, lpips=(module, params))
    write_reports(out_dir, results, protocol(restorer, ...))   # metrics.json + metrics.md

Conventions (also written into metrics.json under "protocol"):
  * The restored image is quantised to 8 bits first (what a user gets as a PNG), the GT is read as
    8-bit; both are scaled to [0, 1] float and compared with data range 1.
  * PSNR and SSIM are `diffrestorer_jax.metrics.psnr_ssim` (scikit-image's conventions: Gaussian
    SSIM window sigma 1.5, K1 0.01, K2 0.03, population covariance); Y is BT.601 studio-range luma
    (MATLAB rgb2ycbcr); `crop_border` pixels are removed from each side before PSNR and SSIM.
  * LPIPS (VGG, v0.1) is on the whole image mapped to [-1, 1], when weights are given.
  * FID (restored vs GT, per type and over all images) when `fid_features` is given: a
    [N, H, W, 3] -> [N, D] feature function, normally FID's Inception-v3
    (`metrics.fid.inception_features(*convert.inception.load_fid_inception(weights))`); each image
    is fed as its 8-bit quantised version in [0, 1]. Without it FID is skipped and metrics.json says
    so. FID is biased below ~2048 images per set; metrics.json records the counts.
  * Per type: the mean over that type's images. "average": the mean of the per-type means (each
    degradation weighs the same, as multi-degradation tables do); "all images": the plain mean.
  * "input" rows measure the degraded LQ against the GT, the baseline a restorer must beat.
  * Values that are not finite (the PSNR of an image equal to its GT, the SSIM of one smaller than
    the SSIM window) are left out of every mean; "left_out_of_means" counts them per metric.
"""
import collections
import datetime
import json
import os
import platform
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import jax
import numpy as np

from diffrestorer_jax.data.image_io import ImageReadError, decode_image, read_image, to_uint8, write_png
from diffrestorer_jax.infer.restorer import path_image_id
from diffrestorer_jax.metrics.fid import FidByType
from diffrestorer_jax.metrics.lpips import lpips_unit_range
from diffrestorer_jax.metrics.psnr_ssim import psnr, ssim

METRICS = ("psnr", "ssim", "psnr_y", "ssim_y")


class EvaluateError(Exception):
    """A foreseeable problem with the evaluation as a whole (no data, bad folder): a message."""


# ------------------------------------------------------------------------------------------ data
def _is_tfds_dir(data: str) -> bool:
    return os.path.isdir(os.path.join(data, "paired"))


def load_pairs(data: str, split: str = "test", max_per_type: Optional[int] = None
                   ) -> Tuple[str, List[Tuple[str, str, Callable[[], Tuple[np.ndarray, np.ndarray]]]], List[Tuple[str, str]]]:
    """(kind, [(name, type, loader)], problems) for a DA-CLIP folder or a TFDS data_dir with `paired`."""
    from diffrestorer_jax.data.tfds.paired import folder_type
    if not os.path.isdir(data):
        raise EvaluateError(f"--data {data}: no such folder")
    entries, problems, per_type = [], [], {}

    def take(type_name):
        per_type[type_name] = per_type.get(type_name, 0) + 1
        return max_per_type is None or per_type[type_name] <= max_per_type

    if _is_tfds_dir(data):
        from diffrestorer_jax.data.tfds.build import load_source
        try:
            source = load_source(data, "paired", split)
        except Exception as e:  # noqa: BLE001  tfds raises assorted types for a missing split/version
            raise EvaluateError(f"--data {data}: cannot open the paired dataset's {split!r} split ({e})") from None
        for i in range(len(source)):
            rec = source[i]
            type_name = rec["type_name"]
            type_name = type_name.decode() if isinstance(type_name, bytes) else str(type_name)
            file_name = rec["file_name"]
            file_name = file_name.decode() if isinstance(file_name, bytes) else str(file_name)
            if take(type_name):
                name = pair_name(file_name)
                entries.append((name, type_name, lambda r=rec, n=name: (decode_image(r["lq"], n + " (LQ)"),
                                                                        decode_image(r["hq"], n + " (GT)"))))
        return "tfds", entries, problems
    for entry in sorted(os.listdir(data)):
        type_dir = os.path.join(data, entry)
        if not os.path.isdir(type_dir):
            continue
        type_name = folder_type(entry)
        lq_dir, gt_dir = os.path.join(type_dir, "LQ"), os.path.join(type_dir, "GT")
        if type_name is None or not (os.path.isdir(lq_dir) and os.path.isdir(gt_dir)):
            problems.append((type_dir, "not a known degradation folder with LQ/ and GT/"))
            continue
        lq, gt = _by_stem(lq_dir, problems), _by_stem(gt_dir, problems)
        for stem in sorted(set(lq) | set(gt)):
            if stem not in gt or stem not in lq:
                problems.append((lq.get(stem) or gt[stem], "no file of the same name in " + ("GT" if stem not in gt else "LQ")))
            elif take(type_name):
                name = pair_name(lq[stem])
                entries.append((name, type_name, lambda a=lq[stem], b=gt[stem]: (read_image(a), read_image(b))))
    if not entries:
        raise EvaluateError(f"--data {data}: no LQ/GT pairs found (expected <type>/LQ/* and <type>/GT/* "
                            f"folders, or a TFDS data_dir holding a built 'paired' dataset)")
    return "folders", entries, problems


def pair_name(lq_path: str) -> str:
    """A pair's name (and image id source): '<type folder>/LQ/<path within LQ>', the same for a
    folder and for the TFDS set built from it alone (a set built from several roots has each root's
    folder name after 'LQ/'), and unique where basenames repeat."""
    p = lq_path.replace(os.sep, "/")
    head, sep, rest = p.rpartition("/LQ/")
    return f"{os.path.basename(head)}/LQ/{rest}" if sep else p.lstrip("/")


def _by_stem(folder: str, problems: List[Tuple[str, str]]) -> Dict[str, str]:
    """{stem: path} of a folder's files; a stem held by several files (a.png, a.jpg) cannot be
    paired unambiguously: those files are reported and left out."""
    found: Dict[str, List[str]] = {}
    for f in sorted(os.listdir(folder)):
        if not f.startswith(".") and os.path.isfile(os.path.join(folder, f)):
            found.setdefault(os.path.splitext(f)[0], []).append(os.path.join(folder, f))
    for paths in found.values():
        if len(paths) > 1:
            problems.extend((p, f"several files named {os.path.basename(os.path.splitext(p)[0])}.*: "
                                "which one pairs is ambiguous, all left out") for p in paths)
    return {stem: paths[0] for stem, paths in found.items() if len(paths) == 1}


# ------------------------------------------------------------------------------------------ metrics
def pair_metrics(restored: np.ndarray, gt: np.ndarray, crop_border: int = 0) -> Dict[str, float]:
    """PSNR/SSIM (RGB and Y) of one HWC pair in [0, 1] (restored quantised to 8 bits first)."""
    x = to_uint8(restored).astype(np.float32) / 255.0
    y = np.asarray(gt, np.float32)
    out = {}
    for y_channel, suffix in ((False, ""), (True, "_y")):
        out["psnr" + suffix] = float(psnr(x, y, crop_border=crop_border, y_channel=y_channel))
        try:
            out["ssim" + suffix] = float(ssim(x, y, crop_border=crop_border, y_channel=y_channel))
        except ValueError:  # smaller than the SSIM window
            out["ssim" + suffix] = float("nan")
    return out


def _mean(values: Sequence[float]) -> Optional[float]:
    """The mean of the finite values (None if there are none): see `_left_out`."""
    vals = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(vals)) if vals else None


def _left_out(per_image: Sequence[Dict[str, Any]], names: Sequence[str]) -> Dict[str, Dict[str, int]]:
    """Per metric, how many restored and input values the means leave out for not being finite: the
    PSNR of an image equal to its GT (infinite), the SSIM of one smaller than its window (undefined).
    Only metrics with any; a report without this key left nothing out."""
    out = {}
    for k in names:
        counts = {side: sum(not np.isfinite(row[k]) for row in rows)
                  for side, rows in (("restored", per_image), ("input", [r["input"] for r in per_image]))}
        if any(counts.values()):
            out[k] = counts
    return out


def evaluate(restorer, entries, *, crop_border: int = 0, lpips: Optional[Tuple[Any, Any]] = None,
             fid_features: Optional[Callable] = None, save_dir: Optional[str] = None,
             log: Callable[[str], None] = lambda m: print(m, file=sys.stderr), progress: bool = True) -> Dict[str, Any]:
    """Restore every pair and measure it; returns {'per_image', 'per_type', 'average', 'all_images',
    'input', 'failed', 'fid'} (see the module docstring for the conventions)."""
    from tqdm import tqdm
    lpips_fn = None
    if lpips is not None:
        module, lp_params = lpips
        lpips_fn = jax.jit(lambda a, b: lpips_unit_range(module, lp_params, a, b))
    twice = sorted(n for n, c in collections.Counter(name for name, _, _ in entries).items() if c > 1)
    if twice:  # the report, the saved images and the image ids go by name
        raise EvaluateError(f"{len(twice)} name(s) occur more than once in the data (e.g. {twice[0]!r}; a "
                            "paired set built from several --src roots by an older version): rebuild it")
    failed, gts, lqs = [], {}, {}
    bar = tqdm(total=len(entries), unit="img", desc="evaluating", disable=not progress, file=sys.stderr)

    def items():
        for name, type_name, load in entries:
            try:
                lq, gt = load()
            except ImageReadError as e:
                failed.append((e.path, e.reason))
                bar.write(f"error: {e.path}: {e.reason}", file=sys.stderr)
                bar.update(1)
                continue
            if lq.shape != gt.shape:
                failed.append((name, f"LQ size {lq.shape[:2]} differs from GT size {gt.shape[:2]}"))
                bar.update(1)
                continue
            gts[name], lqs[name] = gt, lq
            yield (name, type_name), lq, path_image_id(name)

    per_image, fid = [], (FidByType(fid_features) if fid_features is not None else None)
    for (name, type_name), restored, info in restorer.restore_stream(items(), on_error="yield"):
        gt, lq = gts.pop(name), lqs.pop(name)
        if restored is None:  # its batch failed (out of device memory, ...): named, the others go on
            failed.append((name, info["error"]))
            bar.write(f"error: {name}: {info['error']}", file=sys.stderr)
            bar.update(1)
            continue
        m = pair_metrics(restored, gt, crop_border)
        inp = pair_metrics(lq, gt, crop_border)
        if lpips_fn is not None:
            q = to_uint8(restored).astype(np.float32) / 255.0
            m["lpips"] = float(lpips_fn(q[None], gt[None])[0])
            inp["lpips"] = float(lpips_fn(lq[None], gt[None])[0])
        if save_dir:
            write_png(os.path.join(save_dir, name.rsplit(".", 1)[0] + ".png"), restored)
        if fid is not None:
            fid.add(type_name, to_uint8(restored).astype(np.float32) / 255.0, gt)
        per_image.append({"name": name, "type": type_name, "image_id": info["image_id"],
                          "predicted_type": info["predicted_type"], **m, "input": inp})
        bar.update(1)
    bar.close()
    if not per_image:
        raise EvaluateError("no pair could be restored (see the errors above)")
    names = [k for k in ("psnr", "ssim", "psnr_y", "ssim_y", "lpips") if k in per_image[0]]
    types = sorted({r["type"] for r in per_image})
    per_type = {t: {"count": sum(r["type"] == t for r in per_image),
                    **{k: _mean([r[k] for r in per_image if r["type"] == t]) for k in names}} for t in types}
    input_type = {t: {k: _mean([r["input"][k] for r in per_image if r["type"] == t]) for k in names} for t in types}
    results = {
        "per_type": per_type,
        "average": {k: _mean([per_type[t][k] for t in types]) for k in names},
        "all_images": {"count": len(per_image), **{k: _mean([r[k] for r in per_image]) for k in names}},
        "input": {"per_type": input_type, "average": {k: _mean([input_type[t][k] for t in types]) for k in names}},
        "type_accuracy": _mean([float(r["predicted_type"] == r["type"]) for r in per_image]),
        "per_image": per_image, "failed": [{"file": f, "reason": r} for f, r in failed],
    }
    left_out = _left_out(per_image, names)
    if left_out:
        results["left_out_of_means"] = left_out
        log("not in the means (not finite): " + _left_out_text(left_out))
    results["fid"] = fid.results() if fid is not None else {
        "computed": False, "reason": "no Inception weights given (--fid-inception)"}
    if fid is None:
        log("FID skipped: no Inception weights given (--fid-inception)")
    return results


# ------------------------------------------------------------------------------------------ reports
def versions() -> Dict[str, str]:
    import importlib.metadata as md
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("jax", "jaxlib", "flax", "numpy", "dm-pix", "Pillow", "orbax-checkpoint", "scikit-image"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    out["backend"] = jax.default_backend()
    out["devices"] = ", ".join(sorted({d.device_kind for d in jax.local_devices()}))
    return out


def protocol(restorer, data: str, split: str, kind: str, crop_border: int, lpips_files=None,
             fid_file=None) -> Dict[str, Any]:
    return {
        "data": os.path.abspath(data), "data_kind": kind, "split": split if kind == "tfds" else None,
        "restoration": restorer.describe(),
        "image_ids": "first 31 bits of SHA-256('<type folder>/LQ/<LQ file>'), noise key "
                     "fold_in(PRNGKey(seed), id)",
        "metric_conventions": {
            "quantisation": "restored image rounded to 8 bits before measuring; GT read as 8-bit",
            "data_range": 1.0, "crop_border": int(crop_border),
            "psnr": "10 log10(1 / MSE) per image, averaged over images",
            "ssim": "Gaussian window 11 taps sigma 1.5, K1 0.01, K2 0.03, population covariance, valid "
                    "region only, RGB = mean over channels (scikit-image structural_similarity)",
            "y_channel": "BT.601 studio-range luma (MATLAB rgb2ycbcr)",
            "lpips": ("VGG v0.1 on the whole image in [-1, 1]; weights " + ", ".join(lpips_files))
            if lpips_files else "not computed (no --lpips-vgg/--lpips-lin)",
            "fid": ("restored vs GT, 2048-d pool features of FID's Inception-v3 (pytorch-fid: bilinear "
                    "resize to 299, [-1, 1]), exact trace term; weights " + fid_file)
            if fid_file else "not computed (no --fid-inception)",
            "average": "mean of the per-type means; all_images: mean over images; values that are not "
                       "finite (PSNR of an image equal to its GT, SSIM of one smaller than the window) "
                       "are left out of every mean and counted under left_out_of_means",
        },
        "versions": versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _left_out_text(left_out: Dict[str, Dict[str, int]]) -> str:
    return "; ".join(f"{k.upper().replace('_Y', ' (Y)')} of {c['restored']} restored and {c['input']} input "
                     f"image(s)" for k, c in left_out.items()) + (
        " (PSNR: equal to the GT, infinite; SSIM: smaller than its window, undefined)")


def _fmt(v, digits):
    return "-" if v is None else f"{v:.{digits}f}"


def markdown_table(results: Dict[str, Any], proto: Optional[Dict[str, Any]] = None) -> str:
    names = [k for k in ("psnr", "ssim", "psnr_y", "ssim_y", "lpips") if k in results["average"]]
    digits = {"psnr": 2, "psnr_y": 2}
    head = ["type", "n"] + [k.upper().replace("_Y", " (Y)") for k in names] + ["input " + names[0].upper()]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t, row in results["per_type"].items():
        lines.append("| " + " | ".join([t, str(row["count"])] + [_fmt(row[k], digits.get(k, 4)) for k in names]
                                       + [_fmt(results["input"]["per_type"][t][names[0]], 2)]) + " |")
    avg = results["average"]
    lines.append("| **average** | " + str(results["all_images"]["count"]) + " | "
                 + " | ".join(_fmt(avg[k], digits.get(k, 4)) for k in names)
                 + " | " + _fmt(results["input"]["average"][names[0]], 2) + " |")
    text = "# Evaluation\n\n" + "\n".join(lines) + "\n"
    fid = results.get("fid", {})
    if fid.get("computed"):
        n = fid.get("images", {})
        text += ("\nFID (restored vs GT): " + ", ".join(f"{t} {_fmt(v, 2)} (n={n.get(t, '?')})"
                                                     for t, v in fid["per_type"].items())
                 + f"; all images {_fmt(fid.get('all_images'), 2)}. {fid.get('note', '')}\n")
    else:
        text += "\nFID: skipped (" + fid.get("reason", "") + ")\n"
    if proto:
        r = proto["restoration"]
        text += (f"\nSettings: {r['settings']}, knobs {r['knobs']}, seed {r['seed']}, colour fix "
                 f"{r['color_fix']}; crop border {proto['metric_conventions']['crop_border']}; "
                 f"checkpoint {r['checkpoint']}. Full protocol in metrics.json.\n")
    if results.get("left_out_of_means"):
        text += "\nLeft out of the means: " + _left_out_text(results["left_out_of_means"]) + ".\n"
    if results.get("failed"):
        text += f"\n{len(results['failed'])} pair(s) failed: see metrics.json.\n"
    return text


def write_reports(out_dir: str, results: Dict[str, Any], proto: Dict[str, Any]) -> Tuple[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    jpath, mpath = os.path.join(out_dir, "metrics.json"), os.path.join(out_dir, "metrics.md")
    with open(jpath, "w") as f:
        json.dump({"protocol": proto, **results}, f, indent=2)
    with open(mpath, "w") as f:
        f.write(markdown_table(results, proto))
    return jpath, mpath
