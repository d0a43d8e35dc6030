"""Tiling reassembles images exactly and tiled local functions match untiled ones; colour fixes move
the right statistics; the automatic colour fix skips low-light and haze."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from skimage import data

from diffrestorer_jax.data.degradations import DEGRADATION_TYPES
from diffrestorer_jax.infer import tiling

# ---------------------------------------------------------------- tiling


@pytest.mark.parametrize("hw,tile,overlap", [
    ((64, 64), 32, 8), ((70, 45), 32, 8), ((100, 37), 48, 16), ((20, 30), 32, 8), ((33, 96), 32, 31),
])
def test_positions_cover_image_inside(hw, tile, overlap):
    h, w = hw
    th, tw = tiling.tile_shape(h, w, tile)
    pos = tiling.tile_positions(h, w, tile, overlap)
    covered = np.zeros(hw, int)
    for y, x in pos:
        assert 0 <= y and y + th <= h and 0 <= x and x + tw <= w
        covered[y:y + th, x:x + tw] += 1
    assert covered.min() >= 1
    assert pos[:, 0].max() + th == h and pos[:, 1].max() + tw == w  # last tile flush with the edge
    if h <= tile and w <= tile:
        assert len(pos) == 1


def test_single_tile_when_image_fits():
    np.testing.assert_array_equal(tiling.tile_positions(32, 32, 32, 8), [[0, 0]])
    with pytest.raises(ValueError, match="overlap"):
        tiling.tile_positions(64, 64, 32, 32)


@pytest.mark.parametrize("shape,tile,overlap,chunk", [
    ((2, 64, 64, 3), 32, 8, 1), ((1, 70, 45, 4), 32, 12, 2), ((2, 37, 100, 1), 24, 5, 4),
    ((1, 20, 30, 3), 32, 8, 3),
])
def test_map_tiles_identity_reassembles_the_image(shape, tile, overlap, chunk):
    """fn = identity: every pixel comes back (weights normalised), for chunks that do not divide the
    number of tiles too (the padding tiles weigh nothing)."""
    x = jax.random.uniform(jax.random.PRNGKey(0), shape)
    n, h, w, c = shape
    calls = []

    def ident(t):
        calls.append(t.shape)
        return t
    out = jax.jit(lambda z: tiling.map_tiles(ident, [z], [1], (h, w), tile, overlap, chunk=chunk))(x)
    t = tiling.tile_shape(h, w, tile)
    assert calls[-1] == (min(chunk, len(tiling.tile_positions(h, w, tile, overlap))) * n,) + t + (c,)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, x, rtol=0, atol=1e-6)


def test_map_tiles_reads_each_input_at_its_scale():
    """A latent (scale 1) and its image (scale 4) tiled together: fn sees matching tiles of both."""
    z = jax.random.normal(jax.random.PRNGKey(3), (2, 12, 20, 4))
    img = jnp.repeat(jnp.repeat(z[..., :3], 4, axis=1), 4, axis=2)
    both = lambda zt, it: it + jnp.repeat(jnp.repeat(zt[..., :3], 4, axis=1), 4, axis=2)  # noqa: E731
    out = jax.jit(lambda a, b: tiling.map_tiles(both, [a, b], [1, 4], (12, 20), 8, 4, 4, chunk=2))(z, img)
    np.testing.assert_allclose(out, 2 * img, atol=1e-5)


def test_blend_accumulates_in_float32():
    x = jax.random.uniform(jax.random.PRNGKey(1), (1, 64, 64, 2))
    out = jax.jit(lambda z: tiling.map_tiles(lambda t: t, [z], [1], (64, 64), 24, 12))(x.astype(jnp.bfloat16))
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, x.astype(jnp.bfloat16).astype(jnp.float32), atol=1e-6)


@pytest.mark.parametrize("shape", [(32, 20), (7, 5), (1, 1)])
def test_weights_positive_heaviest_at_centre_faded_at_edges(shape):
    w = np.asarray(tiling.tile_weights(shape))
    th, tw = shape
    assert w.shape == shape and w.min() > 0 and w.max() <= 1.0
    assert w[(th - 1) // 2:th // 2 + 1, (tw - 1) // 2:tw // 2 + 1].min() == w.max()  # centre (2x2 if even)
    if min(shape) >= 7:
        assert max(w[0].max(), w[-1].max(), w[:, 0].max(), w[:, -1].max()) <= 0.06 * w.max()


def test_weights_sum_to_one_at_half_overlap():
    w = np.asarray(tiling.tile_weights((1, 32)))[0]
    np.testing.assert_allclose(w[:16] + w[16:], 1.0, atol=2e-3)  # sin^2 + cos^2, but for the floor


@pytest.mark.parametrize("tile,overlap", [(32, 16), (32, 8), (16, 8)])
def test_blend_has_no_step_where_a_tile_ends(tile, overlap):
    """Tiles that restore differently (here: each returns its own mean, on a ramp) must blend
    smoothly: where a tile ends, the output may not jump. Gaussian weights (sigma 0.3 of the tile,
    used before) kept a quarter of a tile's weight at its edge and jumped by 27-46% of the
    neighbouring tiles' difference there; the raised cosine stays within one pixel's share of a
    smooth ramp over the overlap."""
    size = tile * 4 - overlap * 3
    ramp = jnp.broadcast_to(jnp.arange(size, dtype=jnp.float32)[None, None, :, None], (1, tile, size, 1))
    per_tile_mean = lambda t: jnp.broadcast_to(t.mean(axis=(1, 2), keepdims=True), t.shape)  # noqa: E731
    out = np.asarray(tiling.map_tiles(per_tile_mean, [ramp], [1], (tile, size), tile, overlap))[0, 0, :, 0]
    step = float(tile - overlap)  # neighbouring tiles' means differ by the stride
    jumps = np.abs(np.diff(out)) / step
    assert jumps.max() < 0.25, jumps.max()
    assert out[0] == pytest.approx((tile - 1) / 2) and out[-1] == pytest.approx(size - 1 - (tile - 1) / 2)


def _local_smooth(z):
    """A per-pixel-local function with a 3x3 neighbourhood (a conv), like a tiny decoder layer."""
    k = jnp.array([[1., 2., 1.], [2., 4., 2.], [1., 2., 1.]]) / 16
    k = jnp.tile(k[:, :, None, None], (1, 1, 1, z.shape[-1]))
    y = jax.lax.conv_general_dilated(z, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     feature_group_count=z.shape[-1])
    return jnp.tanh(2 * y)


def test_tiled_local_function_close_to_whole():
    img = jnp.asarray(data.astronaut()[:90, :130] / 255.0, jnp.float32)[None]
    whole = jax.jit(_local_smooth)(img)
    tiled = jax.jit(lambda z: tiling.tiled_apply(_local_smooth, z, 48, 16, 1))(img)
    diff = np.abs(np.asarray(tiled - whole))
    assert diff.mean() < 2e-3 and diff.max() < 0.1
    assert diff.max() > 0  # tile borders differ a little (zero padding inside tiles): test can fail


def test_tiled_apply_with_scale():
    """A latent -> 8x pixels map (nearest upsampling) and the 1/8 inverse, tiled."""
    z = jax.random.normal(jax.random.PRNGKey(2), (2, 20, 28, 4))
    up = lambda t: jnp.repeat(jnp.repeat(t, 8, axis=1), 8, axis=2)[..., :3]
    out = jax.jit(lambda v: tiling.tiled_apply(up, v, 8, 4, 8))(z)
    np.testing.assert_allclose(out, up(z), atol=1e-6)
    down = lambda t: t[:, ::8, ::8]
    back = jax.jit(lambda v: tiling.tiled_apply(down, v, 64, 32, 0.125, tiles_per_call=3))(out)
    np.testing.assert_allclose(back, z[..., :3], atol=1e-6)
    with pytest.raises(ValueError, match="scale"):
        jax.eval_shape(lambda v: tiling.tiled_apply(up, v, 8, 4, 4), z)

# ---------------------------------------------------------------- colour fix

from diffrestorer_jax.infer import colorfix  # noqa: E402


def _photo():
    return jnp.asarray(data.astronaut()[100:164, 180:276] / 255.0, jnp.float32)[None]


def _heavy_blur(x):
    """An independent low-pass for measuring (a box mean over 17x17, 'valid')."""
    return jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 17, 17, 1), (1, 1, 1, 1), "VALID") / 289


def test_adain_matches_reference_stats():
    ref = _photo()
    restored = jnp.clip(ref[:, ::-1] * 0.6 + jnp.array([0.3, 0.1, 0.0]), 0, 1)  # wrong colours
    out = jax.jit(lambda a, b: colorfix.adain_color_fix(a, b, clip=False))(restored, ref)
    np.testing.assert_allclose(out.mean(axis=(1, 2)), ref.mean(axis=(1, 2)), atol=1e-5)
    np.testing.assert_allclose(out.std(axis=(1, 2)), ref.std(axis=(1, 2)), atol=1e-3)
    assert np.abs(restored.mean(axis=(1, 2)) - ref.mean(axis=(1, 2))).max() > 0.05


def test_wavelet_exact_cases():
    ref = _photo() * 0.8 + 0.1
    shifted = ref + jnp.array([0.1, -0.05, 0.02])  # a pure colour cast is removed exactly
    out = colorfix.wavelet_color_fix(shifted, ref, clip=False)
    np.testing.assert_allclose(out, ref, atol=1e-5)
    # a pixel-period checkerboard has no low frequencies: it survives untouched away from the
    # borders (edge padding leaks into 1 + 2 + 4 pixels with 3 levels)
    yy, xx = np.mgrid[:64, :96]
    checker = jnp.asarray(((yy + xx) % 2 * 2 - 1) * 0.05, jnp.float32)[None, :, :, None]
    out = colorfix.wavelet_color_fix(ref + checker, ref, levels=3, clip=False)
    np.testing.assert_allclose(out[:, 8:-8, 8:-8], (ref + checker)[:, 8:-8, 8:-8], atol=1e-5)


def test_wavelet_keeps_ref_low_and_restored_high():
    ref = _photo()
    sharp = _photo()
    restored = sharp * 0.7 + jnp.array([0.25, 0.0, 0.1])  # same detail, wrong tone and colour
    ref = jax.image.resize(jax.image.resize(ref, (1, 16, 24, 3), "linear"), ref.shape, "linear")
    out = jax.jit(lambda a, b: colorfix.wavelet_color_fix(a, b, clip=False))(restored, ref)
    low_err = np.abs(_heavy_blur(out) - _heavy_blur(ref)).mean()
    low_err_before = np.abs(_heavy_blur(restored) - _heavy_blur(ref)).mean()
    high = lambda z: z[:, 8:-8, 8:-8] - _heavy_blur(z)
    high_err = np.abs(high(out) - high(restored)).mean()
    high_err_ref = np.abs(high(ref) - high(restored)).mean()
    assert low_err < 0.25 * low_err_before
    assert high_err < 0.5 * high_err_ref


def test_auto_skips_low_light_and_haze():
    names = DEGRADATION_TYPES
    probs = jax.nn.one_hot(jnp.arange(len(names)), len(names))
    keep = np.asarray(colorfix.should_color_fix(probs))
    assert [n for n, k in zip(names, keep) if not k] == ["haze", "low_light"]
    ref = jnp.tile(_photo(), (3, 1, 1, 1))
    restored = jnp.clip(ref * 0.5 + 0.4, 0, 1)
    probs = jax.nn.one_hot(jnp.array([names.index("low_light"), names.index("noise"),
                                      names.index("haze")]), len(names))
    for method in ("wavelet", "adain"):
        out = jax.jit(colorfix.color_fix, static_argnames="method")(restored, ref, method, probs)
        np.testing.assert_array_equal(out[0], restored[0])
        np.testing.assert_array_equal(out[2], restored[2])
        assert np.abs(out[1] - restored[1]).mean() > 0.05
    with pytest.raises(ValueError, match="colour fix"):
        colorfix.color_fix(restored, ref, "histogram")
