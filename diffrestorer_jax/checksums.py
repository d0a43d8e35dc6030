"""Checksums of array trees, so that values read back from disk can be told from the ones written.

Orbax's files carry no checksum of their own: a changed byte in a data file can read back as other
numbers without any error. `state_checksums` gives each array a 32-bit checksum of its bit patterns,
computed where the arrays live (host arrays by NumPy, with no program to compile; device arrays by
one jitted program); the writer keeps it beside the files, the reader compares. Integer sums, so
the same values give the same checksums on any mesh, device or host.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

_UNSIGNED = {1: "uint8", 2: "uint16", 4: "uint32", 8: "uint32"}
_HOST_CHUNK = 1 << 22  # elements per NumPy pass: bounded temporaries for large arrays


def _bits(x):
    """x's bit patterns as uint32, one or more per element (exact integers, whatever the dtype)."""
    x = jnp.ravel(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    return jnp.ravel(jax.lax.bitcast_convert_type(x, _UNSIGNED[x.dtype.itemsize])).astype(jnp.uint32)


def _checksum(x):
    """sum_i bits_i * (2i + 1) mod 2^32: any one changed element changes it (the weight is odd, so
    invertible mod 2^32), as does a swap of two; integer sums, so the same on any mesh or device."""
    bits = _bits(x)
    return jnp.sum(bits * (2 * jnp.arange(bits.shape[0], dtype=jnp.uint32) + 1), dtype=jnp.uint32)


def _host_checksum(x: np.ndarray) -> int:
    """`_checksum` of a host array by NumPy (uint64 products and sums wrap mod 2^64, so mod 2^32
    they are exact)."""
    x = np.ascontiguousarray(x).reshape(-1)
    if x.dtype.itemsize == 8 and x.dtype.kind in "fiu" and not jax.config.jax_enable_x64:
        x = x.astype(x.dtype.kind + "4")  # what JAX will hold (and read back) without 64-bit types
    bits = x.astype(np.uint32) if x.dtype == np.bool_ else x.view(_UNSIGNED[x.dtype.itemsize])
    total = 0
    for start in range(0, bits.size, _HOST_CHUNK):
        chunk = bits[start:start + _HOST_CHUNK].astype(np.uint64)
        weights = 2 * np.arange(start, start + chunk.size, dtype=np.uint64) + 1
        total = (total + int(np.sum(chunk * weights, dtype=np.uint64))) & 0xFFFFFFFF
    return total


def _on_host(leaf) -> bool:
    if isinstance(leaf, (np.ndarray, np.generic)):
        return True
    return (isinstance(leaf, jax.Array) and leaf.is_fully_addressable
            and all(d.platform == "cpu" for d in leaf.sharding.device_set))


def state_checksums(state) -> dict:
    """{'ema.unet.conv_in.kernel': 32-bit checksum} of a state's arrays, computed where they live
    (host arrays by NumPy; otherwise one small program, which every process of a multi-host run
    must call, as it does a save)."""
    named = [(leaf_name(p), leaf) for p, leaf in jax.tree_util.tree_leaves_with_path(state)
             if hasattr(leaf, "shape")]
    if not named:
        return {}
    leaves = [leaf for _, leaf in named]
    if all(_on_host(leaf) for leaf in leaves):
        return {name: _host_checksum(np.asarray(leaf)) for name, leaf in named}
    meshes = [leaf.sharding.mesh for leaf in leaves if isinstance(getattr(leaf, "sharding", None), NamedSharding)]
    out = NamedSharding(meshes[0], PartitionSpec()) if meshes else None
    sums = _checksum_program(out)(leaves)
    return {name: int(v) for (name, _), v in zip(named, jax.device_get(sums))}


@functools.lru_cache(maxsize=8)
def _checksum_program(out_sharding):
    """The jitted checksums of a list of arrays, replicated on `out_sharding`'s mesh (traced once per
    state layout, like the step)."""
    return jax.jit(lambda xs: jnp.stack([_checksum(x) for x in xs]), out_shardings=out_sharding)


def leaf_name(path) -> str:
    """'ema.unet.conv_in.kernel' for a tree path (dataclass fields, dict keys and indices alike)."""
    return ".".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def differing(saved: dict, now: dict) -> list:
    """The names whose checksums differ between two `state_checksums` results (sorted)."""
    return sorted(n for n in saved.keys() | now.keys() if saved.get(n) != now.get(n))
