"""A convolution whose gradients, on CPU, skip XLA's per-step rearrangement of the kernel.

For the input gradient XLA CPU convolves the output gradient with a flipped, channel-swapped copy of
the kernel that it materialises on every step: a badly strided transpose that costs seconds per
step for SD's large frozen kernels (benchmarks/RESULTS.md). Where the kernel is large next to the
activation, this module computes that gradient as one matmul reading the kernel in its stored layout,
  Z[n, p, q, a, b, :] = W[a, b] @ dy[n, p, q],   dx = sum over taps (a, b) of Z shifted into place,
(the same sum in another order), and the kernel gradient as patches(x)^T @ dy, in HWIO order.
Elsewhere, and on every other platform (`lax.platform_dependent`, so AOT compiles for TPU are
unaffected), the gradients are XLA's own. The forward pass is XLA's convolution, except on CPU for
convolutions to few output channels (`narrow_conv`) and wide 3x3 ones (`winograd`), where
`conv_general_dilated` sends them (each module's doc says where).

Pass `conv_general_dilated` to `flax.linen.Conv(conv_general_dilated=...)`.
"""
from typing import Sequence, Tuple

import jax
import jax.numpy as jnp
from jax import lax

from diffrestorer_jax.models import narrow_conv, winograd

# The matmul route is taken when the kernel holds at least this many times more values per output
# channel than the output gradient has pixels (kh * kw * C_in >= RATIO * N * H_out * W_out): where
# single-convolution timings showed it faster than XLA's gradients (benchmarks/RESULTS.md).
MATMUL_ROUTE_RATIO = 16

_NHWC = ("NHWC", "HWIO", "NHWC")


def _plain_conv(x, w, strides, padding, precision):
    return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_NHWC,
                                    precision=precision)


def _input_grad_by_matmul(dy, w, x_shape, strides, padding, precision):
    """d(conv)/dx contracted with dy, as one matmul plus a sum of shifted (and, for strides > 1,
    dilated) taps. Shapes: dy (N, Ho, Wo, Co), w (kh, kw, Ci, Co) -> (N, H, W, Ci)."""
    kh, kw, ci, co = w.shape
    n, ho, wo, _ = dy.shape
    height, width = x_shape[1], x_shape[2]
    z = lax.dot_general(dy.reshape(-1, co), w.reshape(-1, co), (((1,), (1,)), ((), ())),
                        precision=precision).reshape(n, ho, wo, kh, kw, ci)
    (pad_top, _), (pad_left, _) = padding
    (stride_h, stride_w) = strides
    dx = None
    for a in range(kh):
        for b in range(kw):
            # Output pixel p read input row stride*p + a - pad_top through tap a: put Z's tap there
            # (negative padding crops what fell outside the input).
            low_h, low_w = a - pad_top, b - pad_left
            high_h = height - low_h - (stride_h * (ho - 1) + 1)
            high_w = width - low_w - (stride_w * (wo - 1) + 1)
            tap = lax.pad(z[:, :, :, a, b, :], jnp.zeros((), z.dtype),
                          ((0, 0, 0), (low_h, high_h, stride_h - 1), (low_w, high_w, stride_w - 1),
                           (0, 0, 0)))
            dx = tap if dx is None else dx + tap
    return dx


def _kernel_grad_by_matmul(x, dy, w_shape, strides, padding, precision):
    """d(conv)/dw contracted with dy, as the input's patches (N*Ho*Wo, kh*kw*Ci) times dy: the
    result comes out in HWIO order, with no transpose. Shapes: x (N, H, W, Ci), dy (N, Ho, Wo, Co)."""
    kh, kw, ci, co = w_shape
    n, ho, wo, _ = dy.shape
    xp = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
    (stride_h, stride_w) = strides
    rows, cols = stride_h * (ho - 1) + 1, stride_w * (wo - 1) + 1
    patches = jnp.stack([xp[:, a:a + rows:stride_h, b:b + cols:stride_w, :]
                         for a in range(kh) for b in range(kw)], axis=3)
    dw = lax.dot_general(patches.reshape(-1, kh * kw * ci), dy.reshape(-1, co),
                         (((0,), (0,)), ((), ())), precision=precision)
    return dw.reshape(kh, kw, ci, co)


def _attach_matmul_grads(strides, padding, precision):
    """attach(y, x, w) = y, whose backward gives x and w the gradients of conv(x, w) (by matmul on
    CPU, XLA's own elsewhere). The convolution itself stays a plain primitive outside it (computed
    on stopped inputs), so remat policies that keep convolution outputs (`checkpoint_dots`) still
    see and keep it: wrapping the convolution inside a custom_vjp hid it from them and made the
    backward recompute every such convolution."""
    @jax.custom_vjp
    def attach(y, x, w):
        del x, w
        return y

    def fwd(y, x, w):
        return y, (x, w)

    def bwd(res, dy):
        x, w = res
        plain = lambda x_, w_: _plain_conv(x_, w_, strides, padding, precision)
        dw = lax.platform_dependent(
            x, dy,
            cpu=lambda x_, dy_: _kernel_grad_by_matmul(x_, dy_, w.shape, strides, padding, precision),
            default=lambda x_, dy_: jax.vjp(lambda w_: plain(x_, w_), w)[1](dy_)[0])
        dx = lax.platform_dependent(
            dy, w,
            cpu=lambda dy_, w_: _input_grad_by_matmul(dy_, w_, x.shape, strides, padding, precision),
            default=lambda dy_, w_: jax.vjp(lambda x_: plain(x_, w_), x)[1](dy_)[0])
        # y came from stopped inputs: its cotangent goes nowhere.
        return jnp.zeros_like(dy), dx.astype(x.dtype), dw.astype(w.dtype)

    attach.defvjp(fwd, bwd)
    return attach


def matmul_route_applies(x_shape, w_shape, strides, padding) -> bool:
    """Whether the gradients are computed by matmul on CPU (static shapes: decided at trace)."""
    kh, kw, ci, _ = w_shape
    n, height, width, _ = x_shape
    (pt, pb), (pl, pr) = padding
    ho = (height + pt + pb - kh) // strides[0] + 1
    wo = (width + pl + pr - kw) // strides[1] + 1
    return kh * kw * ci >= MATMUL_ROUTE_RATIO * n * ho * wo


def conv_general_dilated(lhs, rhs, window_strides: Sequence[int], padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count: int = 1,
                         precision=None, **kwargs):
    """`lax.conv_general_dilated` (same signature), with the CPU routes where they apply (2D
    NHWC/HWIO, explicit padding, no dilation, no groups): the gradients above for a large kernel,
    one matmul plus shifted sums (`narrow_conv.applies`) where the output has few channels next to
    the input, Winograd's forward (`winograd.applies`) for a wide 3x3 one. Anything else goes to
    `lax.conv_general_dilated` unchanged."""
    eligible = (lhs.ndim == 4 and rhs.ndim == 4 and not kwargs and feature_group_count == 1
                and all(d == 1 for d in (lhs_dilation or (1, 1)))
                and all(d == 1 for d in (rhs_dilation or (1, 1)))
                and not isinstance(padding, str)
                and _is_nhwc(dimension_numbers, lhs.shape, rhs.shape))
    if eligible:
        strides = tuple(int(s) for s in window_strides)
        pads: Tuple[Tuple[int, int], ...] = tuple((int(lo), int(hi)) for lo, hi in padding)
        if matmul_route_applies(lhs.shape, rhs.shape, strides, pads):
            y = _plain_conv(lax.stop_gradient(lhs), lax.stop_gradient(rhs), strides, pads, precision)
            return _attach_matmul_grads(strides, pads, precision)(y, lhs, rhs)
        if narrow_conv.applies(lhs.shape, rhs.shape):
            return narrow_conv.conv_on_cpu(lhs, rhs, strides, pads, precision)
        if winograd.applies(lhs.shape, rhs.shape, strides, pads, jnp.result_type(lhs, rhs)):
            return winograd.conv3x3_on_cpu(lhs, rhs, precision)
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                                    rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                                    feature_group_count=feature_group_count, precision=precision,
                                    **kwargs)


def _is_nhwc(dimension_numbers, lhs_shape, rhs_shape) -> bool:
    if dimension_numbers is None:
        return False
    dn = lax.conv_dimension_numbers(lhs_shape, rhs_shape, dimension_numbers)
    return dn == lax.conv_dimension_numbers(lhs_shape, rhs_shape, _NHWC)
