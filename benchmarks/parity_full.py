"""Full-size parity with the PyTorch references, and the memory the conversion needs.

    python benchmarks/parity_full.py --models unet_sd15,unet_sd21

For each model: build the reference with random weights (torch.manual_seed), save it as a diffusers
folder (safetensors) in a temp dir, run it on fixed inputs, then in a FRESH process load the folder
through our loader and run the Flax model. Reported: max |ours - ref| / max |ref|, and the peak RSS
of that process while converting against the weights' size on disk (the target: increase < 2x).
The child process keeps the reference model's memory out of the measurement.

One function per model; add a section by adding a function to `MODELS` (and, if its loader is new, a
child runner to `CHILD_RUNNERS`).
"""
import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

GiB = 1024 ** 3


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)
               if f.endswith((".safetensors", ".bin")))


# ---------------------------------------------------------------- child side (our code only)
def _child_unet(folder, inputs):
    import jax
    import jax.numpy as jnp
    from diffrestorer_jax.convert.unet import load_unet
    base = rss_bytes()
    t0 = time.time()
    module, params = load_unet(folder)
    jax.block_until_ready(params)
    stats = {"rss_before_load": base, "peak_rss_after_load": peak_rss_bytes(), "load_s": time.time() - t0}
    x = jnp.asarray(inputs["sample"].transpose(0, 2, 3, 1))
    t1 = time.time()
    out = jax.jit(module.apply)({"params": params}, x, jnp.asarray(inputs["timesteps"]),
                                jnp.asarray(inputs["context"]))
    out = np.asarray(out).transpose(0, 3, 1, 2)
    stats["forward_s"] = time.time() - t1
    return out, stats


def _child_clip(folder, inputs):
    """CLIP vision: last_hidden_state, pooled and image_embeds, flattened into one vector."""
    import jax
    from diffrestorer_jax.convert.clip import load_clip_vision
    base = rss_bytes()
    t0 = time.time()
    module, params = load_clip_vision(folder)
    jax.block_until_ready(params)
    stats = {"rss_before_load": base, "peak_rss_after_load": peak_rss_bytes(), "load_s": time.time() - t0}

    def run(p, x):
        last, pooled, _ = module.apply(p, x)
        return last, pooled, module.apply(p, x, method="image_embeds")

    t1 = time.time()
    outs = jax.jit(run)({"params": params}, inputs["pixel_values"].transpose(0, 2, 3, 1))
    stats["forward_s"] = time.time() - t1
    return np.concatenate([np.asarray(o).ravel() for o in outs]), stats


def _child_vae(folder, inputs):
    import jax
    import jax.numpy as jnp
    from diffrestorer_jax.convert.vae import load_vae
    from diffrestorer_jax.models.vae import AutoencoderKL
    base = rss_bytes()
    t0 = time.time()
    module, params = load_vae(folder)
    jax.block_until_ready(params)
    stats = {"rss_before_load": base, "peak_rss_after_load": peak_rss_bytes(), "load_s": time.time() - t0}
    t1 = time.time()
    encode = jax.jit(lambda p, x: module.apply({"params": p}, x, method=AutoencoderKL.encode))
    decode = jax.jit(lambda p, z: module.apply({"params": p}, z, method=AutoencoderKL.decode))
    mean, logvar = encode(params, jnp.asarray(inputs["image"].transpose(0, 2, 3, 1)))
    image = decode(params, mean)
    # one array so the parent compares encode and decode at once: [mean, logvar, image] flattened
    out = np.concatenate([np.asarray(a).transpose(0, 3, 1, 2).ravel() for a in (mean, logvar, image)])
    stats["forward_s"] = time.time() - t1
    return out, stats


CHILD_RUNNERS = {"unet": _child_unet, "clip": _child_clip, "vae": _child_vae}


def child_main(kind, folder, inputs_path, out_path):
    import jax
    jax.config.update("jax_default_matmul_precision", "highest")
    inputs = dict(np.load(inputs_path))
    out, stats = CHILD_RUNNERS[kind](folder, inputs)
    np.save(out_path, out)
    print("STATS " + json.dumps(stats))


def run_child(kind, folder, inputs, workdir):
    inputs_path, out_path = os.path.join(workdir, "inputs.npz"), os.path.join(workdir, "ours.npy")
    np.savez(inputs_path, **inputs)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": repo + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", kind, folder, inputs_path,
                           out_path], env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"child failed:\n{proc.stdout}\n{proc.stderr}")
    stats = json.loads([line for line in proc.stdout.splitlines() if line.startswith("STATS ")][-1][6:])
    return np.load(out_path), stats


# ---------------------------------------------------------------- parent side (reference + report)
SD15_UNET = dict(cross_attention_dim=768, attention_head_dim=8, use_linear_projection=False, sample_size=64)
SD21_BASE_UNET = dict(cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
                      upcast_attention=False, sample_size=64)


def _unet_section(name, config, workdir, latent=64, tokens=77):
    import torch
    from diffusers import UNet2DConditionModel
    torch.manual_seed(0)
    model = UNet2DConditionModel(**config).eval()
    folder = os.path.join(workdir, name, "unet")
    model.save_pretrained(folder, safe_serialization=True)
    rng = np.random.default_rng(0)
    inputs = {"sample": rng.standard_normal((1, 4, latent, latent)).astype(np.float32),
              "timesteps": np.array([500.0], np.float32),
              "context": rng.standard_normal((1, tokens, config["cross_attention_dim"])).astype(np.float32)}
    with torch.no_grad():
        ref = model(torch.from_numpy(inputs["sample"]), torch.from_numpy(inputs["timesteps"]),
                    encoder_hidden_states=torch.from_numpy(inputs["context"])).sample.numpy()
    del model
    gc.collect()
    ours, stats = run_child("unet", folder, inputs, os.path.join(workdir, name))
    report(name, ours, ref, stats, folder_bytes(folder))


def unet_sd15(workdir):
    _unet_section("unet_sd15", SD15_UNET, workdir)


def unet_sd21(workdir):
    _unet_section("unet_sd21", SD21_BASE_UNET, workdir)


def clip_l14(workdir):
    """OpenAI CLIP ViT-L/14 (224 px) as a transformers CLIPVisionModelWithProjection, one image."""
    import torch
    import transformers
    torch.manual_seed(0)
    config = transformers.CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                           num_attention_heads=16, image_size=224, patch_size=14,
                                           projection_dim=768, hidden_act="quick_gelu")
    model = transformers.CLIPVisionModelWithProjection(config).eval()
    folder = os.path.join(workdir, "clip_l14")
    model.save_pretrained(folder)
    inputs = {"pixel_values": np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)}
    with torch.no_grad():
        out = model.vision_model(pixel_values=torch.from_numpy(inputs["pixel_values"]))
        refs = (out.last_hidden_state, out.pooler_output, model.visual_projection(out.pooler_output))
    ref = np.concatenate([r.numpy().ravel() for r in refs])
    del model, out
    gc.collect()
    ours, stats = run_child("clip", folder, inputs, workdir)
    report("clip_l14 (last_hidden_state, pooled, image_embeds)", ours, ref, stats, folder_bytes(folder))


SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
              norm_num_groups=32, down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512)


def vae_sd(workdir, size=256):
    """The SD 1.x/2.x VAE: encode (mean, logvar) then decode the mean of a 256x256 image."""
    import torch
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    model = AutoencoderKL(**SD_VAE).eval()
    folder = os.path.join(workdir, "vae_sd", "vae")
    model.save_pretrained(folder, safe_serialization=True)
    inputs = {"image": np.random.default_rng(0).uniform(-1, 1, (1, 3, size, size)).astype(np.float32)}
    with torch.no_grad():
        dist = model.encode(torch.from_numpy(inputs["image"])).latent_dist
        image = model.decode(dist.mean).sample
    ref = np.concatenate([t.numpy().ravel() for t in (dist.mean, dist.logvar, image)])
    del model
    gc.collect()
    ours, stats = run_child("vae", folder, inputs, os.path.join(workdir, "vae_sd"))
    report("vae_sd", ours, ref, stats, folder_bytes(folder))


MODELS = {"unet_sd15": unet_sd15, "unet_sd21": unet_sd21, "clip_l14": clip_l14, "vae_sd": vae_sd}


def report(name, ours, ref, stats, weight_bytes):
    rel = float(np.abs(ours - ref).max() / np.abs(ref).max())
    peak, base = stats["peak_rss_after_load"], stats["rss_before_load"]
    print(f"{name}: max|err|/max|ref| = {rel:.2e}  (max|ref| {np.abs(ref).max():.3g})")
    print(f"  weights {weight_bytes / GiB:.2f} GiB; peak RSS while converting {peak / GiB:.2f} GiB "
          f"({(peak - base) / GiB:.2f} GiB above the {base / GiB:.2f} GiB before loading) = "
          f"{peak / weight_bytes:.2f}x weights total, {(peak - base) / weight_bytes:.2f}x increase; "
          f"load {stats['load_s']:.1f}s, first forward (compile+run) {stats['forward_s']:.1f}s", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="unet_sd15", help=f"comma-separated, from {sorted(MODELS)}")
    parser.add_argument("--workdir", default=None, help="where to write the reference folders (default: temp)")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child_main(*args.child)
    names = [m for m in args.models.split(",") if m]
    unknown = [m for m in names if m not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {sorted(MODELS)}")
    with tempfile.TemporaryDirectory(dir=args.workdir) as workdir:
        for name in names:
            MODELS[name](workdir)


if __name__ == "__main__":
    main()
