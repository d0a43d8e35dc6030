"""Ours vs diffusers PyTorch on one GPU: stage-1 train step and restore, plus the cuDNN attention check.

    python benchmarks/gpu_bench.py [--batch 16] [--restore_batch 8] [--steps 50] [--smoke]
    python benchmarks/gpu_bench.py --part train_ours --results r.jsonl   # one part (gpu.sh does this)
    python benchmarks/gpu_bench.py --summary r.jsonl                     # the RESULTS.md row

1. Attention: our `dot_product_attention(implementation='cudnn')` vs 'xla' (the reference) on the
   SD 1.5 shapes (64x64 self-attention, 77/256-token cross-attention), bfloat16; max abs error.
2. Stage-1 train step at 512^2, bfloat16 compute (float32 masters), paired LQ given (no on-device
   degradation, so both sides do the same work): ours = train/stage1's compiled step; theirs = the same
   graph in PyTorch (benchmarks/cpu_vs_torch.TrainPair) under torch.autocast(bfloat16).
   images/s, and MFU = model FLOPs (XLA's HLO count of the step without remat, see tools/aot.py)
   / time / the card's peak dense bf16 FLOP/s.
3. Restore at 512^2 with `--steps` DDIM steps: ours = the restore CLI's own program
   (`Restorer.restore_batch`, its defaults on a GPU: batched rows, bfloat16 weights and compute,
   host -> device -> host included); theirs = CLIP + the prompt MLPs + a diffusers DDIM loop over
   ControlNet + UNet + the VAE decoder (the plain VAE decoder: our degradation-aware decoder has extra
   RDB fusion, so ours does slightly more work), bfloat16. images/s.
Weights are random (timing does not depend on them); ours are drawn on the host by default
(`--init host`: a jitted random init takes minutes to compile at SD 1.5 size). benchmarks/gpu.sh runs each side of each
figure in its own process (`--part`), so neither framework's memory pool squeezes the other, and a
part that fails or runs out of time leaves the others' numbers; `--summary` puts them side by side.
`--smoke` runs all of it on CPU at the tiny config with 2 sampler steps and 1 timed repetition, to
check the script, not to measure.
"""
import argparse
import json
import os
import tempfile
import sys
import time
from typing import Optional

import numpy as np

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "cpu": float("nan")}


def peak_flops(name: str) -> float:
    return next((v for k, v in PEAK_BF16.items() if k.lower() in name.lower()), float("nan"))


def timed(fn, reps: int) -> float:
    fn()
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


PARTS = ("flops", "attention", "train_ours", "train_torch", "restore_ours", "restore_torch")


def record(args, **values):
    """Print one part's figures and append them to --results (JSON lines) for --summary."""
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()),
          flush=True)
    if args.results:
        with open(args.results, "a") as f:
            f.write(json.dumps(values) + "\n")


def device_name(framework: str) -> str:
    """The card's name as `framework` ('jax' or 'torch') sees it; 'cpu' where it sees no GPU."""
    if framework == "jax":
        import jax
        d = jax.devices()[0]
        return d.device_kind if d.platform == "gpu" else "cpu"
    import torch
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def check_attention(args):
    import jax
    import jax.numpy as jnp
    from diffrestorer_jax.models.attention import dot_product_attention
    if jax.devices()[0].platform != "gpu":
        print("attention: no GPU, cuDNN check skipped")
        return
    key = jax.random.PRNGKey(0)
    for name, (b, lq, lk, h, d) in {"self 64x64": (2, 4096, 4096, 8, 40),
                                    "cross 256 tok": (2, 4096, 256, 8, 40),
                                    "self 32x32": (2, 1024, 1024, 8, 80)}.items():
        kq, kk, kv = jax.random.split(jax.random.fold_in(key, lq + lk), 3)
        q = jax.random.normal(kq, (b, lq, h, d), jnp.bfloat16)
        k = jax.random.normal(kk, (b, lk, h, d), jnp.bfloat16)
        v = jax.random.normal(kv, (b, lk, h, d), jnp.bfloat16)
        ref = jax.jit(lambda q, k, v: dot_product_attention(q.astype(jnp.float32), k.astype(jnp.float32),
                                                            v.astype(jnp.float32), implementation="xla"))
        cud = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, implementation="cudnn"))
        xla = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, implementation="xla"))
        err = float(jnp.max(jnp.abs(cud(q, k, v).astype(jnp.float32) - ref(q, k, v))))
        t_x = timed(lambda: jax.block_until_ready(xla(q, k, v)), 5)
        t_c = timed(lambda: jax.block_until_ready(cud(q, k, v)), 5)
        record(args, part="attention", shape=name, max_abs_err=err, ok=bool(err < 2e-2),
               cudnn_ms=t_c * 1e3, xla_bf16_ms=t_x * 1e3)


def config_for(smoke: bool, batch: int):
    from diffrestorer_jax.config_base import load_config_file
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    c = load_config_file(os.path.join(repo, "configs", f"{'tiny' if smoke else 'sd15'}.py:stage1"))
    c.model.dtype = "float32" if smoke else "bfloat16"
    c.model.control = dict(c.model.control, use_film=False)
    c.train.batch_size = batch
    return c


def train_batch(args, c):
    rng = np.random.default_rng(0)
    s = int(c.image_size)
    return {"hq": rng.random((args.batch, s, s, 3), np.float32),
            "lq": rng.random((args.batch, s, s, 3), np.float32),
            "index": np.arange(args.batch, dtype=np.int32), "type_id": np.zeros(args.batch, np.int32)}


def count_train_flops(args):
    """Model FLOPs of one train step: XLA's count of the step lowered for the CPU, without remat
    recompute. Minutes of host time at SD 1.5 size, so gpu.sh runs it beside the GPU parts, and the
    train parts' MFU is worked out from it in --summary (or at once with --train_flops)."""
    if not args.train_flops:
        from diffrestorer_jax.parallel import aot
        args.train_flops = aot.model_flops_train(config_for(args.smoke, args.batch), paired=True)
    record(args, part="flops", batch=args.batch, train_flops=args.train_flops)


def mfu_now(args, step_s: float, name: str) -> dict:
    """{'mfu': ...} when --train_flops is given, else {} (--summary fills it from the flops part)."""
    return {"mfu": args.train_flops / step_s / peak_flops(name)} if args.train_flops else {}


def fast_threefry_compile():
    """On a GPU, JAX's threefry as one kernel: the random init (one draw per weight kernel, 722 in SD
    1.5's stage 1) otherwise compiles each draw's unrolled rounds on its own (the same bits either
    way; a no-op on other backends)."""
    import jax
    jax.config.update("jax_threefry_gpu_kernel_lowering", True)


def host_weights(abstract, seed: Optional[int]):
    """Timing-only values for an abstract tree: float leaves N(0, 0.02^2) drawn on the host (zeros
    with seed None), other leaves zeros, each placed with its leaf's sharding. Nothing to compile,
    unlike the jitted random init (see fast_threefry_compile)."""
    import jax
    rng = np.random.default_rng(seed)

    def leaf(a):
        if seed is not None and np.issubdtype(a.dtype, np.floating):
            x = (rng.standard_normal(a.shape, np.float32) * 0.02).astype(a.dtype)
        else:
            x = np.zeros(a.shape, a.dtype)
        return jax.device_put(x, getattr(a, "sharding", None))
    return jax.tree.map(leaf, abstract)


def bench_train_ours(args):
    import jax
    fast_threefry_compile()
    from diffrestorer_jax.data.sources import global_batch
    from diffrestorer_jax.train.run import Run
    c = config_for(args.smoke, args.batch)
    batch = train_batch(args, c)
    t0 = time.perf_counter()
    run = Run(c)
    if args.init == "host":  # optimizer moments, step and key zero; weights random
        st = run.plan.state_target
        state = host_weights(st.replace(params=None, ema=None), None).replace(  # None: no leaves
            params=host_weights(st.params, 0), ema=host_weights(st.ema, 0))
        frozen = host_weights(run.plan.frozen_target, 1)
    else:
        state, frozen = run.init()
    jax.block_until_ready((state, frozen))
    print(f"train_ours: initialised in {time.perf_counter() - t0:.0f}s", flush=True)
    compiled = run.compile(batch)
    compile_s = time.perf_counter() - t0
    print(f"train_ours: compiled at {compile_s:.0f}s", flush=True)
    gb = global_batch(batch, run.batch_shardings)
    holder = [state, None]
    del state

    def ours():
        holder[0], holder[1] = compiled(holder[0], frozen, gb)
        jax.block_until_ready(holder[1]["loss"])
    t = timed(ours, args.reps)
    name = device_name("jax")
    # loss and skipped: the steps did real updates (a non-finite loss would skip them)
    record(args, part="train_ours", device=name, batch=args.batch, step_ms=t * 1e3,
           images_per_s=args.batch / t, init_and_compile_s=compile_s, loss=float(holder[1]["loss"]),
           skipped=int(holder[1]["skipped"]), **mfu_now(args, t, name))


def bench_train_torch(args):
    import torch
    from benchmarks.cpu_vs_torch import Bench, TrainPair
    c = config_for(args.smoke, args.batch)
    batch = train_batch(args, c)
    b = Bench("tiny" if args.smoke else "sd15", int(c.image_size) // (4 if args.smoke else 8), "/tmp")
    b.config = c
    b.hq, b.lq = batch["hq"], batch["lq"]
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    step = TrainPair(b).theirs(device=dev, autocast=not args.smoke)

    def theirs():
        step()
        if dev == "cuda":
            torch.cuda.synchronize()
    t = timed(theirs, args.reps)
    name = device_name("torch")
    record(args, part="train_torch", device=name, batch=args.batch, step_ms=t * 1e3,
           images_per_s=args.batch / t, **mfu_now(args, t, name))


def bench_restore_ours(args):
    import jax
    from diffrestorer_jax.infer.restorer import Options, Restorer
    from diffrestorer_jax.models import diffrestorer as dr
    from diffrestorer_jax.parallel import sharding
    fast_threefry_compile()
    c = config_for(args.smoke, args.restore_batch)
    nets = dr.build_networks(c.model)
    s = int(c.image_size)
    t0 = time.perf_counter()
    init = lambda k: dr.init_params(nets, k, s)  # noqa: E731
    if args.init == "host":
        params = host_weights(sharding.unbox(jax.eval_shape(init, jax.random.PRNGKey(0))), 0)
    else:
        params = sharding.unbox(jax.jit(init)(jax.random.PRNGKey(0)))
    jax.block_until_ready(params)
    # The CLI's defaults on this device (dtype, weights placement, batched), one device.
    restorer = Restorer(c, nets, params, Options(steps=args.steps, sampler="ddim", batch_size=args.restore_batch,
                                                 num_devices=1, color_fix="none", tile=0))
    print(f"restore_ours: initialised in {time.perf_counter() - t0:.0f}s; {restorer.placement_note()}", flush=True)
    lq = np.random.default_rng(1).random((args.restore_batch, s, s, 3), np.float32)
    ids = np.arange(args.restore_batch)

    def ours():
        restorer.restore_batch(lq, ids)
    t = timed(ours, max(1, args.reps // 3))
    record(args, part="restore_ours", device=device_name("jax"), batch=args.restore_batch, steps=args.steps,
           batch_s=t, images_per_s=args.restore_batch / t, dtype=restorer.dtype, weights=restorer.weights,
           compile_s=restorer.clock.seconds)


def bench_restore_torch(args):
    import torch
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import torch_restore
    c = config_for(args.smoke, args.restore_batch)
    s = int(c.image_size)
    lq_nhwc = np.random.default_rng(1).random((args.restore_batch, s, s, 3), np.float32)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dt = torch.float32 if args.smoke else torch.bfloat16
    # encode_lq=False: as the H100 row of 2026-11-27 was measured (the LQ's VAE encode is < 1% of it).
    reference = torch_restore.build(c.model, dev, dt, encode_lq=False)
    lq = torch_restore.nchw(lq_nhwc, dev, dt)

    def run():
        return reference(lq, args.steps)
    t = timed(run, max(1, args.reps // 3))
    record(args, part="restore_torch", device=device_name("torch"), batch=args.restore_batch, steps=args.steps,
           batch_s=t, images_per_s=args.restore_batch / t)


def summary(path: str):
    """Side by side from a --results file; the last line is the RESULTS.md row."""
    rows = [json.loads(line) for line in open(path) if line.strip()]
    by = {r["part"]: r for r in rows}
    for part in ("train_ours", "train_torch"):  # MFU from the flops part where the run had none
        r, f = by.get(part), by.get("flops")
        if r and "mfu" not in r and f and f["batch"] == r["batch"]:
            r["mfu"] = f["train_flops"] / (r["step_ms"] / 1e3) / peak_flops(r["device"])
    att = [r for r in rows if r["part"] == "attention"]

    def fig(part, key, fmt):
        return fmt.format(by[part][key]) if key in by.get(part, {}) else "—"
    for what, key, fmt in (("train", "images_per_s", "{:.2f}"), ("train", "mfu", "{:.1%}"),
                           ("restore", "images_per_s", "{:.2f}")):
        o, t = by.get(f"{what}_ours", {}), by.get(f"{what}_torch", {})
        ratio = f"; ours/PyTorch {o[key] / t[key]:.2f}x" if key in o and key in t else ""
        print(f"{what} {key}: ours {fig(what + '_ours', key, fmt)}, PyTorch {fig(what + '_torch', key, fmt)}{ratio}")
    err = max((r["max_abs_err"] for r in att), default=float("nan"))
    card = next((r["device"] for r in rows if "device" in r), "?")
    print(f"| {time.strftime('%Y-%m-%d')} | {card} | {fig('train_ours', 'images_per_s', '{:.2f}')} / "
          f"{fig('train_torch', 'images_per_s', '{:.2f}')} | {fig('train_ours', 'mfu', '{:.1%}')} / "
          f"{fig('train_torch', 'mfu', '{:.1%}')} | {fig('restore_ours', 'images_per_s', '{:.2f}')} / "
          f"{fig('restore_torch', 'images_per_s', '{:.2f}')} | {err:.3g} ({len(att)} shapes) |")


RUNNERS = {"flops": count_train_flops, "attention": check_attention, "train_ours": bench_train_ours,
           "train_torch": bench_train_torch, "restore_ours": bench_restore_ours,
           "restore_torch": bench_restore_torch}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--restore_batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--part", choices=PARTS, action="append",
                    help="run only this part (repeatable); default: all, in this process")
    ap.add_argument("--skip", default="", help="comma list of parts to skip")
    ap.add_argument("--results", default="", help="append each part's figures here (JSON lines)")
    ap.add_argument("--summary", default="", help="print the side-by-side table of a --results file and exit")
    ap.add_argument("--init", choices=("host", "jit"), default="host",
                    help="our weights: 'host' random arrays put on the device (nothing to compile), "
                         "'jit' the real jitted random init (slow to compile at SD 1.5 size)")
    ap.add_argument("--train_flops", type=float, default=0.0,
                    help="model FLOPs of one train step, if already known: MFU at once, no flops part")
    args = ap.parse_args()
    if args.summary:
        summary(args.summary)
        return
    if args.smoke:
        args.batch, args.restore_batch, args.steps, args.reps = 2, 2, 2, 1
    skip = set(filter(None, args.skip.split(",")))
    if not args.results:  # all parts in this process: keep the figures for the summary at the end
        args.results = os.path.join(tempfile.mkdtemp(prefix="gpu_bench_"), "results.jsonl")
    for part in args.part or PARTS:
        if part not in skip:
            RUNNERS[part](args)
    if not args.part:
        summary(args.results)


if __name__ == "__main__":
    main()
