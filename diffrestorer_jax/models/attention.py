"""One attention function for every network, with selectable implementations.

Layout is [batch, length, heads, head_dim] (what `jax.nn.dot_product_attention` takes).
`implementation`:
  'xla'         the reference: `jax.nn.dot_product_attention` lowered by XLA (any backend);
  'cudnn'       cuDNN's fused flash attention (NVIDIA GPU; float16/bfloat16; head_dim a multiple of 8,
                at most 128);
  'pallas_tpu'  the Pallas TPU splash-attention kernel (flash attention with block sparsity; here
                every block is dense). On a backend other than TPU it runs in Pallas interpret mode:
                exact but very slow, meant for tests;
  'auto'        cuDNN on GPU where it applies, the TPU kernel on TPU for long sequences (where the
                L x L score matrix XLA materialises costs memory and bandwidth), XLA otherwise.
`upcast=True` computes in float32 (cuDNN has no float32 kernel, so on GPU that means XLA).

The TPU kernel runs per device: under `jit` with sharded activations call it inside `shard_map`
(batch/heads split) — GSPMD cannot partition a Pallas call and would replicate it.
"""
import functools
from typing import Optional

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "pallas_tpu")
# 'auto' uses the TPU kernel only when both lengths reach this: below it XLA's fused attention is
# as fast and the score matrix (heads x L x L) is small (SD's 32x32 latents give L = 1024).
PALLAS_MIN_LENGTH = 2048
_LANES = 128  # the TPU kernel's sequence blocks are multiples of the 128-lane vreg width
_CUDNN_DTYPES = (jnp.float16, jnp.bfloat16)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: Optional[float] = None,
                          implementation: str = "auto", upcast: bool = False) -> jax.Array:
    """softmax(q k^T * scale) v over [B, L, H, D] tensors (scale defaults to D ** -0.5)."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {implementation!r}; "
                         f"choose one of {IMPLEMENTATIONS}")
    if scale is None:
        scale = q.shape[-1] ** -0.5
    dtype = q.dtype
    if upcast:
        q, k, v = (t.astype(jnp.float32) for t in (q, k, v))
    impl = _choose(implementation, q, k)
    if upcast and impl == "cudnn":
        impl = "xla"  # cuDNN has no float32 flash kernel
    if impl == "cudnn":
        _check_cudnn(q)
        out = jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="cudnn")
    elif impl == "pallas_tpu":
        out = splash_attention(q, k, v, scale=scale, interpret=jax.default_backend() != "tpu")
    else:
        out = jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="xla")
    return out.astype(dtype)


def _choose(implementation: str, q, k) -> str:
    if implementation != "auto":
        return implementation
    backend = jax.default_backend()
    if backend == "gpu" and _cudnn_problem(q) is None:
        return "cudnn"
    if backend == "tpu" and min(q.shape[1], k.shape[1]) >= PALLAS_MIN_LENGTH:
        return "pallas_tpu"
    return "xla"


def _cudnn_problem(q) -> Optional[str]:
    if jax.default_backend() != "gpu":
        return f"needs an NVIDIA GPU (the default backend is {jax.default_backend()!r})"
    if q.dtype not in _CUDNN_DTYPES:
        return f"supports float16/bfloat16 only, got {q.dtype} (set the model dtype, or use 'xla')"
    d = q.shape[-1]
    if d % 8 or d > 128:
        return f"needs head_dim a multiple of 8 and at most 128, got {d}"
    return None


def _check_cudnn(q):
    problem = _cudnn_problem(q)
    if problem:
        raise ValueError(f"attention implementation 'cudnn' {problem}")


def splash_attention(q, k, v, *, scale: float, interpret: bool = False) -> jax.Array:
    """Non-causal attention with the Pallas TPU splash kernel, [B, L, H, D] in and out.

    The kernel wants [H, L, D] per example, lengths a multiple of its block size and unscaled
    logits, so: scale q, pad both lengths to a multiple of 128, give padded keys their own segment
    id (queries never attend to them), vmap over the batch, and cut the padded queries off.
    """
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    _, lq, h, _ = q.shape
    lk = k.shape[1]
    lq_pad, lk_pad = _round_up(lq, _LANES), _round_up(lk, _LANES)
    q = (q.astype(jnp.float32) * scale).astype(q.dtype)
    q, k, v = (jnp.pad(t, ((0, 0), (0, n - t.shape[1]), (0, 0), (0, 0)))
               for t, n in ((q, lq_pad), (k, lk_pad), (v, lk_pad)))
    kernel = _splash_kernel(h, lq_pad, lk_pad, interpret)
    segments = None
    if lk_pad != lk:
        segments = sa.SegmentIds(q=jnp.zeros((lq_pad,), jnp.int32),
                                 kv=(jnp.arange(lk_pad) >= lk).astype(jnp.int32))
    to_hld = lambda t: jnp.swapaxes(t, 1, 2)  # [B, L, H, D] <-> [B, H, L, D]
    out = jax.vmap(lambda q_, k_, v_: kernel(q_, k_, v_, segment_ids=segments))(
        to_hld(q), to_hld(k), to_hld(v))
    return to_hld(out)[:, :lq]


@functools.lru_cache(maxsize=64)
def _splash_kernel(heads: int, lq: int, lk: int, interpret: bool):
    """Build (once per shape) a dense multi-head splash kernel with the largest blocks that fit."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    bq, bkv = _block(lq), _block(lk)
    blocks = sa.BlockSizes(block_q=bq, block_kv=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
                           block_q_dq=bq, block_kv_dq=bkv)
    mask = sa.MultiHeadMask([sa.FullMask((lq, lk)) for _ in range(heads)])
    return sa.make_splash_mha(mask, head_shards=1, q_seq_shards=1, block_sizes=blocks,
                              interpret=interpret)


def _block(length: int) -> int:
    # 512-wide blocks amortise the per-block overhead; the length is a multiple of 128 already.
    return next(b for b in (512, 256, 128) if length % b == 0)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m
