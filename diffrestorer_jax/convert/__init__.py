"""PyTorch checkpoints -> (Flax module, params). The public loaders:

    load_unet(path)         diffusers `unet/` folder, a pipeline root, or a single-file SD checkpoint
    load_vae(path)          diffusers `vae/` folder, a pipeline root, or a single-file SD checkpoint
    load_clip_vision(path)  Hugging Face CLIP folder (vision / full / with projection) or an
                            OpenAI / open_clip state-dict file
    load_control(path)      diffusers `controlnet/` folder

Each returns `(module, params)`; `module.apply({'params': params}, ...)` takes NHWC images.
A single file (.safetensors / .ckpt) is read as a CompVis/LDM Stable Diffusion checkpoint; a folder
written by `diffrestorer-convert` (our converted format, see converted.py) loads without torch.
"""
import os

from diffrestorer_jax import paths
from diffrestorer_jax.convert.clip import load_clip_vision as _load_clip_source
from diffrestorer_jax.convert.converted import is_converted, load_converted, save_converted
from diffrestorer_jax.convert.core import CheckpointError


def _local_source(path: str) -> str:
    """PyTorch sources are read from local disk; on a URL only our converted folders load."""
    if paths.is_url(path):
        raise CheckpointError(f"{path}: no converted weights there (flax_module.json missing). PyTorch "
                              "checkpoints are read from a local path: run diffrestorer-convert on "
                              "them and give its --out folder (which may itself be on gs://)")
    return path


def load_clip_vision(path: str, dtype=None, **kwargs):
    if is_converted(path):
        return load_converted(path, dtype)
    path = _local_source(path)
    return _load_clip_source(path, dtype, **kwargs)


def load_unet(path: str, dtype=None, **kwargs):
    if is_converted(path):
        return load_converted(path, dtype)
    path = _local_source(path)
    if os.path.isfile(path):
        from diffrestorer_jax.convert.ldm import load_unet_single_file
        return load_unet_single_file(path, dtype, **kwargs)
    from diffrestorer_jax.convert.unet import load_unet as load_folder
    return load_folder(path, dtype, **kwargs)


def load_vae(path: str, dtype=None, **kwargs):
    if is_converted(path):
        return load_converted(path, dtype)
    path = _local_source(path)
    if os.path.isfile(path):
        from diffrestorer_jax.convert.ldm import load_vae_single_file
        return load_vae_single_file(path, dtype, **kwargs)
    from diffrestorer_jax.convert.vae import load_vae as load_folder
    return load_folder(path, dtype, **kwargs)


def load_control(path: str, dtype=None, **kwargs):
    if is_converted(path):
        return load_converted(path, dtype)
    path = _local_source(path)
    from diffrestorer_jax.convert.control import load_control as load_folder
    return load_folder(path, dtype, **kwargs)


__all__ = ["load_unet", "load_vae", "load_clip_vision", "load_control", "save_converted",
           "load_converted", "CheckpointError"]
