"""Building into an existing --out: splits side by side, no silent reuse, ambiguous inputs reported,
equal names from several roots kept apart, a killed build's leftovers cleared."""
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from diffrestorer_jax.cli.build_dataset import main as build_dataset_main
from diffrestorer_jax.data.tfds.build import build_dataset, load_source
from diffrestorer_jax.data.tfds.store import DatasetExistsError
from diffrestorer_jax.tools.evaluate import pair_name


def _save(path, seed):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (6, 6, 3), dtype=np.uint8)).save(path)


def _paired(root, names, folder="noisy"):
    for i, n in enumerate(names):
        _save(str(root / folder / "LQ" / f"{n}.png"), i)
        _save(str(root / folder / "GT" / f"{n}.png"), i + 50)
    return str(root)


def _report(path):
    with open(path) as f:
        return [line.rstrip("\n").split("\t") for line in f if not line.startswith("#")]


def _names(source):
    return sorted(os.path.basename(source[i]["file_name"].decode()) for i in range(len(source)))


def test_splits_side_by_side_and_a_rebuild_needs_overwrite(tmp_path):
    small, large = _paired(tmp_path / "small", ["a", "b"]), _paired(tmp_path / "large", ["c", "d", "e"])
    out = str(tmp_path / "data")
    assert build_dataset("paired", [small], out, "train")[0] == 2
    assert build_dataset("paired", [large], out, "test")[0] == 3
    assert _names(load_source(out, "paired", "train")) == ["a.png", "b.png"]
    assert _names(load_source(out, "paired", "test")) == ["c.png", "d.png", "e.png"]

    with pytest.raises(DatasetExistsError, match=r"already holds the 'train' split \(2 records; also 'test'\)"
                                                 r".*--overwrite"):
        build_dataset("paired", [large], out, "train")
    assert _names(load_source(out, "paired", "train")) == ["a.png", "b.png"]  # untouched

    assert build_dataset("paired", [large], out, "train", overwrite=True)[0] == 3
    assert _names(load_source(out, "paired", "train")) == ["c.png", "d.png", "e.png"]
    assert _names(load_source(out, "paired", "test")) == ["c.png", "d.png", "e.png"]  # kept
    shards = sorted(f for f in os.listdir(os.path.join(out, "paired", "1.0.0")) if "array_record" in f)
    assert [s.split(".")[0] for s in shards] == ["paired-test", "paired-train"]
    assert not [f for f in os.listdir(out) if f.startswith(".building")]


def test_cli_refuses_an_existing_split_and_reports_a_rebuild_truthfully(tmp_path, capsys):
    src = tmp_path / "src"
    _paired(src, ["a", "b"])
    out = str(tmp_path / "data")
    args = ["--kind", "paired", "--src", str(src), "--out", out, "--split", "test"]
    assert build_dataset_main(args) == 0
    (src / "noisy" / "GT" / "b.png").unlink()  # b now lacks its GT: a rebuild must say so
    capsys.readouterr()
    assert build_dataset_main(args) == 2
    captured = capsys.readouterr()
    assert "already holds the 'test' split" in captured.err and "--overwrite" in captured.err
    assert "Traceback" not in captured.err and "0 skipped" not in captured.out
    assert build_dataset_main(args + ["--overwrite"]) == 0
    assert "paired/test: 1 records" in (out_text := capsys.readouterr().out) and "1 skipped" in out_text
    assert len(load_source(out, "paired", "test")) == 1
    assert [os.path.basename(p) for p, _ in _report(os.path.join(out, "paired_test_report.txt"))] == ["b.png"]


def test_duplicate_stems_in_a_paired_folder_are_reported_and_skipped(tmp_path):
    root = tmp_path / "src"
    _paired(root, ["a", "b"])
    _save(str(root / "noisy" / "LQ" / "a.jpg"), 7)
    count, report = build_dataset("paired", [str(root)], str(tmp_path / "data"))
    assert count == 1 and _names(load_source(str(tmp_path / "data"), "paired")) == ["b.png"]
    problems = {os.path.basename(p): r for p, r in _report(report)}
    assert set(problems) == {"a.png", "a.jpg"}
    assert "2 LQ files share the name 'a' (a.jpg, a.png)" in problems["a.jpg"]


def test_overlapping_sources_give_each_file_once_and_nothing_usable_is_an_error(tmp_path, capsys):
    _save(str(tmp_path / "hq" / "x.png"), 0)
    _save(str(tmp_path / "hq" / "sub" / "y.png"), 1)
    out = str(tmp_path / "data")
    count, report = build_dataset("hq_folder", [str(tmp_path / "hq"), str(tmp_path / "hq" / "sub")], out)
    assert count == 2
    assert [(os.path.basename(p), "already included" in r) for p, r in _report(report)] == [("y.png", True)]

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    assert build_dataset_main(["--kind", "hq_folder", "--src", str(tmp_path / "empty"), "--out", out, "--split", "x"]) == 2
    err = capsys.readouterr().err
    assert "no usable hq_folder inputs" in err and "hq_folder_x_report.failed.txt" in err
    assert "Traceback" not in err


def test_paired_roots_holding_equal_file_names_stay_apart(tmp_path):
    roots = [_paired(tmp_path / "x" / "setA", ["0"]), _paired(tmp_path / "setB", ["0"]),
             _paired(tmp_path / "y" / "setA", ["0"])]
    out = str(tmp_path / "data")
    assert build_dataset("paired", roots, out, "test")[0] == 3
    source = load_source(out, "paired", "test")
    names = sorted(source[i]["file_name"].decode() for i in range(len(source)))
    assert names == ["noisy/LQ/setA-1/0.png", "noisy/LQ/setA-2/0.png", "noisy/LQ/setB/0.png"]
    assert len({pair_name(n) for n in names}) == 3  # what evaluation names (and saves) each pair by
    assert build_dataset("paired", roots[1:2], out, "train")[0] == 1  # one root: its paths, as before
    lq_path = os.path.join(roots[1], "noisy", "LQ", "0.png")
    assert load_source(out, "paired", "train")[0]["file_name"].decode() == lq_path


def test_a_killed_build_leaves_nothing_that_the_next_build_keeps(tmp_path, capsys):
    _save(str(tmp_path / "hq" / "x.png"), 0)
    src, out = str(tmp_path / "hq"), str(tmp_path / "data")
    kill_at_first_image = ("import os, signal; from diffrestorer_jax.data.tfds import build, hq_folder; "
                           "hq_folder.read_image = lambda p: os.kill(os.getpid(), signal.SIGKILL); "
                           f"build.build_dataset('hq_folder', [{src!r}], {out!r})")
    assert subprocess.run([sys.executable, "-c", kill_at_first_image]).returncode == -signal.SIGKILL
    assert [f for f in os.listdir(out) if f.startswith(".building")]  # the killed build's partial copy
    for name, owner in (("live", f"{socket.gethostname()} {os.getpid()}"), ("remote", "elsewhere 1")):
        os.makedirs(os.path.join(out, f".building-hq_folder-train-{name}"))
        with open(os.path.join(out, f".building-hq_folder-train-{name}", ".owner"), "w") as f:
            f.write(owner)
    capsys.readouterr()
    assert build_dataset("hq_folder", [src], out)[0] == 1
    assert sorted(f for f in os.listdir(out) if f.startswith(".building")) == [
        ".building-hq_folder-train-live", ".building-hq_folder-train-remote"]  # may still run: kept
    err = capsys.readouterr().err
    assert "removed" in err and "a build on host elsewhere" in err and "-live" not in err
