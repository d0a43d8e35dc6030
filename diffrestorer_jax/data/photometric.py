"""Random intensity levels for clean (HQ) training images, before they are degraded.

    hq' = lo + c * hq,   c ~ U[min_contrast, 1],  lo ~ U[0, 1 - c]   (per image, with probability p)

A low-contrast clean photo, bright (a white clock face) or dark (a night sky), looks like a hazy or a
dark one; a model that never saw such clean images shifts their brightness. Remapped clean images
are degraded like any other and the clean target moves with them, so the task stays "undo the
degradation", never "restore the contrast".
"""
import jax
import jax.numpy as jnp


def random_levels(keys: jax.Array, hq: jax.Array, prob: float, min_contrast: float = 0.3) -> jax.Array:
    """keys: one raw key per image [B, 2] (uint32); hq [B, H, W, C] in [0, 1] -> same shape, in [0, 1]."""
    if not 0.0 < min_contrast <= 1.0:
        raise ValueError(f"random_levels: min_contrast must be in (0, 1], got {min_contrast}")

    def one(key, image):
        k_use, k_c, k_lo = jax.random.split(jax.random.wrap_key_data(key), 3)
        c = jax.random.uniform(k_c, (), minval=min_contrast, maxval=1.0)
        lo = jax.random.uniform(k_lo, ()) * (1.0 - c)
        remapped = lo + c * image
        return jnp.where(jax.random.bernoulli(k_use, prob), remapped, image)

    return jax.vmap(one)(keys, hq.astype(jnp.float32))
