"""Checksums of array trees, so that values read back from disk can be told from the ones written.

Orbax's files carry no checksum of their own: a changed byte in a data file can read back as other
numbers without any error. `state_checksums` gives each array a 32-bit checksum of its bit patterns,
computed where the arrays live (on CPU by NumPy from each process's shards, with no program to
compile; on accelerators by one jitted program); the writer keeps it beside the files, the reader
compares. Integer sums, so the same values give the same checksums on any mesh, device or host.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
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


def _host_bits(x: np.ndarray) -> np.ndarray:
    """x's bit patterns as unsigned integers, shaped x.shape + (words per element,): the words
    `_bits` flattens, in the same order."""
    x = np.ascontiguousarray(x)
    if x.dtype.itemsize == 8 and x.dtype.kind in "fiu" and not jax.config.jax_enable_x64:
        x = x.astype(x.dtype.kind + "4")  # what JAX will hold (and read back) without 64-bit types
    if x.dtype == np.bool_:
        return x.astype(np.uint32)[..., None]
    return x.reshape(x.shape + (1,)).view(_UNSIGNED[x.dtype.itemsize]).reshape(x.shape + (-1,))


def _block_sum(bits: np.ndarray, starts, shape) -> int:
    """`_checksum`'s sum over one block of an array's words: `bits` (from `_host_bits`) sits at
    `starts` in a whole of `shape` (+ words). The weight 2f + 1 is affine in the element's
    coordinates, so the sum needs only per-axis sums; uint64 sums wrap mod 2^64, exact mod 2^32.
    Blocks of over _HOST_CHUNK words go by slabs of their first axis (bounded temporaries)."""
    shape = tuple(shape) + (bits.shape[-1],)
    starts = tuple(starts) + (0,)
    if bits.size > _HOST_CHUNK and bits.shape[0] > 1:
        rows = max(1, bits.shape[0] * _HOST_CHUNK // bits.size)
        return sum(_block_sum(bits[r:r + rows], (starts[0] + r,) + starts[1:-1], shape[:-1])
                   for r in range(0, bits.shape[0], rows)) & 0xFFFFFFFF
    words = bits.astype(np.uint64)
    strides = [int(np.prod(shape[k + 1:], dtype=np.int64)) for k in range(len(shape))]
    total = int(np.sum(words, dtype=np.uint64))
    for k, (start, n) in enumerate(zip(starts, words.shape)):
        per_index = np.sum(words, axis=tuple(a for a in range(words.ndim) if a != k), dtype=np.uint64)
        index_sum = int(np.sum(per_index * np.arange(start, start + n, dtype=np.uint64), dtype=np.uint64))
        total += 2 * strides[k] * index_sum
    return total & 0xFFFFFFFF


def _host_checksum(leaf) -> int:
    """`_checksum` of an array on the host: a NumPy array whole; a jax.Array on CPU devices from the
    shards this process holds (one copy of each: replica 0), so a multi-host array gives this
    process's part of the sum."""
    if not isinstance(leaf, jax.Array):
        x = np.asarray(leaf)
        return _block_sum(_host_bits(x), (0,) * x.ndim, x.shape)
    total = 0
    for shard in leaf.addressable_shards:
        if shard.replica_id == 0:
            starts = [sl.start or 0 for sl in shard.index]
            total += _block_sum(_host_bits(np.asarray(shard.data)), starts, leaf.shape)
    return total & 0xFFFFFFFF


def _on_cpu(leaf) -> bool:
    if isinstance(leaf, (np.ndarray, np.generic)):
        return True
    return isinstance(leaf, jax.Array) and all(d.platform == "cpu" for d in leaf.sharding.device_set)


def state_checksums(state) -> dict:
    """{'ema.unet.conv_in.kernel': 32-bit checksum} of a state's arrays, computed where they live:
    on CPU by NumPy from each process's shards (no program to compile; the processes of a multi-host
    run add their parts), on accelerators by one small program. Every process of a multi-host run
    must call it, as it does a save."""
    named = [(leaf_name(p), leaf) for p, leaf in jax.tree_util.tree_leaves_with_path(state)
             if hasattr(leaf, "shape")]
    if not named:
        return {}
    leaves = [leaf for _, leaf in named]
    if all(_on_cpu(leaf) for leaf in leaves):
        sums = [_host_checksum(leaf) for leaf in leaves]
        spread = [i for i, leaf in enumerate(leaves)
                  if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable]
        if spread:  # each process summed its own shards: add the parts (the same leaves everywhere)
            parts = multihost_utils.process_allgather(np.array([sums[i] for i in spread], np.uint32))
            for i, total in zip(spread, np.sum(np.asarray(parts, np.uint64), axis=0, dtype=np.uint64)):
                sums[i] = int(total) & 0xFFFFFFFF
        return {name: total for (name, _), total in zip(named, sums)}
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
