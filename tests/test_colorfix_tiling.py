"""Tiling reassembles images exactly and tiled local functions match untiled ones; colour fixes move
the right statistics; the automatic colour fix skips low-light and haze."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from skimage import data

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


@pytest.mark.parametrize("shape,tile,overlap", [
    ((2, 64, 64, 3), 32, 8), ((1, 70, 45, 4), 32, 12), ((2, 37, 100, 1), 24, 5), ((1, 20, 30, 3), 32, 8),
])
def test_extract_then_blend_is_identity(shape, tile, overlap):
    x = jax.random.uniform(jax.random.PRNGKey(0), shape)
    n, h, w, c = shape
    t = tiling.tile_shape(h, w, tile)
    pos = tiling.tile_positions(h, w, tile, overlap)
    tiles = jax.eval_shape(lambda z: tiling.extract_tiles(z, pos, t), x)
    assert tiles.shape == (len(pos), n) + t + (c,)
    roundtrip = lambda z: tiling.blend_tiles(tiling.extract_tiles(z, pos, t), pos,
                                             tiling.gaussian_tile_weights(t), shape)
    out = jax.jit(roundtrip)(x)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, x, rtol=0, atol=1e-6)


def test_blend_accumulates_in_float32():
    x = jax.random.uniform(jax.random.PRNGKey(1), (1, 64, 64, 2))
    pos = tiling.tile_positions(64, 64, 24, 12)
    roundtrip = lambda z: tiling.blend_tiles(tiling.extract_tiles(z, pos, 24), pos,
                                             tiling.gaussian_tile_weights(24), x.shape)
    out = jax.jit(roundtrip)(x.astype(jnp.bfloat16))
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, x.astype(jnp.bfloat16).astype(jnp.float32), atol=1e-6)


@pytest.mark.parametrize("sigma_frac", [0.3, 0.05, 0.005])
def test_weights_positive(sigma_frac):
    w = np.asarray(tiling.gaussian_tile_weights((32, 20), sigma_frac))
    assert w.shape == (32, 20) and w.min() > 0 and w.max() <= 1.0
    assert w[15:17, 9:11].min() == w.max()  # heaviest at the centre (even sizes: 2x2 pixels)


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
