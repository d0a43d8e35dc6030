"""Build a dataset (`hq_folder` or `paired`) into a folder, and open one for reading; no TF needed.

The dataset lands in `<out>/<kind>/1.0.0/` (array_record shards + TFDS metadata) and the list of
skipped inputs in `<out>/<kind>_<split>_report.txt`. Several splits (train, test, ...) live side by
side in one `<out>`, each built by its own call; building a split that is already there is refused
unless `overwrite=True`, which rebuilds that split and keeps the others (see store.py). A killed
build's temporary `<out>/.building-*` folder is removed by the next build into `<out>`. Read it back
with `load_source(out, kind, split)` (= `tfds.data_source`), a random-access source the grain
pipeline consumes directly.
"""
import os
import re
import sys
import tempfile
from typing import Sequence, Tuple

import tensorflow_datasets as tfds

from diffrestorer_jax import paths
from diffrestorer_jax.data.tfds import common, store
from diffrestorer_jax.data.tfds.hq_folder import HqFolder
from diffrestorer_jax.data.tfds.paired import Paired

BUILDERS = {"hq_folder": HqFolder, "paired": Paired}
SPLIT_NAME = re.compile(r"[A-Za-z0-9_]+")


def build_dataset(kind: str, src_dirs: Sequence[str], out_dir: str, split: str = "train",
                  overwrite: bool = False) -> Tuple[int, str]:
    """Build one split; returns (number of records written, report path).

    ValueError for an unknown kind or missing source folders; store.DatasetExistsError (a ValueError)
    when `out_dir` already holds this kind's `split` and `overwrite` is false.
    """
    if kind not in BUILDERS:
        raise ValueError(f"unknown dataset kind {kind!r}; use one of {', '.join(BUILDERS)}")
    missing = [d for d in src_dirs if not os.path.isdir(d)]
    if missing or not src_dirs:
        raise ValueError(f"source folder(s) not found: {', '.join(missing) or '(none given)'}")
    if not SPLIT_NAME.fullmatch(split):
        raise ValueError(f"split name {split!r}: use letters, digits and '_' (e.g. train, test)")
    version = str(BUILDERS[kind].VERSION)
    version_dir = os.path.join(out_dir, kind, version)
    store.check_can_build(version_dir, split, overwrite)
    os.makedirs(out_dir, exist_ok=True)
    for note in store.clear_stale_builds(out_dir):
        print(note, file=sys.stderr)
    # A fresh folder on the same file system, so the built split is moved in by renames.
    with tempfile.TemporaryDirectory(prefix=f"{store.BUILDING}{kind}-{split}-", dir=out_dir) as work:
        store.claim(work)
        builder = BUILDERS[kind](src_dirs=src_dirs, split=split, data_dir=os.path.join(work, "data"),
                                 file_format="array_record")
        try:
            builder.download_and_prepare(download_dir=os.path.join(work, "downloads"))
        except Exception:  # noqa: BLE001  tfds refuses an empty split with an AssertionError
            if builder.num_records:
                raise
            report = _write_report(out_dir, kind, split, src_dirs, builder.problems, failed=True)
            raise ValueError(f"no usable {kind} inputs in {', '.join(src_dirs)} ({len(builder.problems)} "
                             f"skipped, listed in {report}); nothing was built") from None
        count = builder.info.splits[split].num_examples
        store.install_split(os.path.join(work, "data", kind, version), version_dir, kind, split)
    return count, _write_report(out_dir, kind, split, src_dirs, builder.problems)


def _write_report(out_dir, kind, split, src_dirs, problems, failed=False) -> str:
    """`<kind>_<split>_report.txt` beside a built split; `..._report.failed.txt` for a build that
    produced nothing (so the report of a split already there stays with it)."""
    name = f"{kind}_{split}_report" + (".failed" if failed else "") + ".txt"
    return common.write_report(os.path.join(out_dir, name), f"{kind} {split!r} split from "
                               f"{', '.join(src_dirs)}" + (" (nothing built)" if failed else ""), problems)


def build_command(kind: str, out_dir: str, split: str) -> str:
    src = "ROOT" if kind == "paired" else "DIR [DIR ...]"
    return f"diffrestorer-build-dataset --kind {kind} --src {src} --out {out_dir} --split {split}"


def load_source(out_dir: str, kind: str, split: str = "train"):
    """The built split as a random-access source (len, [i] -> record dict with PNG bytes).

    ValueError for a kind we do not build; FileNotFoundError naming the folder (and the command
    that builds it) when the dataset or its split is not there.
    """
    if kind not in BUILDERS:
        raise ValueError(f"unknown dataset kind {kind!r}; use one of {', '.join(BUILDERS)} "
                         "(built with diffrestorer-build-dataset)")
    where = paths.path(out_dir) / kind  # local or gs://... (TFDS reads both)
    if not where.is_dir():
        raise FileNotFoundError(f"no built {kind!r} dataset in {out_dir!r} ({where} does not exist); "
                                f"build it with: {build_command(kind, out_dir, split)}")
    try:
        return tfds.data_source(kind, split=split, data_dir=out_dir)
    except Exception as e:  # noqa: BLE001  tfds raises assorted types for a missing version/split
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]  # not tfds' list of all datasets
        raise FileNotFoundError(f"cannot open the {kind!r} dataset's {split!r} split in {where} ({reason}); "
                                f"build it with: {build_command(kind, out_dir, split)}") from None
