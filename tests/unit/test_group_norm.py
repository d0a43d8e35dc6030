"""The networks' GroupNorm (models/group_norm.py) is Flax's: same parameters, values and gradients;
on CPU its sums run over a 128-wide minor axis, elsewhere it is nn.GroupNorm's program."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffrestorer_jax.models.layers import GroupNorm
from tpu_hlo import hlo_for_tpu


@pytest.mark.parametrize("shape,groups,dtype", [
    ((2, 16, 16, 32), 8, jnp.float32),    # 32 channels: folded 4x into 128 lanes
    ((1, 7, 5, 64), 32, jnp.float32),     # odd spatial size: fewer folds
    ((2, 9, 320), 32, jnp.float32),       # token layout, channels wider than 128
    ((2, 6, 6, 48), 4, jnp.bfloat16),     # 48 does not divide 128; bfloat16 output
])
def test_equals_flax_groupnorm(shape, groups, dtype):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(shape) * 3 + 1.5, jnp.float32)  # a mean away from 0
    ours, flax_norm = GroupNorm(groups, dtype=dtype), nn.GroupNorm(num_groups=groups, epsilon=1e-5, dtype=dtype)
    params = ours.init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, nn.unbox(params)) == jax.tree.map(jnp.shape, flax_norm.init(jax.random.key(0), x))
    assert nn.get_partition_spec(params)["params"]["scale"] == jax.sharding.PartitionSpec("norm")
    params = jax.tree.map(lambda a: a + 0.1 * jnp.asarray(rng.standard_normal(a.shape), a.dtype),
                          nn.unbox(params))

    def run(module):
        y = jax.jit(module.apply)(params, x)
        grads = jax.jit(jax.grad(lambda p, x_: jnp.sum(jnp.sin(module.apply(p, x_).astype(jnp.float32))),
                                 (0, 1)))(params, x)
        return [y] + jax.tree.leaves(grads)

    tol = 2e-2 if dtype == jnp.bfloat16 else 2e-5
    for got, want in zip(run(ours), run(flax_norm)):
        assert got.dtype == want.dtype
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                                   rtol=tol, atol=tol * float(jnp.max(jnp.abs(want.astype(jnp.float32)))))


def test_module_name_and_tree_match_nn_groupnorm():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return GroupNorm(8)(GroupNorm(8, name="norm1")(x))

    params = Net().init(jax.random.key(0), jnp.ones((1, 4, 4, 16)))["params"]
    assert set(params) == {"norm1", "GroupNorm_0"} and set(params["norm1"]) == {"scale", "bias"}


def test_cpu_sums_run_over_128_lanes():
    x = jnp.ones((2, 16, 16, 32))
    module = GroupNorm(8)
    params = module.init(jax.random.key(0), x)
    text = jax.jit(module.apply).lower(params, x).compile().as_text()
    assert "f32[2,64,128]" in text  # [N, H*W / 4, 4 * 32]: the folded view the sums reduce


def test_tpu_lowering_is_flax_groupnorm():
    x = jnp.ones((2, 16, 16, 32))
    module = GroupNorm(8)
    params = nn.unbox(module.init(jax.random.key(0), x))
    ours = hlo_for_tpu(module.apply, params, x)
    flax_text = hlo_for_tpu(nn.GroupNorm(num_groups=8, epsilon=1e-5).apply, params, x)
    assert "f32[2,64,128]" not in ours
    assert ours.count(" reduce(") == flax_text.count(" reduce(")


def _without_xla_tree_pass(monkeypatch):
    """XLA_FLAGS as the restoring commands set them (read when the sums are traced), and the same
    option for this compile (conftest made the process's CPU client with its own flags)."""
    from diffrestorer_jax import xla_cpu
    monkeypatch.setenv("XLA_FLAGS", f"--{xla_cpu.DISABLE_PASSES_FLAG}={xla_cpu.CPU_TREE_REDUCTION_PASS}")
    return {xla_cpu.DISABLE_PASSES_FLAG: xla_cpu.CPU_TREE_REDUCTION_PASS}


def test_cpu_sums_add_windows_of_rows_without_xla_tree_pass(monkeypatch):
    """Without XLA's tree_reduction_rewriter the sums over the pixels still run as a tree (windows of
    32 rows, then their partial sums), not as one slow loop over all rows, and equal Flax's."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 64, 64, 512)), jnp.float32)
    module = GroupNorm(32)
    params = module.init(jax.random.key(0), x)
    want = jax.jit(nn.GroupNorm(num_groups=32, epsilon=1e-5).apply)(params, x)
    options = _without_xla_tree_pass(monkeypatch)
    compiled = jax.jit(module.apply).lower(params, x).compile(compiler_options=options)
    assert "reduce-window(" in compiled.as_text() and "f32[2,128,512]" in compiled.as_text()  # 4096 rows -> 128
    np.testing.assert_allclose(compiled(params, x), want, rtol=2e-5, atol=2e-5)


def test_cpu_sums_with_xla_tree_pass_are_its_program(monkeypatch):
    """Where XLA's pass runs (training), the sums are plain ones: the pass builds the tree."""
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    jaxpr = jax.make_jaxpr(GroupNorm(32).init)(jax.random.key(0), jnp.ones((1, 64, 64, 64)))
    assert "reduce_window" not in str(jaxpr)


def test_cpu_window_sums_derivative_is_the_plain_sums(monkeypatch):
    """A windowed sum differentiates as a plain sum (a broadcast), not through the windows."""
    _without_xla_tree_pass(monkeypatch)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 40, 48)), jnp.float32)  # 40 rows: padded
    from diffrestorer_jax.models.group_norm import channel_sums
    np.testing.assert_allclose(channel_sums(x), np.asarray(x).sum(1), rtol=1e-6, atol=1e-5)
    weights = jnp.asarray(np.random.default_rng(1).standard_normal((2, 48)), jnp.float32)
    grad = jax.grad(lambda x_: jnp.sum(channel_sums(x_) * weights))
    np.testing.assert_allclose(grad(x), np.broadcast_to(np.asarray(weights)[:, None], x.shape), rtol=1e-6)
    assert str(jax.make_jaxpr(grad)(x)).count("reduce_window_sum") == 1  # the forward's only
