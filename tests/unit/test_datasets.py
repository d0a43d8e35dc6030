"""TFDS builders without TensorFlow: build, read back, report bad inputs, feed the pipeline."""
import os

import numpy as np
import pytest
from PIL import Image

from diffrestorer_jax.data import pipeline as pl
from diffrestorer_jax.data.degradations import DEGRADATION_TYPES
from diffrestorer_jax.data.image_io import decode_image, read_image
from diffrestorer_jax.data.tfds.build import build_dataset, load_source


def _save(path, array, **kw):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path, **kw)


def _img(seed, h=10, w=12):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _read_report(path):
    with open(path) as f:
        return [line.rstrip("\n").split("\t") for line in f if not line.startswith("#")]


def test_hq_folder_builds_reads_back_and_reports_bad_files(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _save(str(a / "one.png"), _img(0))
    _save(str(a / "sub" / "two.jpg"), _img(1), quality=95)
    _save(str(b / "gray.png"), _img(2)[..., 0])
    (a / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40))
    (b / "notes.txt").write_text("not a picture")
    (b / "empty.jpg").write_bytes(b"")
    out = str(tmp_path / "data")
    count, report = build_dataset("hq_folder", [str(a), str(b)], out)
    assert count == 3
    problems = {os.path.basename(p): reason for p, reason in _read_report(report)}
    assert set(problems) == {"broken.png", "notes.txt", "empty.jpg"}
    assert "empty" in problems["empty.jpg"]
    source = load_source(out, "hq_folder")
    records = {r["file_name"].decode() if isinstance(r["file_name"], bytes) else r["file_name"]: r
               for r in (source[i] for i in range(len(source)))}
    for path in (a / "one.png", a / "sub" / "two.jpg", b / "gray.png"):
        np.testing.assert_allclose(decode_image(records[str(path)]["image"]), read_image(path), atol=1 / 255)


def test_paired_builds_labels_from_folders_and_reports_mismatches(tmp_path):
    root = tmp_path / "daclip"
    for t, names in (("noisy", ["x", "y"]), ("hazy", ["z"]), ("snow", ["s"])):
        for n in names:
            _save(str(root / t / "LQ" / f"{n}.png"), _img(hash(n) % 100))
            _save(str(root / t / "GT" / f"{n}.png"), _img(hash(n) % 100 + 1))
    _save(str(root / "noisy" / "LQ" / "orphan.png"), _img(5))
    _save(str(root / "hazy" / "GT" / "lonely.png"), _img(6))
    _save(str(root / "hazy" / "LQ" / "big.png"), _img(7, 20, 20))
    _save(str(root / "hazy" / "GT" / "big.png"), _img(8))
    _save(str(root / "shadowed" / "LQ" / "q.png"), _img(9))
    out = str(tmp_path / "data")
    count, report = build_dataset("paired", [str(root)], out, split="test")
    assert count == 4
    reasons = " | ".join(f"{os.path.basename(p)}: {r}" for p, r in _read_report(report))
    for expected in ("orphan.png: LQ without a GT", "lonely.png: GT without an LQ", "big.png: LQ size",
                     "shadowed: unknown degradation folder"):
        assert expected in reasons, reasons
    source = load_source(out, "paired", "test")
    labels = sorted(DEGRADATION_TYPES[int(source[i]["type_id"])] for i in range(len(source)))
    assert labels == ["haze", "noise", "noise", "snow"]
    batch = next(pl.make_pipeline(source, _pipeline_config(), process_index=0, process_count=1))
    assert batch["lq"].shape == (4, 8, 8, 3) and sorted(batch["type_id"].tolist()) == [1, 4, 4, 7]  # haze, noise x2, snow


def _pipeline_config():
    c = pl.default_pipeline_config()
    c.crop_size, c.global_batch_size, c.num_threads = 8, 4, 1
    return c


def test_bad_arguments_are_explained(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        build_dataset("hq_folder", [str(tmp_path / "nope")], str(tmp_path / "d"))
    with pytest.raises(ValueError, match="unknown dataset kind"):
        build_dataset("folder", [str(tmp_path)], str(tmp_path / "d"))


def test_file_names_that_are_not_utf8_are_built_and_reported_escaped(tmp_path):
    src = tmp_path / "src"
    _save(str(src / "ok.png"), _img(0))
    _save(os.fsdecode(os.fsencode(str(src)) + b"/caf\xe9.png"), _img(1))  # a Latin-1 name
    (src / os.fsdecode(b"r\xe9sum\xe9.txt")).write_text("not a picture")
    out = str(tmp_path / "data")
    count, report = build_dataset("hq_folder", [str(src)], out)
    assert count == 2
    assert [os.path.basename(p) for p, _ in _read_report(report)] == ["r\\xe9sum\\xe9.txt"]
    source = load_source(out, "hq_folder")
    names = sorted(os.path.basename(source[i]["file_name"].decode()) for i in range(len(source)))
    assert names == ["caf\\xe9.png", "ok.png"]


def test_linked_folders_are_followed_once_each(tmp_path):
    src, elsewhere = tmp_path / "src", tmp_path / "elsewhere" / "flickr"
    _save(str(src / "div2k" / "0.png"), _img(0))
    for i in range(2):
        _save(str(elsewhere / f"{i}.png"), _img(i + 1))
    (src / "flickr").symlink_to(elsewhere)
    (src / "flickr_again").symlink_to(elsewhere)  # one real folder through two links: read once
    (elsewhere / "loop").symlink_to(src)          # a loop ends
    count, report = build_dataset("hq_folder", [str(src)], str(tmp_path / "data"))
    assert count == 3 and _read_report(report) == []
