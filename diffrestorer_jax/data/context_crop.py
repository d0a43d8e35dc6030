"""Train on crops of images degraded at a larger size, the way tiled inference sees a large image.

With `train.degrade_size` S > `image_size` s (0 = off), stages 1 and 2 get clean images of S x S,
degrade them whole, read the CLIP prompts from the whole degraded image, and train the control
module / decoder on one random s x s crop of it (the same crop of the clean image as target):

    hq [B, S, S] -> lq = degrade(hq) -> prompts = CLIP(lq)  (CLIP resizes the whole image)
                                      -> (hq, lq)[crop]      (control, UNet, VAE, decoder)

That is what restoring an S-px photo by s-px tiles does (infer/): the prompts come from
the whole image and every network but CLIP runs on tiles. The degradations' spatial sizes scale with
the image they are applied to (data/camera.py `image_scale`), so degrading the s-px crop itself would
give blur kernels, rain streaks, drops and flakes S/s times too small for such tiles.
"""
import jax
import jax.numpy as jnp


def degrade_size(config) -> int:
    """The side the clean images are degraded at, 0 when it is image_size (no crop)."""
    s = int(config.train.get("degrade_size", 0))
    if s and s < int(config.image_size):
        raise ValueError(f"train.degrade_size={s} must be 0 or at least image_size={config.image_size}")
    return s if s > int(config.image_size) else 0


def data_size(config) -> int:
    """The side of the clean images the data source hands the step."""
    return degrade_size(config) or int(config.image_size)


def crop_pair(keys: jax.Array, hq: jax.Array, lq: jax.Array, size: int):
    """One random size x size window per example (keys: one raw key per example [B, 2]), the same
    window of hq and lq: ([B, size, size, C], [B, size, size, C])."""
    full = hq.shape[1]

    def one(key, a, b):
        k_y, k_x = jax.random.split(jax.random.wrap_key_data(key))
        top = jax.random.randint(k_y, (), 0, full - size + 1)
        left = jax.random.randint(k_x, (), 0, hq.shape[2] - size + 1)
        cut = lambda x: jax.lax.dynamic_slice(x, (top, left, 0), (size, size, x.shape[-1]))  # noqa: E731
        return cut(a), cut(b)

    return jax.vmap(one)(keys, hq, lq)
