"""Load a CLIP image encoder from a Hugging Face folder or an OpenAI / open_clip state-dict file.

`load_clip_vision(path)` returns `(CLIPVisionTransformer, params)`:
  * a Hugging Face folder (config.json + model.safetensors / pytorch_model.bin, sharded or not) of
    `CLIPVisionModel`, `CLIPVisionModelWithProjection` or `CLIPModel` (the text tower is skipped);
    transformers 4 saves the vision weights under `vision_model.`, transformers 5's CLIPVisionModel
    without a prefix; both load;
  * one OpenAI / open_clip file (`visual.conv1.weight`, `visual.transformer.resblocks.N...`); the
    architecture is read from the tensor shapes, except what shapes cannot tell (heads, activation).
Every key is accounted for strictly by `core.load_into`: a mismatch raises one CheckpointError.
"""
import os
import re
from typing import Any, Dict, Mapping, Optional, Tuple

import jax.numpy as jnp

from diffrestorer_jax.convert.core import (CheckpointError, RenamedStateDict, ShardedStateDict,
                                           StateDict, abstract_params, config_errors, load_into)
from diffrestorer_jax.convert.files import read_json_object
from diffrestorer_jax.models.clip_vision import CLIPVisionTransformer

HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                   "pytorch_model.bin.index.json")
# Keys of a CLIPModel (or old checkpoint) that the image encoder does not use.
HF_IGNORE = r"^(text_model\.|text_projection\.|logit_scale$)|position_ids$"

# Attention heads cannot be read from shapes (q/k/v are width x width whatever the split); these are
# the widths of the released OpenAI and open_clip ViTs (head width 64, and 80/88/104 for H/g/bigG).
HEADS_BY_WIDTH = {384: 6, 512: 8, 768: 12, 1024: 16, 1280: 16, 1408: 16, 1664: 16}


def load_clip_vision(path: str, dtype=None, *, hidden_act: str = "quick_gelu",
                     num_attention_heads: Optional[int] = None,
                     **module_kwargs) -> Tuple[CLIPVisionTransformer, Dict]:
    """(module, params) from a HF folder or an OpenAI/open_clip file.

    `dtype` is the parameter and compute dtype (default float32). For OpenAI/open_clip files,
    `hidden_act` is 'quick_gelu' for OpenAI's weights and usually 'gelu' for open_clip's own
    trainings (e.g. LAION ViT-H/14); `num_attention_heads` defaults to the released models' value
    for the width. `module_kwargs` (e.g. attention_impl) go to the module.
    """
    path = os.fspath(path)
    if dtype is not None:
        module_kwargs.setdefault("dtype", dtype)
        module_kwargs.setdefault("param_dtype", dtype)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file or folder")
    with config_errors(os.path.join(path, "config.json") if os.path.isdir(path) else path):
        if os.path.isdir(path):
            module, sd = _hf_module_and_weights(path, module_kwargs)
            ignore = HF_IGNORE
        else:
            module, sd = _openai_module_and_weights(path, hidden_act, num_attention_heads, module_kwargs)
            ignore = None
        ref = abstract_params(module, jnp.zeros((1, module.image_size, module.image_size,
                                                 module.num_channels), module.dtype))
    params = load_into(ref, sd, dtype=dtype, ignore_pattern=ignore, what="CLIP vision model")
    return module, params


# ----------------------------------------------------------------------------- Hugging Face

def _hf_module_and_weights(folder: str, module_kwargs) -> Tuple[CLIPVisionTransformer, Mapping]:
    config = _read_json(os.path.join(folder, "config.json"))
    model_type = config.get("model_type", "")
    if model_type == "clip_text_model" or (model_type == "clip" and "vision_config" not in config):
        raise CheckpointError(f"{folder}: is a CLIP text model ({config.get('architectures')}), it has "
                              "no vision tower; use a CLIPModel, CLIPVisionModel or "
                              "CLIPVisionModelWithProjection checkpoint")
    vision = config.get("vision_config", config) if model_type == "clip" else config
    if vision.get("model_type", "clip_vision_model") != "clip_vision_model":
        raise CheckpointError(f"{folder}: model_type {vision.get('model_type')!r} is not a CLIP vision "
                              "model")
    base = _open_hf_weights(folder)
    # Strip transformers 4's `vision_model.` prefix so keys mirror our module tree.
    rename = {(k[len("vision_model."):] if k.startswith("vision_model.") else k): k for k in base}
    sd = RenamedStateDict(base, rename, path=base.path)
    if not any(k.startswith(("embeddings.", "encoder.")) for k in rename):
        raise CheckpointError(f"{base.path}: holds no CLIP vision weights (no `vision_model.*` or "
                              "`embeddings.*` keys); is it a text-only checkpoint?")
    with_projection = "visual_projection.weight" in rename
    if with_projection:
        module_kwargs.setdefault("projection_dim", sd.shape("visual_projection.weight")[0])
    module = CLIPVisionTransformer.from_config(vision, with_projection=with_projection, **module_kwargs)
    return module, sd


def _open_hf_weights(folder: str) -> Mapping:
    for name in HF_WEIGHT_FILES:
        f = os.path.join(folder, name)
        if not os.path.isfile(f):
            continue
        if name.endswith(".index.json"):
            return ShardedStateDict.from_index(f)
        return StateDict(f)
    raise CheckpointError(f"{folder}: no weights found; expected one of {', '.join(HF_WEIGHT_FILES)}")


def _read_json(path: str) -> Dict[str, Any]:
    return read_json_object(path, "config.json of a Hugging Face CLIP folder")


# ----------------------------------------------------------------------------- OpenAI / open_clip

# OpenAI module names -> transformers' (per-layer names are under transformer.resblocks.N).
_OPENAI_TOP = {"conv1.weight": "embeddings.patch_embedding.weight",
               "class_embedding": "embeddings.class_embedding",
               "positional_embedding": "embeddings.position_embedding.weight",
               "ln_pre.weight": "pre_layrnorm.weight", "ln_pre.bias": "pre_layrnorm.bias",
               "ln_post.weight": "post_layernorm.weight", "ln_post.bias": "post_layernorm.bias"}
_OPENAI_LAYER = {"attn.out_proj": "self_attn.out_proj", "ln_1": "layer_norm1", "ln_2": "layer_norm2",
                 "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_RESBLOCK = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+)[._](weight|bias)$")  # in_proj_weight too


def _openai_module_and_weights(path: str, hidden_act: str, num_heads: Optional[int],
                               module_kwargs) -> Tuple[CLIPVisionTransformer, Mapping]:
    full = StateDict(path)
    base = StateDict(path, prefix="visual.")
    if len(base) == 0:
        hint = (" It looks like a Hugging Face state dict: pass its folder (with config.json)."
                if any(k.startswith("vision_model.") for k in full) else
                " It holds no `visual.*` keys: a text-only checkpoint?")
        raise CheckpointError(f"{path}: not an OpenAI/open_clip CLIP vision checkpoint.{hint}")
    if "attnpool.c_proj.weight" in base:
        raise CheckpointError(f"{path}: a ResNet CLIP (visual.attnpool); only ViT towers are supported")
    for need in ("conv1.weight", "positional_embedding", "transformer.resblocks.0.mlp.c_fc.weight"):
        if need not in base:
            raise CheckpointError(f"{path}: missing key visual.{need}, needed to infer the architecture")
    width, _, patch, _ = base.shape("conv1.weight")
    grid = int(round((base.shape("positional_embedding")[0] - 1) ** 0.5))
    layers = 1 + max(int(m.group(1)) for m in map(_RESBLOCK.match, base) if m)
    heads = num_heads or HEADS_BY_WIDTH.get(width, max(1, width // 64))
    config = dict(hidden_size=width, intermediate_size=base.shape("transformer.resblocks.0.mlp.c_fc.weight")[0],
                  num_hidden_layers=layers, num_attention_heads=heads, image_size=grid * patch,
                  patch_size=patch, hidden_act=hidden_act, layer_norm_eps=1e-5)
    with_projection = "proj" in base
    if with_projection:
        config["projection_dim"] = base.shape("proj")[1]
    module = CLIPVisionTransformer.from_config(config, with_projection=with_projection, **module_kwargs)
    return module, RenamedStateDict(base, _openai_rename(base, width), path=path)


def _openai_rename(base: Mapping, width: int) -> Dict[str, Any]:
    """HF-style key -> OpenAI key (or a function deriving the tensor). Unknown keys keep their name,
    so the strict loader reports them as unexpected rather than silently dropping them."""
    rename: Dict[str, Any] = {}
    for key in base:
        if key in _OPENAI_TOP:
            rename[_OPENAI_TOP[key]] = key
        elif key == "proj":
            # OpenAI computes x @ proj with proj (width, dim); a torch Linear weight is (dim, width).
            rename["visual_projection.weight"] = lambda sd: sd["proj"].T
        elif (m := _RESBLOCK.match(key)) is None:
            rename[key] = key
        elif m.group(2) == "attn.in_proj":
            for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
                # fused [q; k; v] along the output axis
                rename[f"encoder.layers.{m.group(1)}.self_attn.{name}.{m.group(3)}"] = (
                    lambda sd, key=key, i=i: sd[key][i * width:(i + 1) * width])
        elif m.group(2) in _OPENAI_LAYER:
            rename[f"encoder.layers.{m.group(1)}.{_OPENAI_LAYER[m.group(2)]}.{m.group(3)}"] = key
        else:
            rename[key] = key
    return rename
