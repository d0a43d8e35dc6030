"""Convolutions with few output channels on CPU: one matmul against every tap, then shifted sums.

XLA's CPU convolution is slow when the output has few channels next to the input (a network's last
convolution to 3 or 4 channels, the decoder's fusion convolutions to 32): on the AVX-512 AMD EPYC host of
2026-12-05 (`benchmarks/cpu_ops.py`), 320 -> 4 at 64x64 (SD's UNet conv_out, every denoising step)
took 7.6 ms against 2.6 for PyTorch, 128 -> 3 at 256x256 (SD's VAE conv_out) 41.9 ms. Written as
  Z[n, i, j, a, b, :] = x[n, i, j] @ W[a, b],   y[n, p, q] = sum over taps (a, b) of Z at the pixel
  (stride * p + a - pad_top, stride * q + b - pad_left)
it is one matmul with C_out * kh * kw columns (no patch matrix) and a cheap sum: 1.2 and 7.8 ms
there (benchmarks/RESULTS.md). With as many output channels as input ones
the matmul is 9x wider than the convolution's and the route loses, so it is taken only where the
input has at least `MIN_CHANNEL_RATIO` times the output's channels, and only on CPU
(`lax.platform_dependent`: TPU and GPU programs, AOT compiles included, are unchanged). The result
differs from XLA's convolution by float rounding (another summation order).
"""
import jax.numpy as jnp
from jax import lax

# From single-convolution timings on the AVX-512 host (family 25 model 17), route / XLA time: 32 -> 4
# at 32 px 0.30x, 16 -> 3 at 128 0.36x, 320 -> 4 at 64 0.16x, 128 -> 3 at 256 0.20x, 512 -> 8 at 32
# 0.15x, 544 -> 32 at 64 0.44x, 256 -> 32 at 64 0.71x, 128 -> 16 at 64 0.46x, 64 -> 16 at 64 0.80x;
# 96 -> 32 at 32 0.78x (ratio 3, not taken); 32 -> 16 at 128 0.97x (ratio 2); 16 -> 16 at 128 2.8x.
MIN_CHANNEL_RATIO = 4


def applies(x_shape, w_shape) -> bool:
    """Whether a convolution (NHWC / HWIO, no dilation or groups) takes this route on CPU."""
    kh, kw, ci, co = w_shape
    return kh * kw > 1 and ci >= MIN_CHANNEL_RATIO * co


def conv(x, w, strides, padding, precision=None):
    """y = conv(x, w) for x [N, H, W, Ci], w [kh, kw, Ci, Co], explicit `padding` ((top, bottom),
    (left, right)), by the matmul and shifted sums above."""
    kh, kw, ci, co = w.shape
    n, height, width, _ = x.shape
    (pad_top, pad_bottom), (pad_left, pad_right) = padding
    stride_h, stride_w = strides
    ho = (height + pad_top + pad_bottom - kh) // stride_h + 1
    wo = (width + pad_left + pad_right - kw) // stride_w + 1
    columns = jnp.transpose(w, (2, 0, 1, 3)).reshape(ci, kh * kw * co)
    z = lax.dot_general(x.reshape(-1, ci), columns, (((1,), (0,)), ((), ())), precision=precision)
    z = z.reshape(n, height, width, kh, kw, co)
    zero = jnp.zeros((), z.dtype)
    y = None
    for a in range(kh):
        for b in range(kw):
            tap = lax.pad(z[:, :, :, a, b, :], zero,
                          ((0, 0, 0), (pad_top, pad_bottom, 0), (pad_left, pad_right, 0), (0, 0, 0)))
            tap = lax.slice(tap, (0, a, b, 0), (n, a + stride_h * (ho - 1) + 1, b + stride_w * (wo - 1) + 1, co),
                            (1, stride_h, stride_w, 1))
            y = tap if y is None else y + tap
    return y.astype(jnp.result_type(x, w))


def conv_on_cpu(x, w, strides, padding, precision=None):
    """`conv` on CPU, XLA's convolution on every other platform."""
    def direct(x_, w_):
        return lax.conv_general_dilated(x_, w_, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        precision=precision)
    return lax.platform_dependent(x, w, cpu=lambda x_, w_: conv(x_, w_, strides, padding, precision),
                                  default=direct)
