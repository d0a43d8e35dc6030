"""Nearest x2 upsampling + 3x3 convolution (models/upsample_conv.py): the CPU route by phases equals
upsampling then convolving, keeps layers.Conv's parameters, and TPU programs keep the convolution."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffrestorer_jax.models import layers, upsample_conv
from diffrestorer_jax.models.upsample_conv import UpsampleConv
from tpu_hlo import hlo_for_tpu


@pytest.mark.parametrize("shape,features", [((2, 32, 32, 16), 8), ((1, 40, 36, 8), 12)])
def test_phases_equal_upsample_then_conv(shape, features):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(shape, np.float32))
    w = jnp.asarray(rng.standard_normal((3, 3, shape[-1], features), np.float32))

    def run(f):
        y = jax.jit(f)(x, w)
        return [y] + list(jax.jit(jax.grad(lambda x_, w_: jnp.sum(jnp.sin(f(x_, w_))), (0, 1)))(x, w))

    for got, want in zip(run(upsample_conv.upsample_conv_by_phases), run(upsample_conv.upsample_then_conv)):
        assert got.shape == want.shape
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4,
                                   atol=2e-5 * float(jnp.max(jnp.abs(want))))


def test_module_has_conv_parameters_and_takes_the_route_on_cpu():
    x = jnp.asarray(np.random.default_rng(1).standard_normal((1, 32, 32, 8), np.float32))
    ours, conv = UpsampleConv(4), layers.Conv(4, 3)
    params = ours.init(jax.random.key(0), x)
    up = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    reference = conv.init(jax.random.key(0), up)
    assert jax.tree.map(jnp.shape, nn.unbox(params)) == jax.tree.map(jnp.shape, nn.unbox(reference))
    assert nn.get_partition_spec(params) == nn.get_partition_spec(reference)
    np.testing.assert_allclose(np.asarray(ours.apply(params, x)), np.asarray(conv.apply(params, up)),
                               rtol=1e-4, atol=1e-4)
    text = jax.jit(ours.apply).lower(params, x).compile().as_text()
    assert "f32[1,33,33,16]" in text  # the 2x2 convolution's four phases at the input's size


def test_tpu_lowering_upsamples_then_convolves():
    x = jnp.ones((1, 32, 32, 8))
    module = UpsampleConv(4)
    text = hlo_for_tpu(module.apply, nn.unbox(module.init(jax.random.key(0), x)), x)
    assert "f32[1,64,64,8]" in text and "f32[1,33,33,16]" not in text
