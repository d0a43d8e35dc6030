"""Every attention implementation against the XLA reference (and XLA against a plain einsum)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffrestorer_jax.models.attention import dot_product_attention


def _qkv(b, lq, lk, h, d, dtype=jnp.float32, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    shapes = ((b, lq, h, d), (b, lk, h, d), (b, lk, h, d))
    return [jax.random.normal(key, s, jnp.float32).astype(dtype) for key, s in zip(ks, shapes)]


def _einsum_attention(q, k, v, scale):
    w = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale, axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", w, v)


def test_xla_matches_einsum_and_default_scale():
    q, k, v = _qkv(2, 17, 9, 3, 8)
    ref = _einsum_attention(q, k, v, 8 ** -0.5)
    np.testing.assert_allclose(dot_product_attention(q, k, v, implementation="xla"), ref, atol=1e-5)
    np.testing.assert_allclose(dot_product_attention(q, k, v, scale=0.3, implementation="xla"),
                               _einsum_attention(q, k, v, 0.3), atol=1e-5)


def test_auto_is_xla_on_cpu():
    q, k, v = _qkv(1, 33, 33, 2, 16)
    np.testing.assert_array_equal(dot_product_attention(q, k, v, implementation="auto"),
                                  dot_product_attention(q, k, v, implementation="xla"))


@pytest.mark.parametrize("b,lq,lk,h,d,bq,bk", [(2, 64, 64, 3, 8, 16, 16),     # several tiles and key blocks
                                                 (1, 50, 77, 2, 16, 32, 32),    # padded queries and keys
                                                 (1, 40, 70, 2, 8, 16, 1024),   # one padded key block
                                                 (1, 24, 9, 1, 8, 1024, 1024)])  # one tile, one block
def test_blocked_matches_xla(b, lq, lk, h, d, bq, bk):
    from diffrestorer_jax.models.attention import blocked_attention
    q, k, v = _qkv(b, lq, lk, h, d, seed=3)
    blocked = lambda *a: blocked_attention(*a, scale=0.3, block_q=bq, block_k=bk)  # noqa: E731
    ours = jax.jit(blocked)(q, k, v)
    ref = dot_product_attention(q, k, v, scale=0.3, implementation="xla")
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, atol=2e-6, rtol=1e-5)
    grad = lambda f: jax.grad(lambda *a: jnp.sum(jnp.sin(f(*a))), argnums=(0, 1, 2))(q, k, v)  # noqa: E731
    for a, r in zip(grad(blocked), grad(lambda *a: dot_product_attention(*a, scale=0.3, implementation="xla"))):
        np.testing.assert_allclose(a, r, atol=1e-5, rtol=1e-4)


def test_blocked_gradient_keeps_no_scores_and_handles_bfloat16():
    """The flash backward saves only the output and one log-sum-exp per query: the compiled
    gradient's temporaries stay far below one copy of the L x L scores (differentiating the
    online-softmax loop instead kept every tile's probabilities: 2.3x the scores)."""
    from diffrestorer_jax.models.attention import blocked_attention
    b, l, h, d = 1, 2048, 2, 8
    q, k, v = _qkv(b, l, l, h, d, seed=5)
    blocked = functools.partial(blocked_attention, scale=0.3, block_q=256, block_k=512)
    grad = jax.jit(jax.grad(lambda *a: jnp.sum(blocked(*a)), argnums=(0, 1, 2)))
    temp = grad.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes
    assert temp < b * h * l * l * 4 / 8, temp
    # bfloat16 in, bfloat16 gradients out, close to the float32 reference
    qb, kb, vb = _qkv(2, 70, 50, 2, 16, jnp.bfloat16, seed=6)
    loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a).astype(jnp.float32)))  # noqa: E731
    ours = jax.grad(loss(functools.partial(blocked_attention, scale=0.25, block_q=32, block_k=32)),
                    argnums=(0, 1, 2))(qb, kb, vb)
    ref = jax.grad(loss(lambda *a: dot_product_attention(*a, scale=0.25, implementation="xla")),
                   argnums=(0, 1, 2))(*(t.astype(jnp.float32) for t in (qb, kb, vb)))
    for a, r in zip(ours, ref):
        assert a.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(a, np.float32), r, atol=0.05, rtol=0.05)


def test_auto_choice_follows_backend_and_length():
    from diffrestorer_jax.models import attention
    short, long = _qkv(1, 64, 64, 1, 8)[0], jnp.zeros((1, attention.PALLAS_MIN_LENGTH, 1, 8))
    assert attention._choose("auto", long, long) == "blocked"  # CPU, scores outgrow the cache
    assert attention._choose("auto", short, short) == "xla"
    cross_q, cross_k = jnp.zeros((1, 4096, 1, 8)), jnp.zeros((1, 77, 1, 8))  # 64x64 latent x 77 tokens
    assert attention._choose("auto", cross_q, cross_k) == "blocked"
    mesh = jax.make_mesh((2,), ("data",), devices=jax.devices()[:2])
    with jax.set_mesh(mesh):  # under a mesh too: the kernels run per device (shard_map)
        assert attention._choose("auto", long, long) == "blocked"
    with attention.target_backend("tpu"):  # ahead-of-time compilation for TPU from this CPU host
        assert attention._choose("auto", long, long) == "pallas_tpu"
        assert attention._choose("auto", short, short) == "xla"
        with jax.set_mesh(mesh):
            assert attention._choose("auto", long, long) == "pallas_tpu"
    with attention.target_backend("gpu"), jax.set_mesh(mesh):
        assert attention._choose("auto", long.astype(jnp.bfloat16), long) == "cudnn"
    assert attention._choose("xla", long, long) == "xla"


def _mesh_sharded(fn, mesh, *arrays):
    """fn(*arrays) jitted under `mesh` with the training rules, inputs split over the batch axes."""
    from flax import linen as nn
    from jax.sharding import NamedSharding, PartitionSpec as P
    from diffrestorer_jax.parallel.rules import DEFAULT_RULES
    rows = NamedSharding(mesh, P(("data", "fsdp")))
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
        return jax.jit(fn, in_shardings=rows)(*(jax.device_put(a, rows) for a in arrays))


def test_kernels_run_per_device_under_a_mesh():
    """Under a (data 2, fsdp 2, tensor 2) mesh of fake CPU devices the splash kernel (Pallas
    interpret mode) and the blocked path run inside shard_map over the batch axes, heads over
    'tensor': forward and gradient equal XLA's attention on one device, and the compiled program
    holds a per-device batch (no replicated Pallas call over the global batch)."""
    from diffrestorer_jax.parallel.mesh import make_mesh
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices()[:8])  # training's (auto) axes
    q, k, v = _qkv(4, 128, 77, 2, 32, seed=4)
    ref = dot_product_attention(q, k, v, scale=0.2, implementation="xla")
    loss = lambda impl: lambda *a: jnp.sum(jnp.sin(dot_product_attention(*a, scale=0.2, implementation=impl)))
    ref_grad = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
    for impl in ("pallas_tpu", "blocked"):
        ours = _mesh_sharded(lambda *a: dot_product_attention(*a, scale=0.2, implementation=impl), mesh, q, k, v)
        np.testing.assert_allclose(ours, ref, atol=2e-5, rtol=1e-5)
        grads = _mesh_sharded(jax.grad(loss(impl), argnums=(0, 1, 2)), mesh, q, k, v)
        for a, r in zip(grads, ref_grad):
            np.testing.assert_allclose(a, r, atol=5e-5, rtol=1e-4)
    from flax import linen as nn
    from jax.sharding import NamedSharding, PartitionSpec as P
    from diffrestorer_jax.parallel.rules import DEFAULT_RULES
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
        text = jax.jit(lambda *a: dot_product_attention(*a, implementation="pallas_tpu"),
                       in_shardings=NamedSharding(mesh, P(("data", "fsdp")))).lower(q, k, v).as_text()
    assert "shard_map" in text or "manual" in text.lower(), "the kernel is not inside a shard_map"


def test_upcast_keeps_dtype_and_is_float32_accurate():
    q, k, v = _qkv(1, 40, 40, 2, 16, dtype=jnp.bfloat16)
    out = dot_product_attention(q, k, v, upcast=True, implementation="xla")
    assert out.dtype == jnp.bfloat16
    ref = _einsum_attention(*(t.astype(jnp.float32) for t in (q, k, v)), 16 ** -0.5)
    assert float(jnp.abs(out.astype(jnp.float32) - ref).max()) < 1e-2


@pytest.mark.parametrize("b,lq,lk,h,d", [(2, 200, 200, 2, 40),   # self-attn, padded 200 -> 256
                                         (1, 128, 77, 2, 64)])   # cross-attn, 77 padded keys masked
def test_pallas_tpu_interpret_matches_xla(b, lq, lk, h, d):
    q, k, v = _qkv(b, lq, lk, h, d, seed=1)
    ours = jax.jit(lambda *a: dot_product_attention(*a, scale=0.2, implementation="pallas_tpu"))(q, k, v)
    ref = dot_product_attention(q, k, v, scale=0.2, implementation="xla")
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, atol=2e-5, rtol=1e-5)


def test_pallas_tpu_interpret_gradient_matches_xla():
    q, k, v = _qkv(1, 128, 100, 1, 32, seed=2)
    loss = lambda impl: lambda *a: jnp.sum(jnp.sin(dot_product_attention(*a, implementation=impl)))
    ours = jax.jit(jax.grad(loss("pallas_tpu"), argnums=(0, 1, 2)))(q, k, v)
    ref = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
    for a, r in zip(ours, ref):
        np.testing.assert_allclose(a, r, atol=5e-5, rtol=1e-4)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs an NVIDIA GPU")
def test_cudnn_matches_xla():
    q, k, v = _qkv(2, 300, 77, 4, 64, dtype=jnp.bfloat16)
    ours = dot_product_attention(q, k, v, implementation="cudnn")
    ref = dot_product_attention(q, k, v, implementation="xla", upcast=True)
    np.testing.assert_allclose(ours.astype(jnp.float32), ref.astype(jnp.float32), atol=2e-2)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs an NVIDIA GPU")
def test_cudnn_inside_shard_map_matches_xla():
    """What 'auto' runs on GPU under a mesh: cuDNN's kernel inside `shard_map` (`_per_device`),
    forward and gradient against float32 XLA. The mesh here spans the GPUs present (one is enough:
    the split over several devices is the same wrapper the CPU test above checks with the other
    kernels); the compiled program must hold cuDNN's fused call, not a fallback."""
    from flax import linen as nn
    from diffrestorer_jax.models import attention
    from diffrestorer_jax.parallel.rules import DEFAULT_RULES
    n = len(jax.devices())
    mesh = jax.make_mesh((n,), ("data",), devices=jax.devices())
    q, k, v = _qkv(2 * n, 256, 77, 4, 64, dtype=jnp.bfloat16, seed=5)
    cudnn = functools.partial(dot_product_attention, scale=0.125, implementation="cudnn")
    loss = lambda fn: lambda *a: jnp.sum(jnp.sin(fn(*a).astype(jnp.float32)))
    ref_fn = lambda *a: dot_product_attention(*a, scale=0.125, implementation="xla", upcast=True)
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
        ours = jax.jit(lambda *a: attention._per_device(cudnn, *a))
        grad = jax.jit(jax.grad(loss(lambda *a: attention._per_device(cudnn, *a)), argnums=(0, 1, 2)))
        out, grads, text = ours(q, k, v), grad(q, k, v), ours.lower(q, k, v).compile().as_text()
    assert "cudnn" in text.lower() and "fmha" in text.lower(), "cuDNN's fused attention is not in the program"
    np.testing.assert_allclose(out.astype(jnp.float32), ref_fn(q, k, v).astype(jnp.float32), atol=2e-2)
    for a, r in zip(grads, jax.grad(loss(ref_fn), argnums=(0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(a.astype(jnp.float32), r.astype(jnp.float32), atol=5e-2, rtol=5e-2)


def test_errors_are_clear():
    q, k, v = _qkv(1, 8, 8, 1, 8)
    with pytest.raises(ValueError, match="unknown attention implementation 'flash'"):
        dot_product_attention(q, k, v, implementation="flash")
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="'cudnn' needs an NVIDIA GPU"):
            dot_product_attention(q, k, v, implementation="cudnn")
