"""GroupNorm + SiLU on CPU under the restoring commands' XLA setting: plain sums against windowed ones.

    python benchmarks/group_norm_windows.py [--reps 31]

Without XLA's tree_reduction_rewriter (the restoring commands leave it out, xla_cpu.py) the CPU
GroupNorm adds its pixels in windows of 32 rows itself (models/group_norm.py). This compiles
`group_norm_cpu` + SiLU both ways in one process under that setting (the plain one traced as if
XLA_FLAGS did not name the pass), at the tiny config's restore shapes and SD 1.5's VAE decoder's,
and times them interleaved after two warm-up calls each (medians), with each one's compile time.
"""
import argparse
import os
import sys
import time

import numpy as np

import host
from cpu_vs_torch import interleaved  # noqa: E402  (same directory)

sys.path.insert(0, host.REPO)
from diffrestorer_jax import xla_cpu  # noqa: E402

SHAPES = [(4, 64, 64, 16), (4, 32, 32, 32), (4, 16, 16, 64), (4, 16, 16, 32), (4, 64, 64, 32),  # tiny, batch 4
          (1, 32, 32, 512), (1, 64, 64, 512), (1, 128, 128, 256), (1, 256, 256, 128)]  # SD 1.5 VAE decoder


def compiled(shape, windowed: bool):
    """(call, compile seconds) of GroupNorm + SiLU over a random x of `shape`."""
    import jax
    import jax.numpy as jnp
    from diffrestorer_jax.models.group_norm import group_norm_cpu
    c = shape[-1]
    scale, bias = jnp.ones((c,)), jnp.zeros((c,))
    x = jnp.asarray(np.random.default_rng(0).standard_normal(shape), jnp.float32)
    fn = jax.jit(lambda x_: jax.nn.silu(group_norm_cpu(x_, scale, bias, groups=8 if c < 128 else 32,
                                                       epsilon=1e-5, dtype=jnp.float32)))
    flags = os.environ["XLA_FLAGS"]
    if not windowed:  # read while tracing: trace as if the pass ran, compile without it all the same
        os.environ["XLA_FLAGS"] = flags.replace(xla_cpu.CPU_TREE_REDUCTION_PASS, "")
    try:
        start = time.perf_counter()
        program = fn.lower(x).compile()
        seconds = time.perf_counter() - start
    finally:
        os.environ["XLA_FLAGS"] = flags
    assert ("reduce-window" in program.as_text()) == windowed
    return (lambda: program(x).block_until_ready()), seconds


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=31)
    args = ap.parse_args()
    xla_cpu.set_cpu_defaults(restore=True)
    import jax.numpy as jnp
    jnp.zeros(1).block_until_ready()  # the CPU client starts with the restoring commands' flags
    print(f"{host.stamp()}; {host.load()}")
    print("| shape | plain sums ms | windowed ms | plain / windowed | compile plain s | compile windowed s |")
    print("|---|---:|---:|---:|---:|---:|")
    for shape in SHAPES:
        (plain, c_plain), (windowed, c_windowed) = compiled(shape, False), compiled(shape, True)
        m = {k: v * 1e3 for k, v in interleaved({"plain": plain, "windowed": windowed}, args.reps,
                                                blocks=False).items()}
        print(f"| {'x'.join(map(str, shape))} | {m['plain']:.3f} | {m['windowed']:.3f} | "
              f"{m['plain'] / m['windowed']:.2f}x | {c_plain:.2f} | {c_windowed:.2f} |", flush=True)
    print(f"float32, medians of {args.reps} interleaved calls; groups 8 below 128 channels, else 32")


if __name__ == "__main__":
    main()
