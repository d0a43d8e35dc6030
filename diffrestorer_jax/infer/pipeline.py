"""Restoration: LQ images -> restored images, the whole of Diff-Restorer in one jitted function.

    restore(nets, params, lq, key, schedule, settings, knobs) -> {'image', 'type_probs'}

Static (they shape the compiled program; change them and it recompiles): the networks, the input
shape, and `RestoreSettings`. Traced (change them freely): the key, image ids, and `Knobs`.

Every image draws its noise from fold_in(key, image_id) (its starting noise, and the noise of
stochastic sampler steps), so its result does not depend on which images are beside it.
`batch_mode='batched'` (the default) sends the rows through every network together, as one batch:
the fast way on every backend. 'exact' runs them one at a time (`lax.map` over batch-1 programs), so
an image's output is the same bit for bit whatever the batch size, its position in the batch or the
device count; batched outputs equal it to float rounding (tests/unit/test_restore_pipeline.py states
the tolerance).

With `settings.tile` (latent pixels) every denoising step, the decoder and the VAE encode of
strength < 1 run over the image's tiles, `tile_batch` tiles at a time (`tiling.map_tiles`), so
their memory is one chunk's activations whatever the image size; the noise is drawn for the whole
latent first, so the tile order does not matter.

`params` is any mapping from network name to its parameters, read with `params[name]` where a
network is used: the sharded program (`infer.program`) passes one that gathers a network's weights
there.
"""
import dataclasses
import functools
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
from flax import struct

from diffrestorer_jax.diffusion.samplers import sample
from diffrestorer_jax.diffusion.schedules import Schedule
from diffrestorer_jax.infer import tiling
from diffrestorer_jax.models import diffrestorer as dr

BATCH_MODES = ("batched", "exact")


@dataclasses.dataclass(frozen=True)
class RestoreSettings:
    """What fixes the compiled program."""
    sampler: str = "ddim"
    steps: int = 50
    strength: float = 1.0  # < 1: start from the noised LQ latent, skipping the first steps
    use_cfg: bool = False  # classifier-free guidance against a null semantic prompt
    tile: Optional[int] = None  # latent tile size; None: whole image at once
    tile_overlap: int = 8  # latent pixels
    tile_batch: int = 4  # tiles (of every row) per network call
    context_mode: str = "degradation"
    batch_mode: str = "batched"  # batched: rows together; exact: one by one, bit-exact per image
    samples: int = 1  # posterior samples averaged per image (see restore_rows)


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
    if settings.batch_mode not in BATCH_MODES:
        raise ValueError(f"restore: batch_mode must be one of {BATCH_MODES}, got {settings.batch_mode!r}")
    if settings.samples < 1:
        raise ValueError(f"restore: samples must be >= 1, got {settings.samples}")
    if settings.tile_batch < 1:
        raise ValueError(f"restore: tile_batch must be >= 1, got {settings.tile_batch}")


def _repeat_rows(a, times: int):
    """[N, ...] -> [times * N, ...], the N rows repeated `times` over (tile j of row n at j*N + n)."""
    return jnp.tile(a, (times,) + (1,) * (a.ndim - 1))


def _tiled(settings, latent_hw, fn, inputs, scales, out_scale):
    return tiling.map_tiles(fn, inputs, scales, latent_hw, settings.tile, settings.tile_overlap,
                            out_scale, chunk=settings.tile_batch)


def denoiser(nets, params, prompts, lq, knobs, settings):
    """model_fn(z_t, t) for the sampler over the rows of `lq` [N, ...].

    The sampler hands N rows, or 2N with CFG ([unconditional; conditional], the unconditional rows
    using a null semantic prompt while keeping P_D and the LQ control). With tiling, each call runs
    the tiles `tile_batch` at a time (every row's tile j together).
    """
    f = nets.vae_factor

    def contexts(rows):
        sem, deg, img = prompts["semantic"], prompts["degradation"], lq
        if rows == 2 * lq.shape[0]:
            sem = jnp.concatenate([jnp.zeros_like(sem), sem])
            deg, img = jnp.concatenate([deg, deg]), jnp.concatenate([img, img])
        return sem, deg, img

    def model_fn(z, t):
        control, unet = params["control"], params["unet"]  # once per step, outside the tile loop

        def run(z, t, sem, deg, img):
            return dr.denoise(nets, control, unet, z, t, {"semantic": sem, "degradation": deg}, img,
                              control_scale=knobs.control_scale, context_mode=settings.context_mode)

        sem, deg, img = contexts(z.shape[0])
        if settings.tile is None:
            return run(z, t, sem, deg, img)

        def on_tiles(z_tiles, img_tiles):
            k = z_tiles.shape[0] // z.shape[0]
            return run(z_tiles, _repeat_rows(t, k), _repeat_rows(sem, k), _repeat_rows(deg, k), img_tiles)
        return _tiled(settings, z.shape[1:3], on_tiles, [z, img], [1, f], 1)

    return model_fn


def decode_latents(nets, params, z0, lq, prompts, knobs, settings):
    """Degradation-aware decoding of latents [N, h, w, C] (tile by tile when tiling is on)."""
    vae, decoder = params["vae"], params["decoder"]

    def dec(z, img, p_d):
        feats = dr.lq_features(nets, vae, img)
        return dr.decode(nets, decoder, z, feats, {"degradation": p_d}, img,
                         fidelity_weight=knobs.fidelity_weight)

    if settings.tile is None:
        return dec(z0, lq, prompts["degradation"])

    def on_tiles(z_tiles, img_tiles):
        return dec(z_tiles, img_tiles, _repeat_rows(prompts["degradation"], z_tiles.shape[0] // z0.shape[0]))
    return _tiled(settings, z0.shape[1:3], on_tiles, [z0, lq], [1, nets.vae_factor], nets.vae_factor)


def encode_start(nets, params, lq, settings):
    """The VAE latents of the LQ images, where strength < 1 starts sampling (tiled like the rest)."""
    vae = params["vae"]
    if settings.tile is None:
        return dr.encode_latents(nets, vae, lq)
    f = nets.vae_factor
    return _tiled(settings, (lq.shape[1] // f, lq.shape[2] // f),
                  lambda img_tiles: dr.encode_latents(nets, vae, img_tiles), [lq], [f], 1)


def sample_keys(key: jax.Array, samples: int) -> jax.Array:
    """The keys of an image's `samples` posterior draws ([samples] keys; a single draw uses `key`)."""
    return key[None] if samples == 1 else jax.random.split(key, samples)


def restore_rows(nets, params, schedule, settings, knobs, keys, lq):
    """Images [N, H, W, 3] with one key each [N] -> (restored [N, H, W, 3], type probabilities [N, 8]),
    every network run on all N rows at once.

    With settings.samples = K > 1, K posterior samples of each image are drawn (keys
    `sample_keys(key, K)`, all N*K as one batch), decoded, and averaged: the mean of posterior samples
    approaches the minimum-MSE estimate, so it trades the single sample's generated detail for
    fidelity (higher PSNR, softer texture) at K times the sampling cost.
    """
    n, k = lq.shape[0], settings.samples
    prompts = dr.visual_prompts(nets, params["prompt"], dr.clip_tokens(nets, params["clip"], lq))
    probs = jax.nn.softmax(prompts["logits"], axis=-1)
    start = encode_start(nets, params, lq, settings) if settings.strength < 1.0 else None
    if k > 1:  # rows n*K .. n*K+K-1 are image n's draws
        keys = jax.vmap(lambda key: sample_keys(key, k))(keys).reshape((n * k,) + keys.shape[1:])
        lq, prompts, start = jax.tree.map(lambda a: jnp.repeat(a, k, axis=0), (lq, prompts, start))
    f = nets.vae_factor
    latent = (lq.shape[1] // f, lq.shape[2] // f, nets.latent_channels)
    noise_keys, step_keys = jnp.moveaxis(jax.vmap(jax.random.split)(keys), 1, 0)
    x_T = jax.vmap(lambda key: jax.random.normal(key, latent, jnp.float32))(noise_keys)
    z0 = sample(denoiser(nets, params, prompts, lq, knobs, settings), x_T, step_keys, schedule,
                sampler=settings.sampler, num_steps=settings.steps, eta=knobs.eta,
                guidance_scale=knobs.guidance_scale if settings.use_cfg else None,
                start_latent=start, strength=settings.strength, per_row_keys=True)
    images = decode_latents(nets, params, z0, lq, prompts, knobs, settings)
    if k > 1:
        images = jnp.mean(images.reshape((n, k) + images.shape[1:]), axis=1)
    return images, probs


def restore_images(nets: dr.Networks, params: Mapping[str, Any], lq: jax.Array, key: jax.Array,
                   schedule: Schedule, settings: RestoreSettings = RestoreSettings(),
                   knobs: Knobs = Knobs(), image_ids: Optional[jax.Array] = None):
    """`restore` before jit: what the restore program (`infer.program`) runs on each device."""
    _check_input(nets, lq, settings)
    ids = jnp.arange(lq.shape[0]) if image_ids is None else jnp.asarray(image_ids)
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(ids)
    rows = functools.partial(restore_rows, nets, params, schedule, settings, knobs)
    if settings.batch_mode == "exact":
        images, probs = jax.lax.map(lambda kx: rows(kx[0][None], kx[1][None]), (keys, lq))
        images, probs = images[:, 0], probs[:, 0]
    else:
        images, probs = rows(keys, lq)
    return {"image": images, "type_probs": probs}


@functools.partial(jax.jit, static_argnames=("nets", "settings"))
def restore(nets: dr.Networks, params, lq: jax.Array, key: jax.Array, schedule: Schedule,
            settings: RestoreSettings = RestoreSettings(), knobs: Knobs = Knobs(),
            image_ids: Optional[jax.Array] = None):
    """Restore a batch of LQ images [N, H, W, 3] in [0, 1] (sides multiples of `size_multiple`).

    `image_ids` [N] (default 0..N-1) key each image's noise: give the same id to get the same
    result for an image whatever batch it is in. Returns {'image': [N, H, W, 3] in [0, 1],
    'type_probs': [N, 8]}.
    """
    return restore_images(nets, params, lq, key, schedule, settings, knobs, image_ids)
