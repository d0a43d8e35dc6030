"""The splits of a built dataset on disk, and putting a freshly built split beside the others.

TFDS keeps every split of one dataset version in one folder, `<out>/<kind>/<version>/`: the
array_record shards (`<kind>-<split>.array_record-NNNNN-of-MMMMM`) and `dataset_info.json`, whose
`splits` list names each split with its shard lengths. `download_and_prepare` into a folder that
already holds the version does nothing ("reusing dataset"), so a second split, or a rebuild, would
silently be the old data. `build.build_dataset` therefore builds each split into a fresh temporary
folder and `install_split` moves it in: its shards join (or replace) those of the same split, and its
entry joins (or replaces) the one in `dataset_info.json`, so a `train` and a `test` split can be built
by two commands into one `--out`.
"""
import json
import os
import re
import shutil
from typing import Dict, List, Optional

from diffrestorer_jax import atomic

INFO_FILE = "dataset_info.json"
BUILDING = ".building-"  # prefix of a build's temporary folder in <out>
OWNER = ".owner"         # in that folder: "<host> <pid>" of the build writing it


class DatasetExistsError(ValueError):
    """The split to build is already there and rebuilding it was not asked for."""


def _read_info(version_dir: str) -> Dict:
    path = os.path.join(version_dir, INFO_FILE)
    with open(path) as f:
        info = json.load(f)
    if not isinstance(info, dict) or not isinstance(info.get("splits", []), list):
        raise ValueError(f"{path}: not a TFDS dataset_info.json (no 'splits' list)")
    return info


def existing_splits(version_dir: str) -> Optional[Dict[str, int]]:
    """{split name: record count} of a built dataset version; None where there is none.

    ValueError naming the file when the folder exists but its dataset_info.json is unreadable.
    """
    if not os.path.isdir(version_dir):
        return None
    try:
        info = _read_info(version_dir)
    except (OSError, ValueError) as e:
        raise ValueError(f"{version_dir} exists but is not a readable built dataset ({e})") from None
    return {s["name"]: sum(int(n) for n in s.get("shardLengths", [])) for s in info.get("splits", [])}


def _splits_or_none(version_dir: str) -> Optional[Dict[str, int]]:
    try:
        return existing_splits(version_dir)
    except ValueError:
        return None


def check_can_build(version_dir: str, split: str, overwrite: bool) -> None:
    """Refuses (DatasetExistsError) to build a split that is already there unless `overwrite`."""
    try:
        splits = existing_splits(version_dir)
    except ValueError as e:
        if overwrite:
            return
        raise DatasetExistsError(f"{e}; pass --overwrite to replace it") from None
    if splits is not None and split in splits and not overwrite:
        others = sorted(set(splits) - {split})
        raise DatasetExistsError(
            f"{version_dir} already holds the {split!r} split ({splits[split]} records"
            + (f"; also {', '.join(repr(s) for s in others)}" if others else "")
            + "). Nothing was built: pass --overwrite to rebuild that split (other splits are kept), "
              "or choose another --split or --out")


def _shard_files(version_dir: str, kind: str, split: str) -> List[str]:
    pattern = re.compile(re.escape(f"{kind}-{split}.") + r"[^.]+-\d{5}-of-\d{5}$")
    return sorted(f for f in os.listdir(version_dir) if pattern.match(f))


def install_split(built_version_dir: str, version_dir: str, kind: str, split: str) -> None:
    """Move the split built in `built_version_dir` into `version_dir`, keeping its other splits.

    Order: new shards in (same names replace the old ones), then the merged dataset_info.json
    (written to a temporary file and renamed), then the old split's leftover shards removed.
    """
    if _splits_or_none(version_dir) is None:
        if os.path.isdir(version_dir):  # unreadable leftover (overwrite was asked for)
            shutil.rmtree(version_dir)
        os.makedirs(os.path.dirname(version_dir), exist_ok=True)
        os.replace(built_version_dir, version_dir)
        return
    new_shards = _shard_files(built_version_dir, kind, split)
    old_shards = _shard_files(version_dir, kind, split)
    for name in new_shards:
        os.replace(os.path.join(built_version_dir, name), os.path.join(version_dir, name))
    info = _read_info(version_dir)
    new_entry = [s for s in _read_info(built_version_dir)["splits"] if s["name"] == split]
    info["splits"] = [s for s in info["splits"] if s["name"] != split] + new_entry
    info["splits"].sort(key=lambda s: s["name"])
    tmp = os.path.join(version_dir, f".{INFO_FILE}.tmp")
    with open(tmp, "w") as f:
        json.dump(info, f, indent=2)
    os.replace(tmp, os.path.join(version_dir, INFO_FILE))
    for name in set(old_shards) - set(new_shards):
        os.remove(os.path.join(version_dir, name))


def claim(work_dir: str) -> None:
    """Mark a build's temporary folder as this process's (see `clear_stale_builds`)."""
    with open(os.path.join(work_dir, OWNER), "w") as f:
        f.write(atomic.owner_record())


def clear_stale_builds(out_dir: str) -> List[str]:
    """Remove the `.building-*` folders in `out_dir` of builds of this host that were killed; one line
    per folder removed, or left because its build may still run (another host's, or unmarked)."""
    notes = []
    for name in sorted(os.listdir(out_dir)):
        folder = os.path.join(out_dir, name)
        if not (name.startswith(BUILDING) and os.path.isdir(folder)):
            continue
        try:
            with open(os.path.join(folder, OWNER)) as f:
                record = f.read()
        except OSError:
            record = ""
        alive = atomic.owner_alive(record)
        if alive is False:
            try:
                shutil.rmtree(folder)
                notes.append(f"removed {folder}, left by a build that was stopped ({record})")
            except OSError as e:
                notes.append(f"could not remove {folder}, left by a stopped build: {e}")
        elif alive is None and record:
            notes.append(f"left {folder} in place: a build on host {record.partition(' ')[0]} wrote it; "
                         "remove it if that build no longer runs")
        elif alive is None:
            notes.append(f"left {folder} in place: no build owner recorded in it (an older version's, "
                         "or just starting); remove it if no build into this folder runs")
    return notes
