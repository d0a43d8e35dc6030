"""One attention function for every network, with selectable implementations.

Layout is [batch, length, heads, head_dim] (what `jax.nn.dot_product_attention` takes).
`implementation`:
  'xla'    the reference: `jax.nn.dot_product_attention` lowered by XLA (any backend);
  'auto'   'xla' for now (GPU cuDNN flash and TPU Pallas kernels are chosen here when added).
"""
from typing import Optional

import jax
import jax.numpy as jnp


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: Optional[float] = None,
                          implementation: str = "auto", upcast: bool = False) -> jax.Array:
    """softmax(q k^T * scale) v over [B, L, H, D] tensors; `upcast` computes in float32."""
    if upcast:
        dtype = q.dtype
        out = jax.nn.dot_product_attention(q.astype(jnp.float32), k.astype(jnp.float32),
                                           v.astype(jnp.float32), scale=scale, implementation="xla")
        return out.astype(dtype)
    if implementation in ("auto", "xla"):
        return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="xla")
    raise ValueError(f"unknown attention implementation {implementation!r}")
