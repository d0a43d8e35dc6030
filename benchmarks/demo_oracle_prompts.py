"""What the demo's degradation classifier costs: the validation photos restored with the right prompts.

    python benchmarks/demo_oracle_prompts.py                       # demo/checkpoint, seeds 0 and 1
    python benchmarks/demo_oracle_prompts.py --arms own oracle --seeds 0

The degradation prompts P_D (the prompt processor's degradation tokens, read by the control module
and, mean-pooled, by the decoder's FiLM layers) come from the CLIP reading the degraded image, and the
demo's classifier names the mild types by the photo more than by the degradation. Each arm restores
the validation photos degraded as `make demo` degrades (every type and the mixed row, `make demo`'s
settings) with other degradation tokens, and prints the PSNR gain over the degraded input per type:
  own     the image's own tokens (what `make demo` does)
  oracle  the mean tokens of the training photos (with their close-ups, degradation seeds 100-103)
          degraded with the image's true type: a classifier that is always right (the mixed row gets
          the mean of mixed compositions)
  snapped the mean tokens of the type the classifier predicts (argmax), i.e. its P_D made typical
  soft    the predicted type probabilities times the eight types' mean tokens
Only the prompts change; every network is the checkpoint's. The held-out photos are never read.
"""
import argparse
import os
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 128  # the side `make demo` degrades and restores at
ARMS = ("own", "oracle", "snapped", "soft")


def type_mean_tokens(nets, params, photos, seeds):
    """[9, T, C]: per row of `degrade_each_type` (8 types, mixed), the degradation tokens averaged over
    the photos degraded with the given seeds."""
    import jax
    import jax.numpy as jnp
    from diffrestorer_jax.data.gallery import degrade_each_type
    from diffrestorer_jax.models import diffrestorer as dr
    tokens = jax.jit(lambda lq: dr.visual_prompts(nets, params["prompt"],
                                                  dr.clip_tokens(nets, params["clip"], lq))["degradation"])
    sums = 0.0
    for seed in seeds:
        lq, _ = degrade_each_type(photos, seed)
        sums = sums + np.stack([np.asarray(tokens(jnp.asarray(lq[:, t]))).sum(0) for t in range(lq.shape[1])])
    return sums / (len(seeds) * len(photos))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default=os.path.join(ROOT, "demo", "checkpoint"))
    ap.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="degradation seeds of the validation photos")
    args = ap.parse_args()

    from diffrestorer_jax.cli import startup
    startup.prepare_process(backend_optimization_level=1, restore=True)  # as `make demo`
    import jax
    import jax.numpy as jnp
    from diffrestorer_jax import export
    from diffrestorer_jax.data import degradations, demo_photos
    from diffrestorer_jax.data.gallery import degrade_each_type
    from diffrestorer_jax.infer import program
    from diffrestorer_jax.infer import restorer as restorer_lib
    from diffrestorer_jax.metrics.psnr_ssim import psnr
    from diffrestorer_jax.models import diffrestorer as dr
    from diffrestorer_jax.tools import demo

    t0 = time.time()
    _, nets, params = export.load_export(args.checkpoint, names=("clip", "prompt"))
    big = demo_photos.train_photos(2 * SIZE)
    close_ups = big.reshape(-1, 2, SIZE, 2, SIZE, 3).transpose(0, 1, 3, 2, 4, 5).reshape(-1, SIZE, SIZE, 3)
    means = type_mean_tokens(nets, params, np.concatenate([demo_photos.train_photos(SIZE), close_ups]),
                             seeds=(100, 101, 102, 103))
    print(f"mean degradation tokens per type {means.shape} from {SIZE}-px training photos "
          f"({time.time() - t0:.0f} s)", flush=True)

    own_prompts = dr.visual_prompts
    chosen = {"arm": "own", "row": 0}

    def prompts_of_arm(nets_, prompt_params, tokens):
        out = dict(own_prompts(nets_, prompt_params, tokens))
        d = out["degradation"]
        typical = jnp.asarray(means[:degradations.NUM_TYPES], d.dtype)  # [8, T, C]
        if chosen["arm"] == "oracle":
            out["degradation"] = jnp.broadcast_to(jnp.asarray(means[chosen["row"]], d.dtype), d.shape)
        elif chosen["arm"] == "snapped":
            out["degradation"] = typical[jnp.argmax(out["logits"], axis=-1)]
        elif chosen["arm"] == "soft":
            out["degradation"] = jnp.einsum("nk,ktc->ntc", jax.nn.softmax(out["logits"].astype(d.dtype)), typical)
        return out

    dr.visual_prompts = prompts_of_arm  # infer/pipeline.py calls dr.visual_prompts while tracing
    val = demo_photos.load_photos(demo_photos.VALIDATION, SIZE)
    settings = demo.demo_settings()
    for seed in args.seeds:
        lq, names = degrade_each_type(val, seed)
        for arm in args.arms:
            chosen["arm"], gains = arm, []
            for t in range(len(names)):
                if t == 0 or arm == "oracle":  # the oracle's tokens are baked into each row's program
                    chosen["row"] = t
                    jax.clear_caches()
                    program.restore_program.cache_clear()
                    restorer_lib._cached_export.cache_clear()
                    restorer = demo.make_restorer(args.checkpoint, settings, seed)
                restored = np.stack([img for img, _ in restorer.restore_images(list(lq[:, t]), list(range(len(val))))])
                gains.append(float(np.mean(psnr(restored, val)) - np.mean(psnr(lq[:, t], val))))
            print(f"seed {seed} {arm:7s} mean of 8 {np.mean(gains[:degradations.NUM_TYPES]):+.2f} | "
                  + " ".join(f"{n} {g:+.2f}" for n, g in zip(names, gains)) + f" ({time.time() - t0:.0f} s)",
                  flush=True)


if __name__ == "__main__":
    main()
