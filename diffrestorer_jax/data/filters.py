"""Blur kernels and per-image FFT filtering, traceable with per-sample parameters.

dm-pix has no convolution with an arbitrary *random* kernel (motion trajectories, anisotropic
Gaussians, rain streak lines), and its spatial Gaussian blur is slow for the large sigmas the weather
effects need, so both are done here by FFT (dm-pix is still used for colour conversions). Kernels have a static size and traced parameters, so one compiled
function serves every draw.
"""
import jax
import jax.numpy as jnp


def depthwise_conv(image: jax.Array, kernel: jax.Array) -> jax.Array:
    """Filter every channel of [H, W, C] with one [k, k] kernel; reflect padding keeps border statistics.

    Computed by FFT: the random kernels here are large (31 px motion paths, 50 px rain streaks), and
    a direct depthwise convolution costs k^2 per pixel where the FFT costs log(HW); on CPU that is
    the difference between seconds and milliseconds per 512-px image.
    """
    k = kernel.shape[0]
    p = k // 2
    h, w, _ = image.shape
    x = jnp.pad(image, ((p, p), (p, p), (0, 0)), mode="reflect")
    hp, wp = h + 2 * p, w + 2 * p
    spectrum = jnp.fft.rfft2(x, axes=(0, 1)) * jnp.fft.rfft2(kernel.astype(image.dtype), s=(hp, wp))[..., None]
    full = jnp.fft.irfft2(spectrum, s=(hp, wp), axes=(0, 1))
    return full[2 * p:2 * p + h, 2 * p:2 * p + w].astype(image.dtype)


def gaussian_blur(image: jax.Array, sigma, max_sigma: float) -> jax.Array:
    """Isotropic Gaussian blur of [H, W, C] with a traced `sigma` (px), applied in the frequency domain.

    dm-pix's `gaussian_blur` is a spatial convolution whose cost grows with the kernel; snow flakes
    and raindrop defocus need sigmas of several px at 512 px, where the analytic transfer function
    exp(-2 pi^2 sigma^2 f^2) is far cheaper. Reflect padding of 3 * max_sigma (static) hides the
    FFT's wrap-around.
    """
    p = int(-(-3 * max_sigma // 1))
    h, w, _ = image.shape
    x = jnp.pad(image, ((p, p), (p, p), (0, 0)), mode="reflect")
    fy = jnp.fft.fftfreq(h + 2 * p)[:, None]
    fx = jnp.fft.rfftfreq(w + 2 * p)[None, :]
    transfer = jnp.exp(-2 * jnp.pi ** 2 * sigma ** 2 * (fy ** 2 + fx ** 2))
    out = jnp.fft.irfft2(jnp.fft.rfft2(x, axes=(0, 1)) * transfer[..., None], s=x.shape[:2], axes=(0, 1))
    return out[p:p + h, p:p + w].astype(image.dtype)


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
