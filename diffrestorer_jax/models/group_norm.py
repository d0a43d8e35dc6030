"""GroupNorm (PyTorch's epsilon, Flax's parameters) with statistics XLA's CPU backend reduces fast.

Flax's GroupNorm reduces an NHWC activation over (H, W, channels of a group). XLA's CPU backend
vectorises a reduction over the major axes only along the minor one it keeps, so with 16-64
channels the loop is narrow: on the AVX-512 AMD EPYC host of 2026-12-05 a per-channel sum of a
128x128x32 activation took 0.64 ms against PyTorch's 0.10 (an ad hoc timing), and GroupNorm + SiLU
over 64x64x32 0.60 ms against 0.13 (`benchmarks/cpu_ops.py`). On CPU the sums here first fold the
pixels into a 128-wide minor axis ([N, L, C] viewed as [N, L / k, k * C], k = 128 / C), which XLA
vectorises (0.12 ms for that sum; the GroupNorm + SiLU 0.32 ms), then add the k copies and the
group's channels on tiny arrays. XLA's CPU loop over all rows of such a column sum at once is
slow (12.6 against 0.9 ms over 64x64x512, ad hoc); its `tree_reduction_rewriter` pass sums windows
of 32 rows first, but the restoring commands leave that pass out (xla_cpu.py). Where XLA_FLAGS
leaves it out, the sums here add windows of 32 rows themselves (an explicit `reduce_window`), with
a plain sum's derivative (a broadcast, not the window's transpose); where it runs, the program is
the pass's, so training is unchanged. The statistics are Flax's (mean and E[x^2] - mean^2 in float32,
`use_fast_variance`) and so is the normalisation; only the summation order differs. Other
platforms run Flax's GroupNorm itself (`lax.platform_dependent`), so TPU and GPU programs are
unchanged. The parameters ('scale', 'bias', logical axis 'norm') and the module's name
match nn.GroupNorm's, so checkpoints and converters see the same tree.
"""
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from diffrestorer_jax import xla_cpu

Dtype = Any
_LANES = 128
_WINDOW = 32


@jax.custom_jvp
def _window_sums(x):
    """x [N, L, C] summed over L: windows of _WINDOW rows first (zero-padded), then their sums."""
    length = x.shape[1]
    if length > _WINDOW:
        x = lax.reduce_window(x, 0.0, lax.add, (1, _WINDOW, 1), (1, _WINDOW, 1),
                              ((0, 0), (0, -length % _WINDOW), (0, 0)))
    return x.sum(1)


@_window_sums.defjvp
def _window_sums_jvp(primals, tangents):
    return _window_sums(primals[0]), tangents[0].sum(1)  # a plain sum: its transpose is a broadcast


def channel_sums(x):
    """sum over every axis but the first and last: [N, ..., C] -> [N, C], float32."""
    n, c = x.shape[0], x.shape[-1]
    length = math.prod(x.shape[1:-1])
    k = _LANES // c if c < _LANES and _LANES % c == 0 else 1
    while k > 1 and length % k:
        k //= 2
    x = x.astype(jnp.float32).reshape(n, length // k, k * c)
    sums = _window_sums(x) if xla_cpu.tree_reduction_pass_disabled() else x.sum(1)
    return sums.reshape(n, k, c).sum(1)


def group_norm_cpu(x, scale, bias, *, groups: int, epsilon: float, dtype: Dtype):
    """Flax's GroupNorm of x [N, ..., C] (fast variance) with the sums of `channel_sums`."""
    n, c = x.shape[0], x.shape[-1]
    count = math.prod(x.shape[1:-1]) * (c // groups)
    xf = x.astype(jnp.float32)
    mean = channel_sums(xf).reshape(n, groups, -1).sum(-1) / count
    mean_sq = channel_sums(xf * xf).reshape(n, groups, -1).sum(-1) / count
    var = jnp.maximum(0.0, mean_sq - mean * mean)
    mul = jnp.repeat(lax.rsqrt(var + epsilon), c // groups, axis=-1) * scale.astype(jnp.float32)
    shape = (n,) + (1,) * (x.ndim - 2) + (c,)
    mean = jnp.repeat(mean, c // groups, axis=-1).reshape(shape)
    y = (xf - mean) * mul.reshape(shape) + bias.astype(jnp.float32)
    return y.astype(dtype)


class GroupNorm(nn.Module):
    """GroupNorm over the last (channel) axis in `num_groups` groups, epsilon 1e-5 by default
    (PyTorch's; Flax's is 1e-6). Output in `dtype`."""
    num_groups: int = 32
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        if c % self.num_groups:
            raise ValueError(f"{self.num_groups} groups do not divide {c} channels")
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
                           (c,), self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)),
                          (c,), self.param_dtype)
        flax_norm = nn.GroupNorm(num_groups=self.num_groups, epsilon=self.epsilon, dtype=self.dtype,
                                 param_dtype=self.param_dtype, parent=None)  # applied as a function

        def default(x_, scale_, bias_):
            return flax_norm.apply({"params": {"scale": scale_, "bias": bias_}}, x_)

        def cpu(x_, scale_, bias_):
            return group_norm_cpu(x_, scale_, bias_, groups=self.num_groups, epsilon=self.epsilon,
                                  dtype=self.dtype)
        return lax.platform_dependent(x, scale, bias, cpu=cpu, default=default)
