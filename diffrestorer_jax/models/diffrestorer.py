"""Diff-Restorer assembled: every network built from a config, and the functional pieces that
training and restoration share (read top to bottom, this is the data path of design.md).

    LQ --clip_vision--> patch tokens --prompt_processor--> P_S, P_D (+ type logits)
    z_t, t, P_D, LQ --control--> residuals;  z_t, t, P_S, residuals --unet--> model output
    z_0, VAE-encoder features of LQ, mean(P_D) --decoder--> restored image

Parameters live in one dict keyed by network name: {'clip', 'prompt', 'control', 'unet', 'vae',
'decoder'}. Which of them are trainable depends on the stage (train/state.py); the functions here
take whatever subset they need, so frozen and trainable trees can be passed separately.
Images at this API are NHWC float32 in [0, 1]; the VAE's [-1, 1] range stays inside.
"""
import dataclasses
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp

from diffrestorer_jax.models.clip_vision import CLIPVisionTransformer, preprocess
from diffrestorer_jax.models.control import ControlModule
from diffrestorer_jax.models.decoder import DegradationAwareDecoder
from diffrestorer_jax.models.prompt_processor import VisualPromptProcessor
from diffrestorer_jax.models.unet import UNet2DConditionModel
from diffrestorer_jax.models.vae import AutoencoderKL

NETWORKS = ("clip", "prompt", "control", "unet", "vae", "decoder")


@dataclasses.dataclass(frozen=True)
class Networks:
    """The six Linen modules (stateless; hashable, so they can be static arguments of jit)."""
    clip: CLIPVisionTransformer
    prompt: VisualPromptProcessor
    control: ControlModule
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    decoder: DegradationAwareDecoder

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return self.vae.latent_channels


def compute_dtype(name: str):
    """The jnp dtype of a config's `model.dtype` name ('float32', 'bfloat16', 'float16')."""
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]


def build_networks(model_config) -> Networks:
    """All modules from `config.model` (see config_base.py for the fields)."""
    m = model_config
    kw = dict(dtype=compute_dtype(m.dtype))
    unet_cfg = dict(m.unet)
    unet = UNet2DConditionModel.from_config(unet_cfg, attention_impl=m.attention_impl,
                                            remat_policy=m.remat_policy, **kw)
    control = ControlModule.from_unet_config(
        unet_cfg, conditioning_channels=tuple(m.control["conditioning_channels"]),
        use_film=bool(m.control["use_film"]), attention_impl=m.attention_impl,
        remat_policy=m.remat_policy, **kw)
    # The VAE and decoder keep attention_impl "auto": their one head is as wide as the channels (512
    # in SD), past what the fused kernels take, and "auto" picks per backend and shape.
    vae = AutoencoderKL.from_config(dict(m.vae), **kw)
    decoder = DegradationAwareDecoder.from_vae_config(
        dict(m.vae), rdb_growth=m.decoder["rdb_growth"], rdb_convs=m.decoder["rdb_convs"],
        image_fusion_width=int(m.decoder.get("image_fusion_width", 0)),
        image_fusion_base=str(m.decoder.get("image_fusion_base", "decoder")), **kw)
    clip = CLIPVisionTransformer.from_config(dict(m.clip), attention_impl=m.attention_impl, **kw)
    prompt = VisualPromptProcessor(context_dim=unet_cfg["cross_attention_dim"],
                                   hidden_dim=m.prompt["hidden_dim"],
                                   classifier_hidden_dim=m.prompt["classifier_hidden_dim"], **kw)
    return Networks(clip=clip, prompt=prompt, control=control, unet=unet, vae=vae, decoder=decoder)


# ------------------------------------------------------------------------------------------------
# The data path, one function per arrow.
# ------------------------------------------------------------------------------------------------
def clip_tokens(nets: Networks, clip_params, lq) -> jax.Array:
    """LQ [N,H,W,3] in [0,1] -> the CLIP patch tokens of the last layer (no CLS, before post-LN)."""
    pixels = preprocess(lq, nets.clip.image_size)
    last, _, _ = nets.clip.apply({"params": clip_params}, pixels)
    return last[:, 1:]


def visual_prompts(nets: Networks, prompt_params, tokens) -> Dict[str, jax.Array]:
    """Patch tokens -> {'semantic': P_S, 'degradation': P_D, 'logits': type logits}."""
    return nets.prompt.apply({"params": prompt_params}, tokens)


def control_context(nets: Networks, prompts: Dict[str, jax.Array], mode: str) -> jax.Array:
    """What the control branch cross-attends to: P_D (the paper's modulation) or P_S (ablation)."""
    return prompts["degradation" if mode == "degradation" else "semantic"]


def denoise(nets: Networks, control_params, unet_params, z_t, t, prompts, lq, *,
            control_scale=1.0, context_mode: str = "degradation", semantic=None) -> jax.Array:
    """Model output (epsilon / v / x0 per the schedule) for noisy latents z_t at timesteps t.

    `semantic` overrides P_S for the frozen UNet (classifier-free guidance's null prompt).
    """
    down, mid = nets.control.apply({"params": control_params}, z_t, t,
                                   control_context(nets, prompts, context_mode), lq,
                                   control_scale=control_scale)
    context = prompts["semantic"] if semantic is None else semantic
    return nets.unet.apply({"params": unet_params}, z_t, t, context,
                           down_block_additional_residuals=down, mid_block_additional_residual=mid)


def encode_latents(nets: Networks, vae_params, images, example_keys: Optional[jax.Array] = None):
    """Images in [0,1] -> diffusion latents (scaled by the VAE's scaling factor). With
    `example_keys` (one per image, so an image's noise does not depend on its batch), a sample of
    the posterior (training); without, its mean (inference).

    The encoder always runs on the whole batch: vmapping it per image would hide the batch from
    the sharding constraints inside the VAE (a vmapped constraint leaves the mapped axis
    unconstrained), and GSPMD then replicated the whole global batch's activations on every chip.
    """
    mean, logvar = nets.vae.apply({"params": vae_params}, images * 2.0 - 1.0, method="encode")
    z = mean
    if example_keys is not None:
        eps = jax.vmap(lambda k: jax.random.normal(k, mean.shape[1:], mean.dtype))(example_keys)
        z = mean + jnp.exp(0.5 * logvar) * eps
    return z * nets.vae.scaling_factor


def lq_features(nets: Networks, vae_params, lq):
    """The frozen VAE encoder's per-level features of the LQ image (the decoder's LQ branch)."""
    _, _, feats = nets.vae.apply({"params": vae_params}, lq * 2.0 - 1.0, return_features=True,
                                 method="encode")
    return feats


def decode(nets: Networks, decoder_params, z0, features, prompts, lq, fidelity_weight=1.0) -> jax.Array:
    """Latents (scaled) + LQ features + mean(P_D) (+ the LQ image [0, 1], used when the decoder has
    image-level fusion) -> restored image in [0, 1]."""
    p_d = jnp.mean(prompts["degradation"].astype(jnp.float32), axis=1)
    lq_image = lq * 2.0 - 1.0 if nets.decoder.image_fusion_width else None
    img = nets.decoder.apply({"params": decoder_params}, z0 / nets.vae.scaling_factor, features, p_d,
                             fidelity_weight=fidelity_weight, lq_image=lq_image)
    return jnp.clip((img.astype(jnp.float32) + 1.0) / 2.0, 0.0, 1.0)


def vae_decode(nets: Networks, vae_params, z0) -> jax.Array:
    """The plain SD VAE decoder (the prior stage of the demo, and a baseline): latents -> [0, 1]."""
    img = nets.vae.apply({"params": vae_params}, z0 / nets.vae.scaling_factor, method="decode")
    return jnp.clip((img.astype(jnp.float32) + 1.0) / 2.0, 0.0, 1.0)


def example_inputs(nets: Networks, batch: int, image_size: int) -> Dict[str, Any]:
    """Abstract example inputs for `init`/`eval_shape` of each network at a given image size."""
    lat = image_size // nets.vae_factor
    ctx = nets.unet.cross_attention_dim
    clip_tokens_n = (nets.clip.image_size // nets.clip.patch_size) ** 2
    s = jax.ShapeDtypeStruct
    return {
        "image": s((batch, image_size, image_size, 3), jnp.float32),
        "latent": s((batch, lat, lat, nets.latent_channels), jnp.float32),
        "t": s((batch,), jnp.int32),
        "context": s((batch, clip_tokens_n, ctx), jnp.float32),
        "clip_pixels": s((batch, nets.clip.image_size, nets.clip.image_size, 3), jnp.float32),
        "clip_tokens": s((batch, clip_tokens_n, nets.clip.hidden_size), jnp.float32),
        "pooled_pd": s((batch, ctx), jnp.float32),
    }


def init_params(nets: Networks, key: jax.Array, image_size: int, batch: int = 1) -> Dict[str, Any]:
    """A fresh parameter dict for all six networks (boxed with logical axis names).

    The control module starts as a copy of the UNet's encoder and the decoder as a copy of the VAE
    decoder (both with zero-initialised new branches), the paper's initialisation. Jit it with
    `out_shardings` (parallel/sharding.py) so nothing is ever materialised unsharded.
    """
    from diffrestorer_jax.models.control import init_control_from_unet
    from diffrestorer_jax.models.decoder import init_decoder_from_vae

    ex = {k: jnp.zeros(v.shape, v.dtype) for k, v in example_inputs(nets, batch, image_size).items()}
    k = jax.random.split(key, 6)
    feats_img = ex["image"]
    params = {
        "clip": nets.clip.init(k[0], ex["clip_pixels"])["params"],
        "prompt": nets.prompt.init(k[1], ex["clip_tokens"])["params"],
        "unet": nets.unet.init(k[2], ex["latent"], ex["t"], ex["context"])["params"],
        "control": nets.control.init(k[3], ex["latent"], ex["t"], ex["context"], ex["image"])["params"],
        "vae": nets.vae.init(k[4], feats_img)["params"],
    }
    feats = nets.vae.apply({"params": params["vae"]}, feats_img, return_features=True,
                           method="encode")[2]
    params["decoder"] = nets.decoder.init(k[5], ex["latent"], feats, ex["pooled_pd"],
                                          lq_image=ex["image"])["params"]
    params["control"] = init_control_from_unet(params["control"], params["unet"])
    params["decoder"] = init_decoder_from_vae(params["decoder"], params["vae"])
    return params
