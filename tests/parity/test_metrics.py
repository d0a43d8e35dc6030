"""PSNR/SSIM agree with scikit-image on real photographs (RGB, border crop, BT.601 luma)."""
import numpy as np
import pytest
from skimage import data
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from diffrestorer_jax.metrics import psnr_ssim

TOL = 1e-4


def _pairs():
    """Two clean photo crops and degraded copies (noise, and a colour shift + blur)."""
    rng = np.random.default_rng(0)
    clean = np.stack([data.astronaut()[:96, 100:228], data.coffee()[150:246, 200:328]]) / 255.0
    noisy = np.clip(clean + rng.normal(0, 0.08, clean.shape), 0, 1)
    blurred = (clean + np.roll(clean, 1, axis=1) + np.roll(clean, 1, axis=2)) / 3 * 0.9 + 0.05
    degraded = np.stack([noisy[0], blurred[1]])
    return clean.astype(np.float32), degraded.astype(np.float32)


def _y_reference(x):
    """BT.601 studio luma in float64, written from the formula (MATLAB rgb2ycbcr), in [0, 1]."""
    x = x.astype(np.float64)
    return (16.0 + 65.481 * x[..., 0] + 128.553 * x[..., 1] + 24.966 * x[..., 2]) / 255.0


def _sk_ssim(a, b, channel_axis):
    return structural_similarity(a.astype(np.float64), b.astype(np.float64), data_range=1.0,
                                 gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                 channel_axis=channel_axis)


@pytest.mark.parametrize("crop", [0, 4])
def test_rgb_matches_skimage(crop):
    clean, degraded = _pairs()
    got_p = np.asarray(psnr_ssim.psnr(degraded, clean, crop_border=crop))
    got_s = np.asarray(psnr_ssim.ssim(degraded, clean, crop_border=crop))
    assert got_p.shape == got_s.shape == (2,)
    sl = np.s_[crop:-crop, crop:-crop] if crop else np.s_[:, :]
    for i in range(2):
        a, b = degraded[i][sl].astype(np.float64), clean[i][sl].astype(np.float64)
        np.testing.assert_allclose(got_p[i], peak_signal_noise_ratio(b, a, data_range=1.0), atol=TOL)
        np.testing.assert_allclose(got_s[i], _sk_ssim(a, b, channel_axis=-1), atol=TOL)
    assert got_s[0] < 0.9 and got_p[0] < 30  # the degradations are visible to the metrics


@pytest.mark.parametrize("crop", [0, 3])
def test_y_channel_matches_formula(crop):
    clean, degraded = _pairs()
    got_p = np.asarray(psnr_ssim.psnr(degraded, clean, crop_border=crop, y_channel=True))
    got_s = np.asarray(psnr_ssim.ssim(degraded, clean, crop_border=crop, y_channel=True))
    sl = np.s_[crop:-crop, crop:-crop] if crop else np.s_[:, :]
    for i in range(2):
        ya, yb = _y_reference(degraded[i])[sl], _y_reference(clean[i])[sl]
        np.testing.assert_allclose(got_p[i], peak_signal_noise_ratio(yb, ya, data_range=1.0), atol=TOL)
        np.testing.assert_allclose(got_s[i], _sk_ssim(ya, yb, channel_axis=None), atol=TOL)


def test_data_range_255_and_single_image():
    clean, degraded = _pairs()
    p255 = psnr_ssim.psnr(degraded[0] * 255, clean[0] * 255, data_range=255.0, y_channel=True)
    s255 = psnr_ssim.ssim(degraded[0] * 255, clean[0] * 255, data_range=255.0, y_channel=True)
    p1 = psnr_ssim.psnr(degraded[:1], clean[:1], y_channel=True)
    s1 = psnr_ssim.ssim(degraded[:1], clean[:1], y_channel=True)
    assert np.ndim(p255) == 0
    np.testing.assert_allclose(p255, p1[0], atol=TOL)
    np.testing.assert_allclose(s255, s1[0], atol=TOL)


def test_identical_images_and_errors():
    clean, _ = _pairs()
    np.testing.assert_allclose(psnr_ssim.ssim(clean, clean), 1.0, atol=1e-6)
    with pytest.raises(ValueError, match="shape"):
        psnr_ssim.psnr(clean, clean[:, :50])
    with pytest.raises(ValueError, match="11x11"):
        psnr_ssim.ssim(clean[:, :12, :12], clean[:, :12, :12], crop_border=1)


# ---------------------------------------------------------------- FID statistics

from diffrestorer_jax.metrics import fid  # noqa: E402


def test_fid_matches_reference_and_closed_forms():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(300, 16)) @ rng.normal(size=(16, 16))
    b = rng.normal(0.3, 1.0, size=(250, 16)) @ rng.normal(size=(16, 16))
    mu1, s1 = fid.activation_statistics(a)
    mu2, s2 = fid.activation_statistics(b)
    np.testing.assert_allclose(s1, np.cov(a, rowvar=False), rtol=1e-10, atol=1e-10)
    # reference: tr sqrt(S1 S2) = sum of square roots of the (real, >= 0) eigenvalues of S1 S2
    ev = np.linalg.eigvals(s1 @ s2).real
    want = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(ev, 0, None)).sum()
    np.testing.assert_allclose(fid.frechet_distance(mu1, s1, mu2, s2), want, rtol=1e-8)
    assert abs(fid.frechet_distance(mu1, s1, mu1, s1)) < 1e-6
    # diagonal covariances: |dmu|^2 + sum (sqrt(a) - sqrt(b))^2
    va, vb = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    got = fid.frechet_distance(np.zeros(3), np.diag(va), np.ones(3), np.diag(vb))
    np.testing.assert_allclose(got, 3 + np.sum((np.sqrt(va) - np.sqrt(vb)) ** 2), rtol=1e-10)


def test_fid_running_statistics_equal_one_shot():
    rng = np.random.default_rng(2)
    acts = rng.normal(size=(50, 8)).astype(np.float32)
    stats = fid.RunningStatistics(8)
    for chunk in np.array_split(acts, 4):
        stats.update(chunk)
    mu, sigma = stats.finalize()
    mu_ref, sigma_ref = fid.activation_statistics(acts)
    np.testing.assert_allclose(mu, mu_ref, atol=1e-12)
    np.testing.assert_allclose(sigma, sigma_ref, atol=1e-12)
    # fewer samples than dimensions: singular product, handled by the eps offset
    small = rng.normal(size=(4, 8))
    assert np.isfinite(fid.frechet_distance(*fid.activation_statistics(small), mu, sigma))
