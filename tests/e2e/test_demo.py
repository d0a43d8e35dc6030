"""`diffrestorer-demo` on the shipped checkpoint: held-out gallery + metrics, and --input mode.

Small and fast (32x32 photos, one sampler step): this checks the plumbing and that the files are
sane, not the quality (demo/README.md and `make demo` report that at the demo's settings).
"""
import json
import os

import numpy as np
import pytest

from diffrestorer_jax.cli import demo as demo_cli

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHECKPOINT = os.environ.get("DEMO_CHECKPOINT", os.path.join(REPO, "demo", "checkpoint"))

pytestmark = pytest.mark.skipif(not os.path.isfile(os.path.join(CHECKPOINT, "config.json")),
                                reason="no shipped demo checkpoint (make demo-train)")


def test_held_out_split_is_disjoint():
    from diffrestorer_jax.data import demo_photos
    assert set(demo_photos.HELD_OUT) == {"coffee", "rocket"}
    assert not set(demo_photos.TRAIN) & set(demo_photos.HELD_OUT)
    assert len(demo_photos.TRAIN) == 10
    # the photos the demo's settings are chosen on: neither trained on nor the evaluation
    assert not set(demo_photos.VALIDATION) & (set(demo_photos.TRAIN) | set(demo_photos.HELD_OUT))
    assert demo_photos.load_photos(demo_photos.VALIDATION, 16).shape == (4, 16, 16, 3)


def test_demo_gallery_and_metrics(tmp_path):
    from diffrestorer_jax.data.image_io import read_image
    out = tmp_path / "out"
    assert demo_cli.main(["--checkpoint", CHECKPOINT, "--out", str(out), "--size", "32", "--steps", "1",
                          "--color-fix", "auto"]) == 0
    gallery = read_image(str(out / "gallery.png"))
    # 9 rows (8 types + mixed) of 32 px with a caption line each, 6 columns (2 photos x degraded |
    # restored | clean)
    assert gallery.shape[0] >= 9 * (32 + 12) and gallery.shape[1] >= 6 * 32
    assert gallery.std() > 0.05
    text = (out / "metrics.md").read_text()
    data = json.loads((out / "metrics.json").read_text())
    names = [r["type"] for r in data["rows"]]
    assert names[-1] == "mixed" and len(names) == 9
    for r in data["rows"]:
        assert r["type"] in text
        for k in ("psnr_degraded", "psnr_restored", "psnr_change"):
            assert np.isfinite(r[k]) and 3.0 < r[k] < 80.0, r
        for k in ("ssim_degraded", "ssim_restored"):
            assert -1.0 <= r[k] <= 1.0, r
    assert "steps" in text and "strength" in text and "colour fix auto" in text
    # the type the model predicted for each photo, and the classical anchor beside it
    from diffrestorer_jax.data.degradations import DEGRADATION_TYPES
    for r in data["rows"]:
        assert len(r["predicted"]) == 2 and set(r["predicted"]) <= set(DEGRADATION_TYPES), r
        assert r["classical_method"] in text and np.isfinite(r["classical_psnr"]), r
    assert data["goals"]["rows"] == 9 and "Ahead of the classical anchor on" in text
    assert data["tiled"] is None and "each image whole (tiles of 64 latent pixels" in text


def test_the_demo_photos_are_restored_whole():
    """The shipped checkpoint's own tile (sampler.tile, 64 latent pixels) takes the demo's 128-px photos
    whole: its decoder restores them better than by tiles of its 64-px training size (demo/README.md).
    Larger images are still tiled; nothing is compiled here."""
    from diffrestorer_jax.tools import demo
    r = demo.make_restorer(CHECKPOINT, demo.demo_settings(), 0)
    assert r.latent_tile == 64
    assert r.settings_for(r.bucket(demo.DEMO_SIZE, demo.DEMO_SIZE)).tile is None
    assert r.settings_for(r.bucket(512, 512)).tile == 64
    assert demo.make_restorer(CHECKPOINT, demo.demo_settings(tile=16), 0).settings_for((128, 128)).tile == 16


def test_demo_input_mode(tmp_path):
    from diffrestorer_jax.data import demo_photos
    from diffrestorer_jax.data.image_io import read_image, write_png
    src = tmp_path / "mine.png"
    write_png(str(src), demo_photos.load_photos(["coffee"], 32)[0])  # the gallery test's shape: no recompile
    out = tmp_path / "out"
    assert demo_cli.main(["--checkpoint", CHECKPOINT, "--input", str(src), "--out", str(out), "--steps", "1",
                          "--color-fix", "auto"]) == 0
    restored = read_image(str(out / "restored" / "mine.png"))
    assert restored.shape == (32, 32, 3)
    assert not (out / "metrics.md").exists()
    # Its own outputs given back as inputs would be written over themselves: refused, kept.
    before = (out / "restored" / "mine.png").read_bytes()
    assert demo_cli.main(["--checkpoint", CHECKPOINT, "--input", str(out / "restored" / "mine.png"),
                          "--out", str(out)]) == 2
    assert (out / "restored" / "mine.png").read_bytes() == before


def test_demo_missing_checkpoint(tmp_path, capsys):
    assert demo_cli.main(["--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
