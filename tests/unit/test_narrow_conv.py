"""Convolutions to few output channels on CPU (models/narrow_conv.py): XLA's values and gradients,
taken where they apply, and TPU programs keep XLA's convolution."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from diffrestorer_jax.models import conv_grad, narrow_conv
from tpu_hlo import hlo_for_tpu

NHWC = ("NHWC", "HWIO", "NHWC")


@pytest.mark.parametrize("x_shape,w_shape,strides,padding", [
    ((2, 16, 16, 16), (3, 3, 16, 3), (1, 1), ((1, 1), (1, 1))),     # a decoder's conv_out to RGB
    ((1, 12, 10, 32), (3, 3, 32, 4), (1, 1), ((1, 1), (1, 1))),     # a UNet's conv_out, odd sizes
    ((1, 16, 16, 64), (3, 3, 64, 16), (2, 2), ((1, 1), (1, 1))),    # stride 2
    ((1, 15, 14, 40), (3, 3, 40, 8), (2, 2), ((0, 1), (0, 1))),     # asymmetric padding, odd input
    ((1, 12, 12, 24), (5, 5, 24, 6), (1, 2), ((2, 2), (1, 3))),     # 5x5, mixed strides
])
def test_values_and_gradients_equal_xla(x_shape, w_shape, strides, padding):
    assert narrow_conv.applies(x_shape, w_shape)
    assert not conv_grad.matmul_route_applies(x_shape, w_shape, strides, padding)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(x_shape, np.float32))
    w = jnp.asarray(rng.standard_normal(w_shape, np.float32))

    def run(conv):
        f = lambda x_, w_: conv(x_, w_, strides, padding, dimension_numbers=NHWC)
        y = jax.jit(f)(x, w)
        grads = jax.jit(jax.grad(lambda x_, w_: jnp.sum(jnp.sin(f(x_, w_))), (0, 1)))(x, w)
        return (y,) + grads

    for got, want in zip(run(conv_grad.conv_general_dilated), run(lax.conv_general_dilated)):
        assert got.shape == want.shape and got.dtype == want.dtype
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4,
                                   atol=2e-5 * float(jnp.max(jnp.abs(want))))


def test_cpu_program_is_a_matmul_not_a_convolution():
    x, w = jnp.ones((1, 32, 32, 64)), jnp.ones((3, 3, 64, 3))
    text = jax.jit(lambda x_, w_: conv_grad.conv_general_dilated(
        x_, w_, (1, 1), ((1, 1), (1, 1)), dimension_numbers=NHWC)).lower(x, w).compile().as_text()
    assert " convolution(" not in text and " dot(" in text


def test_route_decision():
    assert narrow_conv.applies((1, 64, 64, 320), (3, 3, 320, 4))     # SD's UNet conv_out
    assert narrow_conv.applies((1, 256, 256, 128), (3, 3, 128, 3))   # SD's VAE conv_out
    assert not narrow_conv.applies((1, 64, 64, 96), (3, 3, 96, 32))  # ratio 3: XLA's is as fast
    assert not narrow_conv.applies((1, 64, 64, 64), (3, 3, 64, 64))
    assert not narrow_conv.applies((1, 64, 64, 64), (1, 1, 64, 4))   # 1x1: already a matmul


def test_tpu_lowering_keeps_xla_convolution():
    """Lowered for TPU from this CPU host, the program is XLA's convolution (`platform_dependent`
    picks by the target, not by the tracing host)."""
    text = hlo_for_tpu(lambda x_, w_: conv_grad.conv_general_dilated(
        x_, w_, (1, 1), ((1, 1), (1, 1)), dimension_numbers=NHWC), jnp.ones((1, 32, 32, 64)), jnp.ones((3, 3, 64, 3)))
    assert text.count(" convolution(") == 1 and " dot(" not in text
