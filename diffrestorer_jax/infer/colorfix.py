"""Colour correction of a restored image towards its degraded input (NHWC, values in [0, 1]).

Latent diffusion often shifts global colour; the LQ input, though degraded, usually has the right
colours at low spatial frequencies. Two fixes:
  * AdaIN: give each channel of the restored image the reference's mean and standard deviation;
  * wavelet: keep the restored image's high frequencies and take the low frequencies from the
    reference, the low band being what remains after `levels` repeated 3x3 binomial blurs with
    dilation 1, 2, 4, ... (an a-trous wavelet decomposition, as StableSR's wavelet colour fix).
Neither is right when the degradation *is* the low frequencies (a dark or hazy input): copying them
would undo the restoration, so `should_color_fix` refuses low-light and haze predictions.
"""
from typing import Optional

import jax
import jax.numpy as jnp

from diffrestorer_jax.data.degradations import DEGRADATION_TYPES

_NO_FIX_TYPES = ("haze", "low_light")


def _match_size(reference, like):
    """The reference resized (bicubic) to `like`'s spatial size when the two differ (e.g. SR output)."""
    if reference.shape[1:3] == like.shape[1:3]:
        return reference
    shape = reference.shape[:1] + like.shape[1:3] + reference.shape[3:]
    return jax.image.resize(reference, shape, "bicubic")


def adain_color_fix(restored, reference, eps: float = 1e-5, clip: bool = True):
    """Per-image, per-channel mean/std of `restored` replaced by those of `reference`."""
    restored = restored.astype(jnp.float32)
    reference = reference.astype(jnp.float32)
    mu_x, sd_x = _mean_std(restored, eps)
    mu_r, sd_r = _mean_std(reference, eps)
    out = (restored - mu_x) / sd_x * sd_r + mu_r
    return jnp.clip(out, 0.0, 1.0) if clip else out


def _mean_std(x, eps):
    mu = jnp.mean(x, axis=(1, 2), keepdims=True)
    var = jnp.mean(jnp.square(x - mu), axis=(1, 2), keepdims=True)
    return mu, jnp.sqrt(var + eps)


def _blur_axis(x, axis: int, dilation: int):
    """[1, 2, 1] / 4 along `axis` with taps `dilation` apart, edges replicated (keeps constants)."""
    pad = [(0, 0)] * x.ndim
    pad[axis] = (dilation, dilation)
    xp = jnp.pad(x, pad, mode="edge")
    n = x.shape[axis]
    take = lambda start: jax.lax.slice_in_dim(xp, start, start + n, axis=axis)
    return 0.25 * take(0) + 0.5 * take(dilation) + 0.25 * take(2 * dilation)


def wavelet_low(x, levels: int = 5):
    """The low-frequency band of x [N, H, W, C]: `levels` dilated binomial blurs (dilation 2**i)."""
    for i in range(levels):
        d = 2 ** i
        x = _blur_axis(_blur_axis(x, 1, d), 2, d)
    return x


def wavelet_color_fix(restored, reference, levels: int = 5, clip: bool = True):
    """Restored high frequencies + reference low frequencies (x = high + low exactly, per image)."""
    restored = restored.astype(jnp.float32)
    reference = _match_size(reference.astype(jnp.float32), restored)
    out = restored - wavelet_low(restored, levels) + wavelet_low(reference, levels)
    return jnp.clip(out, 0.0, 1.0) if clip else out


def should_color_fix(type_probs):
    """Per image: True unless the most probable degradation ([..., 8] probabilities or logits, in
    DEGRADATION_TYPES order) is haze or low-light."""
    pred = jnp.argmax(type_probs, axis=-1)
    skip = jnp.zeros_like(pred, dtype=bool)
    for name in _NO_FIX_TYPES:
        skip = skip | (pred == DEGRADATION_TYPES.index(name))
    return ~skip


def color_fix(restored, reference, method: str = "wavelet", type_probs: Optional[jax.Array] = None):
    """The configured fix: method 'none', 'adain' or 'wavelet'. With `type_probs` ([N, 8]) it is the
    automatic mode: images predicted as haze or low-light are returned unchanged."""
    if method == "none":
        return restored
    if method == "adain":
        fixed = adain_color_fix(restored, reference)
    elif method == "wavelet":
        fixed = wavelet_color_fix(restored, reference)
    else:
        raise ValueError(f"unknown colour fix {method!r}; expected 'none', 'adain' or 'wavelet'")
    if type_probs is None:
        return fixed
    keep = should_color_fix(type_probs)[:, None, None, None]
    return jnp.where(keep, fixed, restored.astype(fixed.dtype))

