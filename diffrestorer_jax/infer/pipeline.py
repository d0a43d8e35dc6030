"""Restoration: LQ images -> restored images, the whole of Diff-Restorer in one jitted function.

    restore(nets, params, lq, key, schedule, settings, knobs) -> {'image', 'type_probs'}

Static (they shape the compiled program; change them and it recompiles): the networks, the input
shape, and `RestoreSettings`. Traced (change them freely): the key, image ids, and `Knobs`.

Every image draws its noise from fold_in(key, image_id). With `batch_mode='map'` (the default) images
go through the networks one at a time (`lax.map`), each running the same batch-1 program wherever it
sits in a batch, so its output is identical bit for bit; 'vmap' batches them (faster on
accelerators, equal to ~1e-6). With `settings.tile` (latent pixels) every denoising step evaluates
the latent tiles and blends them with Gaussian weights (float32), and the decoder runs tile by tile;
the noise is drawn for the whole latent first, so the tile order does not matter.
"""
import dataclasses
import functools
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
from flax import struct

from diffrestorer_jax.diffusion.samplers import sample
from diffrestorer_jax.diffusion.schedules import Schedule
from diffrestorer_jax.infer import tiling
from diffrestorer_jax.models import diffrestorer as dr


@dataclasses.dataclass(frozen=True)
class RestoreSettings:
    """What fixes the compiled program."""
    sampler: str = "ddim"
    steps: int = 50
    strength: float = 1.0  # < 1: start from the noised LQ latent, skipping the first steps
    use_cfg: bool = False  # classifier-free guidance against a null semantic prompt
    tile: Optional[int] = None  # latent tile size; None: whole image at once
    tile_overlap: int = 8  # latent pixels
    context_mode: str = "degradation"
    batch_mode: str = "map"  # map: images one by one, bit-exact per image; vmap: batched, faster
    samples: int = 1  # posterior samples averaged per image (see restore_one)


@struct.dataclass
class Knobs:
    """Traced inference knobs."""
    guidance_scale: Any = 1.0
    control_scale: Any = 1.0
    fidelity_weight: Any = 1.0
    eta: Any = 0.0


def size_multiple(nets: dr.Networks) -> int:
    """Image sides must be multiples of this (VAE factor x the UNet's total downsampling)."""
    return nets.vae_factor * 2 ** (len(nets.unet.block_out_channels) - 1)


def _check_input(nets: dr.Networks, lq, settings: RestoreSettings):
    if lq.ndim != 4 or lq.shape[-1] != 3:
        raise ValueError(f"restore: expected images [N, H, W, 3] in [0, 1], got shape {lq.shape}")
    m = size_multiple(nets)
    if lq.shape[1] % m or lq.shape[2] % m:
        raise ValueError(f"restore: image size {lq.shape[1]}x{lq.shape[2]} is not a multiple of {m}; "
                         "pad it (infer.restorer pads and crops back for you)")
    if settings.tile is not None and settings.tile % (m // nets.vae_factor):
        raise ValueError(f"restore: latent tile {settings.tile} must be a multiple of "
                         f"{m // nets.vae_factor}")


def denoiser(nets, params, prompts, lq, knobs, settings):
    """model_fn(z_t, t) for the sampler, for ONE image.

    The sampler hands a batch of 1, or of 2 with CFG ([unconditional; conditional], the
    unconditional row using a null semantic prompt while keeping P_D and the LQ control). With
    tiling, every tile of every row goes through the networks in one batched call.
    """
    def contexts(batch):
        sem, deg, img = prompts["semantic"], prompts["degradation"], lq
        if batch == 2:
            sem = jnp.concatenate([jnp.zeros_like(sem), sem])
            deg, img = jnp.concatenate([deg, deg]), jnp.concatenate([img, img])
        return sem, deg, img

    def run(z, t, sem, deg, img):
        return dr.denoise(nets, params["control"], params["unet"], z, t,
                          {"semantic": sem, "degradation": deg}, img,
                          control_scale=knobs.control_scale, context_mode=settings.context_mode)

    def model_fn(z, t):
        sem, deg, img = contexts(z.shape[0])
        if settings.tile is None:
            return run(z, t, sem, deg, img)
        b, h, w, _ = z.shape
        f = nets.vae_factor
        tile = tiling.tile_shape(h, w, settings.tile)
        pos = tiling.tile_positions(h, w, tile, settings.tile_overlap)
        z_tiles = tiling.extract_tiles(z, pos, tile)  # [T, b, th, tw, C]
        img_tiles = tiling.extract_tiles(img, pos * f, (tile[0] * f, tile[1] * f))
        n_tiles = z_tiles.shape[0]
        flat = lambda a: a.reshape((-1,) + a.shape[2:])  # noqa: E731  [T, b, ...] -> [T*b, ...]
        rep = lambda a: flat(jnp.broadcast_to(a[None], (n_tiles,) + a.shape))  # noqa: E731
        out = run(flat(z_tiles), rep(t), rep(sem), rep(deg), flat(img_tiles))
        out = out.reshape(z_tiles.shape[:2] + out.shape[1:])
        return tiling.blend_tiles(out, pos, tiling.gaussian_tile_weights(tile), (b, h, w, out.shape[-1]))

    return model_fn


def decode_latents(nets, params, z0, lq, prompts, knobs, settings):
    """Degradation-aware decoding of one image's latent, tile by tile when tiling is on."""
    def dec(z, img, p_d):
        feats = dr.lq_features(nets, params["vae"], img)
        return dr.decode(nets, params["decoder"], z, feats, {"degradation": p_d}, img,
                         fidelity_weight=knobs.fidelity_weight)

    if settings.tile is None:
        return dec(z0, lq, prompts["degradation"])
    f = nets.vae_factor
    _, h, w, _ = z0.shape
    tile = tiling.tile_shape(h, w, settings.tile)
    pos = tiling.tile_positions(h, w, tile, settings.tile_overlap)
    z_tiles = tiling.extract_tiles(z0, pos, tile)
    img_tiles = tiling.extract_tiles(lq, pos * f, (tile[0] * f, tile[1] * f))
    outs = jax.lax.map(lambda zi: dec(zi[0], zi[1], prompts["degradation"]), (z_tiles, img_tiles))
    px_tile = (tile[0] * f, tile[1] * f)
    return tiling.blend_tiles(outs, pos * f, tiling.gaussian_tile_weights(px_tile),
                              (lq.shape[0], h * f, w * f, 3))


def sample_keys(key: jax.Array, samples: int) -> jax.Array:
    """The keys of an image's `samples` posterior draws ([samples] keys; a single draw uses `key`)."""
    return key[None] if samples == 1 else jax.random.split(key, samples)


def restore_one(nets, params, schedule, settings, knobs, key, lq):
    """One image [1, H, W, 3] -> (restored [1, H, W, 3], type probabilities [1, 8]).

    With settings.samples = K > 1, K posterior samples are drawn (keys `sample_keys(key, K)`), each
    decoded, and the images averaged: the mean of posterior samples approaches the minimum-MSE
    estimate, so it trades the single sample's generated detail for fidelity (higher PSNR, softer
    texture) at K times the sampling cost.
    """
    prompts = dr.visual_prompts(nets, params["prompt"], dr.clip_tokens(nets, params["clip"], lq))
    f = nets.vae_factor
    latent_shape = (1, lq.shape[1] // f, lq.shape[2] // f, nets.latent_channels)
    start = dr.encode_latents(nets, params["vae"], lq) if settings.strength < 1.0 else None
    model_fn = denoiser(nets, params, prompts, lq, knobs, settings)

    def one_sample(k):
        noise_key, sample_key = jax.random.split(k)
        x_T = jax.random.normal(noise_key, latent_shape, jnp.float32)
        z0 = sample(model_fn, x_T, sample_key, schedule,
                    sampler=settings.sampler, num_steps=settings.steps, eta=knobs.eta,
                    guidance_scale=knobs.guidance_scale if settings.use_cfg else None,
                    start_latent=start, strength=settings.strength)
        return decode_latents(nets, params, z0, lq, prompts, knobs, settings)

    if settings.samples < 1:
        raise ValueError(f"restore: samples must be >= 1, got {settings.samples}")
    if settings.samples == 1:
        image = one_sample(key)
    else:
        over = jax.lax.map if settings.batch_mode == "map" else (lambda fn, xs: jax.vmap(fn)(xs))
        image = jnp.mean(over(one_sample, sample_keys(key, settings.samples)), axis=0)
    return image, jax.nn.softmax(prompts["logits"], axis=-1)


@functools.partial(jax.jit, static_argnames=("nets", "settings"))
def restore(nets: dr.Networks, params: Dict[str, Any], lq: jax.Array, key: jax.Array,
            schedule: Schedule, settings: RestoreSettings = RestoreSettings(), knobs: Knobs = Knobs(),
            image_ids: Optional[jax.Array] = None) -> Dict[str, jax.Array]:
    """Restore a batch of LQ images [N, H, W, 3] in [0, 1] (sides multiples of `size_multiple`).

    `image_ids` [N] (default 0..N-1) key each image's noise: give the same id to get the same
    result for an image whatever batch it is in. Returns {'image': [N, H, W, 3] in [0, 1],
    'type_probs': [N, 8]}.
    """
    _check_input(nets, lq, settings)
    ids = jnp.arange(lq.shape[0]) if image_ids is None else jnp.asarray(image_ids)
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(ids)
    one = functools.partial(restore_one, nets, params, schedule, settings, knobs)
    per_image = lambda kx: one(kx[0], kx[1][None])  # noqa: E731
    if settings.batch_mode == "map":
        images, probs = jax.lax.map(per_image, (keys, lq))
    elif settings.batch_mode == "vmap":
        images, probs = jax.vmap(per_image)((keys, lq))
    else:
        raise ValueError(f"restore: batch_mode must be 'map' or 'vmap', got {settings.batch_mode!r}")
    return {"image": images[:, 0], "type_probs": probs[:, 0]}
