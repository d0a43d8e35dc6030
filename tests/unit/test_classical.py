"""metrics/classical.py: the demo's classical, type-aware anchor (benchmarks/classical_baseline.py)."""
import numpy as np
import pytest

from diffrestorer_jax.metrics import classical


def _photo(size=48, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = np.stack([0.5 + 0.3 * np.sin(6 * xx), 0.4 + 0.3 * yy, 0.3 + 0.2 * (xx > 0.5)], -1)
    return np.clip(base + 0.02 * rng.standard_normal(base.shape), 0, 1).astype(np.float32)


@pytest.mark.parametrize("method", sorted(classical.METHODS))
def test_methods_keep_shape_and_range(method):
    x = _photo()
    y = classical.apply(method, x)
    assert y.shape == x.shape and y.dtype == np.float32
    assert y.min() >= 0 and y.max() <= 1
    assert np.isfinite(y).all()


def test_noise_sigma_estimate():
    rng = np.random.default_rng(1)
    clean = np.repeat(np.linspace(0.2, 0.8, 64)[None, :, None], 64, 0).repeat(3, -1)
    for sigma in (0.05, 0.1):
        est = classical.noise_sigma(clean + sigma * rng.standard_normal(clean.shape))
        assert abs(est - sigma) < 0.2 * sigma


def test_anchor_picks_the_best_method_per_type():
    clean = np.stack([_photo(seed=0), _photo(seed=1)])
    rng = np.random.default_rng(2)
    noisy = np.clip(clean + 0.15 * rng.standard_normal(clean.shape), 0, 1).astype(np.float32)
    dark = (clean * 0.25).astype(np.float32)
    lq = np.stack([noisy, dark], 1)  # [P, T, H, W, 3]
    rows = classical.anchor(clean, lq, ["noise", "low_light"])
    assert [r["type"] for r in rows] == ["noise", "low_light"]
    for r in rows:
        assert r["method"] == max(r["per_method"], key=r["per_method"].get)
        assert r["psnr"] == r["per_method"][r["method"]]
        assert r["psnr"] > r["psnr_degraded"]
    assert rows[0]["method"] in ("nl_means", "tv", "median")
    assert rows[1]["method"] in ("clahe", "stretch")
