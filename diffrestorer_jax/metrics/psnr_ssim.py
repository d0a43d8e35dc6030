"""PSNR and SSIM on NHWC batches, with the conventions restoration papers report.

Conventions (so numbers are comparable with published tables):
  * SSIM is the Wang et al. 2004 index with an 11-tap Gaussian window (sigma 1.5), K1 0.01, K2 0.03,
    population (not sample) covariance, evaluated only where the window fits inside the image and
    averaged over pixels and channels. This is exactly scikit-image's
    `structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)` (it
    filters with reflect padding and then drops the 5-pixel band the padding touched) and BasicSR's
    `calculate_ssim` on one channel.
  * `y_channel=True` converts RGB to the luma of ITU-R BT.601 with the 16-235 studio range, as
    MATLAB's `rgb2ycbcr` and BasicSR do, because most SR/restoration tables are on Y.
  * `crop_border` drops that many pixels from each side first (SR papers crop the scale factor).

dm-pix's `ssim` already computes this index with the same Gaussian window and a 'valid' filter,
which equals scikit-image's reflect-then-crop, so it is reused. Its `psnr` assumes a data range of
1, so inputs are divided by `data_range` before calling it.
"""
import dm_pix
import jax.numpy as jnp

# BT.601 luma for RGB in [0, 1] -> Y in [16, 235] / 255 (MATLAB rgb2ycbcr / BasicSR rgb2ycbcr).
_Y_WEIGHTS = (65.481, 128.553, 24.966)
_Y_OFFSET = 16.0


def rgb_to_y(x, data_range: float = 1.0):
    """BT.601 studio-range luma of RGB images in [0, data_range], keeping the range and a channel axis."""
    w = jnp.asarray(_Y_WEIGHTS, x.dtype) / 255.0
    y = jnp.sum(x * w, axis=-1, keepdims=True) + _Y_OFFSET / 255.0 * data_range
    return y


def _prepare(a, b, data_range, crop_border, y_channel):
    """Float32, batch axis, border crop, optional luma, scaled to [0, 1]: what both metrics need."""
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {a.shape} vs {b.shape}")
    if a.ndim not in (3, 4):
        raise ValueError(f"expected HWC or NHWC images, got shape {a.shape}")
    if crop_border:
        c = int(crop_border)
        a, b = a[..., c:-c, c:-c, :], b[..., c:-c, c:-c, :]
    if y_channel:
        if a.shape[-1] != 3:
            raise ValueError(f"y_channel=True needs RGB images, got {a.shape[-1]} channels")
        a, b = rgb_to_y(a, data_range), rgb_to_y(b, data_range)
    return a / data_range, b / data_range


def psnr(a, b, *, data_range: float = 1.0, crop_border: int = 0, y_channel: bool = False):
    """Peak signal-to-noise ratio in dB, one value per image (a scalar for a single HWC image)."""
    a, b = _prepare(a, b, data_range, crop_border, y_channel)
    return dm_pix.psnr(a, b)


def ssim(a, b, *, data_range: float = 1.0, crop_border: int = 0, y_channel: bool = False):
    """Mean structural similarity, one value per image; RGB is computed per channel and averaged."""
    a, b = _prepare(a, b, data_range, crop_border, y_channel)
    if min(a.shape[-3:-1]) < 11:
        raise ValueError(f"SSIM needs images of at least 11x11 pixels after cropping, got {a.shape}")
    return dm_pix.ssim(a, b, max_val=1.0, filter_size=11, filter_sigma=1.5, k1=0.01, k2=0.03)
