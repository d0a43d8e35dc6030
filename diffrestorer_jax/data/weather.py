"""Degradations made by the scene: haze, rain streaks, raindrops on the lens, snow.

Same op signature and conventions as `camera.py` (draws from `rnd`, static shapes, sizes in px at a
512-px reference). Each is a cheap physical caricature: good enough that the CLIP features and the
classifier see the right kind of corruption, and sampled fresh for every training example.
Sparse particles (rain seeds, snow flakes) come from one uniform field u: a pixel seeds where
u < density, and u / density (uniform on [0, 1) given that) sets its brightness, so one field does
the work of two.
"""
import dm_pix as pix
import jax
import jax.numpy as jnp

from diffrestorer_jax.data import filters
from diffrestorer_jax.data.camera import image_scale

PARAM_NAMES = {
    "haze": ("haze_beta", "haze_airlight"),
    "rain": ("rain_density", "rain_length", "rain_angle", "rain_intensity"),
    "raindrop": ("raindrop_count", "raindrop_radius"),
    "snow": ("snow_density", "snow_size", "snow_opacity"),
}
FIELDS = {"haze": 0, "rain": 1, "raindrop": 0, "snow": 3}


def _seeds(u: jax.Array, density, min_brightness: float) -> jax.Array:
    """Sparse particle seeds [H, W, 1] from a uniform field: present where u < density."""
    brightness = min_brightness + (1 - min_brightness) * u / density
    return jnp.where(u < density, brightness, 0.0)[..., None]


def _normalise(x: jax.Array) -> jax.Array:
    return (x - x.min()) / (x.max() - x.min() + 1e-6)


def _depth_proxy(rnd, image) -> jax.Array:
    """A smooth stand-in for scene depth in [0.2, 1]: far at the top, in bright (sky) areas, plus a
    random low-frequency field; the mix of the three is drawn per sample."""
    h, w, _ = image.shape
    weights = rnd.uniforms(3) + 0.05
    rows = jnp.broadcast_to(jnp.linspace(1.0, 0.0, h)[:, None], (h, w))
    blob = _normalise(jax.image.resize(rnd.normals(16).reshape(4, 4), (h, w), "cubic"))
    luma = pix.rgb_to_grayscale(image)[..., 0]
    bright = jax.image.resize(jax.image.resize(luma, (8, 8), "linear"), (h, w), "cubic")
    d = _normalise(weights[0] * rows + weights[1] * blob + weights[2] * bright)
    return 0.2 + 0.8 * d


def haze(rnd, image, cfg):
    """Atmospheric scattering I = J t + A (1 - t), t = exp(-beta d), grey-ish airlight A."""
    beta = rnd.uniform(cfg.beta)
    airlight = rnd.uniform(cfg.airlight)
    a = jnp.clip(airlight + 0.015 * rnd.normals(3), 0, 1)
    t = jnp.exp(-beta * _depth_proxy(rnd, image))[..., None]
    return image * t + a * (1 - t), {"haze_beta": beta, "haze_airlight": airlight}


def rain(rnd, image, cfg):
    """Rain streaks: sparse seeds smeared along a near-vertical line, screen-blended over the image."""
    scale = image_scale(image)
    size = filters.odd(cfg.length[1] * scale + 2)
    density = rnd.log_uniform(cfg.density)
    length = rnd.uniform(cfg.length) * scale
    angle = rnd.uniform(cfg.angle)
    intensity = rnd.uniform(cfg.intensity)
    heading = jnp.pi / 2 + jnp.deg2rad(angle)
    line = filters.trajectory_kernel(jnp.zeros(15), size, length, heading, width=0.4 + 0.6 * scale)
    streaks = filters.depthwise_conv(_seeds(rnd.field(0), density, 0.5), line / line.max())
    streaks = jnp.clip(streaks * intensity, 0, 1)
    out = 1 - (1 - image) * (1 - 0.95 * streaks)
    return out, {"rain_density": density, "rain_length": length, "rain_angle": angle,
                 "rain_intensity": intensity}


def _drop_geometry(rnd, image, cfg):
    """Random drop centres, radii (px), aspect ratios and an active mask for a static maximum count."""
    h, w, _ = image.shape
    n = cfg.max_drops
    count = rnd.randint(*cfg.count)
    cy, cx = rnd.uniforms(n) * h, rnd.uniforms(n) * w
    lo, hi = cfg.radius
    radius = (lo + (hi - lo) * rnd.uniforms(n)) * min(h, w)
    aspect = 1.0 + 0.3 * rnd.uniforms(n)
    return count, cy, cx, radius, aspect, jnp.arange(n) < count


def _bilinear(image: jax.Array, y: jax.Array, x: jax.Array) -> jax.Array:
    """Sample [H, W, C] at real coordinates (edge-clamped); four gathers for all channels at once,
    which compiles far faster than one `map_coordinates` per channel."""
    h, w, _ = image.shape
    y, x = jnp.clip(y, 0, h - 1), jnp.clip(x, 0, w - 1)
    y0, x0 = jnp.floor(y).astype(jnp.int32), jnp.floor(x).astype(jnp.int32)
    y1, x1 = jnp.minimum(y0 + 1, h - 1), jnp.minimum(x0 + 1, w - 1)
    wy, wx = (y - y0)[..., None], (x - x0)[..., None]
    top = image[y0, x0] * (1 - wx) + image[y0, x1] * wx
    bottom = image[y1, x0] * (1 - wx) + image[y1, x1] * wx
    return top * (1 - wy) + bottom * wy


def raindrop(rnd, image, cfg):
    """Adherent raindrops: soft-edged lenses that show a blurred, inverted view of their surroundings.

    Each pixel takes the drop that covers it most; inside, it samples a defocused copy of the image
    at the point mirrored through the drop centre (a drop is a tiny fisheye lens), with a darker rim
    and a specular highlight, then blends by the drop's soft mask.
    """
    h, w, _ = image.shape
    scale = image_scale(image)
    count, cy, cx, radius, aspect, active = _drop_geometry(rnd, image, cfg)
    yy, xx = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32), indexing="ij")
    ry = radius * aspect
    rho2 = ((yy[None] - cy[:, None, None]) / ry[:, None, None]) ** 2 + ((xx[None] - cx[:, None, None]) / radius[:, None, None]) ** 2
    idx = jnp.argmin(jnp.where(active[:, None, None], rho2, jnp.inf), 0)  # the drop covering each pixel most
    sel = lambda a: jnp.take(a, idx)  # noqa: E731  per-pixel value of a per-drop quantity
    r_y, r_x = (yy - sel(cy)) / sel(ry), (xx - sel(cx)) / sel(radius)
    rr = jnp.sqrt(r_y ** 2 + r_x ** 2)
    mask = (jax.nn.sigmoid((1 - rr) * 12.0) * (count > 0))[..., None]
    src_y = sel(cy) - r_y * sel(ry) * 1.5 - sel(radius) * 0.5
    src_x = sel(cx) - r_x * sel(radius) * 1.5
    sigma = (3.0 + 5.0 * rnd.uniforms(1)[0]) * scale + 0.5
    blurred = filters.gaussian_blur(image, sigma, 8.0 * scale + 0.5)
    sample = _bilinear(blurred, src_y, src_x)
    shade = (1.0 - 0.35 * jnp.clip(rr, 0, 1) ** 4)[..., None]
    highlight = 0.5 * jnp.exp(-((r_y + 0.4) ** 2 + (r_x + 0.35) ** 2) / 0.015)[..., None]
    drop = jnp.clip(sample * shade * 1.05 + highlight, 0, 1)
    out = image * (1 - mask) + drop * mask
    mean_r = (radius * active).sum() / jnp.maximum(count, 1) / min(h, w)
    return out, {"raindrop_count": count.astype(jnp.float32), "raindrop_radius": mean_r}


def snow(rnd, image, cfg):
    """Snow: three layers of flakes (small/many to large/few), Gaussian-blurred, plus a white veil."""
    scale = image_scale(image)
    density = rnd.log_uniform(cfg.density)
    size = rnd.uniform(cfg.size)
    opacity = rnd.uniform(cfg.opacity)
    alpha = jnp.zeros(image.shape[:2] + (1,))
    for i, base_sigma in enumerate(cfg.layer_sigmas):
        sigma = base_sigma * scale * size + 0.3
        seeds = _seeds(rnd.field(i), density / (1 + i) ** 2, 0.6)
        flakes = filters.gaussian_blur(seeds, sigma, base_sigma * scale * cfg.size[1] + 0.3)
        flakes = flakes * (2 * jnp.pi * sigma ** 2)
        alpha = 1 - (1 - alpha) * (1 - opacity * jnp.clip(flakes, 0, 1))
    veil = 0.15 * opacity
    out = image * (1 - veil) + 0.9 * veil
    out = out * (1 - alpha) + 0.97 * alpha
    return out, {"snow_density": density, "snow_size": size, "snow_opacity": opacity}
