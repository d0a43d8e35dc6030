"""Nearest-neighbour x2 upsampling then a 3x3 convolution; on CPU as one 2x2 convolution at the input's size.

After a nearest x2 upsampling, each of the four output phases (row parity r, column parity s) of a
3x3, pad-1 convolution reads only a 2x2 neighbourhood of the input: for rows, phase 0 sees input
rows (i-1, i) through kernel rows (w0, w1 + w2) and phase 1 rows (i, i+1) through (w0 + w1, w2);
columns likewise. So the four phases are one 2x2 convolution of the (padded) input with 4x the
output channels, then interleaved: 16 multiplies per input pixel and channel pair instead of 36,
and no upsampled copy of the input. On the AVX-512 EPYC host (2026-12-05, `benchmarks/cpu_ops.py`)
that took the SD VAE's 512-channel 64 -> 128 upsampling 419 -> 231 ms, 256 channels at 128 -> 256
450 -> 238 ms, the tiny VAE's 32-channel 64 -> 128 one 4.5 -> 2.8 ms (its 64-channel 32 -> 64 one is
a wash); at 8-16 px inputs with 1280 channels it was slower (XLA's convolution with 4x the outputs),
so it is taken from `MIN_INPUT_PIXELS` and only on CPU (`lax.platform_dependent`:
TPU and GPU programs, AOT compiles included, are unchanged). The parameters are `layers.Conv`'s.
The result differs from upsampling then convolving by float rounding (the summed kernel rows).
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from flax.linen.dtypes import promote_dtype
from jax import lax

from diffrestorer_jax.models.conv_grad import conv_general_dilated

Dtype = Any
MIN_INPUT_PIXELS = 32 * 32
_NHWC = ("NHWC", "HWIO", "NHWC")
# [phase, tap of the 2x2 kernel, row of the 3x3 kernel]: which 3x3 rows each 2x2 row sums
_PHASE_ROWS = np.array([[[1, 0, 0], [0, 1, 1]], [[1, 1, 0], [0, 0, 1]]], np.float32)


def upsample_then_conv(x, kernel):
    """Nearest x2 upsampling of x [N, H, W, C], then the 3x3 pad-1 convolution with kernel [3, 3, C, O]."""
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=_NHWC)


def upsample_conv_by_phases(x, kernel):
    """The same as `upsample_then_conv`, by one 2x2 convolution at the input's size (module doc)."""
    n, height, width, c = x.shape
    out = kernel.shape[-1]
    rows = jnp.asarray(_PHASE_ROWS, kernel.dtype)
    phases = jnp.einsum("rai,sbj,ijco->abcrso", rows, rows, kernel).reshape(2, 2, c, 4 * out)
    y = conv_general_dilated(x, phases, (1, 1), ((1, 1), (1, 1)), dimension_numbers=_NHWC)
    y = y.reshape(n, height + 1, width + 1, 2, 2, out)  # output (i, j) of phase (r, s) at y[i + r, j + s]
    by_row = [jnp.stack([y[:, r:r + height, s:s + width, r, s] for s in range(2)], axis=3) for r in range(2)]
    return jnp.stack(by_row, axis=2).reshape(n, 2 * height, 2 * width, out)


class UpsampleConv(nn.Module):
    """Nearest x2 upsampling then a 3x3, pad-1 convolution with `features` outputs (parameters
    'kernel' and 'bias' as `layers.Conv`'s)."""
    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.with_logical_partitioning(
            nn.initializers.lecun_normal(), (None, None, "conv_in", "conv_out")),
            (3, 3, x.shape[-1], self.features), self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)),
                          (self.features,), self.param_dtype)
        x, kernel, bias = promote_dtype(x, kernel, bias, dtype=self.dtype)
        if x.shape[1] * x.shape[2] >= MIN_INPUT_PIXELS:
            y = lax.platform_dependent(x, kernel, cpu=upsample_conv_by_phases, default=upsample_then_conv)
        else:
            y = upsample_then_conv(x, kernel)
        return y + bias
