"""Per-chip bytes of a run's sharded state and frozen weights (the step's arguments, batch aside)
for a TPU slice, from the shardings alone: nothing is compiled or allocated.

    python benchmarks/state_bytes.py --config configs/sd15.py:stage1 --topology v5e-256 \
        [--mesh data=4,fsdp=64]

Prints the bytes of the largest shard (the chip that holds most), the same summed over every
array as if it were replicated, and the arrays left replicated over an axis of size > 1 by a
dimension the mesh does not divide (parallel/sharding.py `fit_spec`). Needs libtpu (no TPU).
"""
import argparse
import math
import os


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--topology", default="v5e-256")
    ap.add_argument("--mesh", default="", help="e.g. data=4,fsdp=64 (default: the config's)")
    args = ap.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import numpy as np
    from diffrestorer_jax.config_base import load_config_file
    from diffrestorer_jax.parallel import topology
    from diffrestorer_jax.train.run import Run

    config = load_config_file(args.config)
    for item in filter(None, args.mesh.split(",")):
        name, value = item.split("=")
        config.mesh[name] = int(value)
    devices = topology.topology_devices(args.topology)
    run = Run(config, devices)
    total = per_chip = 0
    replicated = []
    for tree, shardings in ((run.plan.state_target, run.plan.state_shardings),
                            (run.plan.frozen_target, run.plan.frozen_shardings)):
        for (path, leaf), sh in zip(jax.tree_util.tree_flatten_with_path(tree)[0], jax.tree.leaves(shardings)):
            size = np.dtype(leaf.dtype).itemsize
            total += math.prod(leaf.shape) * size
            per_chip += math.prod(sh.shard_shape(leaf.shape)) * size
            if leaf.ndim >= 2 and math.prod(leaf.shape) * size >= 2 ** 20 and sh.is_fully_replicated:
                replicated.append((math.prod(leaf.shape) * size, jax.tree_util.keystr(path)))
    gib = 1024 ** 3
    print(f"{args.config} on {args.topology} mesh {dict(run.mesh.shape)}: state + frozen weights "
          f"{total / gib:.2f} GiB in all, {per_chip / gib:.3f} GiB per chip; "
          f"{len(replicated)} arrays of >= 1 MiB fully replicated "
          f"({sum(b for b, _ in replicated) / gib:.3f} GiB)")
    for b, p in sorted(replicated, reverse=True)[:5]:
        print(f"  replicated: {p} {b / 2 ** 20:.1f} MiB")


if __name__ == "__main__":
    main()
