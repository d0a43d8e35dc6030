"""Wide 3x3 convolutions by Winograd F(2x2, 3x3) on CPU (models/winograd.py): the same values and
gradients as XLA's convolution, taken by the project's Conv layer only where `applies` says."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from diffrestorer_jax.models import layers, winograd

NHWC = ("NHWC", "HWIO", "NHWC")
PAD = ((1, 1), (1, 1))


def _direct(x, w):
    return lax.conv_general_dilated(x, w, (1, 1), PAD, dimension_numbers=NHWC)


@pytest.mark.parametrize("x_shape,w_shape", [((2, 6, 10, 5), (3, 3, 5, 7)), ((1, 2, 2, 3), (3, 3, 3, 4))])
def test_values_and_gradients_equal_the_direct_convolution(x_shape, w_shape):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(x_shape, np.float32))
    w = jnp.asarray(rng.standard_normal(w_shape, np.float32))
    want, got = _direct(x, w), jax.jit(winograd.conv3x3)(x, w)
    scale = float(jnp.max(jnp.abs(want)))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5 * scale)
    loss = lambda conv: jax.jit(jax.grad(lambda x_, w_: jnp.sum(jnp.sin(conv(x_, w_))), (0, 1)))  # noqa: E731
    for g, r in zip(loss(winograd.conv3x3_on_cpu)(x, w), loss(_direct)(x, w)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-5 * float(jnp.max(jnp.abs(r))))


def test_applies_only_to_wide_large_float32_3x3():
    ok = ((1, 64, 64, 512), (3, 3, 512, 512), (1, 1), PAD, jnp.float32)
    assert winograd.applies(*ok)
    for i, bad in [(0, (1, 32, 32, 512)), (0, (1, 64, 64, 256)), (0, (1, 64, 65, 512)),
                   (1, (1, 1, 512, 512)), (1, (3, 3, 512, 256)), (2, (2, 2)), (3, ((0, 0), (0, 0))), (4, jnp.bfloat16)]:
        assert not winograd.applies(*(ok[:i] + (bad,) + ok[i + 1:])), bad


def _compiled(features, x_shape):
    conv = layers.Conv(features, 3)
    x = jnp.zeros(x_shape, jnp.float32)
    params = jax.eval_shape(conv.init, jax.random.PRNGKey(0), x)
    return jax.jit(conv.apply).lower(params, x).compile().as_text()


def test_the_conv_layer_takes_the_route_where_it_applies():
    # 64x64, 384 -> 384 channels: Winograd's batched matmul, no convolution; 32x32: XLA's convolution.
    assert winograd.applies((1, 64, 64, 384), (3, 3, 384, 384), (1, 1), PAD, jnp.float32)
    assert "convolution(" not in _compiled(384, (1, 64, 64, 384))
    assert "convolution(" in _compiled(384, (1, 32, 32, 384))


def test_conv_layer_output_matches_xla_where_routed():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((1, 64, 64, 384), np.float32))
    conv = layers.Conv(384, 3)
    params = conv.init(jax.random.PRNGKey(0), x)
    plain = nn.Conv(384, (3, 3), padding=PAD)
    want = plain.apply(nn.meta.unbox(params), x)
    got = jax.jit(conv.apply)(params, x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5 * float(jnp.max(jnp.abs(want))))
