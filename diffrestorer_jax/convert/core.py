"""Reading PyTorch checkpoints and placing their tensors into a Flax parameter tree, strictly.

The rules are mechanical because our parameter names mirror PyTorch's:
  * a numeric key segment joins the one before it: `down_blocks.0.resnets.1` -> `down_blocks_0/resnets_1`;
  * `weight` becomes `kernel` (conv OIHW -> HWIO, linear (out, in) -> (in, out)), `scale` (norms) or
    `embedding` (embedding tables), whichever the reference tree has; `bias` stays `bias`;
  * a 1x1 conv kernel is accepted where the reference has a linear one (old LDM VAE attention).

The reference tree comes from `jax.eval_shape(module.init, ...)`, so no full-size random init is ever
materialised; tensors are read one at a time (files.py reads the files), converted and placed.
"""
import contextlib
import os
import re
from typing import Dict, Iterable, Iterator, List, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from diffrestorer_jax.convert.files import (PICKLE_SUFFIXES, CheckpointError, SafetensorsFile, index_shards,
                                            load_pickle)

Path = Tuple[str, ...]


class StateDict(Mapping):
    """A lazy, read-only view of a PyTorch state dict: `sd[key]` loads one tensor as a jax array.

    safetensors files are read tensor by tensor after their header is checked (bfloat16 included);
    pickled files (.bin/.ckpt/.pt/.pth) only through `torch.load(weights_only=True, mmap=True)` and
    only when torch is installed (files.py).
    """

    def __init__(self, path: str, prefix: str = ""):
        self.path = str(path)
        if not os.path.isfile(self.path):
            raise CheckpointError(f"{self.path}: no such checkpoint file")
        self._tensors: Optional[Dict[str, object]] = None
        self._handle = None
        if self.path.endswith(".safetensors"):
            self._handle = SafetensorsFile(self.path)
            keys = list(self._handle.keys())
        elif self.path.endswith(PICKLE_SUFFIXES):
            self._tensors = load_pickle(self.path)
            keys = list(self._tensors)
        else:
            raise CheckpointError(f"{self.path}: unknown checkpoint format; expected .safetensors, "
                                  f"or a PyTorch pickle ({', '.join(PICKLE_SUFFIXES)})")
        self._keys = [k[len(prefix):] for k in keys if k.startswith(prefix)]
        self._prefix = prefix

    def __getitem__(self, key: str) -> jax.Array:
        full = self._prefix + key
        if self._handle is not None:
            return self._handle.get_tensor(full)
        t = self._tensors[full]
        if t.dtype.is_floating_point and str(t.dtype) == "torch.bfloat16":
            return jnp.asarray(t.float().numpy()).astype(jnp.bfloat16)
        return jnp.asarray(t.numpy())

    def shape(self, key: str) -> Tuple[int, ...]:
        full = self._prefix + key
        if self._handle is not None:
            return self._handle.shape(full)
        return tuple(self._tensors[full].shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key) -> bool:
        return (self._prefix + key) in (self._handle.keys() if self._handle is not None else self._tensors)


class RenamedStateDict(Mapping):
    """A view of another state dict under new key names (`rename` maps new -> old).

    An entry may instead map to a function `f(base) -> tensor`, for tensors that must be derived
    rather than renamed (a slice of a fused qkv projection, a transposed projection matrix).
    """

    def __init__(self, base, rename: Mapping[str, object], path: Optional[str] = None):
        self.base, self.rename = base, dict(rename)
        self.path = path or getattr(base, "path", "<state dict>")

    def __getitem__(self, key):
        src = self.rename[key]
        return src(self.base) if callable(src) else self.base[src]

    def shape(self, key):
        src = self.rename[key]
        if callable(src):
            return tuple(np.shape(src(self.base)))
        return tuple(_shape_of(self.base, src))

    def __iter__(self):
        return iter(self.rename)

    def __len__(self):
        return len(self.rename)


def _shape_of(sd, key) -> Tuple[int, ...]:
    if hasattr(sd, "shape") and callable(getattr(sd, "shape")):
        return tuple(sd.shape(key))
    return tuple(np.shape(sd[key]))


class ShardedStateDict(Mapping):
    """Several StateDicts (the shards of one model, e.g. `*.safetensors.index.json`) seen as one;
    a key in two shards is an error. `ShardedStateDict.from_index(path)` reads an index file."""

    def __init__(self, files: List[str], path: str):
        self.path = path
        self._parts = [StateDict(f) for f in files]
        self._where = {}
        for part in self._parts:
            for key in part:
                if key in self._where:
                    raise CheckpointError(f"{path}: key {key} appears in two shards")
                self._where[key] = part

    @classmethod
    def from_index(cls, index_path: str) -> "ShardedStateDict":
        return cls(index_shards(index_path), index_path)

    def __getitem__(self, key):
        return self._where[key][key]

    def shape(self, key) -> Tuple[int, ...]:
        return self._where[key].shape(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


_NUMERIC = re.compile(r"^\d+$")


def torch_key_to_module_path(key: str) -> Tuple[Path, str]:
    """`down_blocks.0.resnets.1.conv1.weight` -> (('down_blocks_0', 'resnets_1', 'conv1'), 'weight')."""
    parts = key.split(".")
    path = []
    for p in parts[:-1]:
        if _NUMERIC.match(p) and path:
            path[-1] = f"{path[-1]}_{p}"
        else:
            path.append(p)
    return tuple(path), parts[-1]


def _flax_leaf_name(module_path: Path, torch_leaf: str, ref_leaves: Mapping[Path, object]) -> str:
    if torch_leaf == "weight":
        for cand in ("kernel", "scale", "embedding"):
            if module_path + (cand,) in ref_leaves:
                return cand
        return "kernel"
    return torch_leaf


def _convert_tensor(t, leaf: str, target_shape: Tuple[int, ...]) -> np.ndarray:
    """One tensor in our layout, on the host: numpy transposes are views, where eager jax
    transposes compile one small program per distinct shape (seconds for a whole network)."""
    t = np.asarray(t)
    if leaf == "kernel":
        if t.ndim == 4 and len(target_shape) == 4:
            t = np.transpose(t, (2, 3, 1, 0))  # OIHW -> HWIO
        elif t.ndim == 4 and len(target_shape) == 2 and t.shape[2:] == (1, 1):
            t = t[:, :, 0, 0].T  # 1x1 conv stored where we use a linear layer
        elif t.ndim == 2 and len(target_shape) == 4 and target_shape[:2] == (1, 1):
            t = t.T[None, None]  # linear stored where we use a 1x1 conv
        elif t.ndim == 2:
            t = t.T
    return t


def load_into(reference, state_dict: Mapping, *, dtype=None, ignore: Iterable[str] = (),
              ignore_pattern: Optional[str] = None, what: str = "model") -> Dict:
    """Fill the (abstract) parameter tree `reference` from `state_dict`; strict about every key.

    `reference` is a nested dict of arrays or `jax.ShapeDtypeStruct`s (boxed logical-partitioning
    metadata is unwrapped). Returns a nested dict of jax arrays in `dtype` (default: the reference's).
    Raises CheckpointError naming every missing, unexpected and wrongly shaped key and the file.
    """
    from flax.core import meta
    ref_leaves = traverse_util.flatten_dict(meta.unbox(reference))
    path_name = getattr(state_dict, "path", "<state dict>")
    ignore = set(ignore)
    ignore_re = re.compile(ignore_pattern) if ignore_pattern else None

    plan: Dict[Path, str] = {}
    unexpected = []
    for key in state_dict:
        if key in ignore or (ignore_re is not None and ignore_re.search(key)):
            continue
        module_path, leaf = torch_key_to_module_path(key)
        flax_path = module_path + (_flax_leaf_name(module_path, leaf, ref_leaves),)
        if flax_path in ref_leaves and flax_path not in plan:
            plan[flax_path] = key
        else:
            unexpected.append(key)
    missing = [("/".join(p)) for p in ref_leaves if p not in plan]

    out, wrong_shape = {}, []
    if not missing and not unexpected:
        for flax_path, key in plan.items():
            target = ref_leaves[flax_path]
            t = _convert_tensor(state_dict[key], flax_path[-1], tuple(target.shape))
            if tuple(t.shape) != tuple(target.shape):
                wrong_shape.append(f"{key}: checkpoint {tuple(_shape_of(state_dict, key))} -> "
                                   f"{tuple(t.shape)}, model expects {tuple(target.shape)}")
                continue
            out[flax_path] = jnp.asarray(t, dtype or target.dtype)
    if missing or unexpected or wrong_shape:
        lines = [f"{path_name}: does not match the {what} ({len(missing)} missing, "
                 f"{len(unexpected)} unexpected, {len(wrong_shape)} wrongly shaped keys)"]
        lines += [f"  missing (model parameter with no tensor): {m}" for m in missing[:50]]
        lines += [f"  unexpected (tensor the model does not have): {u}" for u in unexpected[:50]]
        lines += [f"  wrong shape: {w}" for w in wrong_shape[:50]]
        if max(len(missing), len(unexpected), len(wrong_shape)) > 50:
            lines.append("  ... (lists cut at 50 each)")
        raise CheckpointError("\n".join(lines))
    return traverse_util.unflatten_dict(out)


@contextlib.contextmanager
def config_errors(source: str):
    """Turns an error raised while building a module from a config (a field of the wrong type or
    value in a user's config.json) into a CheckpointError naming the config."""
    try:
        yield
    except CheckpointError:
        raise
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, ZeroDivisionError) as e:
        raise CheckpointError(f"{source}: cannot build the model this config describes "
                              f"({type(e).__name__}: {e})") from None


def abstract_params(module, *args, **kwargs):
    """The parameter tree of `module.init(key, *args)` as ShapeDtypeStructs, without computing it."""
    shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *args, **kwargs))
    return shapes["params"]
