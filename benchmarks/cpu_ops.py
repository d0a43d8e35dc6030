"""Single operations on this CPU where ours takes a CPU-only route: XLA's plain op, ours, PyTorch's.

    python benchmarks/cpu_ops.py [--ops narrow_conv,group_norm,upsample_conv,attention] [--reps 21] [--restore]

  narrow_conv    3x3 convolutions to few output channels: lax.conv_general_dilated vs
                 models/narrow_conv.py (one matmul + shifted sums) vs torch conv2d
  group_norm     GroupNorm + SiLU: flax's nn.GroupNorm vs models/group_norm.py (sums over a
                 128-wide minor axis; with --restore in windows of 32 rows first) vs torch
                 GroupNorm + SiLU; the last four shapes are SD 1.5's VAE decoder at a 256² image
  upsample_conv  nearest x2 + 3x3 conv: repeat + XLA's conv vs models/upsample_conv.py (one 2x2
                 conv at the input's size) vs torch interpolate + conv2d
  attention      the CPU blocked attention with 512 vs 1024 queries per tile vs torch SDPA

float32, batch 1 unless the shape says otherwise, the three sides interleaved after two warm-up
calls each; medians. Ours runs with this project's XLA CPU setting (xla_cpu.py): the training
commands' by default, the restoring commands' (without XLA's tree_reduction_rewriter) with
--restore. Each row checks ours against XLA's plain op first.
"""
import argparse
import functools
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import host  # noqa: E402
from cpu_vs_torch import interleaved  # noqa: E402

OPS = ("narrow_conv", "group_norm", "upsample_conv", "attention")
SHAPES = {  # (batch, side, in channels, out channels) or, for attention, (batch, length, heads, head_dim)
    "narrow_conv": [(1, 128, 16, 3), (1, 32, 32, 4), (1, 64, 320, 4), (1, 256, 128, 3), (1, 64, 544, 32)],
    "group_norm": [(1, 32, 64, 8), (1, 64, 32, 8), (1, 128, 32, 8), (1, 128, 16, 8), (1, 64, 320, 32),
                   (1, 32, 512, 32), (1, 64, 512, 32), (1, 128, 256, 32), (1, 256, 128, 32)],
    "upsample_conv": [(1, 32, 64, 64), (1, 64, 32, 32), (1, 64, 512, 512), (1, 128, 256, 256)],
    "attention": [(1, 1024, 1, 64), (2, 1024, 8, 40), (1, 1024, 8, 80), (1, 4096, 8, 40)],
}


def sides(op, shape, rng):
    """{'xla': f, 'ours': f, 'torch': f} for one row, after checking ours against xla."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import torch
    from jax import lax
    from diffrestorer_jax.models import attention, conv_grad, upsample_conv
    from diffrestorer_jax.models.group_norm import GroupNorm
    nhwc = ("NHWC", "HWIO", "NHWC")
    t = lambda a: torch.from_numpy(np.ascontiguousarray(np.moveaxis(a, -1, 1)))  # noqa: E731
    if op == "attention":
        b, length, heads, dim = shape
        q, k, v = (rng.standard_normal(shape, np.float32) for _ in range(3))
        args = tuple(map(jnp.asarray, (q, k, v)))
        block = lambda bq: jax.jit(functools.partial(attention.blocked_attention, scale=dim ** -0.5,  # noqa: E731
                                                     block_q=bq))
        xla, ours = block(512), block(1024)
        qt, kt, vt = (torch.from_numpy(a).transpose(1, 2).contiguous() for a in (q, k, v))
        theirs = lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt)  # noqa: E731
    else:
        b, side, cin, cout = shape
        x = rng.standard_normal((b, side, side, cin), np.float32)
        xt = t(x)
        if op == "group_norm":
            module = GroupNorm(cout)
            params = nn.unbox(module.init(jax.random.key(0), x))
            flax_norm = nn.GroupNorm(num_groups=cout, epsilon=1e-5)
            xla = jax.jit(lambda x_: nn.silu(flax_norm.apply(params, x_)))
            ours = jax.jit(lambda x_: nn.silu(module.apply(params, x_)))
            gn = torch.nn.GroupNorm(cout, cin)
            theirs = lambda: torch.nn.functional.silu(gn(xt))  # noqa: E731
            args = (jnp.asarray(x),)
        else:
            w = (rng.standard_normal((3, 3, cin, cout)) / np.sqrt(9 * cin)).astype(np.float32)
            wt = torch.from_numpy(np.ascontiguousarray(w.transpose(3, 2, 0, 1)))
            args = (jnp.asarray(x), jnp.asarray(w))
            pad = ((1, 1), (1, 1))
            if op == "narrow_conv":
                xla = jax.jit(lambda x_, w_: lax.conv_general_dilated(x_, w_, (1, 1), pad, dimension_numbers=nhwc))
                ours = jax.jit(lambda x_, w_: conv_grad.conv_general_dilated(x_, w_, (1, 1), pad,
                                                                             dimension_numbers=nhwc))
                theirs = lambda: torch.nn.functional.conv2d(xt, wt, padding=1)  # noqa: E731
            else:
                xla = jax.jit(lambda x_, w_: lax.conv_general_dilated(
                    jnp.repeat(jnp.repeat(x_, 2, axis=1), 2, axis=2), w_, (1, 1), pad, dimension_numbers=nhwc))
                ours = jax.jit(upsample_conv.upsample_conv_by_phases)
                theirs = lambda: torch.nn.functional.conv2d(  # noqa: E731
                    torch.nn.functional.interpolate(xt, scale_factor=2.0, mode="nearest"), wt, padding=1)
    want, got = np.asarray(xla(*args)), np.asarray(ours(*args))
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4 * float(np.abs(want).max()))
    return {"xla": lambda: xla(*args).block_until_ready(), "ours": lambda: ours(*args).block_until_ready(),
            "torch": theirs}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ops", default=",".join(OPS))
    ap.add_argument("--reps", type=int, default=21)
    ap.add_argument("--restore", action="store_true", help="the restoring commands' XLA CPU setting")
    args = ap.parse_args()
    sys.path.insert(0, host.REPO)
    from diffrestorer_jax.xla_cpu import set_cpu_defaults
    set_cpu_defaults(restore=args.restore)
    import torch
    print(host.stamp(), "restoring commands' XLA setting" if args.restore else "", flush=True)
    print("| op | shape | XLA's op ms | ours ms | PyTorch ms | ours / XLA's | ours / PyTorch |")
    print("|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for op in args.ops.split(","):
        for shape in SHAPES[op]:
            with torch.no_grad():
                ms = {k: v * 1e3 for k, v in interleaved(sides(op, shape, rng), args.reps, blocks=False).items()}
            print(f"| {op} | {'x'.join(map(str, shape))} | {ms['xla']:.3f} | {ms['ours']:.3f} | {ms['torch']:.3f} "
                  f"| {ms['ours'] / ms['xla']:.2f}x | {ms['ours'] / ms['torch']:.2f}x |", flush=True)
    print(f"float32, medians of {args.reps} interleaved calls; torch threads {torch.get_num_threads()}; "
          f"attention: 'XLA's op' is the blocked path with 512 queries per tile, ours 1024")


if __name__ == "__main__":
    main()
