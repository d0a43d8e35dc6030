"""The CPU convolution gradient by matmul (models/conv_grad.py) equals XLA's own, and is taken only
where it applies."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from diffrestorer_jax.models import conv_grad, layers
from tpu_hlo import hlo_for_tpu

NHWC = ("NHWC", "HWIO", "NHWC")


def _grads(conv, x, w, strides, padding):
    # A nonlinear loss so dy differs per pixel and channel.
    loss = lambda x_, w_: jnp.sum(jnp.sin(conv(x_, w_, strides, padding, dimension_numbers=NHWC)))
    return jax.jit(jax.grad(loss, (0, 1)))(x, w)


@pytest.mark.parametrize("x_shape,w_shape,strides,padding", [
    ((1, 4, 4, 96), (3, 3, 96, 8), (1, 1), ((1, 1), (1, 1))),       # a UNet-like 3x3
    ((2, 5, 7, 128), (3, 3, 128, 6), (1, 1), ((1, 1), (1, 1))),       # batch, odd sizes
    ((1, 8, 8, 64), (3, 3, 64, 5), (2, 2), ((1, 1), (1, 1))),       # stride-2 downsampler
    ((1, 7, 6, 80), (3, 3, 80, 4), (2, 2), ((0, 1), (0, 1))),       # asymmetric padding, odd input
    ((1, 5, 5, 40), (4, 4, 40, 4), (2, 1), ((1, 2), (2, 1))),       # even kernel, mixed strides
    ((1, 3, 3, 200), (1, 1, 200, 7), (1, 1), ((0, 0), (0, 0))),     # 1x1 projection
])
def test_gradients_equal_xla(x_shape, w_shape, strides, padding):
    assert conv_grad.matmul_route_applies(x_shape, w_shape, strides, padding)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(x_shape, np.float32))
    w = jnp.asarray(rng.standard_normal(w_shape, np.float32))
    want = _grads(lax.conv_general_dilated, x, w, strides, padding)
    got = _grads(conv_grad.conv_general_dilated, x, w, strides, padding)
    for g, r in zip(got, want):
        assert g.shape == r.shape and g.dtype == r.dtype
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4,
                                   atol=1e-5 * float(jnp.max(jnp.abs(r))))
    # The forward pass is XLA's convolution itself.
    np.testing.assert_array_equal(
        np.asarray(conv_grad.conv_general_dilated(x, w, strides, padding, dimension_numbers=NHWC)),
        np.asarray(lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=NHWC)))


def test_cpu_gradient_has_no_kernel_convolutions():
    """On CPU the step compiles to one convolution (the forward) and matmuls, instead of three
    convolutions (forward, input and kernel gradients) with the kernel rearranged for the input's."""
    x = jnp.ones((1, 4, 4, 128)); w = jnp.ones((3, 3, 128, 16))
    pad = ((1, 1), (1, 1))

    def hlo(conv):
        loss = lambda x_, w_: jnp.sum(conv(x_, w_, (1, 1), pad, dimension_numbers=NHWC) ** 2)
        return jax.jit(jax.grad(loss, (0, 1))).lower(x, w).compile().as_text()

    ours, theirs = hlo(conv_grad.conv_general_dilated), hlo(lax.conv_general_dilated)
    assert theirs.count(" convolution(") == 3
    assert ours.count(" convolution(") == 1 and ours.count(" dot(") == 2


def test_route_decision_and_pass_through():
    pad = ((1, 1), (1, 1))
    # Large kernel next to a small activation: the matmul route; the reverse: XLA's.
    assert conv_grad.matmul_route_applies((1, 8, 8, 1280), (3, 3, 1280, 1280), (1, 1), pad)
    assert not conv_grad.matmul_route_applies((1, 64, 64, 320), (3, 3, 320, 320), (1, 1), pad)
    assert not conv_grad.matmul_route_applies((16, 8, 8, 1280), (3, 3, 1280, 1280), (1, 1), pad)
    # Grouped, dilated or string-padded convolutions go to lax unchanged (same values and grads).
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((1, 4, 4, 64), np.float32))
    for w_shape, kwargs in (((3, 3, 32, 8), dict(feature_group_count=2)),
                            ((3, 3, 64, 8), dict(rhs_dilation=(2, 2))),
                            ((3, 3, 64, 8), dict(padding="SAME"))):
        w = jnp.asarray(rng.standard_normal(w_shape, np.float32))
        padding = kwargs.pop("padding", pad)
        f = lambda conv: jax.grad(lambda x_, w_: jnp.sum(jnp.sin(conv(
            x_, w_, (1, 1), padding, dimension_numbers=NHWC, **kwargs))), (0, 1))(x, w)
        for g, r in zip(f(conv_grad.conv_general_dilated), f(lax.conv_general_dilated)):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(r))


def test_project_conv_layer_matches_flax_conv_in_bfloat16():
    """`layers.Conv` (which routes through conv_grad) gives flax's plain nn.Conv's values and
    gradients, in the bfloat16 compute dtype the GPU / TPU configs use."""
    ours = layers.Conv(8, 3, dtype=jnp.bfloat16)
    plain = nn.Conv(8, (3, 3), padding=((1, 1), (1, 1)), dtype=jnp.bfloat16)
    x = jnp.asarray(np.random.default_rng(2).standard_normal((1, 3, 3, 96), np.float32))
    params = plain.init(jax.random.key(0), x)

    def loss(module, p, x_):
        return jnp.sum(module.apply(p, x_).astype(jnp.float32) ** 2)

    (gp_ours, gx_ours) = jax.grad(lambda p, x_: loss(ours, p, x_), (0, 1))(params, x)
    (gp_flax, gx_flax) = jax.grad(lambda p, x_: loss(plain, p, x_), (0, 1))(params, x)
    assert gx_ours.dtype == gx_flax.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(gx_ours), np.asarray(gx_flax), rtol=2e-2, atol=2e-2)
    for a, b in zip(jax.tree.leaves(gp_ours), jax.tree.leaves(gp_flax)):
        assert a.dtype == b.dtype
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-2,
                                   atol=2e-2 * float(jnp.max(jnp.abs(b))))


def test_tpu_lowering_keeps_xla_gradient():
    """Compiled ahead of time for TPU from this CPU host, the gradient is XLA's own convolutions
    (`lax.platform_dependent` picks by the target, not by the tracing host)."""
    loss = lambda x_, w_: jnp.sum(conv_grad.conv_general_dilated(
        x_, w_, (1, 1), ((1, 1), (1, 1)), dimension_numbers=NHWC) ** 2)
    text = hlo_for_tpu(jax.grad(loss, (0, 1)), jnp.ones((1, 4, 4, 128)), jnp.ones((3, 3, 128, 16)))
    assert text.count(" convolution(") == 3 and " dot(" not in text


def test_remat_policy_still_keeps_the_convolutions(monkeypatch):
    """Under nn.remat with `checkpoint_dots` (the SD configs' save_dots) the convolution outputs are
    still kept: the TPU program with the matmul route's wrapper has the FLOPs and convolutions of the
    one without it (wrapping the convolution itself in the custom_vjp made remat recompute it)."""
    pytest.importorskip("libtpu")
    from diffrestorer_jax.parallel import topology

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            for i in range(3):
                x = jax.nn.silu(layers.Conv(128, 3, name=f"conv{i}")(x))
            return x

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            for j in range(2):
                x = nn.remat(Block, policy=jax.checkpoint_policies.checkpoint_dots)(name=f"b{j}")(x)
            return x

    x = jnp.ones((1, 8, 8, 128))
    assert conv_grad.matmul_route_applies(x.shape, (3, 3, 128, 128), (1, 1), ((1, 1), (1, 1)))
    params = Net().init(jax.random.key(0), x)
    sharding = jax.sharding.SingleDeviceSharding(topology.topology_devices("v5e-4")[0])
    spec = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding)

    def compiled(ratio):
        monkeypatch.setattr(conv_grad, "MATMUL_ROUTE_RATIO", ratio)
        grad = jax.jit(jax.grad(lambda p, x_: jnp.sum(Net().apply(p, x_) ** 2)))
        c = grad.lower(jax.tree.map(spec, params), spec(x)).compile()
        return c.cost_analysis()["flops"], c.as_text().count("convolution(")

    assert compiled(16) == compiled(10 ** 9)
