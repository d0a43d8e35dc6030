"""Files in, files out: which inputs a restore run takes and where each output goes.

    inputs = find_inputs("photos/")                  # FILE, DIR (recursive) or 'GLOB'
    check_output_folder(inputs, "restored/")         # before the model is loaded
    summary = restore_files(restorer, inputs, "restored/")

One PNG per input (same relative path, extension .png) and a JSON sidecar with every setting, the
image id and the predicted degradation-type probabilities. An image's id (its noise key) is
`path_image_id` of its path relative to the input root: the folder for `--input DIR`, the file's
folder for `--input FILE`, the glob's directory part for `--input 'DIR/*.jpg'`, so `--input photos`
and `--input photos/a.png` give a.png the same id. On several hosts each process takes every
process_count-th file.

What a run guarantees: a file that cannot be read, or a batch that fails (out of memory, anything
unexpected), is reported with its reason and the rest is written; outputs are written atomically
with the user's umask; an existing output is kept only if its sidecar says it was made with the same
settings and checkpoint from the same input content (a new photo under an old name is restored); a
file at an output's path that no restore run wrote (no sidecar of ours) is never replaced without
--overwrite, and an output folder where an output would replace an input is refused; no two inputs
share an output name, even on a case-insensitive file system.
"""
import contextlib
import dataclasses
import fnmatch
import glob as globlib
import hashlib
import json
import os
import stat
import sys
import tempfile
from typing import Any, Callable, Dict, List, Optional, Tuple

import jax

from diffrestorer_jax import paths
from diffrestorer_jax.data.image_io import (IMAGE_EXTENSIONS, ImageReadError, precision_notes, read_image,
                                            remove_stale_temporaries, write_atomic, write_png)
from diffrestorer_jax.infer.restorer import Restorer, RestoreError, path_image_id

# Sidecar fields that decide an output's pixels (batch size and device count do not: restorer.py);
# config_overrides (the command's --config.* flags) may change the schedule or the networks.
DECIDING = ("seed", "settings", "knobs", "color_fix", "latent_tile", "tile_overlap", "checkpoint",
            "checkpoint_id", "dtype", "config_overrides")


@dataclasses.dataclass
class InputSet:
    root: str
    files: List[str]  # sorted, absolute
    kind: str = "dir"  # dir | file | glob
    special: List[str] = dataclasses.field(default_factory=list)  # FIFOs etc. named like images
    pattern: str = ""  # a glob input's pattern, absolute


_GLOB_CHARS = "*?["


def local_only(flag: str, path: str) -> None:
    """Image folders are read and written on local disk: refuse a URL (os.path would make
    `<cwd>/gs:/...` of it) with a message instead."""
    if paths.is_url(path):
        raise RestoreError(f"{flag} {path}: images are read and written on local disk (only --checkpoint "
                           "may be a gs:// or other URL); copy them locally first")


def _regular(path: str) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def find_inputs(spec: str) -> InputSet:
    """FILE, DIR (recursive, image extensions, hidden files skipped) or GLOB -> InputSet. Special
    files (a FIFO named x.png) are set aside in `special`, never opened."""
    local_only("--input", spec)
    spec = os.path.expanduser(spec)
    if os.path.isdir(spec):
        root, kind = spec, "dir"
        files = [os.path.join(d, f) for d, _, fs in os.walk(spec) for f in fs
                 if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)]
        if not files:
            raise RestoreError(f"--input {spec}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in this folder")
    elif os.path.exists(spec):
        if not _regular(spec):
            raise RestoreError(f"--input {spec}: not a regular file (a FIFO, socket or device)")
        root, files, kind = os.path.dirname(spec) or ".", [spec], "file"
    elif any(c in spec for c in _GLOB_CHARS):
        files = [p for p in globlib.glob(spec, recursive=True) if os.path.exists(p) and not os.path.isdir(p)]
        if not files:
            raise RestoreError(f"--input {spec}: the pattern matches no files")
        parts = spec.replace(os.sep, "/").split("/")
        fixed = []
        for part in parts:
            if any(c in part for c in _GLOB_CHARS):
                break
            fixed.append(part)
        root, kind = "/".join(fixed) or ".", "glob"
    else:
        raise RestoreError(f"--input {spec}: no such file or folder")
    files = sorted(os.path.abspath(f) for f in files)
    return InputSet(os.path.abspath(root), [f for f in files if _regular(f)], kind,
                    [f for f in files if not _regular(f)], os.path.abspath(spec) if kind == "glob" else "")


def _glob_matches(pattern: str, path: str) -> bool:
    """Whether `glob(pattern)` could list `path` (both absolute): component by component, as glob
    matches; a pattern with '**' is taken to match everything under its fixed prefix."""
    if "**" in pattern:
        return True
    want, have = pattern.split(os.sep), path.split(os.sep)
    return len(want) == len(have) and all(fnmatch.fnmatchcase(h, w) for h, w in zip(have, want))


def check_output_folder(inputs: InputSet, out_dir: str) -> None:
    """Refuse, before the model is loaded: an output folder inside (or equal to) a folder input, or
    one where a glob input's pattern matches the outputs (the next run would take them for inputs);
    one where an output would replace an input (`--input photo.png --output .`); and one that cannot
    be written."""
    local_only("--output", out_dir)
    out = os.path.abspath(out_dir)
    inside = out == inputs.root or out.startswith(os.path.join(inputs.root, ""))
    outputs = output_paths(inputs, out)
    if inputs.kind == "dir" and inside:
        raise RestoreError(f"--output {out_dir} is inside --input {inputs.root}: the next run would take "
                           "the outputs for inputs; choose an output folder outside it")
    if inputs.kind == "glob" and inside and any(_glob_matches(inputs.pattern, o) for o in outputs.values()):
        raise RestoreError(f"--output {out_dir}: --input's pattern {inputs.pattern} matches the outputs, "
                           "so the next run would take them for inputs; choose an output folder it does "
                           "not match")
    # By file identity, so links and a case-insensitive file system (photo.PNG's output photo.png)
    # are seen through.
    identity = {}
    for f in inputs.files:
        with contextlib.suppress(OSError):
            st = os.stat(f)
            identity[(st.st_dev, st.st_ino)] = f
    for f, o in outputs.items():
        try:
            st = os.stat(o)
        except OSError:
            continue
        clash = identity.get((st.st_dev, st.st_ino))
        if clash is not None:
            raise RestoreError(f"--output {out_dir}: the output for {f} would overwrite the input {clash}; "
                               "choose another output folder")
    try:
        os.makedirs(out, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise RestoreError(f"--output {out_dir} cannot be written: {e.strerror or e}") from None


def output_paths(inputs: InputSet, out_dir: str) -> Dict[str, str]:
    """Input -> output PNG: the same relative path with extension .png; where that would collide
    (a.jpg and a.png; on a case-insensitive file system A.png and a.png) the input's whole name is
    kept (a.jpg.png), and where even that collides (with an input named a.jpg.png), a short hash of
    the input's path is added (a.jpg~3f2a9c01.png). The result depends only on the set of inputs."""
    rel = {f: os.path.relpath(f, inputs.root) for f in inputs.files}
    first = {f: os.path.splitext(r)[0] + ".png" for f, r in rel.items()}
    counts: Dict[str, int] = {}
    for name in first.values():
        counts[name.casefold()] = counts.get(name.casefold(), 0) + 1
    chosen = {f: n for f, n in first.items() if counts[n.casefold()] == 1}
    used = {n.casefold() for n in chosen.values()}
    for f in sorted(set(rel) - set(chosen)):
        digest = hashlib.sha256(os.fsencode(rel[f])).hexdigest()
        options = [rel[f] + ".png"] + [f"{os.path.splitext(rel[f])[0]}~{digest[:k]}.png" for k in (8, 16, 64)]
        chosen[f] = next(n for n in options if n.casefold() not in used)
        used.add(chosen[f].casefold())
    return {f: os.path.join(out_dir, chosen[f]) for f in inputs.files}


def sidecar_path(png_path: str) -> str:
    return os.path.splitext(png_path)[0] + ".json"


def _write_json(path: str, data) -> None:
    write_atomic(path, json.dumps(data, indent=2).encode())


def _saved_record(sidecar: str) -> Optional[Dict[str, Any]]:
    """The record a restore run wrote at `sidecar`, or None where there is none (missing, or a
    file of someone else's: not JSON, or JSON without the record's fields)."""
    try:
        with open(sidecar) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return None
    return saved if isinstance(saved, dict) and {"output", "checkpoint"} <= saved.keys() else None


def _file_sha256(path: str) -> Optional[str]:
    """The file's content hash (None if it cannot be read: reading it again reports why)."""
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError:
        return None


def _made_with(saved: Dict[str, Any], settings: Dict[str, Any]) -> bool:
    """Whether an existing output's record shows these very settings and checkpoint (compared as
    the record keeps them: JSON, where a tuple is a list)."""
    as_saved = json.loads(json.dumps({k: settings.get(k) for k in DECIDING}, default=str))
    return all(saved.get(k) == as_saved[k] for k in DECIDING)


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
    Every file that cannot be read, restored or written is logged (one line naming it and why) and
    listed in the summary; the others are written."""
    from tqdm import tqdm
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    out_dir = os.path.abspath(out_dir)
    removed = remove_stale_temporaries(out_dir) if os.path.isdir(out_dir) else 0
    if removed:
        log(f"removed {removed} temporary file(s) left in {out_dir} by an interrupted run")
    outputs = output_paths(inputs, out_dir)
    summary = Summary()
    for f in inputs.special:
        summary.failed.append((f, "not a regular file (a FIFO, socket or device): not read"))
        log(f"error: {f}: not a regular file (a FIFO, socket or device): not read")
    common = restorer.describe()
    deciding = {**common, **(extra or {})}
    todo, redo = [], 0
    for f in inputs.files[pi::pc]:
        out, side = outputs[f], sidecar_path(outputs[f])
        if not overwrite and (os.path.exists(out) or os.path.exists(side)):
            saved = _saved_record(side)
            if saved is None:  # a file this command did not write: never replaced unasked
                theirs = out if os.path.exists(out) else side
                summary.failed.append((f, f"{theirs} exists and was not written by a restore run: kept "
                                          "(--overwrite replaces it)"))
                log(f"error: {f}: {summary.failed[-1][1]}")
                continue
            if os.path.exists(out):
                content = _file_sha256(f)
                if content and saved.get("input_sha256") == content and _made_with(saved, deciding):
                    summary.skipped.append(out)
                    continue
                redo += 1
        todo.append(f)
    if summary.skipped:
        log(f"{len(summary.skipped)} output(s) made with these settings already exist, skipped "
            "(--overwrite redoes them)")
    if redo:
        log(f"{redo} existing output(s) were made with other settings, another checkpoint or from another "
            "version of their input: redone")
    bar = tqdm(total=len(todo), unit="img", desc="restoring", disable=not progress, file=sys.stderr)
    say = (lambda m: bar.write(m, file=sys.stderr)) if progress else log

    def fail(path, reason):
        summary.failed.append((path, reason))
        say(f"error: {path}: {reason}")
        bar.update(1)

    notes: Dict[str, List[str]] = {}

    def items():
        for f in todo:
            try:
                image = read_image(f, max_pixels=restorer.options.max_pixels)
            except ImageReadError as e:
                fail(f, e.reason)
                continue
            notes[f] = precision_notes(f)
            for note in notes[f]:
                say(f"note: {f}: {note}")
            yield f, image, path_image_id(os.path.relpath(f, inputs.root))

    for f, image, info in restorer.restore_stream(items(), on_error="yield"):
        if image is None:
            fail(f, info["error"])
            continue
        out = outputs[f]
        record = {"input": f, "relative_path": os.path.relpath(f, inputs.root).replace(os.sep, "/"),
                  "input_sha256": _file_sha256(f), "output": out, **info, **common,
                  "notes": notes.pop(f, []), **(extra or {})}
        try:  # the record first: an image without one is taken for someone else's by the next run
            _write_json(sidecar_path(out), record)
            write_png(out, image)
        except OSError as e:
            fail(f, f"cannot write {out}: {e.strerror or e}")
            continue
        summary.written.append(out)
        bar.update(1)
    bar.close()
    return summary
