"""Per-chip memory of one SD 1.5 transformer block at the 64x64 latent (L = 4096 tokens, 8 heads of
40, cross-attention to 256 tokens of 768), forward + backward, compiled ahead of time for a TPU
slice with XLA's attention and with the splash kernel (shard_map per chip): the part of the
stage-1 step the fused attention changes, in a program small enough to compile in minutes on a
2-core host (the whole SD 1.5 step takes hours there).

    python benchmarks/aot_attention_block.py --topology v5e-256 --batch 1024

Needs libtpu (no TPU). The batch is spread over every chip (fsdp = chips), bfloat16 compute, the
block's own weights sharded by the training rules; the gradient is taken with respect to the
block's input and weights (in stage 1 gradients flow through the frozen UNet's activations).
"""
import argparse
import os
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--topology", default="v5e-256")
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--impls", default="xla,pallas_tpu")
    args = ap.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import jax.numpy as jnp
    from diffrestorer_jax.models import attention
    from diffrestorer_jax.models.unet_blocks import Transformer2DModel
    from diffrestorer_jax.parallel import mesh as mesh_lib, sharding, topology
    from diffrestorer_jax.parallel.rules import DEFAULT_RULES

    devices = topology.topology_devices(args.topology)
    mesh = mesh_lib.make_mesh({"data": 1, "fsdp": -1, "tensor": 1}, devices)
    gib = 1024 ** 3
    for impl in args.impls.split(","):
        block = Transformer2DModel(heads=8, dim_head=40, attention_impl=impl, dtype=jnp.bfloat16)
        x = jax.ShapeDtypeStruct((args.batch, 64, 64, 320), jnp.bfloat16)
        ctx = jax.ShapeDtypeStruct((args.batch, 256, 768), jnp.bfloat16)
        with sharding.mesh_context(mesh, DEFAULT_RULES):
            boxed = jax.eval_shape(lambda: block.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 320), jnp.bfloat16),
                                                      jnp.zeros((1, 256, 768), jnp.bfloat16)))
        p_sh = sharding.tree_shardings(boxed, mesh, DEFAULT_RULES)
        params = sharding.abstract_with_shardings(boxed, p_sh)
        rows = sharding.batch_sharding(mesh, 4, DEFAULT_RULES)
        x = jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rows)
        ctx = jax.ShapeDtypeStruct(ctx.shape, ctx.dtype, sharding=sharding.batch_sharding(mesh, 3, DEFAULT_RULES))

        def loss(p, x, c):
            return jnp.mean(block.apply(p, x, c).astype(jnp.float32) ** 2)

        step = jax.jit(jax.grad(loss, argnums=(0, 1)))
        t0 = time.time()
        with sharding.mesh_context(mesh, DEFAULT_RULES), attention.target_backend("tpu"):
            lowered = step.lower(params, x, ctx)
        t1 = time.time()
        m = lowered.compile().memory_analysis()
        t2 = time.time()
        print(f"{impl}: batch {args.batch} on {len(devices)} x {devices[0].device_kind}: per chip "
              f"temp {m.temp_size_in_bytes / gib:.3f} GiB, argument {m.argument_size_in_bytes / gib:.3f} GiB, "
              f"output {m.output_size_in_bytes / gib:.3f} GiB (lower {t1 - t0:.0f} s, compile {t2 - t1:.0f} s)",
              flush=True)


if __name__ == "__main__":
    main()
