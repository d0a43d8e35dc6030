"""Wide 3x3 convolutions on CPU by Winograd's F(2x2, 3x3): 16 matmuls in place of 36 per 2x2 tile.

XLA's CPU convolution is 1.3-1.4x slower than PyTorch's oneDNN for 512-channel 3x3 convolutions at
64x64 and 128x128 pixels, where the SD VAE spends most of its time (benchmarks/RESULTS.md). Winograd's
minimal filtering computes each 2x2 output tile from a 4x4 input tile with 16 multiplies per channel
pair instead of 36: input tiles V = B^T d B, kernel U = G g G^T, then for each of the 16 tile points
one matmul over channels (M = V @ U), and the output A^T M A. On this host that took those
convolutions to 0.6-0.7x of XLA's time (below PyTorch's); at fewer channels or pixels XLA's own
convolution is as fast or faster, so only wide (in and out), large ones take this route (`applies`), and only on
CPU (`lax.platform_dependent`: TPU and GPU programs, AOT compiles included, are unchanged). The
result differs from the direct convolution by float rounding (~1e-6 relative in float32); float32
only, as the transforms would lose more in bfloat16.
"""
import jax.numpy as jnp
import numpy as np
from jax import lax

# Where single-convolution timings on the AMD EPYC host of 2026-12-05 (AVX2, one thread) showed the
# route faster than XLA's convolution (in -> out channels at a side, Winograd / XLA time): 512 -> 512
# at 64 0.68x and at 128 0.59x, 1024 -> 512 at 64 0.69x, 384 -> 384 at 64 0.91x; slower: 512 -> 256
# at 128 (1.07x), 512 -> 128 at 64, 544 -> 32 at 64 (2.3x), 320 at 64, 512 at 32, 640 at 32, 1280
# at 16 and 128 at 256; 256 -> 256 at 128-256 ~0.95x (not worth the rounding).
MIN_IN_CHANNELS = 384
MIN_OUT_CHANNELS = 384
MIN_OUTPUT_PIXELS = 64 * 64

_BT = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float32)
_G = np.array([[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]], np.float32)
_AT = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float32)


def applies(x_shape, w_shape, strides, padding, dtype) -> bool:
    """Whether a convolution takes the Winograd route on CPU (static shapes: decided at trace)."""
    _, height, width, ci = x_shape
    return (tuple(w_shape[:2]) == (3, 3) and tuple(strides) == (1, 1)
            and tuple(map(tuple, padding)) == ((1, 1), (1, 1)) and jnp.dtype(dtype) == jnp.float32
            and ci >= MIN_IN_CHANNELS and w_shape[3] >= MIN_OUT_CHANNELS
            and height * width >= MIN_OUTPUT_PIXELS
            and height % 2 == 0 and width % 2 == 0)


def _combine(matrix, terms):
    """[sum_i matrix[r, i] * terms[i] for each row r], skipping zero coefficients."""
    out = []
    for row in matrix:
        acc = None
        for c, t in zip(row, terms):
            if c == 0:
                continue
            t = t if c == 1 else (-t if c == -1 else t * c)
            acc = t if acc is None else acc + t
        out.append(acc)
    return out


def conv3x3(x, w, precision=None):
    """A 3x3, stride-1, pad-1 NHWC/HWIO convolution by F(2x2, 3x3). x [N, H, W, Ci] with H, W even,
    w [3, 3, Ci, Co] -> [N, H, W, Co]."""
    n, height, width, ci = x.shape
    co = w.shape[-1]
    th, tw = height // 2, width // 2
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    # d[i][j]: pixel (i, j) of every 4x4 input tile (tiles start every 2 pixels), [N, th, tw, Ci].
    d = [[xp[:, i:i + height:2, j:j + width:2, :] for j in range(4)] for i in range(4)]
    cols = [_combine(_BT, [d[i][j] for i in range(4)]) for j in range(4)]
    v = [_combine(_BT, [cols[j][r] for j in range(4)]) for r in range(4)]
    tiles = jnp.stack([v[r][s] for r in range(4) for s in range(4)]).reshape(16, n * th * tw, ci)
    g = jnp.asarray(_G, w.dtype)
    u = jnp.einsum("ai,ijco,bj->abco", g, w, g).reshape(16, ci, co)
    m = lax.dot_general(tiles, u, (((2,), (1,)), ((0,), (0,))), precision=precision)
    m = m.reshape(4, 4, n, th, tw, co)
    rows = [_combine(_AT, [m[r, s] for r in range(4)]) for s in range(4)]
    y = [_combine(_AT, [rows[s][p] for s in range(4)]) for p in range(2)]  # y[p][q]: [N, th, tw, Co]
    y = jnp.stack([jnp.stack(y[p], axis=3) for p in range(2)], axis=2)  # [N, th, 2, tw, 2, Co]
    return y.reshape(n, height, width, co)


def conv3x3_on_cpu(x, w, precision=None):
    """`conv3x3` on CPU, XLA's convolution on every other platform."""
    def direct(x_, w_):
        return lax.conv_general_dilated(x_, w_, (1, 1), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=precision)
    return lax.platform_dependent(x, w, cpu=lambda x_, w_: conv3x3(x_, w_, precision), default=direct)
