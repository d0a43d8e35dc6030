"""The restore program: `pipeline.restore_images` + colour fix as one SPMD program over a mesh, and
how the weights sit on the devices.

Every device of the mesh's 'data' axis runs the single-device program on its own rows of the batch
(`shard_map`), so no step communicates rows and, in the exact batch mode, a row's result cannot
depend on the device count. The restore CLI (`infer.restorer`) runs it; the AOT tools compile it for
topologies we do not have.

Weights (`place_weights`), in the inference dtype (`cast_weights`):
  replicated  every device holds the whole model: no communication, the most memory;
  sharded     every weight is flattened, padded to a multiple of the device count and split evenly
              over the devices (`Shard`); inside the program a network's weights are all-gathered
              where the network is used (control + UNet once per denoising step, CLIP and the prompt
              heads once, VAE encoder + decoder once), so a device holds 1/n of the model plus the
              network in use. Flat shards split any weight evenly on any device count (SD 1.5's
              320/640/1280 channels do not divide 256 chips). Results equal the replicated ones bit
              for bit: the gathered weights are the same numbers.
"""
import functools
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from diffrestorer_jax.infer.colorfix import color_fix, should_color_fix
from diffrestorer_jax.infer.pipeline import RestoreSettings, restore_images

COLOR_FIX_METHODS = ("none", "wavelet", "adain", "auto")
WEIGHTS = ("replicated", "sharded")


@jax.tree_util.register_pytree_node_class
class Shard:
    """One weight split over the devices: `data` is its flattened values padded to a multiple of
    the device count (sharded along the mesh's 'data' axis), `shape` its own shape (static)."""

    def __init__(self, data, shape):
        self.data, self.shape = data, tuple(shape)

    def tree_flatten(self):
        return (self.data,), self.shape

    @classmethod
    def tree_unflatten(cls, shape, children):
        return cls(children[0], shape)


def cast_weights(tree, dtype):
    """Kernels and embeddings (floating leaves of >= 2 dims) in `dtype`; biases and norm scales stay
    as they are (a few KB, and the precision of a norm's scale is worth keeping). Works on arrays and
    on ShapeDtypeStructs."""
    dtype = jnp.dtype(dtype)

    def one(x):
        if len(x.shape) >= 2 and jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dtype:
            if isinstance(x, jax.ShapeDtypeStruct):
                return jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding)
            return x.astype(dtype)
        return x
    return jax.tree.map(one, tree)


def weight_bytes(tree) -> int:
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _padded(size: int, n: int) -> int:
    return -(-size // n) * n


def place_weights(params, mesh, weights: str):
    """Put `params` (arrays anywhere: host, one device) on the mesh, replicated or sharded."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    if weights == "replicated":
        return jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
    n, rows = mesh.shape["data"], NamedSharding(mesh, PartitionSpec("data"))

    def shard(x):
        flat = jnp.ravel(x)
        flat = jnp.pad(flat, (0, _padded(flat.size, n) - flat.size))
        return Shard(jax.device_put(flat, rows), x.shape)
    return jax.tree.map(shard, params)


def abstract_weights(abstract, mesh, weights: str):
    """`place_weights` for ShapeDtypeStructs (ahead-of-time compilation): same tree, same shardings."""
    if weights == "replicated":
        rep = NamedSharding(mesh, PartitionSpec())
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep), abstract)
    n, rows = mesh.shape["data"], NamedSharding(mesh, PartitionSpec("data"))
    return jax.tree.map(lambda a: Shard(jax.ShapeDtypeStruct((_padded(math.prod(a.shape), n),), a.dtype,
                                                             sharding=rows), a.shape), abstract)


def _gather(w: Shard):
    full = jax.lax.all_gather(w.data, "data", tiled=True)
    return full[:math.prod(w.shape)].reshape(w.shape)


class GatherOnUse(Mapping):
    """Inside the program: network name -> that network's whole weights, all-gathered from the
    shards at the point where the pipeline reads `params[name]`."""

    def __init__(self, params):
        self._params = params

    def __getitem__(self, name):
        return jax.tree.map(_gather, self._params[name], is_leaf=lambda x: isinstance(x, Shard))

    def __iter__(self):
        return iter(self._params)

    def __len__(self):
        return len(self._params)


@functools.lru_cache(maxsize=64)
def restore_program(nets, settings: RestoreSettings, color_method: str, mesh, weights: str = "replicated"):
    """jit(params, lq [B, H, W, 3], key, schedule, knobs, image_ids [B]) -> (images, type
    probabilities [B, 8], colour fixed? [B]), B a multiple of the mesh's 'data' size; `params` as
    `place_weights(..., weights)` left them.

    `color_method`: 'none', 'wavelet', 'adain', or 'auto' (wavelet, except for images predicted
    hazy or dark). Remembered per process, so later callers with the same networks, settings, mesh
    and weights reuse the compiled programs.
    """
    if color_method not in COLOR_FIX_METHODS:
        raise ValueError(f"colour fix must be one of {', '.join(COLOR_FIX_METHODS)}, got {color_method!r}")
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")

    def body(params, lq, key, schedule, knobs, ids):
        if weights == "sharded":
            params = GatherOnUse(params)
        out = restore_images(nets, params, lq, key, schedule, settings, knobs, image_ids=ids)
        images, probs = out["image"], out["type_probs"]
        if color_method == "none":
            fixed = jnp.zeros(lq.shape[0], bool)
        elif color_method == "auto":
            images = color_fix(images, lq, "wavelet", probs)
            fixed = should_color_fix(probs)
        else:
            images = color_fix(images, lq, color_method)
            fixed = jnp.ones(lq.shape[0], bool)
        return images, probs, fixed

    body.__name__ = "restore_bucket"  # what CompileCounter("restore_bucket") counts
    rows, rep = PartitionSpec("data"), PartitionSpec()
    param_spec = rows if weights == "sharded" else rep
    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(param_spec, rows, rep, rep, rep, rows),
                                 out_specs=(rows, rows, rows), check_vma=False))

