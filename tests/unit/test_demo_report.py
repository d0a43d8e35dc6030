"""tools/demo.py's report: the goal counts of issue #25, metrics.md's columns, the gallery's captions."""
import numpy as np

from diffrestorer_jax.tools import demo

TYPES = ["motion_blur", "haze", "jpeg", "low_light", "noise", "raindrop", "rain", "snow", "mixed"]


def _rows(gains, ssim_up=True, classical_gains=None):
    rows = []
    for i, (name, g) in enumerate(zip(TYPES, gains)):
        r = dict(type=name, psnr_degraded=20.0, psnr_restored=20.0 + g, ssim_degraded=0.5,
                 ssim_restored=0.6 if ssim_up else 0.4, psnr_change=30.0, predicted=[name, "noise"])
        if classical_gains is not None:
            r.update(classical_method="tv", classical_psnr=20.0 + classical_gains[i], classical_ssim=0.55)
        rows.append(r)
    return rows


def test_goal_summary_counts():
    gains = [4.0, 6.0, 0.2, 5.0, -1.0, 0.5, 8.0, 3.0, 0.4]  # mixed last: not in the mean or PSNR wins
    anchor = [5.0, 1.0, 0.0, 9.0, 8.0, 0.0, 0.6, 5.0, 3.0]
    g = demo.goal_summary(_rows(gains, classical_gains=anchor))
    assert g["psnr_wins"] == 7  # all but noise
    assert g["clear_wins"] == 6  # >= 0.5 dB with SSIM up: 4, 6, 5, 0.5, 8, 3 (not jpeg 0.2, mixed 0.4)
    assert g["rows"] == 9
    assert np.isclose(g["mean_gain"], np.mean(gains[:8]))
    assert g["ahead_of_classical"] == 4  # haze, jpeg, raindrop, rain (not motion_blur, low_light, noise, snow)
    assert np.isclose(g["classical_mean_gain"], np.mean(anchor[:8]))
    # SSIM down: no clear wins, whatever the PSNR
    assert demo.goal_summary(_rows(gains, ssim_up=False))["clear_wins"] == 0
    assert "ahead_of_classical" not in demo.goal_summary(_rows(gains))


def test_metrics_markdown_columns():
    settings = demo.demo_settings()
    rows = _rows([1.0] * 9, classical_gains=[2.0] * 9)
    text, goals = demo.metrics_markdown(rows, settings, "/x/ckpt", 128, 0, ("coffee", "rocket"), 3.0)
    assert "| motion_blur | motion_blur, noise | 20.00 | 21.00 | +1.00 | 22.00 (tv) | +2.00 |" in text
    assert "Ahead of the classical anchor on 0 of 8 types" in text and "(classical anchor: +2.00 dB)" in text
    assert goals["clear_wins"] == 9
    text, _ = demo.metrics_markdown(_rows([1.0] * 9), settings, "/x/ckpt", 128, 0, ("coffee",), 3.0)
    assert "classical" not in text.split("| type |")[1]


def test_metrics_markdown_says_how_the_photos_were_tiled():
    rows, settings = _rows([1.0] * 9), demo.demo_settings()
    whole, _ = demo.metrics_markdown(rows, settings, "/x/ckpt", 128, 0, ("coffee",), 3.0, tiled=None, tile=64)
    assert "each image whole (tiles of 64 latent pixels only for larger images)." in whole
    tiled, _ = demo.metrics_markdown(rows, settings, "/x/ckpt", 128, 0, ("coffee",), 3.0, tiled=16, tile=16)
    assert "by tiles of 16 latent pixels." in tiled and "whole" not in tiled
    never, _ = demo.metrics_markdown(rows, settings, "/x/ckpt", 512, 0, ("coffee",), 3.0, tiled=None, tile=0)
    assert "each image whole." in never


def test_gallery_captions_go_under_their_column():
    col = np.zeros((2, 16, 16, 3), np.float32)
    plain = demo.gallery_image([col, col, col], ["a", "b"], ["p"])
    captioned = demo.gallery_image([col, col, col], ["a", "b"], ["p"], captions={1: ["model: x", "model: y"]})
    assert captioned.shape[0] == plain.shape[0] + 2 * 12 and captioned.shape[1] == plain.shape[1]
    # the caption strip under the restored column has dark text, the one under the degraded column none
    strip = slice(26 + 16, 26 + 16 + 12)
    x_restored = 76 + 1 * (16 + 2)
    assert captioned[strip, x_restored:x_restored + 16].min() < 128
    assert captioned[strip, 76:76 + 16].min() == 255
