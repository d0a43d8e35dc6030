"""Files in, files out: which inputs a restore run takes and where each output goes.

    inputs = find_inputs("photos/")                  # FILE, DIR (recursive) or 'GLOB'
    summary = restore_files(restorer, inputs, "restored/")

One PNG per input (same relative path, extension .png) and a JSON sidecar with every setting, the
image id and the predicted degradation-type probabilities. An image's id (its noise key) is
`path_image_id` of its path relative to the input root: the folder for `--input DIR`, the file's
folder for `--input FILE`, the glob's directory part for `--input 'DIR/*.jpg'`, so `--input photos`
and `--input photos/a.png` give a.png the same id. On several hosts each process takes every
process_count-th file.
"""
import dataclasses
import glob as globlib
import json
import os
import sys
import tempfile
from typing import Any, Callable, Dict, List, Optional, Tuple

import jax

from diffrestorer_jax.data.image_io import IMAGE_EXTENSIONS, ImageReadError, read_image, write_png
from diffrestorer_jax.infer.restorer import Restorer, RestoreError, path_image_id


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
