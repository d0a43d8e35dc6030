"""One attention function for every network, with selectable implementations.

Layout is [batch, length, heads, head_dim] (what `jax.nn.dot_product_attention` takes).
`implementation`:
  'xla'         the reference: `jax.nn.dot_product_attention` lowered by XLA (any backend);
  'cudnn'       cuDNN's fused flash attention (NVIDIA GPU; float16/bfloat16; head_dim a multiple of 8,
                at most 128);
  'pallas_tpu'  the Pallas TPU splash-attention kernel (flash attention with block sparsity; here
                every block is dense). On a backend other than TPU it runs in Pallas interpret mode:
                exact but very slow, meant for tests;
  'blocked'     flash attention written in jnp for XLA's CPU backend: one (example, head, query
                chunk) tile at a time (lax.map), keys in blocks with an online softmax (lax.scan),
                so the L x L scores never leave the cache; its gradient is flash attention's
                (recomputed per tile, no score matrix kept). At SD's 64x64 latent (L = 4096) 'xla'
                materialises 8 x 4096 x 4096 float32 scores and streams them through memory; see
                benchmarks/attention_cpu.py and RESULTS.md for the measured difference;
  'auto'        cuDNN on GPU where it applies, the TPU kernel on TPU for long sequences, 'blocked' on
                CPU where the score matrix outgrows the cache, XLA otherwise.
The backend 'auto' chooses for is the default backend, or the one set by `target_backend(...)`
(ahead-of-time compilation for TPU from a CPU host must not pick the CPU path;
`target_backend("flops")` makes 'auto' pick 'xla' everywhere, so XLA's HLO cost model sees every
attention as plain dots: a Pallas or cuDNN call and the blocked loop hide their FLOPs from it).
`upcast=True` computes in float32 (cuDNN has no float32 kernel, so on GPU that means XLA).

Under a mesh (`jax.set_mesh`, as training sets it) the kernels run per device: GSPMD cannot
partition a Pallas call (it would replicate it: every chip attending the whole global batch) nor
the blocked loop (its lax.map over (example, head) tiles would gather the batch). So 'pallas_tpu',
'cudnn' and 'blocked' are called inside `shard_map` over the mesh axes the logical rules give
'activation_batch' (each chip attends its own images) and 'heads' (tensor parallelism), and 'auto'
picks them under a mesh as it does on one device (`_per_device`). Inside a `shard_map` already (the
restore program) they are called directly.
"""
import contextlib
import functools
import math
from typing import Iterator, Optional

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "pallas_tpu", "blocked")
# 'auto' uses the TPU kernel only when both lengths reach this: below it XLA's fused attention is
# as fast and the score matrix (heads x L x L) is small (SD's 32x32 latents give L = 1024).
PALLAS_MIN_LENGTH = 2048
# On CPU 'auto' uses 'blocked' once one head's scores (Lq x Lk float32) outgrow a core's L2 cache
# (512 KiB): SD's 32x32 and 64x64 latent levels and their cross-attention at 64x64. Not under a
# GSPMD mesh: its lax.map over (example, head) tiles would gather a sharded batch.
BLOCKED_MIN_SCORES = 2 ** 17
_LANES = 128  # the TPU kernel's sequence blocks are multiples of the 128-lane vreg width
_CUDNN_DTYPES = (jnp.float16, jnp.bfloat16)
# 'blocked': queries per tile and keys per block (1024 x 1024 float32 scores = 4 MiB, one head).
# 1024 queries per tile (512 before 2026-12-05) were faster at every shape timed on the AVX-512 host
# (benchmarks/cpu_ops.py): 0.81-0.94x the time for one head of 1024 x 64, SD's 32x32 level (batch 2,
# 8 heads of 40), 8 heads of 80 at 1024 and SD's 64x64 level (4096 x 8 x 40).
_BLOCK_Q, _BLOCK_K = 1024, 1024
_target: Optional[str] = None


@contextlib.contextmanager
def target_backend(name: Optional[str]) -> Iterator[None]:
    """Choose implementations for backend `name` ('tpu', 'gpu', 'cpu', or 'flops': XLA's attention
    everywhere, for counting) while tracing inside."""
    global _target
    previous, _target = _target, name
    try:
        yield
    finally:
        _target = previous


def _backend() -> str:
    return _target or jax.default_backend()


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
    if impl != "xla" and _partitioned_by_gspmd():
        one = functools.partial(dot_product_attention, scale=scale, implementation=impl)
        return _per_device(one, q, k, v).astype(dtype)
    if impl == "cudnn":
        _check_cudnn(q)
        out = jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="cudnn")
    elif impl == "pallas_tpu":
        out = splash_attention(q, k, v, scale=scale, interpret=_backend() != "tpu")
    elif impl == "blocked":
        out = blocked_attention(q, k, v, scale=scale)
    else:
        out = jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="xla")
    return out.astype(dtype)


def _choose(implementation: str, q, k) -> str:
    if implementation != "auto":
        return implementation
    backend = _backend()
    if backend == "flops":
        return "xla"
    if backend == "gpu" and _cudnn_problem(q) is None:
        return "cudnn"
    long = min(q.shape[1], k.shape[1]) >= PALLAS_MIN_LENGTH
    if backend == "tpu" and long:
        return "pallas_tpu"
    if backend == "cpu" and q.shape[1] * k.shape[1] >= BLOCKED_MIN_SCORES:
        return "blocked"
    return "xla"


def _free_axes() -> dict:
    """{name: size} of the context mesh's axes of size > 1 that are not manual (shard_map'ed)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return {}
    manual = set(mesh.manual_axes)
    return {n: s for n, s in zip(mesh.axis_names, mesh.axis_sizes) if s > 1 and n not in manual}


def _partitioned_by_gspmd() -> bool:
    """True under a mesh with a non-manual axis of size > 1, where GSPMD partitions the program."""
    return bool(_free_axes())


def _split_axes(logical: str, free: dict, size: int, taken=()):
    """The mesh axes the logical rules in scope give `logical`, kept to the free ones not `taken`,
    innermost dropped until their product divides `size` (None: not split)."""
    from flax import linen as nn
    rule = nn.logical_to_mesh_axes((logical,))[0]
    axes = [a for a in ((rule,) if isinstance(rule, str) else tuple(rule or ())) if a in free and a not in taken]
    while axes and size % math.prod(free[a] for a in axes):
        axes.pop()
    return tuple(axes) or None


def _per_device(fn, q, k, v):
    """fn(q, k, v) on each device's own rows: `shard_map` over the free mesh axes, batch split as
    'activation_batch' and heads as 'heads' by the logical rules in scope; axes the rules leave out
    see the same rows on every device (the result is replicated over them, as GSPMD would)."""
    from jax.sharding import PartitionSpec as P
    free = _free_axes()
    batch = _split_axes("activation_batch", free, q.shape[0])
    heads = _split_axes("heads", free, q.shape[2], taken=batch or ())
    spec = P(batch, None, heads, None)
    mesh = jax.sharding.get_abstract_mesh()
    # Every axis manual, those of size 1 too: a Pallas TPU call refuses a partly automatic context.
    manual = set(mesh.axis_names) - set(mesh.manual_axes)
    return jax.shard_map(fn, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec,
                         axis_names=manual, check_vma=False)(q, k, v)


def _cudnn_problem(q) -> Optional[str]:
    if _backend() != "gpu":
        return f"needs an NVIDIA GPU (the default backend is {_backend()!r})"
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


def blocked_attention(q, k, v, *, scale: float, block_q: int = _BLOCK_Q,
                      block_k: int = _BLOCK_K) -> jax.Array:
    """Exact attention over [B, L, H, D] without materialising the scores (flash attention in jnp).

    One tile = one (example, head) and `block_q` queries: `lax.map` runs the tiles one after the
    other, each a plain 2-D [block_q, D] x [D, block_k] matmul (XLA's CPU dot is much faster on
    these than on the head-batched 3-D einsum, and a tile's scores stay in cache). Keys come in
    blocks through a `lax.scan` keeping the running max m, normaliser l and unnormalised output
    acc (float32), rescaled by exp(m_old - m_new) as each block arrives; with one key block that is
    a plain softmax. Padded keys get a large negative logit.

    The gradient is flash attention's own (`_tiled_attention`'s custom VJP): the forward keeps only
    the output and each query's log-sum-exp, and the backward recomputes a tile's probabilities
    from them. Differentiating the online-softmax loop instead made XLA keep every tile's
    probabilities (2.3x the score matrix) and reduce them again (RESULTS.md: the tiny train step).
    """
    b, lq, h, d = q.shape
    lk = k.shape[1]
    bq, bk = min(block_q, lq), min(block_k, lk)
    lq_pad, lk_pad = _round_up(lq, bq), _round_up(lk, bk)
    heads_first = lambda t, n: jnp.pad(jnp.swapaxes(t, 1, 2).reshape(b * h, t.shape[1], d),  # noqa: E731
                                       ((0, 0), (0, n - t.shape[1]), (0, 0)))
    qh = heads_first(q.astype(jnp.float32) * scale, lq_pad).astype(q.dtype).reshape(b * h, -1, bq, d)
    kh = heads_first(k, lk_pad).reshape(b * h, -1, bk, d)
    vh = heads_first(v, lk_pad).reshape(b * h, -1, bk, d)
    out = _tiled_attention(qh, kh, vh, lk)
    out = out.reshape(b, h, lq_pad, d)[:, :, :lq]
    return jnp.swapaxes(out, 1, 2).astype(q.dtype)


def _key_mask(nk: int, bk: int, lk: int) -> Optional[jax.Array]:
    """[nk, bk] True for real keys, or None when no key is padding (static)."""
    return None if nk * bk == lk else jnp.arange(nk * bk).reshape(nk, bk) < lk


def _with_mask(block):
    """(k, v) or (k, v, mask) scan slice -> (k, v, mask or None)."""
    return tuple(block) if len(block) == 3 else (*block, None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _tiled_attention(qh, kh, vh, lk: int):
    """softmax(q k^T) v per head: qh [BH, nq, bq, D] (pre-scaled), kh, vh [BH, nk, bk, D] of which
    the first `lk` keys are real -> float32 [BH, nq, bq, D]."""
    return _tiled_forward(qh, kh, vh, lk)[0]


def _tiled_forward(qh, kh, vh, lk):
    bh, nq, bq, d = qh.shape
    _, nk, bk, _ = kh.shape
    mask = _key_mask(nk, bk, lk)

    def key_block(qc, carry, blk):
        m, l, acc = carry
        kb, vb, ok = blk
        s = jnp.dot(qc, kb.T, preferred_element_type=jnp.float32)
        if ok is not None:
            s = jnp.where(ok, s, -1e30)
        m_new = jnp.maximum(m, s.max(-1))
        p = jnp.exp(s - m_new[:, None])
        c = jnp.exp(m - m_new)
        pv = jnp.dot(p.astype(vb.dtype), vb, preferred_element_type=jnp.float32)
        return (m_new, l * c + p.sum(-1), acc * c[:, None] + pv), None

    def tile(args):  # [bq, D] queries of head i
        qc, i = args
        init = (jnp.full((bq,), -jnp.inf, jnp.float32), jnp.zeros((bq,), jnp.float32),
                jnp.zeros((bq, d), jnp.float32))
        if nk == 1:
            (m, l, acc), _ = key_block(qc, init, (kh[i, 0], vh[i, 0], None if mask is None else mask[0]))
        else:
            blocks = (kh[i], vh[i]) + (() if mask is None else (mask,))
            step = lambda carry, blk: key_block(qc, carry, _with_mask(blk))  # noqa: E731
            (m, l, acc), _ = jax.lax.scan(step, init, blocks)
        return acc / l[:, None], m + jnp.log(l)

    out, lse = jax.lax.map(tile, (qh.reshape(bh * nq, bq, d), jnp.repeat(jnp.arange(bh), nq)))
    return out.reshape(bh, nq, bq, d), lse.reshape(bh, nq, bq)


def _tiled_attention_fwd(qh, kh, vh, lk):
    out, lse = _tiled_forward(qh, kh, vh, lk)
    return out, (qh, kh, vh, out, lse)


def _tiled_attention_bwd(lk, residuals, d_out):
    """Flash attention's backward, one head at a time (lax.map), its query tiles in a lax.scan that
    sums dK and dV, each tile's key blocks in an inner scan that sums dQ: with P = exp(S - lse),
    dV = P^T dO, dS = P * (dO V^T - rowsum(dO * O)), dQ = dS K, dK = dS^T Q (scale is in Q)."""
    qh, kh, vh, out, lse = residuals
    _, nq, bq, d = qh.shape
    _, nk, bk, _ = kh.shape
    mask = _key_mask(nk, bk, lk)
    delta = jnp.sum(d_out * out, axis=-1)  # rowsum(dO * O) = rowsum(P * dP)
    f32 = jnp.float32

    def block_grads(qc, doc, lse_c, delta_c, kb, vb, ok):
        # Scores transposed ([keys, queries]) so that dV = P^T dO and dK = dS^T Q are plain
        # [bk, bq] x [bq, D] products: XLA's CPU dot runs a transposed left operand several times
        # slower. dQ = dS K needs dS the other way round; the barrier makes XLA copy it into that
        # layout instead of folding the transpose back into the dot (timings: RESULTS.md).
        p_t = jnp.exp(jnp.dot(kb, qc.T, preferred_element_type=f32) - lse_c[None, :])
        if ok is not None:
            p_t = jnp.where(ok[:, None], p_t, 0.0)
        do_c = doc.astype(vb.dtype)
        dv = jnp.dot(p_t.astype(vb.dtype), do_c, preferred_element_type=f32)
        ds_t = p_t * (jnp.dot(vb, do_c.T, preferred_element_type=f32) - delta_c[None, :])
        dk = jnp.dot(ds_t.astype(qc.dtype), qc, preferred_element_type=f32)
        ds = jax.lax.optimization_barrier(ds_t.T)
        dq = jnp.dot(ds.astype(kb.dtype), kb, preferred_element_type=f32)
        return dq, dk, dv

    def head(args):
        q_tiles, do_tiles, lse_tiles, delta_tiles, k_blocks, v_blocks = args

        def query_tile(carry, xs):
            dk_sum, dv_sum = carry
            qc, doc, lse_c, delta_c = xs
            if nk == 1:
                dq, dk, dv = block_grads(qc, doc, lse_c, delta_c, k_blocks[0], v_blocks[0],
                                         None if mask is None else mask[0])
                dk, dv = dk[None], dv[None]
            else:
                def key_block(dq_sum, blk):
                    dq, dk, dv = block_grads(qc, doc, lse_c, delta_c, *_with_mask(blk))
                    return dq_sum + dq, (dk, dv)
                blocks = (k_blocks, v_blocks) + (() if mask is None else (mask,))
                dq, (dk, dv) = jax.lax.scan(key_block, jnp.zeros((bq, d), f32), blocks)
            return (dk_sum + dk, dv_sum + dv), dq

        zeros = jnp.zeros((nk, bk, d), f32)
        (dk, dv), dq = jax.lax.scan(query_tile, (zeros, zeros), (q_tiles, do_tiles, lse_tiles, delta_tiles))
        return dq, dk, dv

    dq, dk, dv = jax.lax.map(head, (qh, d_out, lse, delta, kh, vh))
    return dq.astype(qh.dtype), dk.astype(kh.dtype), dv.astype(vh.dtype)


_tiled_attention.defvjp(_tiled_attention_fwd, _tiled_attention_bwd)


def _splash_kernel(heads: int, lq: int, lk: int, interpret: bool):
    """A dense multi-head splash kernel with the largest blocks that fit. Built per call, in the
    trace that uses it: the kernel holds its mask-info arrays, and a kernel cached across traces
    leaks one trace's arrays into another (a shard_map's backward is traced apart from its forward)."""
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
