"""Restore throughput on this machine's CPU: the restore CLI's own program beside a PyTorch reference
built from diffusers parts, same size, batch and DDIM steps.

    python benchmarks/restore_throughput.py --size tiny --image 64 --batch 4 --steps 10 --reps 5
    python benchmarks/restore_throughput.py --size sd15 --image 256 --batch 2 --steps 4 --reps 3 \
        --sides ours_batched,ours_exact      # then --sides theirs,theirs_aware in another process
    python benchmarks/restore_throughput.py --size tiny --split   # + one DDIM step vs the once-per-batch work

Sides (run interleaved: one of each in turn, `--reps` times, after one warm-up call each; medians):
  ours_batched  `Restorer.restore_batch` (what diffrestorer-restore runs per batch: host -> device,
                the shard_map restore program, device -> host), rows as one batch (the default)
  ours_exact    the same with --exact: the rows one at a time inside the program
  theirs        PyTorch (torch.no_grad, eval): CLIP vision tower (transformers) on the LQ resized to
                the CLIP size, the prompt MLPs, then per DDIM step ControlNet (diffusers, from the
                UNet, context P_D, the LQ as its condition) + UNet (context P_S, the residuals), then
                the VAE encoder on the LQ and the plain VAE decoder on the latent
  theirs_aware  the same, decoding with our degradation-aware decoder written in PyTorch
                (torch_decoder.py, parity-tested against ours): the same work as ours
Ours decodes with the degradation-aware decoder (the VAE decoder plus, at every level, a fusion of
the LQ's encoder features through residual dense blocks, and the tiny config's image-level fusion),
so `theirs` does less work than ours (the plain VAE decoder; the LQ encoder pass is in both) and
`theirs_aware` the same work. Weights are random (timing does not depend on them), float32 on both
sides. Ours uses this host's XLA CPU setting (xla_cpu.py), as the commands do.
"""
import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import host  # noqa: E402

REPO = host.REPO
SIDES = ("ours_batched", "ours_exact", "theirs", "theirs_aware")


def get_config(size: str):
    sys.path.insert(0, REPO)
    from diffrestorer_jax.config_base import load_config_file
    c = load_config_file(os.path.join(REPO, "configs", f"{'tiny' if size == 'tiny' else 'sd15'}.py"))
    c.model.dtype = "float32"
    return c


def host_params(nets, seed: int = 0):
    """Random weights drawn on the host with the init's shapes (nothing to compile): N(0, 1/fan_in)
    kernels, scales near 1, small biases, so activations stay in a normal range."""
    import jax
    from diffrestorer_jax.export import abstract_params
    from diffrestorer_jax.parallel.sharding import unbox
    rng = np.random.default_rng(seed)

    def fill(path, a):
        z = rng.standard_normal(a.shape, np.float32)
        if "scale" in str(path[-1]):
            return 1.0 + 0.02 * z
        if len(a.shape) >= 2:
            return z / np.float32(np.sqrt(np.prod(a.shape[:-1])))
        return 0.02 * z
    return jax.tree_util.tree_map_with_path(fill, unbox(abstract_params(nets, 64)))


def ours(config, args, exact: bool):
    from diffrestorer_jax.infer.restorer import Options, Restorer
    from diffrestorer_jax.models import diffrestorer as dr
    nets = dr.build_networks(config.model)
    r = Restorer(config, nets, host_params(nets), Options(
        steps=args.steps, sampler="ddim", batch_size=args.batch, num_devices=1, exact=exact,
        dtype="float32", color_fix="none", tile=0))
    lq = np.random.default_rng(1).random((args.batch, args.image, args.image, 3), np.float32)
    ids = np.arange(args.batch)
    return lambda: r.restore_batch(lq, ids)


def theirs(config, args, decoder: str = "vae"):
    """The PyTorch reference (torch_restore.py), float32, on this CPU."""
    import torch_restore
    run = torch_restore.build(config.model, decoder=decoder)
    lq_nhwc = np.random.default_rng(1).random((args.batch, args.image, args.image, 3), np.float32)
    return lambda: run(torch_restore.nchw(lq_nhwc), args.steps).permute(0, 2, 3, 1).numpy()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="tiny", choices=("tiny", "sd15"))
    ap.add_argument("--image", type=int, default=64, help="image side (pixels)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10, help="DDIM steps")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--sides", default=",".join(SIDES))
    ap.add_argument("--threads", type=int, help="pin this process to the first N CPUs and give PyTorch N "
                    "threads (XLA sizes its pool from the CPUs it may use): on a host loaded by other jobs, "
                    "1 keeps PyTorch's spinning thread pool from collapsing, so the two sides compare")
    ap.add_argument("--split", action="store_true", help="also time every side at 1 DDIM step (interleaved with "
                    "the rest) and print the time of one step and of the once-per-batch work (CLIP, prompts, "
                    "LQ encode, decoding) from the two")
    ap.add_argument("--out", help="append the result (JSON) to this file")
    args = ap.parse_args()
    host.pin(args.threads)
    sides = args.sides.split(",")
    if any(s not in SIDES for s in sides):
        ap.error(f"--sides: choose from {SIDES}")
    sys.path.insert(0, REPO)
    from diffrestorer_jax import xla_cpu
    xla_cpu.set_cpu_defaults(restore=True)  # before JAX starts: what the restore command runs with
    import jax
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    config = get_config(args.size)
    stamp = host.stamp()  # now: the code being measured
    print(f"{stamp}; {host.load()}; jax {jax.__version__}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}", flush=True)
    fns, build = {}, {}
    one_step = argparse.Namespace(**{**vars(args), "steps": 1})
    runs = [(side, args) for side in sides] + ([(f"{side}@1", one_step) for side in sides] if args.split else [])
    for side, run_args in runs:
        t0 = time.perf_counter()
        kind = side.split("@")[0]
        if kind.startswith("theirs"):
            fns[side] = theirs(config, run_args, "aware" if kind == "theirs_aware" else "vae")
        else:
            fns[side] = ours(config, run_args, kind == "ours_exact")
        fns[side]()  # warm-up: compiles ours
        build[side] = time.perf_counter() - t0
        print(f"{side}: built and warmed up in {build[side]:.0f} s", flush=True)
    times = {s: [] for s in fns}
    for _ in range(args.reps):
        for s in fns:
            t = time.perf_counter()
            fns[s]()
            times[s].append(time.perf_counter() - t)
    result = {"date": time.strftime("%Y-%m-%d"), "machine": stamp, "load_after": host.load(),
              "threads": args.threads or os.cpu_count(),
              "size": args.size, "image": args.image, "batch": args.batch, "steps": args.steps,
              "reps": args.reps, "median_s": {s: statistics.median(v) for s, v in times.items()},
              "all_s": times, "warmup_s": build}
    ips = {s: args.batch / result["median_s"][s] for s in sides}
    result["images_per_s"] = ips
    print(json.dumps(result), flush=True)
    print(f"{args.size}, {args.image}^2, batch {args.batch}, {args.steps} DDIM steps, {result['threads']} "
          f"thread(s), median of {args.reps} interleaved: " + ", ".join(f"{s} {ips[s]:.3f} images/s" for s in sides))
    for ref in ("theirs", "theirs_aware"):
        for s in sides:
            if ref in ips and s.startswith("ours"):
                print(f"  {s} / {ref}: {ips[s] / ips[ref]:.2f}x images/s")
    if args.split and args.steps > 1:
        med = result["median_s"]
        for s in sides:
            step = (med[s] - med[f"{s}@1"]) / (args.steps - 1)
            print(f"  {s}: one DDIM step {step * 1e3:.1f} ms, once per batch {(med[f'{s}@1'] - step) * 1e3:.1f} ms")
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
