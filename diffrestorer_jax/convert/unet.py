"""Load a diffusers UNet folder into `UNet2DConditionModel` + params; infer a config from weights.

A diffusers component folder holds `config.json` and `diffusion_pytorch_model.safetensors` (or
`.bin`, or shards listed in `diffusion_pytorch_model.safetensors.index.json`). A pipeline root
(with `model_index.json`) is accepted too: its `unet/` folder is used.
"""
import os
from typing import Dict, List, Mapping, Optional, Tuple

import jax.numpy as jnp

from diffrestorer_jax.convert.core import (CheckpointError, ShardedStateDict, StateDict, abstract_params,
                                          config_errors, load_into)
from diffrestorer_jax.convert.files import read_json_object
from diffrestorer_jax.models.unet import UNet2DConditionModel

WEIGHTS_STEM = "diffusion_pytorch_model"


def component_dir(path: str, component: str) -> str:
    """`path` itself if it holds a config.json, else `path/component` if that does."""
    path = str(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such directory (expected a diffusers {component} folder "
                              f"or a pipeline folder containing {component}/)")
    sub = os.path.join(path, component)
    if not os.path.isfile(os.path.join(path, "config.json")) and os.path.isfile(os.path.join(sub, "config.json")):
        return sub
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise CheckpointError(f"{path}: no config.json here nor in {sub}/; expected a diffusers "
                              f"{component} folder (config.json + {WEIGHTS_STEM}.safetensors)")
    return path


def read_config(folder: str, expected_class: str) -> Dict:
    """config.json as a dict; refuses a config written for another diffusers class."""
    path = os.path.join(folder, "config.json")
    config = read_json_object(path)
    found = config.get("_class_name")
    if found is not None and found != expected_class:
        raise CheckpointError(f"{path}: describes a {found}, not a {expected_class} "
                              f"(wrong folder passed?)")
    return config


def open_weights(folder: str, stem: str = WEIGHTS_STEM, variant: Optional[str] = None) -> Mapping:
    """The state dict of a diffusers component folder: safetensors, sharded safetensors, or .bin."""
    name = f"{stem}.{variant}" if variant else stem
    single = os.path.join(folder, f"{name}.safetensors")
    index = single + ".index.json"
    if os.path.isfile(single):
        return StateDict(single)
    if os.path.isfile(index):
        return ShardedStateDict.from_index(index)
    pickle = os.path.join(folder, f"{name}.bin")
    if os.path.isfile(pickle):
        return StateDict(pickle)
    raise CheckpointError(f"{folder}: no weights file ({name}.safetensors, {name}.safetensors.index.json "
                          f"or {name}.bin)")


def example_inputs(module: UNet2DConditionModel, batch: int = 1):
    """Smallest inputs that trace the whole network (for `abstract_params`)."""
    side = 2 ** (len(module.block_out_channels) - 1)
    return (jnp.zeros((batch, side, side, module.in_channels), jnp.float32), jnp.zeros((batch,), jnp.float32),
            jnp.zeros((batch, 1, module.cross_attention_dim), jnp.float32))


def load_unet(path: str, dtype=None, *, variant: Optional[str] = None, **module_overrides):
    """(module, params) from a diffusers UNet folder or a pipeline root containing `unet/`.

    `dtype` (e.g. jnp.bfloat16) sets both the compute dtype and the stored parameter dtype;
    `module_overrides` sets other module fields (attention_impl, remat_policy, ...).
    """
    folder = component_dir(path, "unet")
    config = read_config(folder, "UNet2DConditionModel")
    if dtype is not None:
        module_overrides = {"dtype": dtype, "param_dtype": dtype, **module_overrides}
    with config_errors(os.path.join(folder, "config.json")):
        module = UNet2DConditionModel.from_config(config, **module_overrides)
        reference = abstract_params(module, *example_inputs(module))
    state_dict = open_weights(folder, variant=variant)
    params = load_into(reference, state_dict, dtype=dtype, what="UNet2DConditionModel")
    return module, params


# ---------------------------------------------------------------- config from tensor shapes
def _shape(sd, key) -> Tuple[int, ...]:
    return tuple(sd.shape(key)) if callable(getattr(sd, "shape", None)) else tuple(sd[key].shape)


def _indices(keys, prefix: str) -> List[int]:
    """Distinct integers N in keys starting with `prefix` + 'N.'."""
    found = set()
    for k in keys:
        if k.startswith(prefix):
            head = k[len(prefix):].split(".", 1)[0]
            if head.isdigit():
                found.add(int(head))
    return sorted(found)


def _one_or_tuple(values):
    return values[0] if len(set(values)) == 1 else tuple(values)


def unet_config_from_state_dict(sd: Mapping, *, attention_head_dim=None, upcast_attention: bool = False,
                                sample_size: int = 64, norm_num_groups: int = 32) -> Dict:
    """A diffusers-style UNet config inferred from a diffusers-keyed state dict's shapes.

    Shapes fix channels, block types and layer counts. They cannot tell the head count, the group
    count or upcasting, so those follow Stable Diffusion conventions unless given: a 768-wide
    context means SD 1.x (8 heads everywhere), any other width SD 2.x (64-wide heads).
    """
    path = getattr(sd, "path", "<state dict>")
    keys = list(sd)
    if "conv_in.weight" not in keys or "time_embedding.linear_1.weight" not in keys:
        raise CheckpointError(f"{path}: not a UNet2DConditionModel state dict (no conv_in.weight / "
                              f"time_embedding.linear_1.weight; first keys: {keys[:5]})")
    down = _indices(keys, "down_blocks.")
    channels, layers, types, tlayers, context, linear = [], [], [], [], None, None
    for i in down:
        p = f"down_blocks.{i}."
        channels.append(_shape(sd, p + "resnets.0.conv1.weight")[0])
        layers.append(len(_indices(keys, p + "resnets.")))
        attn = _indices(keys, p + "attentions.")
        types.append("CrossAttnDownBlock2D" if attn else "DownBlock2D")
        if attn:
            tlayers.append(len(_indices(keys, p + "attentions.0.transformer_blocks.")))
            context = _shape(sd, p + "attentions.0.transformer_blocks.0.attn2.to_k.weight")[1]
            linear = len(_shape(sd, p + "attentions.0.proj_in.weight")) == 2
        else:
            tlayers.append(None)
    mid_t = len(_indices(keys, "mid_block.attentions.0.transformer_blocks."))
    tlayers = [t if t is not None else mid_t for t in tlayers]
    if context is None:
        context = _shape(sd, "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight")[1]
        linear = len(_shape(sd, "mid_block.attentions.0.proj_in.weight")) == 2
    if attention_head_dim is None:
        attention_head_dim = 8 if context == 768 else tuple(c // 64 for c in channels)
    up_types = []
    for i in _indices(keys, "up_blocks."):
        up_types.append("CrossAttnUpBlock2D" if _indices(keys, f"up_blocks.{i}.attentions.") else "UpBlock2D")
    conv_in, conv_out = _shape(sd, "conv_in.weight"), _shape(sd, "conv_out.weight")
    return {
        "_class_name": "UNet2DConditionModel",
        "sample_size": sample_size,
        "in_channels": conv_in[1],
        "out_channels": conv_out[0],
        "conv_in_kernel": conv_in[2],
        "conv_out_kernel": conv_out[2],
        "down_block_types": types,
        "up_block_types": up_types,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "block_out_channels": channels,
        "layers_per_block": _one_or_tuple(layers),
        "transformer_layers_per_block": _one_or_tuple(tlayers),
        "cross_attention_dim": context,
        "attention_head_dim": attention_head_dim,
        "use_linear_projection": linear,
        "upcast_attention": upcast_attention,
        "norm_num_groups": norm_num_groups,
        "norm_eps": 1e-5,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "act_fn": "silu",
    }
