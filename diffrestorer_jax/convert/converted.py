"""Our own on-disk format for converted weights: an Orbax checkpoint of the params and, beside it,
`flax_module.json` naming the module class and its fields, and `checksums.json`, a checksum of every
array (Orbax's files have none: a damaged file could read back as other weights). Converting a
3.4 GB SD UNet from PyTorch takes a while; doing it once (`diffrestorer-convert`) and loading this
format afterwards skips the renaming/transposing, and needs neither torch nor the original files.
"""
import dataclasses
import json
from typing import Any, Dict, Tuple

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from diffrestorer_jax import atomic, paths
from diffrestorer_jax.checksums import differing, state_checksums
from diffrestorer_jax.convert.core import CheckpointError

MODULE_FILE = "flax_module.json"
PARAMS_DIR = "params"
CHECKSUMS_FILE = "checksums.json"


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
        (tmp / CHECKSUMS_FILE).write_text(json.dumps(state_checksums(params), indent=0, sort_keys=True))


def load_converted(directory: str, dtype=None) -> Tuple[Any, Dict]:
    """(module, params) from a directory written by `save_converted`. A folder from another version
    of this code, edited or damaged is a CheckpointError naming it and what is wrong."""
    directory = paths.path(directory)
    try:
        spec = json.loads((directory / MODULE_FILE).read_text())
        cls = _module_classes()[spec["class"]]
        fields = {k: _from_json(v) for k, v in spec["fields"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{directory}: not a converted-weights folder ({MODULE_FILE}: "
                              f"{type(e).__name__}: {e})") from e
    if dtype is not None:
        fields["dtype"] = fields["param_dtype"] = dtype
    try:
        module = cls(**fields)
    except TypeError as e:  # a field this version of the module does not have
        raise CheckpointError(f"{directory}: {MODULE_FILE} does not fit this version's {cls.__name__} "
                              f"({e}); convert the weights again with this version") from e
    try:
        with ocp.StandardCheckpointer() as ckptr:
            params = ckptr.restore(directory / PARAMS_DIR)
    except Exception as e:  # orbax reports a lost or damaged file as ValueError, FileNotFoundError, ...
        raise CheckpointError(f"{directory / PARAMS_DIR}: the parameters cannot be read "
                              f"({type(e).__name__}: {str(e)[:160]}); "
                              f"convert the weights again") from e
    if (directory / CHECKSUMS_FILE).exists():  # folders converted before checksums load unchecked
        try:
            saved = json.loads((directory / CHECKSUMS_FILE).read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{directory / CHECKSUMS_FILE}: cannot be read ({e}); convert the weights "
                                  "again") from e
        differ = differing(saved, state_checksums(params))
        if differ:
            raise CheckpointError(f"{directory}: damaged: {len(differ)} parameter array(s) read back are not "
                                  f"what was saved ({'; '.join(differ[:5])}{'; ...' if len(differ) > 5 else ''}); "
                                  "convert the weights again")
    if dtype is not None:
        params = jax.tree.map(lambda x: jnp.asarray(x, dtype), params)
    return module, params
