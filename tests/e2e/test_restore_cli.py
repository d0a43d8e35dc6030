"""diffrestorer-restore on a tiny checkpoint made here: a folder of mixed-size photos with broken files.

Outputs at the input sizes with sidecars; bad files named on stderr without a traceback and a
non-zero exit; existing outputs skipped, --overwrite redoes them; one compilation per shape bucket;
an image's output identical bit for bit whatever the batch size, the other images or the device count.
"""
import json
import os
import pathlib
import subprocess

import numpy as np
import pytest
from PIL import Image

import procs
from exports import tiny_export
from diffrestorer_jax.cli import restore as restore_cli
from diffrestorer_jax.infer import buckets
from diffrestorer_jax.infer.files import find_inputs, output_paths
from diffrestorer_jax.infer.restorer import path_image_id
from diffrestorer_jax.parallel.sharding import CompileCounter

ROOT = pathlib.Path(__file__).resolve().parents[2]
GOOD = {"a.png": (32, 32), "b.jpg": (27, 30), "sub/c.png": (40, 44), "e.png": (38, 41)}
BAD = ("trunc.png", "text.png", "empty.png")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_export(tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    from skimage import data
    folder = tmp_path_factory.mktemp("photos")
    (folder / "sub").mkdir()
    sources = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    for (name, (h, w)), src in zip(GOOD.items(), sources):
        im = Image.fromarray(src).resize((w * 4, h * 4)).crop((0, 0, w * 4, h * 4)).resize((w, h))
        im.save(folder / name, quality=90) if name.endswith(".jpg") else im.save(folder / name)
    data_png = (folder / "a.png").read_bytes()
    (folder / "trunc.png").write_bytes(data_png[: len(data_png) // 2])
    (folder / "text.png").write_text("not an image")
    (folder / "empty.png").write_bytes(b"")
    return folder


def _read(path):
    return np.asarray(Image.open(path))


def test_buckets_small_set():
    assert [buckets.bucket_side(n, 8) for n in (1, 8, 9, 30, 33, 40, 41, 64, 65, 100)] == \
        [8, 8, 16, 32, 40, 40, 48, 64, 80, 112]
    assert buckets.round_batch(3, 8) == 8 and buckets.round_batch(9, 8) == 16 and buckets.round_batch(3, 1) == 3
    img = np.arange(5 * 7 * 3, dtype=np.float32).reshape(5, 7, 3)
    padded = buckets.pad_to(img, (8, 8))
    assert padded.shape == (8, 8, 3) and np.array_equal(buckets.crop_to(padded, (5, 7)), img)
    assert np.array_equal(buckets.pad_to(img[:1, :1], (8, 8)), np.broadcast_to(img[:1, :1], (8, 8, 3)))
    batch, n = buckets.fill_batch([img, img + 1], 4)
    assert batch.shape == (4, 5, 7, 3) and n == 2


def test_cli_folder(ckpt, photos, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--checkpoint", ckpt, "--input", str(photos), "--output", str(out), "--seed", "3",
            "--no-progress", "--color-fix", "auto", "--config.sampler.eta=0.0"]
    with CompileCounter("restore_bucket") as compiles:
        assert restore_cli.main(args) == 1  # bad files -> non-zero
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for name in BAD:
        assert sum(name in line and "error" in line for line in err.splitlines()) == 1, err
    assert "truncated" in err and "zero-byte" in err and "not an image" in err
    # One compilation per shape bucket (8 devices -> batch 8; two buckets: 32x32 and 40x48).
    sizes = {n: s for n, s in GOOD.items()}
    assert len({buckets.bucket_for(h, w, 8) for h, w in sizes.values()}) == 2
    assert compiles.count == 2, compiles.names
    for name, (h, w) in GOOD.items():
        png = out / (os.path.splitext(name)[0] + ".png")
        assert _read(png).shape == (h, w, 3)
        side = json.loads(png.with_suffix(".json").read_text())
        assert side["seed"] == 3 and side["settings"]["steps"] == 2 and side["settings"]["sampler"] == "ddim"
        assert side["image_id"] == path_image_id(name) and side["size"] == [h, w]
        assert side["color_fix"] == "auto" and isinstance(side["color_fix_applied"], bool)
        assert set(side["knobs"]) == {"guidance_scale", "control_scale", "fidelity_weight", "eta"}
        probs = side["type_probs"]
        assert len(probs) == 8 and "low_light" in probs and abs(sum(probs.values()) - 1) < 1e-4
        assert side["config_overrides"] == {"sampler.eta": 0.0}
    assert not any((out / (os.path.splitext(b)[0] + ".png")).exists() for b in BAD)

    # Rerun: everything there is skipped (nothing rewritten, nothing compiled).
    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    first = {p: _read(p) for p in stamp}
    with CompileCounter("restore_bucket") as compiles:
        assert restore_cli.main(args) == 1
    assert compiles.count == 0
    assert "4 output(s) already exist" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.png")} == stamp
    # --overwrite redoes them, with the same result.
    assert restore_cli.main(args + ["--overwrite"]) == 1
    assert all(p.stat().st_mtime_ns != stamp[p] for p in stamp)
    assert all(np.array_equal(_read(p), first[p]) for p in stamp)


def test_same_output_any_batch_or_device_count(ckpt, photos, tmp_path, capsys):
    """a.png asked with batch size 1 on 8 devices (alone; the batch is rounded up to 8 and padded),
    with batch size 3 among b.jpg (and a padding row) on 1 device, and among the whole folder on 8
    devices: identical PNGs. (Same 32x32 bucket as test_cli_folder, so the 8-device program is reused.)"""
    runs = {"alone_8dev": ["--input", str(photos / "a.png"), "--batch-size", "1"],
            "batch3_1dev": ["--input", str(photos / "[ab].*"), "--devices", "1", "--batch-size", "3"],
            "folder_8dev": ["--input", str(photos), "--batch-size", "8"]}
    images = {}
    for name, extra in runs.items():
        out = tmp_path / name
        rc = restore_cli.main(["--checkpoint", ckpt, "--output", str(out), "--seed", "3", "--no-progress",
                               "--color-fix", "auto"] + extra)
        assert rc == (1 if name == "folder_8dev" else 0)
        images[name] = _read(out / "a.png")
        assert json.loads((out / "a.json").read_text())["image_id"] == path_image_id("a.png")
    capsys.readouterr()
    np.testing.assert_array_equal(images["alone_8dev"], images["batch3_1dev"])
    np.testing.assert_array_equal(images["alone_8dev"], images["folder_8dev"])


def test_inputs_and_output_names(photos, tmp_path):
    assert [os.path.basename(f) for f in find_inputs(str(photos / "*.png")).files] == \
        ["a.png", "e.png", "empty.png", "text.png", "trunc.png"]
    (tmp_path / "x.png").write_bytes(b"1")
    (tmp_path / "x.jpg").write_bytes(b"1")
    (tmp_path / "notes.txt").write_text("ignored")
    names = sorted(os.path.basename(p) for p in output_paths(find_inputs(str(tmp_path)), "/o").values())
    assert names == ["x.jpg.png", "x.png.png"]


def test_foreseeable_errors_are_messages(ckpt, photos, tmp_path, capsys):
    assert restore_cli.main(["--checkpoint", str(tmp_path), "--input", str(photos), "--output", str(tmp_path / "o")]) == 2
    assert "config.json is missing" in capsys.readouterr().err
    assert restore_cli.main(["--checkpoint", ckpt, "--input", str(tmp_path / "none*.png"), "--output", str(tmp_path / "o")]) == 2
    assert "matches no files" in capsys.readouterr().err
    assert restore_cli.main(["--checkpoint", ckpt, "--input", str(photos), "--output", str(tmp_path / "o"),
                             "--config.no_such.field=1"]) == 2
    assert "no such config field" in capsys.readouterr().err


def test_subprocess_exit_status_and_stderr(ckpt, photos, tmp_path):
    """The real command on broken files only: one line per file, no traceback, exit status 1."""
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in BAD:
        (bad / name).write_bytes((photos / name).read_bytes())
    proc = subprocess.run([*procs.command("diffrestorer-restore"), "--checkpoint", ckpt,
                           "--input", str(bad), "--output", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for name in BAD:
        assert str(bad / name) in proc.stderr


def test_large_buckets_are_tiled(ckpt):
    """Buckets larger than the config's training size (64 px = 16 latent) get a tiled program; the
    tile and overlap options are checked before anything is compiled."""
    from diffrestorer_jax.infer.restorer import Options, RestoreError, Restorer
    r = Restorer.from_export(ckpt, Options(steps=2))
    assert r.settings_for((64, 64)).tile is None
    big = r.settings_for(r.bucket(72, 100))
    assert big.tile == 16 and big.tile_overlap == 4
    assert Restorer.from_export(ckpt, Options(tile=0)).settings_for((256, 256)).tile is None
    assert Restorer.from_export(ckpt, Options(tile=8, tile_overlap=2)).settings_for((64, 64)).tile == 8
    with pytest.raises(RestoreError, match="multiple of 2"):
        Restorer.from_export(ckpt, Options(tile=7))


def test_samples_option_reaches_the_program_settings(ckpt):
    """--samples K becomes RestoreSettings.samples (the averaged posterior draws, tested in
    test_restore_pipeline.py); K < 1 is refused before anything is compiled."""
    import argparse
    from diffrestorer_jax.cli.restore_options import add_options, options_from_args
    from diffrestorer_jax.infer.restorer import Options, RestoreError, Restorer
    p = argparse.ArgumentParser()
    add_options(p)
    options = options_from_args(p.parse_args(["--samples", "4"]))
    assert Restorer.from_export(ckpt, options).settings_for((64, 64)).samples == 4
    assert Restorer.from_export(ckpt, Options()).settings_for((64, 64)).samples == 1
    with pytest.raises(RestoreError, match="--samples must be >= 1"):
        Restorer.from_export(ckpt, Options(samples=0))
