"""Ours vs diffusers PyTorch on one GPU: stage-1 train step and restore, plus the cuDNN attention check.

    python benchmarks/gpu_bench.py [--batch 16] [--restore_batch 8] [--steps 50] [--smoke]

1. Attention: our `dot_product_attention(implementation='cudnn')` vs 'xla' (the reference) on the
   SD 1.5 shapes (64x64 self-attention, 77/256-token cross-attention), bfloat16; max abs error.
2. Stage-1 train step at 512^2, bfloat16 compute (float32 masters), paired LQ given (no on-device
   degradation, so both sides do the same work): ours = train/stage1's compiled step; theirs = the same
   graph in PyTorch (benchmarks/cpu_vs_torch.TrainPair) under torch.autocast(bfloat16).
   images/s, and MFU = model FLOPs (XLA's HLO count of the step without remat, see parallel/aot.py)
   / time / the card's peak dense bf16 FLOP/s.
3. Restore at 512^2 with `--steps` DDIM steps: ours = infer/pipeline.restore; theirs = CLIP + the
   prompt MLPs + a diffusers DDIM loop over ControlNet + UNet + the VAE decoder (the plain VAE decoder:
   our degradation-aware decoder has extra RDB fusion, so ours does slightly more work). images/s.
Weights are random (timing does not depend on them). `--smoke` runs all of it on CPU at the tiny
config with 2 sampler steps and 1 timed repetition, to check the script, not to measure.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

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


def check_attention(smoke: bool):
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
        err = float(jnp.max(jnp.abs(cud(q, k, v).astype(jnp.float32) - ref(q, k, v))))
        t_x = timed(lambda: jax.block_until_ready(
            jax.jit(lambda q, k, v: dot_product_attention(q, k, v, implementation="xla"))(q, k, v)), 5)
        t_c = timed(lambda: jax.block_until_ready(cud(q, k, v)), 5)
        print(f"attention {name}: cuDNN vs float32 XLA max abs err {err:.3g} "
              f"({'OK' if err < 2e-2 else 'TOO LARGE'}); cuDNN {t_c * 1e3:.2f} ms, XLA bf16 {t_x * 1e3:.2f} ms",
              flush=True)


def config_for(smoke: bool, batch: int):
    if smoke:
        from configs.tiny import get_config
    else:
        from configs.sd15 import get_config
    c = get_config("stage1")
    c.model.dtype = "float32" if smoke else "bfloat16"
    c.model.control = dict(c.model.control, use_film=False)
    c.train.batch_size = batch
    return c


def _ours_train(args, c, batch):
    """(median step seconds, model FLOPs); everything on the device is freed on return."""
    import jax
    from diffrestorer_jax.parallel import aot
    from diffrestorer_jax.train.loop import Run, global_batch
    run = Run(c, "/tmp/gpu_bench_run")
    state, frozen = run.init()
    compiled = run.compile(batch)
    gb = global_batch(batch, run.batch_shardings)
    holder = [state]

    def ours():
        holder[0], m = compiled(holder[0], frozen, gb)
        jax.block_until_ready(m["loss"])
    del state
    t_ours = timed(ours, args.reps)
    return t_ours, aot.model_flops_train(c, paired=True)  # global, no remat recompute


def bench_train(args, device_name: str):
    import torch
    from benchmarks.cpu_vs_torch import Bench, TrainPair
    c = config_for(args.smoke, args.batch)
    b = Bench("tiny" if args.smoke else "sd15", int(c.image_size) // (4 if args.smoke else 8), "/tmp")
    b.config = c
    rng = np.random.default_rng(0)
    s = int(c.image_size)
    batch = {"hq": rng.random((args.batch, s, s, 3), np.float32),
             "lq": rng.random((args.batch, s, s, 3), np.float32),
             "index": np.arange(args.batch, dtype=np.int32), "type_id": np.zeros(args.batch, np.int32)}
    t_ours, flops = _ours_train(args, c, batch)
    print(f"train ours: {t_ours * 1e3:.1f} ms/step, {args.batch / t_ours:.2f} images/s, "
          f"{flops / args.batch / 1e12:.3f} TFLOP/image, MFU {flops / t_ours / peak_flops(device_name):.1%}",
          flush=True)

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    b.hq, b.lq = batch["hq"], batch["lq"]
    step = TrainPair(b).theirs(device=dev, autocast=not args.smoke)

    def theirs():
        step()
        if dev == "cuda":
            torch.cuda.synchronize()
    t_th = timed(theirs, args.reps)
    print(f"train PyTorch: {t_th * 1e3:.1f} ms/step, {args.batch / t_th:.2f} images/s, "
          f"MFU {flops / t_th / peak_flops(device_name):.1%}; ours/PyTorch time {t_ours / t_th:.2f}x",
          flush=True)
    return t_ours, t_th


def _ours_restore(args, c, lq_np) -> float:
    import jax
    from diffrestorer_jax.infer.pipeline import RestoreSettings, restore
    from diffrestorer_jax.models import diffrestorer as dr
    from diffrestorer_jax.parallel import sharding
    from diffrestorer_jax.train.loop import make_schedule
    nets = dr.build_networks(c.model)
    s = int(c.image_size)
    params = sharding.unbox(jax.jit(lambda k: dr.init_params(nets, k, s))(jax.random.PRNGKey(0)))
    lq = jax.numpy.asarray(lq_np)
    settings = RestoreSettings(steps=args.steps)
    sched = make_schedule(c)

    def ours():
        jax.block_until_ready(restore(nets, params, lq, jax.random.PRNGKey(0), sched, settings)["image"])
    return timed(ours, max(1, args.reps // 3))


def bench_restore(args):
    c = config_for(args.smoke, args.restore_batch)
    s = int(c.image_size)
    lq = np.random.default_rng(1).random((args.restore_batch, s, s, 3), np.float32)
    t_ours = _ours_restore(args, c, lq)
    print(f"restore ours ({args.steps} steps): {t_ours:.2f} s/batch, {args.restore_batch / t_ours:.2f} images/s",
          flush=True)

    t_th = torch_restore(c, args, lq)
    print(f"restore PyTorch: {t_th:.2f} s/batch, {args.restore_batch / t_th:.2f} images/s; "
          f"ours/PyTorch time {t_ours / t_th:.2f}x", flush=True)
    return t_ours, t_th


def torch_restore(c, args, lq_nhwc) -> float:
    import diffusers
    import torch
    import transformers
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dt = torch.float32 if args.smoke else torch.bfloat16
    m = c.model
    unet_cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(m.unet).items()}
    vae_cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(m.vae).items()}
    unet = diffusers.UNet2DConditionModel(**unet_cfg)
    control = diffusers.ControlNetModel.from_unet(
        unet, conditioning_embedding_out_channels=tuple(m.control["conditioning_channels"]))
    vae = diffusers.AutoencoderKL(**vae_cfg)
    cc = dict(m.clip)
    clip = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=cc["hidden_size"], intermediate_size=cc["intermediate_size"],
        num_hidden_layers=cc["num_hidden_layers"], num_attention_heads=cc["num_attention_heads"],
        image_size=cc["image_size"], patch_size=cc["patch_size"], hidden_act=cc["hidden_act"],
        attn_implementation="sdpa"))
    ctx, hid = unet_cfg["cross_attention_dim"], m.prompt["hidden_dim"]
    nn = torch.nn
    sem = nn.Sequential(nn.Linear(cc["hidden_size"], hid), nn.LayerNorm(hid), nn.LeakyReLU(0.01),
                        nn.Linear(hid, hid), nn.LayerNorm(hid), nn.LeakyReLU(0.01), nn.Linear(hid, ctx))
    deg = nn.Sequential(nn.Linear(cc["hidden_size"], hid), nn.LayerNorm(hid), nn.LeakyReLU(0.01),
                        nn.Linear(hid, ctx))
    mods = [unet, control, vae, clip, sem, deg]
    for mod in mods:
        mod.to(dev, dt).eval()
    sched = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                    clip_sample=False, set_alpha_to_one=False)
    lq = torch.from_numpy(np.ascontiguousarray(lq_nhwc.transpose(0, 3, 1, 2))).to(dev, dt)
    n, f = lq.shape[0], 2 ** (len(vae_cfg["block_out_channels"]) - 1)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073], device=dev, dtype=dt).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711], device=dev, dtype=dt).view(1, 3, 1, 1)

    @torch.no_grad()
    def run():
        px = torch.nn.functional.interpolate(lq, size=(cc["image_size"],) * 2, mode="bicubic", antialias=True)
        tok = clip(pixel_values=(px - mean) / std).last_hidden_state[:, 1:]
        p_s, p_d = sem(tok), deg(tok)
        z = torch.randn(n, 4, lq.shape[2] // f, lq.shape[3] // f, device=dev, dtype=dt)
        sched.set_timesteps(args.steps)
        for t in sched.timesteps:
            down, mid = control(z, t, p_d, controlnet_cond=lq, return_dict=False)
            eps = unet(z, t, p_s, down_block_additional_residuals=down, mid_block_additional_residual=mid,
                       return_dict=False)[0]
            z = sched.step(eps, t, z, return_dict=False)[0]
        img = vae.decode(z / vae_cfg["scaling_factor"], return_dict=False)[0]
        if dev == "cuda":
            torch.cuda.synchronize()
        return img
    return timed(run, max(1, args.reps // 3))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--restore_batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--skip", default="", help="comma list of attention,train,restore to skip")
    args = ap.parse_args()
    if args.smoke:
        args.batch, args.restore_batch, args.steps, args.reps = 2, 2, 2, 1
    import jax
    import torch
    dev = jax.devices()[0]
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    print(f"device: jax {dev.device_kind} ({dev.platform}), torch {name}; jax {jax.__version__}, "
          f"torch {torch.__version__}; peak bf16 {peak_flops(name) / 1e12:.0f} TFLOP/s", flush=True)
    skip = set(filter(None, args.skip.split(",")))
    if "attention" not in skip:
        check_attention(args.smoke)
    if "train" not in skip:
        bench_train(args, name)
    if "restore" not in skip:
        bench_restore(args)


if __name__ == "__main__":
    main()
