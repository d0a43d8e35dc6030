"""Degradations made by the camera: sensor noise, motion blur, low light, JPEG compression.

Every op has the signature `op(rnd, image [H, W, 3] in [0, 1], cfg) -> (image, params)`: `rnd` is the
op's `randomness.Draws`, cfg its sub-config (Python constants, static under jit), and params a dict of
float32 scalars named in PARAM_NAMES, the values actually drawn, so each sample's label says what was
done to it. FIELDS says how many image-sized uniform channels an op reads. Spatial sizes in configs
are px at a 512-px reference and scale with min(H, W) / 512, so the same config looks the same on
64-px test images and 512-px training crops.
"""
import jax
import jax.numpy as jnp

from diffrestorer_jax.data import filters
from diffrestorer_jax.data.jpeg import jpeg_compress
from diffrestorer_jax.data.randomness import to_normal

PARAM_NAMES = {
    "noise": ("noise_sigma", "noise_poisson_peak"),
    "motion_blur": ("blur_spread", "blur_angle"),
    "low_light": ("low_light_exposure", "low_light_shot", "low_light_read"),
    "jpeg": ("jpeg_quality",),
}
FIELDS = {"noise": 3, "motion_blur": 0, "low_light": 3, "jpeg": 0}
_PATH_POINTS = 24


def image_scale(image) -> float:
    """Static size factor relative to the 512-px reference the configs are written for."""
    return min(image.shape[0], image.shape[1]) / 512.0


def _normal_image(rnd, image) -> jax.Array:
    return to_normal(jnp.stack([rnd.field(c) for c in range(3)], -1))


def noise(rnd, image, cfg):
    """Additive Gaussian noise (sigma in 0..255 units) or, with prob poisson_prob, Poisson shot noise.

    Poisson counts photons, x ~ Poisson(image * peak) / peak, so dark regions are relatively noisier.
    It is drawn as its Gaussian limit N(image, image / peak): exact in mean and variance, close in
    shape for the peaks used (>= 5 photons at white), and free of the rejection-sampling loops that
    make `jax.random.poisson` slow to compile. The unused branch reports 0 for its parameter.
    """
    sigma = rnd.uniform(cfg.sigma)
    use_poisson = rnd.uniforms(1)[0] < cfg.poisson_prob
    peak = rnd.log_uniform(cfg.poisson_peak)
    z = _normal_image(rnd, image)
    std = jnp.where(use_poisson, jnp.sqrt(jnp.clip(image, 0, None) / peak), sigma / 255.0)
    return image + std * z, {"noise_sigma": jnp.where(use_poisson, 0.0, sigma),
                             "noise_poisson_peak": jnp.where(use_poisson, peak, 0.0)}


def motion_blur(rnd, image, cfg):
    """Blur by a random camera-shake trajectory or, with prob gaussian_prob, an anisotropic Gaussian.

    Reports the kernel's RMS radius in px (`blur_spread`, comparable across both kinds) and heading.
    """
    scale = image_scale(image)
    size = filters.odd(cfg.kernel_size * scale)
    angle = rnd.uniform((0.0, jnp.pi))
    length = jnp.minimum(rnd.uniform(cfg.length) * scale, size - 2)
    turns = rnd.normals(_PATH_POINTS - 1) * rnd.uniform((0.0, cfg.curvature))
    path = filters.trajectory_kernel(turns, size, length, angle)
    major = rnd.uniform(cfg.gaussian_sigma) * scale + 0.3
    minor = major * rnd.uniform((0.2, 1.0))
    gauss = filters.anisotropic_gaussian_kernel(size, major, minor, angle)
    kernel = jnp.where(rnd.uniforms(1)[0] < cfg.gaussian_prob, gauss, path)
    out = filters.depthwise_conv(image, kernel)
    return out, {"blur_spread": filters.kernel_spread(kernel), "blur_angle": angle}


def low_light(rnd, image, cfg):
    """Under-exposure in linear light plus sensor noise (shot ~ signal, read constant), re-encoded.

    Working in linear light (sRGB ~ gamma 2.2) keeps shadows from being crushed unrealistically; the
    noise after the gain is what makes real low-light photos look grainy and colour-speckled.
    """
    exposure = rnd.log_uniform(cfg.exposure)
    shot = rnd.log_uniform(cfg.shot)
    read = rnd.log_uniform(cfg.read)
    dark = jnp.clip(image, 0, 1) ** 2.2 * exposure
    noisy = dark + jnp.sqrt(dark * shot + read ** 2) * _normal_image(rnd, image)
    out = jnp.clip(noisy, 0.0, 1.0) ** (1 / 2.2)
    return out, {"low_light_exposure": exposure, "low_light_shot": shot, "low_light_read": read}


def jpeg(rnd, image, cfg):
    """JPEG at an integer IJG quality drawn from cfg.quality (inclusive)."""
    quality = rnd.randint(*cfg.quality).astype(jnp.float32)
    return jpeg_compress(image, quality), {"jpeg_quality": quality}
