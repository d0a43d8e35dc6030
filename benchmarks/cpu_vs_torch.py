"""Ours (JAX, jitted) vs the PyTorch references (diffusers / transformers) on this machine's CPU.

    python benchmarks/cpu_vs_torch.py --size tiny,sd15 --latent 32 --reps 7 [--parts unet,control_unet,...]

Same config, same weights (the PyTorch model is saved with `save_pretrained` and loaded through our
converters), same inputs, float32, batch 1. Runs are interleaved (ours, theirs, ours, theirs, ...) so
that the load of a shared machine hits both alike; we report medians and ours/theirs.
Parts:
  unet          UNet forward (context: 256 tokens of the cross-attention width, like P_S)
  control_unet  control module (a ControlNet, FiLM off) + UNet with its residuals
  vae_decode    VAE decoder, latent -> image
  clip          CLIP vision tower forward (224 px for ViT-L/14)
  train         one stage-1 train step (paired LQ given, so no degradation): ours = train/stage1's
                step (VAE encode, CLIP, prompts, control + UNet, loss, grads, AdamW, EMA); theirs =
                the same graph in PyTorch (no_grad for the frozen parts, a torch AdamW step on the
                prompt MLPs + ControlNet, grad clipping, EMA). Not run for sd15 unless --train_sd15
                (the two models' train states together need more than a 24 GiB host has: there,
                time one side per process with --side ours, then --side theirs; sequential, not
                interleaved, so compare them only on an otherwise idle machine).
Ours: warmed up (compiled before timing), `block_until_ready`. Theirs: `torch.no_grad()`, eval().
Short calls are timed in blocks of back-to-back calls of >= 50 ms (`interleaved`; --no_blocks times
each alone). --threads N pins both sides to N CPUs (on a host loaded by other jobs, use 1).
--flops adds each part's model FLOPs (PyTorch's FlopCounterMode on the reference: matmuls,
convolutions, attention; the same count for both sides), the rate each side reaches, and that rate
against a large float32 GEMM's on this host (the most a matmul-bound part can reach here).
"""
import argparse
import math
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import host  # noqa: E402

# Our attention implementation: 'auto' (what users get: on CPU the blocked flash-style path where one
# head's scores outgrow the cache, XLA's below) or 'xla' (the reference everywhere); --attention sets it.
ATTENTION = "auto"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTS = ("unet", "control_unet", "vae_decode", "clip", "train")


# Short calls are timed in blocks of back-to-back calls lasting at least this long.
BLOCK_S = 0.05


def interleaved(fns, reps: int, blocks: bool = True):
    """fns: {name: callable}; each is called twice to warm up, then reps times in turn. Medians (s).

    With `blocks`, a side whose call is short is timed as a block of back-to-back calls lasting at
    least BLOCK_S (the time per call: the block's over its count), so the figure is the steady cost
    of a call in a loop. A single short JAX call right after a PyTorch one pays the hand-over between
    the libraries' threads (JAX runs a computation on its own worker threads, PyTorch on the calling
    one; on the loaded 2-core host that cost 2-5 ms, in either direction), which is no measure of
    either's kernels: it was the whole difference for the tiny CLIP (0.6 ms of work).
    """
    calls = {}
    for k, f in fns.items():
        f()  # compiles ours
        t = time.perf_counter()
        f()
        calls[k] = max(1, math.ceil(BLOCK_S / max(time.perf_counter() - t, 1e-6))) if blocks else 1
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t = time.perf_counter()
            for _ in range(calls[k]):
                f()
            times[k].append((time.perf_counter() - t) / calls[k])
    return {k: statistics.median(v) for k, v in times.items()}


def model_flops(fn) -> int:
    """FLOPs of one call of a PyTorch callable as torch.utils.flop_counter counts them (matmuls,
    convolutions, attention; elementwise work is not counted)."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def gemm_rates(n: int = 2048, reps: int = 7) -> dict:
    """GFLOP/s of an n x n x n float32 matmul on this host, {'ours': XLA's, 'theirs': PyTorch's}:
    what a part made only of large matmuls could reach."""
    import jax
    import jax.numpy as jnp
    import torch
    a = np.random.default_rng(0).standard_normal((n, n), np.float32)
    x, y = jnp.asarray(a), jnp.asarray(a.T.copy())
    dot = jax.jit(jnp.dot)
    ta, tb = torch.from_numpy(a), torch.from_numpy(a.T.copy())
    med = interleaved({"ours": lambda: dot(x, y).block_until_ready(), "theirs": lambda: ta @ tb}, reps)
    return {k: 2 * n ** 3 / t / 1e9 for k, t in med.items()}


def get_config(size: str):
    from diffrestorer_jax.config_base import load_config_file
    c = load_config_file(os.path.join(REPO, "configs", f"{'tiny' if size == 'tiny' else 'sd15'}.py:stage1"))
    c.model.dtype = "float32"
    c.model.remat_policy = "none"
    c.model.attention_impl = ATTENTION
    return c


class Bench:
    """Reference models built from the config, saved, and loaded through our converters."""

    def __init__(self, size: str, latent: int, tmp: str):
        import torch
        torch.manual_seed(0)
        self.size, self.latent, self.tmp = size, latent, tmp
        self.config = get_config(size)
        m = self.config.model
        self.unet_cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(m.unet).items()}
        self.vae_cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(m.vae).items()}
        self.clip_cfg = dict(m.clip)
        self.factor = 2 ** (len(self.vae_cfg["block_out_channels"]) - 1)
        rng = np.random.default_rng(0)
        ctx_dim = self.unet_cfg["cross_attention_dim"]
        ntok = (self.clip_cfg["image_size"] // self.clip_cfg["patch_size"]) ** 2
        self.z = rng.standard_normal((1, latent, latent, 4)).astype(np.float32)
        self.t = np.array([500], np.int32)
        self.ctx = rng.standard_normal((1, ntok, ctx_dim)).astype(np.float32)
        px = latent * self.factor
        self.lq = rng.random((1, px, px, 3)).astype(np.float32)
        self.hq = rng.random((1, px, px, 3)).astype(np.float32)
        s = self.clip_cfg["image_size"]
        self.clip_px = rng.standard_normal((1, s, s, 3)).astype(np.float32)

    @staticmethod
    def nchw(a):
        import torch
        return torch.from_numpy(np.ascontiguousarray(np.transpose(a, (0, 3, 1, 2))))

    def _save(self, model, name):
        folder = os.path.join(self.tmp, f"{self.size}_{name}")
        model.save_pretrained(folder, safe_serialization=True)
        return folder

    # ---------------------------------------------------------------- networks
    def unet(self):
        import diffusers
        if not hasattr(self, "_unet"):
            ref = diffusers.UNet2DConditionModel(**self.unet_cfg).eval()
            from diffrestorer_jax.convert import load_unet
            mod, params = load_unet(self._save(ref, "unet"), attention_impl=ATTENTION)
            self._unet = (ref, mod, params)
        return self._unet

    def control(self):
        import diffusers
        if not hasattr(self, "_control"):
            ref_unet = self.unet()[0]
            ref = diffusers.ControlNetModel.from_unet(
                ref_unet, conditioning_embedding_out_channels=tuple(
                    self.config.model.control["conditioning_channels"])).eval()
            from diffrestorer_jax.convert import load_control
            mod, params = load_control(self._save(ref, "control"), attention_impl=ATTENTION)
            self._control = (ref, mod, params)
        return self._control

    def vae(self):
        import diffusers
        if not hasattr(self, "_vae"):
            ref = diffusers.AutoencoderKL(**self.vae_cfg).eval()
            from diffrestorer_jax.convert import load_vae
            mod, params = load_vae(self._save(ref, "vae"))
            self._vae = (ref, mod, params)
        return self._vae

    def clip(self):
        import transformers
        if not hasattr(self, "_clip"):
            c = self.clip_cfg
            cfg = transformers.CLIPVisionConfig(
                hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
                num_hidden_layers=c["num_hidden_layers"], num_attention_heads=c["num_attention_heads"],
                image_size=c["image_size"], patch_size=c["patch_size"], hidden_act=c["hidden_act"],
                layer_norm_eps=c["layer_norm_eps"], projection_dim=c.get("projection_dim", 512),
                attn_implementation="sdpa")
            ref = transformers.CLIPVisionModel(cfg).eval()
            from diffrestorer_jax.convert import load_clip_vision
            mod, params = load_clip_vision(self._save(ref, "clip"), attention_impl=ATTENTION)
            self._clip = (ref, mod, params)
        return self._clip

    # ---------------------------------------------------------------- parts: (ours, theirs)
    def part_unet(self):
        import jax
        import torch
        ref, mod, params = self.unet()
        f = jax.jit(mod.apply)
        args = tuple(map(jax.numpy.asarray, (self.z, self.t, self.ctx)))
        z, t, ctx = self.nchw(self.z), torch.from_numpy(self.t), torch.from_numpy(self.ctx)

        def ours():
            jax.block_until_ready(f({"params": params}, *args))

        def theirs():
            with torch.no_grad():
                ref(z, t, ctx, return_dict=False)
        return ours, theirs

    def part_control_unet(self):
        import jax
        import torch
        uref, umod, uparams = self.unet()
        cref, cmod, cparams = self.control()

        @jax.jit
        def f(up, cp, z, t, ctx, lq):
            down, mid = cmod.apply({"params": cp}, z, t, ctx, lq)
            return umod.apply({"params": up}, z, t, ctx, down_block_additional_residuals=down,
                              mid_block_additional_residual=mid)
        args = tuple(map(jax.numpy.asarray, (self.z, self.t, self.ctx, self.lq)))
        z, t, ctx = self.nchw(self.z), torch.from_numpy(self.t), torch.from_numpy(self.ctx)
        lq = self.nchw(self.lq)

        def ours():
            jax.block_until_ready(f(uparams, cparams, *args))

        def theirs():
            with torch.no_grad():
                down, mid = cref(z, t, ctx, controlnet_cond=lq, return_dict=False)
                uref(z, t, ctx, down_block_additional_residuals=down,
                     mid_block_additional_residual=mid, return_dict=False)
        return ours, theirs

    def part_vae_decode(self):
        import jax
        import torch
        ref, mod, params = self.vae()
        f = jax.jit(lambda p, z: mod.apply({"params": p}, z, method="decode"))
        zj = jax.numpy.asarray(self.z)
        z = self.nchw(self.z)

        def ours():
            jax.block_until_ready(f(params, zj))

        def theirs():
            with torch.no_grad():
                ref.decode(z, return_dict=False)
        return ours, theirs

    def part_clip(self):
        import jax
        import torch
        ref, mod, params = self.clip()
        f = jax.jit(lambda p, x: mod.apply({"params": p}, x)[0])
        xj = jax.numpy.asarray(self.clip_px)
        x = self.nchw(self.clip_px)

        def ours():
            jax.block_until_ready(f(params, xj))

        def theirs():
            with torch.no_grad():
                ref(pixel_values=x, output_hidden_states=True)
        return ours, theirs

    def part_train(self):
        return TrainPair(self).pair()


class TrainPair:
    """One stage-1 step, ours (train.run.Run's compiled step) and the same graph in PyTorch."""

    def __init__(self, b: Bench):
        self.b = b

    def ours(self):
        import jax
        from diffrestorer_jax.data.sources import global_batch
        from diffrestorer_jax.train.run import Run
        c = self.b.config.copy_and_resolve_references()
        c.train.batch_size = self.b.hq.shape[0]
        c.image_size = self.b.latent * self.b.factor
        c.model.control = dict(c.model.control, use_film=False)
        run = Run(c)
        state, frozen = run.init()
        n = self.b.hq.shape[0]
        batch = {"hq": self.b.hq, "lq": self.b.lq, "index": np.arange(n, dtype=np.int32),
                 "type_id": np.zeros((n,), np.int32)}
        compiled = run.compile(batch)
        gb = global_batch(batch, run.batch_shardings)
        holder = [state]

        def step():
            holder[0], metrics = compiled(holder[0], frozen, gb)
            jax.block_until_ready(metrics["loss"])
        return step

    def theirs(self, device: str = "cpu", autocast: bool = False):
        """The PyTorch step on `device`; `autocast`: bfloat16 compute, float32 masters (GPU)."""
        import torch
        b = self.b
        with torch.device(device):  # random init straight on the device (SD 1.5's CPU init is slow)
            return self._theirs(b, device, autocast)

    def _theirs(self, b, device, autocast):
        import diffusers
        import torch
        import transformers
        unet = diffusers.UNet2DConditionModel(**b.unet_cfg).requires_grad_(False)
        control = diffusers.ControlNetModel.from_unet(
            unet, conditioning_embedding_out_channels=tuple(b.config.model.control["conditioning_channels"]))
        vae = diffusers.AutoencoderKL(**b.vae_cfg).requires_grad_(False)
        c = b.clip_cfg
        clip = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
            hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
            num_hidden_layers=c["num_hidden_layers"], num_attention_heads=c["num_attention_heads"],
            image_size=c["image_size"], patch_size=c["patch_size"], hidden_act=c["hidden_act"],
            attn_implementation="sdpa")).requires_grad_(False)
        p = b.config.model.prompt
        d, h, ctx = c["hidden_size"], p["hidden_dim"], b.unet_cfg["cross_attention_dim"]
        nn = torch.nn

        def mlp(widths, din):
            layers = []
            for i, w in enumerate(widths):
                layers.append(nn.Linear(din, w))
                din = w
                if i < len(widths) - 1:
                    layers += [nn.LayerNorm(w), nn.LeakyReLU(0.01)]
            return nn.Sequential(*layers)
        sem, deg = mlp((h, h, ctx), d), mlp((h, ctx), d)
        cls = mlp((p["classifier_hidden_dim"], 8), ctx)
        for mod in (unet, control, vae, clip, sem, deg, cls):
            mod.to(device)
        trained = [*sem.parameters(), *deg.parameters(), *cls.parameters(), *control.parameters()]
        ema = [q.detach().clone() for q in trained]
        opt = torch.optim.AdamW(trained, lr=1e-5, weight_decay=1e-2, foreach=True)
        alphas = torch.linspace(0.9999, 0.005, 1000, device=device)
        hq, lq = (b.nchw(b.hq) * 2 - 1).to(device), b.nchw(b.lq).to(device)
        n = hq.shape[0]
        mean = torch.tensor([0.48145466, 0.4578275, 0.40821073], device=device).view(1, 3, 1, 1)
        std = torch.tensor([0.26862954, 0.26130258, 0.27577711], device=device).view(1, 3, 1, 1)
        label = torch.zeros(n, dtype=torch.long, device=device)

        def step():
            with torch.autocast(device.split(":")[0], torch.bfloat16, enabled=autocast):
                loss = forward()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trained, 1.0)
            opt.step()
            with torch.no_grad():
                torch._foreach_lerp_(ema, [q.detach() for q in trained], 1 - 0.9999)
            loss.item()

        def forward():
            with torch.no_grad():
                dist = vae.encode(hq).latent_dist
                z0 = dist.sample() * b.vae_cfg["scaling_factor"]
                px = torch.nn.functional.interpolate(lq, size=(c["image_size"],) * 2, mode="bicubic",
                                                     antialias=True)
                tokens = clip(pixel_values=(px - mean) / std).last_hidden_state[:, 1:]
                t = torch.randint(0, 1000, (n,), device=device)
                noise = torch.randn_like(z0)
                a = alphas[t].view(-1, 1, 1, 1)
                zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
            p_s, p_d = sem(tokens), deg(tokens)
            logits = cls(p_d.mean(1))
            down, mid = control(zt, t, p_d, controlnet_cond=lq, return_dict=False)
            out = unet(zt, t, p_s, down_block_additional_residuals=down,
                       mid_block_additional_residual=mid, return_dict=False)[0]
            return (torch.nn.functional.mse_loss(out.float(), noise)
                    + 0.1 * torch.nn.functional.cross_entropy(logits.float(), label))
        return step

    def pair(self):
        return self.ours(), self.theirs()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="tiny,sd15")
    ap.add_argument("--latent", type=int, default=32)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--parts", default=",".join(PARTS))
    ap.add_argument("--train_sd15", action="store_true")
    ap.add_argument("--attention", default="auto", help="our attention implementation: auto | xla")
    ap.add_argument("--side", default="both", choices=("both", "ours", "theirs"),
                    help="train part only: time one side in this process (when both do not fit in memory)")
    ap.add_argument("--threads", type=int, help="pin to the first N CPUs, PyTorch N threads (host.pin)")
    ap.add_argument("--flops", action="store_true", help="also model FLOPs per part, the rate each side "
                    "reaches and its share of a large GEMM's rate on this host")
    ap.add_argument("--no_blocks", action="store_true", help="time every call alone, short ones too (see "
                    "interleaved: the hand-over between the libraries' threads is then included)")
    args = ap.parse_args()
    host.pin(args.threads)
    global ATTENTION
    ATTENTION = args.attention
    import jax
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)

    from diffrestorer_jax import xla_cpu
    xla_cpu.set_cpu_defaults()  # the XLA CPU setting the commands run with (xla_cpu.py)
    print(f"{host.stamp()}; {host.load()}; attention {ATTENTION}; torch threads {torch.get_num_threads()}; jax {jax.__version__} "
          f"({jax.devices()[0].platform}); torch {torch.__version__}; "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}", flush=True)
    rows = []
    gemm = gemm_rates() if args.flops else None
    if gemm:
        print(f"2048^3 float32 GEMM: ours {gemm['ours']:.0f} GFLOP/s, PyTorch {gemm['theirs']:.0f} GFLOP/s",
              flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.size.split(","):
            b = Bench(size, args.latent, tmp)
            for part in args.parts.split(","):
                if part == "train" and size != "tiny" and not args.train_sd15:
                    continue
                t0 = time.time()
                if args.side == "both":
                    ours, theirs = getattr(b, f"part_{part}")()
                    fns = {"ours": ours, "theirs": theirs}
                elif part == "train":
                    fns = {args.side: getattr(TrainPair(b), args.side)()}
                else:
                    ap.error("--side ours/theirs applies to the train part only")
                med = interleaved(fns, args.reps, blocks=not args.no_blocks)
                ms = {k: med[k] * 1e3 if k in med else float("nan") for k in ("ours", "theirs")}
                row = (size, part, ms["ours"], ms["theirs"], ms["ours"] / ms["theirs"])
                rows.append(row)
                print(f"| {size} | {part} | {row[2]:.1f} | {row[3]:.1f} | {row[4]:.2f}x | "
                      f"({time.time() - t0:.0f} s incl. build/compile)", flush=True)
                if gemm and part != "train" and "theirs" in fns:
                    flops = model_flops(fns["theirs"])
                    rate = {k: flops / (ms[k] / 1e3) / 1e9 for k in ("ours", "theirs")}
                    print(f"|   {size} {part}: {flops / 1e9:.2f} GFLOP; ours {rate['ours']:.0f} GFLOP/s "
                          f"({rate['ours'] / gemm['ours']:.0%} of its GEMM rate), PyTorch {rate['theirs']:.0f} "
                          f"GFLOP/s ({rate['theirs'] / gemm['theirs']:.0%})", flush=True)
    how = "interleaved runs" if args.side == "both" else f"runs of {args.side} alone (--side)"
    print(f"\n{args.latent}x{args.latent} latent, batch 1, float32, median of {args.reps} {how}; "
          f"{host.stamp()}; {host.load()} at the end")
    print("| config | part | ours ms | PyTorch ms | ours / PyTorch |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]:.1f} | {r[3]:.1f} | {r[4]:.2f}x |")


if __name__ == "__main__":
    main()
