"""diffrestorer-restore on a tiny checkpoint made here: a folder of mixed-size photos with broken files.

Outputs at the input sizes with sidecars and umask permissions; bad files (and a failing batch, and
a FIFO named like an image) named on stderr without a traceback and a non-zero exit; existing
outputs skipped only when made with the same settings (and --config.* overrides), --overwrite
redoes them; a file no restore run wrote kept unless --overwrite, an input never overwritten, a
glob's outputs allowed below its folder where the pattern does not match them; outputs never
collide; names that are not UTF-8 work; one compilation per shape bucket; with --exact an image's
output identical bit for bit whatever the batch size, the other images or the device count, and the
batched default equal to it to a rounding; bfloat16 sharded weights; oversized files refused from
their header; a second run loads its programs from the compilation cache.
"""
import json
import os
import pathlib
import re
import socket
import stat
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


def _dead_pid():
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_cli_folder(ckpt, photos, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    leftover = out / f".tmp-diffrestorer-{socket.gethostname()}-{_dead_pid()}-x.png"  # a killed run's
    leftover.write_bytes(b"half")
    args = ["--checkpoint", ckpt, "--input", str(photos), "--output", str(out), "--seed", "3",
            "--no-progress", "--color-fix", "auto", "--config.sampler.eta=0.0"]
    with CompileCounter("restore_bucket") as compiles:
        assert restore_cli.main(args) == 1  # bad files -> non-zero
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for name in BAD:
        assert sum(name in line and "error" in line for line in err.splitlines()) == 1, err
    assert "truncated" in err and "zero-byte" in err and "not an image" in err
    assert not leftover.exists() and "removed 1 temporary file(s)" in err
    # One compilation per shape bucket (8 devices -> batch 8; two buckets: 32x32 and 40x48).
    sizes = {n: s for n, s in GOOD.items()}
    assert len({buckets.bucket_for(h, w, 8) for h, w in sizes.values()}) == 2
    assert compiles.count == 2, compiles.names
    umask = os.umask(0)
    os.umask(umask)
    for name, (h, w) in GOOD.items():
        png = out / (os.path.splitext(name)[0] + ".png")
        assert _read(png).shape == (h, w, 3)
        for f in (png, png.with_suffix(".json")):
            assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, f
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
    assert "4 output(s) made with these settings already exist" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.png")} == stamp
    # --overwrite redoes them, with the same result.
    assert restore_cli.main(args + ["--overwrite"]) == 1
    assert all(p.stat().st_mtime_ns != stamp[p] for p in stamp)
    assert all(np.array_equal(_read(p), first[p]) for p in stamp)
    # Other settings (a seed): the outputs are not the ones asked for, so they are redone.
    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    assert restore_cli.main([a if a != "3" else "4" for a in args]) == 1
    assert "4 existing output(s) were made with other settings" in capsys.readouterr().err
    assert all(p.stat().st_mtime_ns != stamp[p] for p in stamp)
    assert all(json.loads(p.with_suffix(".json").read_text())["seed"] == 4 for p in stamp)
    # So are outputs made with other --config.* overrides (here the noise schedule's end).
    assert restore_cli.main([a if a != "3" else "4" for a in args] + ["--config.diffusion.beta_end=0.013"]) == 1
    assert "4 existing output(s) were made with other settings" in capsys.readouterr().err


def test_same_output_any_batch_or_device_count(ckpt, photos, tmp_path, capsys):
    """--exact: a.png asked with batch size 1 on 8 devices (alone; the batch is rounded up to 8 and
    padded), with batch size 3 among b.jpg (and a padding row) on 1 device, and with b.jpg on 8
    devices: identical PNGs. Batched (the default; test_cli_folder's 32x32 program): the same PNG to
    within one level of 255."""
    runs = {"alone_8dev": ["--input", str(photos / "a.png"), "--batch-size", "1", "--exact"],
            "batch3_1dev": ["--input", str(photos / "[ab].*"), "--devices", "1", "--batch-size", "3", "--exact"],
            "pair_8dev": ["--input", str(photos / "[ab].*"), "--batch-size", "8", "--exact"],
            "pair_8dev_batched": ["--input", str(photos / "[ab].*"), "--batch-size", "8"]}
    images = {}
    for name, extra in runs.items():
        out = tmp_path / name
        rc = restore_cli.main(["--checkpoint", ckpt, "--output", str(out), "--seed", "3", "--no-progress",
                               "--color-fix", "auto"] + extra)
        assert rc == 0
        images[name] = _read(out / "a.png")
        side = json.loads((out / "a.json").read_text())
        assert side["image_id"] == path_image_id("a.png")
        assert side["settings"]["batch_mode"] == ("batched" if name.endswith("batched") else "exact")
    capsys.readouterr()
    np.testing.assert_array_equal(images["alone_8dev"], images["batch3_1dev"])
    np.testing.assert_array_equal(images["alone_8dev"], images["pair_8dev"])
    diff = np.abs(images["pair_8dev_batched"].astype(int) - images["pair_8dev"].astype(int))
    assert diff.max() <= 1, diff.max()


def test_weights_choice_from_device_memory():
    from diffrestorer_jax.infer.restorer import RestoreError, choose_weights, default_dtype
    gib = 2 ** 30
    assert choose_weights("auto", 3 * gib, 16 * gib, 8)[0] == "replicated"
    placement, why = choose_weights("auto", 9 * gib, 16 * gib, 8)
    assert placement == "sharded" and "9.00 GiB" in why and "16.0 GiB" in why and "8 devices" in why
    assert choose_weights("auto", 9 * gib, 16 * gib, 1)[0] == "replicated"  # nothing to share with
    assert choose_weights("auto", 9 * gib, None, 8)[0] == "replicated"  # CPU: no limit reported
    assert choose_weights("sharded", 1, None, 8) == ("sharded", "0.00 GiB of weights, as asked")
    with pytest.raises(RestoreError, match="--weights"):
        choose_weights("half", 1, None, 8)
    assert default_dtype("tpu") == default_dtype("gpu") == "bfloat16" and default_dtype("cpu") == "float32"


def test_bfloat16_sharded_weights(ckpt):
    """--dtype bfloat16 --weights sharded: kernels stored in bfloat16 (half the bytes), computed in
    it, each device holding 1/8 of every weight; the result close to float32's (test_cli_folder's
    program: replicated, colour fix auto). The sidecar settings say which dtype and placement ran."""
    import jax
    from diffrestorer_jax.infer.program import Shard
    from diffrestorer_jax.infer.restorer import Options, Restorer
    rng = np.random.default_rng(4)
    imgs = [rng.random((32, 32, 3)).astype(np.float32) for _ in range(3)]
    runs = {}
    for dtype, weights in [("float32", "replicated"), ("bfloat16", "sharded")]:
        r = Restorer.from_export(ckpt, Options(batch_size=8, dtype=dtype, weights=weights, color_fix="auto"))
        assert (r.describe()["dtype"], r.describe()["weights"]) == (dtype, weights)
        assert f"{dtype} weights, {weights} on 8 cpu device(s)" in r.placement_note()
        runs[dtype] = (r, np.stack([x for x, _ in r.restore_images(imgs, [1, 2, 3])]))
    f32, bf16 = runs["float32"][0], runs["bfloat16"][0]
    assert bf16.nets.unet.dtype == jax.numpy.bfloat16
    assert bf16.weight_bytes < 0.6 * f32.weight_bytes
    kernel, shard = f32.params["unet"]["conv_in"]["kernel"], bf16.params["unet"]["conv_in"]["kernel"]
    assert isinstance(shard, Shard) and shard.shape == kernel.shape and shard.data.dtype == jax.numpy.bfloat16
    assert shard.data.addressable_shards[0].data.size * 8 == shard.data.size >= kernel.size
    err = np.abs(runs["bfloat16"][1] - runs["float32"][1])
    assert err.mean() < 0.02 and err.max() < 0.25, (err.mean(), err.max())
    assert err.max() > 0  # bfloat16 really ran


def test_max_pixels_refused_from_the_header(ckpt, photos, tmp_path, capsys):
    """A PNG whose header claims 60000x60000 pixels (and holds almost no data) is refused by
    --max-pixels before any decoding (decoding would fail on its missing data), named with the
    limit; the others are restored."""
    import struct
    import zlib
    good = (photos / "a.png").read_bytes()
    ihdr = struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "huge.png").write_bytes(good[:8] + chunk + good[8 + 25:])
    (folder / "a.png").write_bytes(good)
    out = tmp_path / "out"
    rc = restore_cli.main(["--checkpoint", ckpt, "--input", str(folder), "--output", str(out), "--seed", "3",
                           "--no-progress", "--color-fix", "auto", "--batch-size", "8", "--max-pixels", "5000"])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    assert "huge.png: 60000x60000 = 3600000000 pixels exceeds the limit of 5000" in err
    assert (out / "a.png").exists() and not (out / "huge.png").exists()


def test_second_run_loads_programs_from_the_compilation_cache(ckpt, photos, tmp_path):
    """The real command twice with one --compile-cache folder: the first compiles and fills it, the
    second loads every program from it (and prints so); same output bits."""
    cache = tmp_path / "cache"
    lines = []
    for run in ("first", "second"):
        proc = subprocess.run([*procs.command("diffrestorer-restore"), "--checkpoint", ckpt,
                               "--input", str(photos / "a.png"), "--output", str(tmp_path / run), "--steps", "1",
                               "--compile-cache", str(cache), "--no-progress"],
                              capture_output=True, text=True, timeout=300,
                              env=procs.worker_env(1, DIFFRESTORER_COMPILE_CACHE="off"))
        assert proc.returncode == 0, proc.stderr
        lines.append(next(line for line in proc.stderr.splitlines() if line.startswith("time: compiling")))
    assert any(cache.iterdir())
    first, second = (re.search(r" (\d+) program\(s\), (\d+) loaded from the cache", line).groups() for line in lines)
    assert int(first[0]) >= 1 and first[1] == "0", lines
    assert int(second[0]) >= 1 and second[1] == second[0], lines
    assert "first image" in lines[1]
    np.testing.assert_array_equal(_read(tmp_path / "first" / "a.png"), _read(tmp_path / "second" / "a.png"))


def test_inputs_and_output_names(photos, tmp_path):
    assert [os.path.basename(f) for f in find_inputs(str(photos / "*.png")).files] == \
        ["a.png", "e.png", "empty.png", "text.png", "trunc.png"]
    for name in ("x.png", "x.jpg", "x.jpg.png", "X.png", "y.png"):
        (tmp_path / name).write_bytes(b"1")
    (tmp_path / "notes.txt").write_text("ignored")
    outputs = output_paths(find_inputs(str(tmp_path)), "/o")
    names = {os.path.basename(k): os.path.basename(v) for k, v in outputs.items()}
    # no two outputs share a name, even where case does not count; unique ones keep the plain name
    assert len({n.casefold() for n in names.values()}) == 5
    assert names["y.png"] == "y.png" and names["x.jpg.png"] == "x.jpg.png" and names["X.png"] == "X.png.png"
    assert names["x.jpg"].startswith("x~") and names["x.png"].startswith("x~")
    assert output_paths(find_inputs(str(tmp_path)), "/o") == outputs  # depends only on the inputs


def test_names_that_are_not_utf8_are_restored(ckpt, photos, tmp_path, capsys):
    """A file name with bytes that are not UTF-8: restored and named as it is on disk."""
    src = tmp_path / "in"
    src.mkdir()
    raw = os.fsdecode(b"caf\xe9.png")  # Latin-1 e-acute: a surrogate escape in Python's str
    (src / raw).write_bytes((photos / "a.png").read_bytes())
    assert restore_cli.main(["--checkpoint", ckpt, "--input", str(src), "--output", str(tmp_path / "o"),
                             "--seed", "3", "--no-progress"]) == 0, capsys.readouterr().err
    assert sorted(os.listdir(os.fsencode(tmp_path / "o"))) == [b"caf\xe9.json", b"caf\xe9.png"]
    side = json.loads((tmp_path / "o" / os.fsdecode(b"caf\xe9.json")).read_text())
    assert side["image_id"] == path_image_id(raw)


def test_what_the_output_cannot_keep_is_said(ckpt, tmp_path, capsys):
    """An animated GIF (first frame restored) and a 16-bit grayscale PNG (8-bit output): a note on
    stderr and in the sidecar."""
    src = tmp_path / "in"
    src.mkdir()
    frames = [Image.fromarray(np.full((32, 32, 3), v, np.uint8)) for v in (40, 200)]
    frames[0].save(src / "anim.gif", save_all=True, append_images=frames[1:])
    Image.fromarray((np.arange(32 * 32).reshape(32, 32) * 60).astype(np.uint16)).save(src / "deep.png")
    assert restore_cli.main(["--checkpoint", ckpt, "--input", str(src), "--output", str(tmp_path / "o"),
                             "--seed", "3", "--no-progress"]) == 0
    err = capsys.readouterr().err
    anim = json.loads((tmp_path / "o" / "anim.json").read_text())["notes"]
    deep = json.loads((tmp_path / "o" / "deep.json").read_text())["notes"]
    assert anim == ["animated (2 frames): only the first frame is restored"]
    assert deep == ["16-bit samples: the output PNG has 8 bits per channel"]
    assert "note:" in err and "anim.gif" in err and "deep.png" in err


def test_a_failing_batch_fails_its_files_only(ckpt, photos, tmp_path, monkeypatch, capsys):
    """A batch that fails on the device (here: out of memory, injected for the 40x48 bucket) reports
    its files with the reason and a hint; the other bucket's files are written; exit status 1."""
    from diffrestorer_jax.infer.restorer import Restorer
    real = Restorer.restore_batch

    def oom_for_large(self, batch, ids):
        if batch.shape[1:3] != (32, 32):
            raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.0GiB")
        return real(self, batch, ids)

    monkeypatch.setattr(Restorer, "restore_batch", oom_for_large)
    out = tmp_path / "o"
    assert restore_cli.main(["--checkpoint", ckpt, "--input", str(photos), "--output", str(out),
                             "--seed", "3", "--no-progress", "--color-fix", "auto"]) == 1
    err = capsys.readouterr().err
    for name in ("sub/c.png", "e.png"):  # the 40x48 bucket
        assert any(name in line and "RESOURCE_EXHAUSTED" in line and "--batch-size" in line
                   for line in err.splitlines()), err
        assert not (out / (os.path.splitext(name)[0] + ".png")).exists()
    assert (out / "a.png").exists() and (out / "b.png").exists() and "Traceback" not in err


def test_output_folder_is_checked_before_the_model_loads(ckpt, photos, tmp_path, capsys):
    assert restore_cli.main(["--checkpoint", ckpt, "--input", str(photos), "--output", str(photos / "out")]) == 2
    assert "is inside --input" in capsys.readouterr().err and not (photos / "out").exists()
    (tmp_path / "file").write_text("x")
    assert restore_cli.main(["--checkpoint", str(tmp_path / "nowhere"), "--input", str(photos),
                             "--output", str(tmp_path / "file" / "out")]) == 2
    assert "cannot be written" in capsys.readouterr().err  # not the missing checkpoint: checked first
    # Images are on local disk: a URL is refused (os.path would make <cwd>/gs:/... of it).
    for flags in (["--input", "gs://b/in", "--output", str(tmp_path / "o")],
                  ["--input", str(photos), "--output", "gs://b/out"]):
        assert restore_cli.main(["--checkpoint", ckpt] + flags) == 2
        assert "only --checkpoint may be a gs://" in capsys.readouterr().err
    assert not os.path.exists("gs:") and not (tmp_path / "o").exists()


def test_inputs_are_never_overwritten_and_globs_need_not_leave_their_folder(ckpt, photos, tmp_path, capsys):
    """--input photo.png --output . would write photo.png over the input: refused before the model
    loads. A glob's outputs may go below its folder where the pattern does not match them."""
    single = tmp_path / "single"
    single.mkdir()
    (single / "photo.png").write_bytes((photos / "a.png").read_bytes())
    before = (single / "photo.png").read_bytes()
    (tmp_path / "nowhere").mkdir()
    nowhere = str(tmp_path / "nowhere")  # not a checkpoint: it is checked after the output folder
    assert restore_cli.main(["--checkpoint", nowhere, "--input", str(single / "photo.png"),
                             "--output", str(single)]) == 2
    assert "would overwrite the input" in capsys.readouterr().err
    assert (single / "photo.png").read_bytes() == before and os.listdir(single) == ["photo.png"]
    for pattern, out, refused in (("*.png", "restored", False), ("*.png", ".", True),
                                  ("*", "restored", False), ("**/*.png", "restored", True)):
        assert restore_cli.main(["--checkpoint", nowhere, "--input", str(single / pattern),
                                 "--output", str(single / out)]) == 2
        err = capsys.readouterr().err
        assert ("matches the outputs" in err or "would overwrite" in err) == refused, (pattern, out, err)
        assert refused or "config.json is missing" in err, err  # got as far as the checkpoint
    assert (single / "photo.png").read_bytes() == before


def test_files_a_restore_did_not_write_are_kept(ckpt, photos, tmp_path, capsys):
    """An image or a .json at an output's path without a restore run's record beside it is the
    user's: that input fails with a message and the file is kept, unless --overwrite. A rerun
    restores an input whose content changed under the same name."""
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    out.mkdir()
    for name in ("a.png", "e.png"):
        (inp / name).write_bytes((photos / name).read_bytes())
    (out / "a.png").write_bytes(b"my own a.png")
    (out / "e.json").write_text("my notes")
    args = ["--checkpoint", ckpt, "--input", str(inp / "*.png"), "--output", str(out), "--no-progress"]
    assert restore_cli.main(args) == 1
    err = capsys.readouterr().err
    for name in ("a.png", "e.json"):
        assert any(name in line and "was not written by a restore run" in line for line in err.splitlines()), err
    assert (out / "a.png").read_bytes() == b"my own a.png" and (out / "e.json").read_text() == "my notes"
    assert restore_cli.main(args + ["--overwrite"]) == 0
    assert _read(out / "a.png").shape == (32, 32, 3) and json.loads((out / "e.json").read_text())["seed"] == 0
    assert restore_cli.main(args) == 0  # its own outputs now: skipped
    assert "2 output(s) made with these settings already exist" in capsys.readouterr().err
    (inp / "a.png").write_bytes((photos / "e.png").read_bytes())  # another photo under the old name
    assert restore_cli.main(args) == 0
    err = capsys.readouterr().err
    assert "1 output(s) made with these settings" in err and "1 existing output(s) were made" in err
    assert _read(out / "a.png").shape == (38, 41, 3)


def test_foreseeable_errors_are_messages(ckpt, photos, tmp_path, capsys):
    assert restore_cli.main(["--checkpoint", str(tmp_path), "--input", str(photos), "--output", str(tmp_path / "o")]) == 2
    assert "config.json is missing" in capsys.readouterr().err
    assert restore_cli.main(["--checkpoint", ckpt, "--input", str(tmp_path / "none*.png"), "--output", str(tmp_path / "o")]) == 2
    assert "matches no files" in capsys.readouterr().err
    assert restore_cli.main(["--checkpoint", ckpt, "--input", str(photos), "--output", str(tmp_path / "o"),
                             "--config.no_such.field=1"]) == 2
    assert "no such config field" in capsys.readouterr().err


def test_subprocess_exit_status_and_stderr(ckpt, photos, tmp_path):
    """The real command on broken files only (and a FIFO named like an image, which must not be
    waited on): one line per file, no traceback, exit status 1."""
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in BAD:
        (bad / name).write_bytes((photos / name).read_bytes())
    os.mkfifo(bad / "fifo.png")
    proc = subprocess.run([*procs.command("diffrestorer-restore"), "--checkpoint", ckpt,
                           "--input", str(bad), "--output", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for name in BAD + ("fifo.png",):
        assert str(bad / name) in proc.stderr
    assert "not a regular file" in proc.stderr


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
    for overlap in (8, -1):  # refused when the restorer is made, not image by image
        with pytest.raises(RestoreError, match="--tile-overlap"):
            Restorer.from_export(ckpt, Options(tile=8, tile_overlap=overlap))


def test_the_checkpoints_own_tile(tmp_path):
    """An export's `sampler.tile` is its default latent tile (the shipped demo's restores 128-px photos
    whole); --tile still overrides it, a bad one is refused before anything compiles, and an export
    written before the key existed tiles by its training size."""
    from diffrestorer_jax.infer.restorer import Options, RestoreError, Restorer
    ckpt = tiny_export(tmp_path / "export")
    cfg_path = os.path.join(ckpt, "config.json")
    cfg = json.loads(open(cfg_path).read())
    assert cfg["sampler"]["tile"] == -1  # the default: the training size (64 px = 16 latent)
    assert Restorer.from_export(ckpt).settings_for((128, 128)).tile == 16
    cfg["sampler"]["tile"] = 32
    open(cfg_path, "w").write(json.dumps(cfg))
    r = Restorer.from_export(ckpt)
    assert r.latent_tile == 32 and r.settings_for((128, 128)).tile is None
    assert r.settings_for((256, 256)).tile == 32
    assert Restorer.from_export(ckpt, Options(tile=8)).settings_for((128, 128)).tile == 8
    with pytest.raises(RestoreError, match="--tile -1 must be >= 0"):
        Restorer.from_export(ckpt, Options(tile=-1))
    for bad, message in ((7, "checkpoint's sampler.tile 7 must be a multiple of 2"),
                         (-2, "checkpoint's sampler.tile -2 must be >= 0")):
        cfg["sampler"]["tile"] = bad
        open(cfg_path, "w").write(json.dumps(cfg))
        with pytest.raises(RestoreError, match=message):
            Restorer.from_export(ckpt)
    del cfg["sampler"]["tile"]
    open(cfg_path, "w").write(json.dumps(cfg))
    assert Restorer.from_export(ckpt).settings_for((128, 128)).tile == 16


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
