"""Our own on-disk format for converted weights: an Orbax checkpoint of the params and, beside it,
`flax_module.json` naming the module class and its fields. Converting a 3.4 GB SD UNet from PyTorch
takes a while; doing it once (`diffrestorer-convert`) and loading this format afterwards skips the
renaming/transposing, and needs neither torch nor the original files.
"""
import dataclasses
import json
from typing import Any, Dict, Tuple

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from diffrestorer_jax import atomic, paths
from diffrestorer_jax.convert.core import CheckpointError

MODULE_FILE = "flax_module.json"
PARAMS_DIR = "params"


def _module_classes():
    from diffrestorer_jax.models.clip_vision import CLIPVisionTransformer
    from diffrestorer_jax.models.control import ControlModule
    from diffrestorer_jax.models.unet import UNet2DConditionModel
    from diffrestorer_jax.models.vae import AutoencoderKL
    return {c.__name__: c for c in (UNet2DConditionModel, AutoencoderKL, CLIPVisionTransformer,
                                    ControlModule)}


def _jsonable(v):
    if isinstance(v, tuple):
        return [_jsonable(x) for x in v]
    return v


def module_fields(module) -> Dict[str, Any]:
    """The constructor fields of a Linen module, JSON-ready (dtypes by name)."""
    out = {}
    for f in dataclasses.fields(module):
        if f.name in ("parent", "name"):
            continue
        v = getattr(module, f.name)
        if f.name in ("dtype", "param_dtype"):
            v = {"dtype": jnp.dtype(v).name}
        out[f.name] = _jsonable(v)
    return out


def _from_json(v):
    if isinstance(v, dict) and set(v) == {"dtype"}:
        return jnp.dtype(v["dtype"]).type
    if isinstance(v, list):
        return tuple(_from_json(x) for x in v)
    return v


def is_converted(path: str) -> bool:
    if atomic.interrupted(path):  # a conversion killed mid-swap: put the whole version in place
        atomic.resolve(path)
    return (paths.path(path) / MODULE_FILE).is_file()


def save_converted(directory: str, module, params) -> None:
    """Write (module, params) to `directory` (local or a URL), replacing what is there atomically
    (atomic.py): a kill leaves the previous conversion or the new one."""
    with atomic.replacing(directory) as tmp:
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(tmp / PARAMS_DIR, params)
        spec = {"class": type(module).__name__, "fields": module_fields(module)}
        (tmp / MODULE_FILE).write_text(json.dumps(spec, indent=1))


def load_converted(directory: str, dtype=None) -> Tuple[Any, Dict]:
    """(module, params) from a directory written by `save_converted`."""
    directory = paths.path(directory)
    try:
        spec = json.loads((directory / MODULE_FILE).read_text())
        cls = _module_classes()[spec["class"]]
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{directory}: not a converted-weights folder ({MODULE_FILE}: {e})") from e
    fields = {k: _from_json(v) for k, v in spec["fields"].items()}
    if dtype is not None:
        fields["dtype"] = fields["param_dtype"] = dtype
    module = cls(**fields)
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(directory / PARAMS_DIR)
    if dtype is not None:
        params = jax.tree.map(lambda x: jnp.asarray(x, dtype), params)
    return module, params

