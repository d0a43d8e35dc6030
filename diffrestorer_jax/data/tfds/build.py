"""Build a dataset (`hq_folder` or `paired`) into a folder, and open one for reading; no TF needed.

The dataset lands in `<out>/<kind>/1.0.0/` (array_record shards + TFDS metadata) and the list of
skipped inputs in `<out>/<kind>_<split>_report.txt`. Read it back with `load_source(out, kind, split)`
(= `tfds.data_source`), a random-access source the grain pipeline consumes directly.
"""
import os
import tempfile
from typing import Sequence, Tuple

import tensorflow_datasets as tfds

from diffrestorer_jax import paths
from diffrestorer_jax.data.tfds import common
from diffrestorer_jax.data.tfds.hq_folder import HqFolder
from diffrestorer_jax.data.tfds.paired import Paired

BUILDERS = {"hq_folder": HqFolder, "paired": Paired}


def build_dataset(kind: str, src_dirs: Sequence[str], out_dir: str, split: str = "train") -> Tuple[int, str]:
    """Build; returns (number of records written, report path). Refuses missing source folders."""
    if kind not in BUILDERS:
        raise ValueError(f"unknown dataset kind {kind!r}; use one of {', '.join(BUILDERS)}")
    missing = [d for d in src_dirs if not os.path.isdir(d)]
    if missing or not src_dirs:
        raise ValueError(f"source folder(s) not found: {', '.join(missing) or '(none given)'}")
    builder = BUILDERS[kind](src_dirs=src_dirs, split=split, data_dir=out_dir, file_format="array_record")
    with tempfile.TemporaryDirectory() as downloads:  # tfds wants a download dir even with nothing to fetch
        builder.download_and_prepare(download_dir=downloads)
    report = common.write_report(os.path.join(out_dir, f"{kind}_{split}_report.txt"),
                                 f"{kind} from {', '.join(src_dirs)}", builder.problems)
    return builder.info.splits[split].num_examples, report


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
