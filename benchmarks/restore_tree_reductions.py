"""The restore program with and without XLA CPU's tree-reduction rewriter, in one process.

    python benchmarks/restore_tree_reductions.py --size tiny --image 64 --batch 4 --steps 10 --reps 15

The restoring commands leave out the `tree_reduction_rewriter` pass (diffrestorer_jax/xla_cpu.py).
This compiles the restore command's own program (`infer.program.restore_program`, batched, float32,
random weights as in restore_throughput.py) twice, once with the pass and once without (per-compile
`compiler_options`), on the same inputs, and times the two interleaved (medians). Separate processes
would be too noisy on a shared VM for a ~10% difference. The program without the pass is traced
with XLA_FLAGS naming it, as in the restoring commands (GroupNorm then builds its own sum trees).
"""
import argparse
import functools
import os
import statistics
import sys
import time

import numpy as np

import host
import restore_throughput as rt  # noqa: E402  (same directory)

sys.path.insert(0, host.REPO)
from diffrestorer_jax import xla_cpu  # noqa: E402


def compiled(config, nets, params, args, compiler_options):
    """A zero-argument call of the restore program compiled with `compiler_options`, and its images."""
    import jax
    from diffrestorer_jax.infer import program
    from diffrestorer_jax.infer.restorer import Options, Restorer
    r = Restorer(config, nets, params, Options(steps=args.steps, sampler="ddim", batch_size=args.batch,
                                               num_devices=1, exact=False, dtype="float32",
                                               color_fix="none", tile=0))
    real_jit, flags = jax.jit, os.environ.get("XLA_FLAGS", "")
    program.restore_program.cache_clear()  # restore_program keeps its jitted programs: build afresh
    jax.jit = functools.partial(real_jit, compiler_options=compiler_options)
    if compiler_options:  # read while tracing (models/group_norm.py), as the restoring commands set it
        os.environ["XLA_FLAGS"] = " ".join([flags] + [f"--{k}={v}" for k, v in compiler_options.items()])
    try:
        prog = r.program(r.settings_for((args.image, args.image)))
    finally:
        jax.jit, os.environ["XLA_FLAGS"] = real_jit, flags
        program.restore_program.cache_clear()
    lq = np.random.default_rng(1).random((args.batch, args.image, args.image, 3), np.float32)
    ids = np.arange(args.batch, dtype=np.int32)
    inputs = (r.params, jax.device_put(lq, r._rows), r.key, r.schedule, r.knobs, jax.device_put(ids, r._rows))
    images = np.asarray(prog(*inputs)[0])
    return (lambda: jax.block_until_ready(prog(*inputs))), images


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="tiny", choices=("tiny", "sd15"))
    ap.add_argument("--image", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--reps", type=int, default=15)
    args = ap.parse_args()
    xla_cpu.set_cpu_defaults()  # YNNPACK for matmuls only, as every command; the pass is chosen per compile
    from diffrestorer_jax.models import diffrestorer as dr
    config = rt.get_config(args.size)
    nets = dr.build_networks(config.model)
    params = rt.host_params(nets)
    with_pass, a = compiled(config, nets, params, args, None)
    without, b = compiled(config, nets, params, args,
                          {xla_cpu.DISABLE_PASSES_FLAG: xla_cpu.CPU_TREE_REDUCTION_PASS})
    times = {"with": [], "without": []}
    for _ in range(args.reps):
        for name, call in (("with", with_pass), ("without", without)):
            t = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - t)
    m = {k: statistics.median(v) for k, v in times.items()}
    print(f"{host.stamp()}; {host.load()}\n{args.size}, {args.image}^2, batch {args.batch}, {args.steps} DDIM steps, "
          f"median of {args.reps} interleaved: with the pass {m['with'] * 1e3:.1f} ms "
          f"({args.batch / m['with']:.2f} images/s), without {m['without'] * 1e3:.1f} ms "
          f"({args.batch / m['without']:.2f} images/s): {m['with'] / m['without']:.2f}x images/s without; "
          f"max |difference| of the images {float(np.max(np.abs(a - b))):.1e}")


if __name__ == "__main__":
    main()
