"""Baseline JPEG compression simulated in JAX (encode + decode in one traceable function).

Why simulate rather than call an encoder: the degradation runs on the accelerator inside the train
step, per sample, with the quality drawn from a key. So every stage a real baseline codec applies
is reproduced with array ops on static shapes:

  RGB -> YCbCr (JFIF, full range, rounded to 8 bits) -> 4:2:0 chroma (2x2 mean) -> 8x8 blocks ->
  orthonormal DCT-II (the JPEG DCT) -> divide by the IJG quality-scaled tables and round ->
  multiply back -> inverse DCT -> "fancy" triangular chroma upsampling -> RGB, rounded and clipped.

This is the path Pillow (libjpeg) takes with its defaults for RGB images (4:2:0, the IJG Annex K
tables scaled by `jpeg_set_quality` with baseline clamping, fancy upsampling on decode), so the
outputs agree to within integer-DCT rounding: tests/unit/test_degradations.py checks PSNR >= 30 dB against
Pillow on natural photos. Images whose size is not a multiple of 16 are edge-padded (as libjpeg
pads the last MCU) and cropped back.
"""
import jax
import jax.numpy as jnp
import numpy as np

# IJG / JPEG Annex K base tables (row-major, natural order).
_LUMA_TABLE = np.array([
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55,
    14, 13, 16, 24, 40, 57, 69, 56, 14, 17, 22, 29, 51, 87, 80, 62,
    18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99,
], np.int32).reshape(8, 8)
_CHROMA_TABLE = np.full((8, 8), 99, np.int32)
_CHROMA_TABLE[:4, :4] = np.array([
    17, 18, 24, 47, 18, 21, 26, 66, 24, 26, 56, 99, 47, 66, 99, 99], np.int32).reshape(4, 4)

_RGB_TO_YCBCR = np.array([[0.299, 0.587, 0.114],
                          [-0.168735892, -0.331264108, 0.5],
                          [0.5, -0.418687589, -0.081312411]], np.float32)
_YCBCR_TO_RGB = np.array([[1.0, 0.0, 1.402],
                          [1.0, -0.344136286, -0.714136286],
                          [1.0, 1.772, 0.0]], np.float32)


def _dct_matrix() -> np.ndarray:
    """The orthonormal 8-point DCT-II; JPEG's 2D DCT is exactly D @ block @ D.T."""
    n = np.arange(8)
    d = np.cos((2 * n[None, :] + 1) * n[:, None] * np.pi / 16) * np.sqrt(2 / 8)
    d[0] /= np.sqrt(2)
    return d.astype(np.float32)


_DCT = _dct_matrix()


def quality_tables(quality) -> tuple:
    """Luma and chroma tables for an IJG quality in [1, 100] (traceable, integer arithmetic as libjpeg)."""
    q = jnp.clip(jnp.round(jnp.asarray(quality, jnp.float32)), 1, 100).astype(jnp.int32)
    scale = jnp.where(q < 50, 5000 // q, 200 - 2 * q)

    def scaled(base):
        return jnp.clip((base * scale + 50) // 100, 1, 255).astype(jnp.float32)

    return scaled(jnp.asarray(_LUMA_TABLE)), scaled(jnp.asarray(_CHROMA_TABLE))


def _quantize_plane(plane: jax.Array, table: jax.Array) -> jax.Array:
    """DCT, quantize (round), dequantize and inverse-DCT a level-shifted [H, W] plane (H, W % 8 == 0)."""
    h, w = plane.shape
    blocks = plane.reshape(h // 8, 8, w // 8, 8)
    d = jnp.asarray(_DCT)
    hi = jax.lax.Precision.HIGHEST
    coef = jnp.einsum("uy,aybx,vx->aubv", d, blocks, d, precision=hi)
    coef = jnp.round(coef / table[None, :, None, :]) * table[None, :, None, :]
    back = jnp.einsum("uy,aubv,vx->aybx", d, coef, d, precision=hi)
    return back.reshape(h, w)


def _fancy_upsample(plane: jax.Array, shape) -> jax.Array:
    """2x triangular upsampling (3/4 near, 1/4 far, edges replicated): libjpeg's h2v2 'fancy' filter."""
    return jax.image.resize(plane, shape, method="linear", antialias=False)


def jpeg_compress(image: jax.Array, quality) -> jax.Array:
    """JPEG round trip of one image [H, W, 3] in [0, 1] at IJG `quality`; returns [H, W, 3] in [0, 1]."""
    h, w, _ = image.shape
    ph, pw = -h % 16, -w % 16
    rgb = jnp.pad(jnp.round(jnp.clip(image, 0, 1) * 255), ((0, ph), (0, pw), (0, 0)), mode="edge")
    hi = jax.lax.Precision.HIGHEST
    ycc = jnp.einsum("hwc,kc->hwk", rgb, jnp.asarray(_RGB_TO_YCBCR), precision=hi)
    ycc = jnp.round(ycc + jnp.array([0.0, 128.0, 128.0]))
    luma_t, chroma_t = quality_tables(quality)
    hp, wp = h + ph, w + pw
    y = _quantize_plane(ycc[..., 0] - 128.0, luma_t) + 128.0
    chroma = []
    for c in (1, 2):
        small = ycc[..., c].reshape(hp // 2, 2, wp // 2, 2).mean(axis=(1, 3))
        small = jnp.clip(jnp.round(_quantize_plane(jnp.round(small) - 128.0, chroma_t) + 128.0), 0, 255)
        chroma.append(_fancy_upsample(small, (hp, wp)) - 128.0)
    y = jnp.clip(jnp.round(y), 0, 255)
    out = jnp.einsum("hwk,ck->hwc", jnp.stack([y, *chroma], -1), jnp.asarray(_YCBCR_TO_RGB), precision=hi)
    out = jnp.clip(jnp.round(out), 0, 255) / 255.0
    return out[:h, :w].astype(jnp.float32)
