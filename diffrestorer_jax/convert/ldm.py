"""Single-file Stable Diffusion checkpoints (CompVis / LDM key names) -> our UNet and VAE.

An SD 1.x / 2.x single file (`.safetensors` or a pickled `.ckpt`) holds
  model.diffusion_model.*   the UNet (and, in training checkpoints, its EMA copy under model_ema.*,
                            with the dots removed: `model_ema.diffusion_modelinput_blocks00weight`)
  first_stage_model.*       the VAE
  cond_stage_model.*        the text encoder (not used here)
The conversion is a pure key-renaming view (`core.RenamedStateDict`, LDM name -> diffusers name),
after which the diffusers loader rules of `core.load_into` apply unchanged (the VAE attention's 1x1
conv q/k/v/proj_out are accepted where we have linear layers). A key we cannot rename keeps its LDM
name, so `load_into` reports it as unexpected instead of silently dropping it.
"""
import logging
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import jax.numpy as jnp

from diffrestorer_jax.convert.core import (CheckpointError, RenamedStateDict, StateDict, abstract_params,
                                           config_errors, load_into)

log = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
EMA_PREFIX = "model_ema."
VAE_PREFIX = "first_stage_model."

Config = Union[None, str, Dict[str, Any]]

# ------------------------------------------------------------------------------------------ UNet
_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
           "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}


def _resnet(rest):
    """LDM ResBlock child names -> diffusers ResnetBlock2D names (`in_layers.0.weight` -> `norm1.weight`)."""
    for old, new in _RESNET.items():
        if ".".join(rest[:old.count(".") + 1]) == old:
            return new + "." + ".".join(rest[old.count(".") + 1:])
    return None


def _unet_key(key: str, layers_per_block: int) -> Optional[str]:
    """One LDM UNet key (prefix removed) -> its diffusers name, or None when unknown."""
    p = key.split(".")
    tail = lambda n: ".".join(p[n:])  # noqa: E731
    if p[0] == "time_embed" and p[1] in ("0", "2"):
        return f"time_embedding.linear_{1 if p[1] == '0' else 2}.{tail(2)}"
    if p[0] == "out" and p[1] in ("0", "2"):
        return f"{'conv_norm_out' if p[1] == '0' else 'conv_out'}.{tail(2)}"
    if p[0] == "middle_block":
        j = int(p[1])
        if j == 1:
            return f"mid_block.attentions.0.{tail(2)}"
        if j in (0, 2):
            r = _resnet(p[2:])
            return r and f"mid_block.resnets.{j // 2}.{r}"
        return None
    if p[0] == "input_blocks":
        i, j = int(p[1]), int(p[2])
        if i == 0:
            return f"conv_in.{tail(3)}" if j == 0 else None
        b, l = divmod(i - 1, layers_per_block + 1)
        if p[3] == "op":
            return f"down_blocks.{b}.downsamplers.0.conv.{tail(4)}"
        if j == 0:
            r = _resnet(p[3:])
            return r and f"down_blocks.{b}.resnets.{l}.{r}"
        return f"down_blocks.{b}.attentions.{l}.{tail(3)}" if j == 1 else None
    if p[0] == "output_blocks":
        i, j = int(p[1]), int(p[2])
        b, l = divmod(i, layers_per_block + 1)
        if j == 0:
            r = _resnet(p[3:])
            return r and f"up_blocks.{b}.resnets.{l}.{r}"
        if p[3] == "conv":  # an Upsample: its only child is `conv` (a SpatialTransformer has none)
            return f"up_blocks.{b}.upsamplers.0.conv.{tail(4)}"
        return f"up_blocks.{b}.attentions.{l}.{tail(3)}" if j == 1 else None
    return None


def _layers_per_block(keys) -> int:
    """Resnets per down level: the first downsampler (`input_blocks.N.0.op`) sits at N = layers + 1."""
    ops = sorted(int(k.split(".")[1]) for k in keys if k.startswith("input_blocks.") and ".0.op." in k)
    if ops:
        return ops[0] - 1
    return max(int(k.split(".")[1]) for k in keys if k.startswith("input_blocks."))


def unet_ldm_to_diffusers(ldm_keys) -> Dict[str, str]:
    """{diffusers name: LDM name} for LDM UNet keys given without their `model.diffusion_model.` prefix."""
    ldm_keys = list(ldm_keys)
    lpb = _layers_per_block(ldm_keys)
    out = {}
    for k in ldm_keys:
        try:
            new = _unet_key(k, lpb)
        except (ValueError, IndexError):
            new = None
        out[new or UNET_PREFIX + k] = k
    return out


def _describe(keys) -> str:
    """A guess at what a non-SD file is, for the error message."""
    ks = list(keys)
    if any(k.startswith(("text_model.", "vision_model.", "visual.", "transformer.resblocks.")) for k in ks):
        return "it looks like a CLIP model"
    if "encoder.conv_in.weight" in ks or any(k.startswith(VAE_PREFIX) for k in ks):
        return "it looks like a VAE only"
    if "conv_in.weight" in ks and any(k.startswith("down_blocks.") for k in ks):
        return "it looks like a diffusers-format UNet (load its folder with load_unet)"
    return f"its first keys are {ks[:5]}"


def _unsupported_family(keys) -> str:
    """The name of a Stable Diffusion family whose single files this loader does not read, or ""."""
    ks = list(keys)
    if any(k.startswith((UNET_PREFIX + "joint_blocks.", "joint_blocks.")) for k in ks):
        return "Stable Diffusion 3 (an MMDiT, not a UNet)"
    if any(k.startswith((UNET_PREFIX + "double_blocks.", "double_blocks.")) for k in ks):
        return "FLUX (a transformer, not a UNet)"
    if any(k.startswith("conditioner.embedders.") for k in ks):
        return "SDXL"
    return ""


def _refuse_unsupported(path: str, keys) -> None:
    family = _unsupported_family(keys)
    if family:
        hint = ("; SDXL's VAE has a latent scale of its own, which a diffusers folder's vae/config.json "
                "gives" if family == "SDXL" else "")
        raise CheckpointError(f"{path}: this looks like a {family} checkpoint; single files are read for "
                              f"Stable Diffusion 1.x / 2.x only{hint}")


def _ema_key(ldm_key: str) -> str:
    return EMA_PREFIX + ("diffusion_model." + ldm_key).replace(".", "")


def unet_state_dict(sd: Mapping, prefer_ema: bool = True) -> RenamedStateDict:
    """A diffusers-keyed view of the UNet in an LDM single-file state dict (EMA weights if present)."""
    path = getattr(sd, "path", "<state dict>")
    all_keys = set(sd)
    _refuse_unsupported(path, all_keys)
    plain = [k[len(UNET_PREFIX):] for k in all_keys if k.startswith(UNET_PREFIX)]
    if not plain:
        if any(k.startswith(EMA_PREFIX + "diffusion_model") for k in all_keys):
            raise CheckpointError(f"{path}: holds only EMA UNet weights (model_ema.*), whose dot-less "
                                  "names cannot be mapped without the plain model.diffusion_model.* keys")
        raise CheckpointError(f"{path}: not a single-file Stable Diffusion checkpoint (no "
                              f"'{UNET_PREFIX}*' keys); {_describe(all_keys)}")
    if any(k.startswith("label_emb.") for k in plain):
        raise CheckpointError(f"{path}: its UNet has class / size embeddings ('{UNET_PREFIX}label_emb.*': "
                              "an SD 2.x unCLIP or SDXL UNet), which this loader does not read")
    if not any(k.startswith("input_blocks.") for k in plain):
        raise CheckpointError(f"{path}: '{UNET_PREFIX}*' holds no input_blocks: not the UNet of a "
                              f"Stable Diffusion 1.x / 2.x file (first keys {sorted(plain)[:3]})")
    rename = unet_ldm_to_diffusers(plain)
    with_ema = [k for k in plain if _ema_key(k) in all_keys]
    if prefer_ema and with_ema and len(with_ema) == len(plain):
        log.info("%s: using the EMA UNet weights (model_ema.*)", path)
        source = {new: _ema_key(old) for new, old in rename.items()}
    else:
        if with_ema:
            log.warning("%s: EMA weights cover %d of %d UNet tensors; using the non-EMA weights",
                        path, len(with_ema), len(plain))
        else:
            log.info("%s: using the UNet weights (no EMA copy in the file)", path)
        source = {new: UNET_PREFIX + old for new, old in rename.items()}
    return RenamedStateDict(sd, source, path=path)


# ------------------------------------------------------------------------------------------- VAE
_VAE_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
               "nin_shortcut": "conv_shortcut"}


def _vae_key(key: str, levels: int) -> Optional[str]:
    """One LDM VAE key (prefix removed) -> its diffusers name, or None when unknown."""
    p = key.split(".")
    if p[0] in ("quant_conv", "post_quant_conv"):
        return key
    if p[0] not in ("encoder", "decoder") or len(p) < 3:
        return None
    side, r = p[0], p[1:]
    if r[0] in ("conv_in", "conv_out"):
        return key
    if r[0] == "norm_out":
        return f"{side}.conv_norm_out.{'.'.join(r[1:])}"
    if r[0] == "mid":
        if r[1] in ("block_1", "block_2") and r[2] in _VAE_RESNET:
            return f"{side}.mid_block.resnets.{int(r[1][-1]) - 1}.{_VAE_RESNET[r[2]]}.{'.'.join(r[3:])}"
        if r[1] == "attn_1" and r[2] in _VAE_ATTN:
            return f"{side}.mid_block.attentions.0.{_VAE_ATTN[r[2]]}.{'.'.join(r[3:])}"
        return None
    if r[0] in ("down", "up"):
        # LDM numbers decoder levels from the highest resolution; diffusers from the deepest.
        i = int(r[1]) if r[0] == "down" else levels - 1 - int(r[1])
        blocks = "down_blocks" if r[0] == "down" else "up_blocks"
        if r[2] == "block" and r[4] in _VAE_RESNET:
            return f"{side}.{blocks}.{i}.resnets.{r[3]}.{_VAE_RESNET[r[4]]}.{'.'.join(r[5:])}"
        if r[2] in ("downsample", "upsample") and r[3] == "conv":
            sampler = "downsamplers" if r[0] == "down" else "upsamplers"
            return f"{side}.{blocks}.{i}.{sampler}.0.conv.{'.'.join(r[4:])}"
    return None


def vae_ldm_to_diffusers(ldm_keys) -> Dict[str, str]:
    """{diffusers name: LDM name} for LDM VAE keys given without their `first_stage_model.` prefix."""
    ldm_keys = list(ldm_keys)
    levels = len({k.split(".")[2] for k in ldm_keys if k.startswith("encoder.down.")})
    out = {}
    for k in ldm_keys:
        try:
            new = _vae_key(k, levels)
        except (ValueError, IndexError):
            new = None
        out[new or k] = k
    return out


def vae_state_dict(sd: Mapping) -> RenamedStateDict:
    """A diffusers-keyed view of the VAE in an SD single file, or in a standalone LDM/diffusers VAE file."""
    path = getattr(sd, "path", "<state dict>")
    keys = list(sd)
    _refuse_unsupported(path, keys)
    if any(k.startswith(VAE_PREFIX) for k in keys):
        prefix = VAE_PREFIX
    elif "encoder.conv_in.weight" in keys:
        prefix = ""  # a standalone VAE file (e.g. a fine-tuned SD VAE)
    else:
        raise CheckpointError(f"{path}: no VAE in this file (no '{VAE_PREFIX}*' or 'encoder.conv_in.weight' "
                              f"keys); {_describe(keys)}")
    # Keep the VAE's own tensors: a standalone VAE training checkpoint also holds its discriminator
    # and LPIPS ('loss.*'), an SD file the UNet and text encoder under other prefixes.
    parts = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
    inner = [k[len(prefix):] for k in keys if k.startswith(prefix) and k[len(prefix):].startswith(parts)]
    if any(k.startswith("encoder.down_blocks.") for k in inner):  # already diffusers names
        rename = {k: k for k in inner}
    else:
        rename = vae_ldm_to_diffusers(inner)
    return RenamedStateDict(sd, {new: prefix + old for new, old in rename.items()}, path=path)


def _count(keys, prefix: str) -> int:
    return len({k[len(prefix):].split(".", 1)[0] for k in keys if k.startswith(prefix)})


def vae_config_from_state_dict(sd: Mapping, *, norm_num_groups: int = 32, scaling_factor: float = 0.18215,
                               sample_size: int = 512) -> Dict[str, Any]:
    """The SD VAE config with channels and depths read from a diffusers-keyed VAE state dict.

    Shapes cannot tell the group count or the latent scale, so those default to SD's (32, 0.18215).
    """
    keys = list(sd)
    shape = sd.shape
    levels = _count(keys, "encoder.down_blocks.")
    if not levels:
        raise CheckpointError(f"{getattr(sd, 'path', '<state dict>')}: no encoder.down_blocks.* in the VAE")
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": shape("encoder.conv_in.weight")[1],
        "out_channels": shape("decoder.conv_out.weight")[0],
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": [shape(f"encoder.down_blocks.{i}.resnets.0.conv1.weight")[0] for i in range(levels)],
        "layers_per_block": _count(keys, "encoder.down_blocks.0.resnets."),
        "latent_channels": shape("decoder.conv_in.weight")[1],
        "norm_num_groups": norm_num_groups,
        "sample_size": sample_size,
        "scaling_factor": scaling_factor,
        "use_quant_conv": "quant_conv.weight" in keys,
        "use_post_quant_conv": "post_quant_conv.weight" in keys,
        "mid_block_add_attention": "encoder.mid_block.attentions.0.to_q.weight" in keys,
    }


# --------------------------------------------------------------------------------------- loaders
def _folder_config(config: str, component: str) -> Dict[str, Any]:
    from diffrestorer_jax.convert.unet import component_dir, read_config
    cls = "UNet2DConditionModel" if component == "unet" else "AutoencoderKL"
    return read_config(component_dir(config, component), cls)


def _dtype_overrides(dtype) -> Dict[str, Any]:
    return {} if dtype is None else {"dtype": jnp.dtype(dtype), "param_dtype": jnp.dtype(dtype)}


def load_unet_single_file(path: str, dtype=None, *, config: Config = None, prefer_ema: bool = True,
                          **infer_kwargs) -> Tuple[Any, Dict]:
    """(UNet2DConditionModel, params) from an SD 1.x / 2.x single-file checkpoint.

    `config`: a diffusers config dict or a folder holding `unet/config.json`; by default it is
    inferred from the tensor shapes (`convert.unet.unet_config_from_state_dict`, to which
    `infer_kwargs` such as attention_head_dim / upcast_attention / norm_num_groups go).
    `dtype` sets both the compute and the parameter dtype.
    """
    from diffrestorer_jax.convert.unet import example_inputs, unet_config_from_state_dict
    from diffrestorer_jax.models.unet import UNet2DConditionModel
    sd = unet_state_dict(StateDict(path), prefer_ema=prefer_ema)
    if isinstance(config, str):
        config = _folder_config(config, "unet")
    config = config or unet_config_from_state_dict(sd, **infer_kwargs)
    with config_errors(f"{path}: UNet config {config}"):
        module = UNet2DConditionModel.from_config(config, **_dtype_overrides(dtype))
        reference = abstract_params(module, *example_inputs(module))
    return module, load_into(reference, sd, dtype=dtype, what="UNet2DConditionModel")


def load_vae_single_file(path: str, dtype=None, *, config: Config = None, **infer_kwargs) -> Tuple[Any, Dict]:
    """(AutoencoderKL, params) from an SD single file (its first_stage_model.*) or a standalone VAE file.

    `config`: a diffusers config dict or a folder holding `vae/config.json`; by default SD's VAE config
    with channels read from shapes (`infer_kwargs`: norm_num_groups, scaling_factor, sample_size).
    """
    from diffrestorer_jax.convert.vae import params_from_state_dict, vae_reference_tree
    from diffrestorer_jax.models.vae import AutoencoderKL
    sd = vae_state_dict(StateDict(path))
    if isinstance(config, str):
        config = _folder_config(config, "vae")
    config = config or vae_config_from_state_dict(sd, **infer_kwargs)
    with config_errors(f"{path}: VAE config {config}"):
        module = AutoencoderKL.from_config(config, **_dtype_overrides(dtype))
        vae_reference_tree(module)
    return module, params_from_state_dict(module, sd, dtype=dtype)
