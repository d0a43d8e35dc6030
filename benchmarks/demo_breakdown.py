"""Where a demo checkpoint loses PSNR: per degradation type, the decoder given different latents.

    python benchmarks/demo_breakdown.py --checkpoint demo/checkpoint --photos astronaut chelsea
    python benchmarks/demo_breakdown.py --dead-leaves 4    # the decoder's kind of training image

Degrades the photos as `diffrestorer-demo` does (same types, same seed) and prints the mean PSNR
against the clean photo of:
  lq        the degraded input
  vae_hq    the plain VAE decode of VAE(HQ): what the latent path alone can reach
  dec_hq    the degradation-aware decoder given VAE(HQ): a perfect diffusion sample
  dec_lq    the decoder given VAE(LQ): a sampler that changed nothing
  vae_sampled  the plain VAE decode of a DDIM sample from noise at the demo's step count
            (`sampled_latents` of diffrestorer_jax/train/stage2.py): how good sampled latents are
  restored  the whole restoration at the demo's settings (`--fidelity`, `--strength`)
so a gap between dec_hq / dec_lq and restored is the sampled latent's, one below lq in dec_lq the
decoder's. Use training photos (the default) to choose things; the held-out ones are for `make demo`.
"""
import argparse
import os

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default=os.path.join(ROOT, "demo", "checkpoint"))
    ap.add_argument("--photos", nargs="+", default=["astronaut", "chelsea"])
    ap.add_argument("--fidelity", type=float, default=None, help="default: the demo's")
    ap.add_argument("--strength", type=float, default=None, help="default: the demo's")
    ap.add_argument("--dead-leaves", type=int, default=0, metavar="N",
                    help="instead of photos, N dead-leaves images (the stage-2 decoder's training kind)")
    args = ap.parse_args()
    import jax
    from diffrestorer_jax import export
    from diffrestorer_jax.diffusion.schedules import from_config
    from diffrestorer_jax.metrics.psnr_ssim import psnr
    from diffrestorer_jax.models import diffrestorer as dr
    from diffrestorer_jax.tools import demo
    from diffrestorer_jax.data import dead_leaves, gallery
    from diffrestorer_jax.train import stage2

    settings = dict(demo.DEMO_SETTINGS)
    settings.update({k: v for k, v in (("fidelity", args.fidelity), ("strength", args.strength)) if v is not None})
    config, nets, params = export.load_export(args.checkpoint)
    size = int(config.image_size)
    if args.dead_leaves:
        args.photos = [f"dead leaves {i}" for i in range(args.dead_leaves)]
        clean = np.stack(list(dead_leaves.images(args.dead_leaves, size, seed=1)))  # not the recipe's seed 0
        lq, names = gallery.degrade_each_type(clean, 0)
    else:
        clean, lq, names = demo.degrade_photos(args.photos, size, 0)
    n_photos, n_types = lq.shape[:2]
    hq_flat = np.repeat(clean, n_types, 0)
    lq_flat = lq.reshape((-1,) + lq.shape[2:])

    schedule = from_config(config.diffusion)
    ctl = config.model.control

    @jax.jit
    def decodes(hq, lq):
        prompts = dr.visual_prompts(nets, params["prompt"], dr.clip_tokens(nets, params["clip"], lq))
        feats = dr.lq_features(nets, params["vae"], lq)
        z_hq, z_lq = dr.encode_latents(nets, params["vae"], hq), dr.encode_latents(nets, params["vae"], lq)
        dec = lambda z: dr.decode(nets, params["decoder"], z, feats, prompts, lq, settings["fidelity"])  # noqa: E731
        noise = jax.random.normal(jax.random.PRNGKey(0), z_hq.shape)
        z_s = stage2.sampled_latents(nets, params, schedule, prompts, lq, noise, settings["steps"],
                                     ctl.control_scale, ctl.context)
        return {"vae_hq": dr.vae_decode(nets, params["vae"], z_hq), "dec_hq": dec(z_hq), "dec_lq": dec(z_lq),
                "vae_sampled": dr.vae_decode(nets, params["vae"], z_s)}

    columns = {"lq": lq_flat, **{k: np.asarray(v) for k, v in decodes(hq_flat, lq_flat).items()}}
    restorer = demo.make_restorer(args.checkpoint, settings, 0)
    columns["restored"] = np.stack([img for img, _ in restorer.restore_images(list(lq_flat))])
    per_type = {k: v.reshape((n_photos, n_types) + v.shape[1:]) for k, v in columns.items()}
    print(f"{args.checkpoint}, photos {', '.join(args.photos)}, fidelity {settings['fidelity']}, "
          f"strength {settings['strength']}, {settings['steps']} steps; mean PSNR (dB)")
    print("| type | " + " | ".join(columns) + " |\n|---|" + "---:|" * len(columns))
    for t, name in enumerate(names):
        row = [np.mean([float(psnr(v[p, t], clean[p])) for p in range(n_photos)]) for v in per_type.values()]
        print(f"| {name} | " + " | ".join(f"{x:.2f}" for x in row) + " |")


if __name__ == "__main__":
    main()
