"""Blur kernels and a per-image depthwise convolution, traceable with per-sample parameters.

dm-pix covers the isotropic Gaussian blur (used directly by the weather effects); what it lacks is a
convolution with an arbitrary *random* kernel (motion trajectories, anisotropic Gaussians, rain
streak lines), so that lives here. Kernels have a static size and traced parameters, so one compiled
function serves every draw.
"""
import jax
import jax.numpy as jnp


def depthwise_conv(image: jax.Array, kernel: jax.Array) -> jax.Array:
    """Filter every channel of [H, W, C] with one [k, k] kernel; reflect padding keeps border statistics."""
    k = kernel.shape[0]
    p = k // 2
    c = image.shape[-1]
    x = jnp.pad(image, ((p, p), (p, p), (0, 0)), mode="reflect")
    rhs = jnp.broadcast_to(kernel[:, :, None, None], (k, k, 1, c)).astype(image.dtype)
    out = jax.lax.conv_general_dilated(x[None], rhs, (1, 1), "VALID",
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                       feature_group_count=c, precision=jax.lax.Precision.HIGHEST)
    return out[0]


def _grid(size: int) -> tuple:
    r = jnp.arange(size, dtype=jnp.float32) - (size - 1) / 2
    return jnp.meshgrid(r, r, indexing="ij")  # (dy, dx)


def trajectory_kernel(turns: jax.Array, size: int, length, angle, width: float = 0.6) -> jax.Array:
    """A motion kernel: a random-walk camera path of `length` px, heading `angle` (rad), rasterised.

    `turns` [n - 1] are the heading changes (rad) between the n path points (e.g. curvature x normal
    draws; zeros give a straight line, used for rain streaks). Points are splatted as Gaussians of
    std `width` px, which rasterises sub-pixel paths without aliasing.
    """
    n_points = turns.shape[0] + 1
    drift = jnp.cumsum(turns)
    heading = angle + drift - drift.mean()
    step = length / (n_points - 1)
    steps = jnp.stack([jnp.sin(heading), jnp.cos(heading)], -1) * step
    pts = jnp.concatenate([jnp.zeros((1, 2)), jnp.cumsum(steps, 0)], 0)
    pts = pts - pts.mean(0)
    gy, gx = _grid(size)
    d2 = (gy[None] - pts[:, 0, None, None]) ** 2 + (gx[None] - pts[:, 1, None, None]) ** 2
    kernel = jnp.exp(-d2 / (2 * width ** 2)).sum(0)
    return kernel / kernel.sum()


def anisotropic_gaussian_kernel(size: int, sigma_major, sigma_minor, theta) -> jax.Array:
    """A normalised Gaussian kernel with principal stds (major, minor) px rotated by `theta` (rad)."""
    gy, gx = _grid(size)
    c, s = jnp.cos(theta), jnp.sin(theta)
    u = c * gx + s * gy
    v = -s * gx + c * gy
    kernel = jnp.exp(-0.5 * ((u / sigma_major) ** 2 + (v / sigma_minor) ** 2))
    return kernel / kernel.sum()


def kernel_spread(kernel: jax.Array) -> jax.Array:
    """RMS radius (px) of a normalised kernel: one number that says how much it blurs."""
    gy, gx = _grid(kernel.shape[0])
    my, mx = (kernel * gy).sum(), (kernel * gx).sum()
    return jnp.sqrt((kernel * ((gy - my) ** 2 + (gx - mx) ** 2)).sum())


def odd(n: float) -> int:
    """The smallest odd integer >= n (and >= 3): kernel sizes must be static and centred."""
    k = max(3, int(-(-n // 1)))
    return k if k % 2 else k + 1
