"""Load a diffusers `AutoencoderKL` folder (`vae/` or a pipeline root holding `vae/`) into Flax."""
import os
from typing import Any, Dict, Mapping, Optional, Tuple

import jax.numpy as jnp

from diffrestorer_jax.convert.core import CheckpointError, StateDict, abstract_params, config_errors, load_into
from diffrestorer_jax.convert.files import read_json_object
from diffrestorer_jax.models.vae import AutoencoderKL

# Preferred first: safetensors is memory-mapped and needs no torch.
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin")


def find_vae_folder(path: str) -> str:
    """`path` itself when it holds an AutoencoderKL config.json, else `path/vae`."""
    path = str(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a folder (expected a diffusers vae/ folder or a pipeline root)")
    for folder in (path, os.path.join(path, "vae")):
        if os.path.isfile(os.path.join(folder, "config.json")):
            cfg = read_config(folder)
            if cfg.get("_class_name", "AutoencoderKL") == "AutoencoderKL" and "latent_channels" in cfg:
                return folder
            if folder.endswith("vae"):
                raise CheckpointError(f"{folder}/config.json: describes a {cfg.get('_class_name')!r}, "
                                      "not an AutoencoderKL")
    raise CheckpointError(f"{path}: no AutoencoderKL config.json here or in {os.path.join(path, 'vae')}")


def read_config(folder: str) -> Dict[str, Any]:
    return read_json_object(os.path.join(folder, "config.json"))


def _weights_file(folder: str) -> str:
    for name in WEIGHT_FILES:
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    if any(n.endswith(".index.json") for n in os.listdir(folder)):
        raise CheckpointError(f"{folder}: sharded VAE weights are not supported; save it unsharded")
    raise CheckpointError(f"{folder}: no weights found (looked for {', '.join(WEIGHT_FILES)})")


def vae_reference_tree(module: AutoencoderKL):
    """Abstract parameter tree of `module` (shapes only; smallest image the down path accepts)."""
    side = 2 ** (len(module.block_out_channels) - 1)
    return abstract_params(module, jnp.zeros((1, side, side, module.in_channels), module.dtype))


def params_from_state_dict(module: AutoencoderKL, state_dict: Mapping, dtype=None) -> Dict:
    """Place a diffusers-keyed VAE state dict into `module`'s parameter tree (strict)."""
    return load_into(vae_reference_tree(module), state_dict, dtype=dtype, what="AutoencoderKL")


def load_vae(path: str, dtype: Optional[Any] = None) -> Tuple[AutoencoderKL, Dict]:
    """(module, params) from a diffusers VAE folder or pipeline root.

    `dtype` (e.g. jnp.bfloat16) sets both the parameters' and the compute dtype; default float32.
    """
    folder = find_vae_folder(path)
    dtype = jnp.dtype(dtype or jnp.float32)
    with config_errors(os.path.join(folder, "config.json")):
        module = AutoencoderKL.from_config(read_config(folder), dtype=dtype, param_dtype=dtype)
        vae_reference_tree(module)
    params = params_from_state_dict(module, StateDict(_weights_file(folder)), dtype=dtype)
    return module, params
