"""Can the demo's degradation classifier learn to name the type? A probe, without the rest of stage 1.

    python benchmarks/demo_classifier_probe.py                          # the shipped heads, trained on
    python benchmarks/demo_classifier_probe.py --fresh --clip-size 128 --patch 16 --train-clip

Trains only what names the degradation type (the prompt processor; with --train-clip the CLIP tower
too) on cross-entropy alone: Adam, the 50 training photos and close-ups (demo_photos.TRAIN) plus
dead-leaves images, each degraded whole at 128 px with a random type or mixture as stage 1 draws
them, flipped at random. Every --every steps it prints the training accuracy and the share of the
eight types of the validation photos (degradation seeds 0-3, 128 images) named right, per type.
--fresh starts from a random init (--clip-size / --patch: a CLIP of another input size); otherwise
from --checkpoint's CLIP and heads. demo/README.md has what it showed (2026-12-07). The held-out
photos are never read.
"""
import argparse
import os
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 128  # the side `make demo` degrades and restores at


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default=os.path.join(ROOT, "demo", "checkpoint"))
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--every", type=int, default=250)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--dead-leaves", type=int, default=300, help="dead-leaves images beside the photos")
    ap.add_argument("--fresh", action="store_true", help="random CLIP and heads, not the checkpoint's")
    ap.add_argument("--clip-size", type=int, default=0, help="with --fresh: the CLIP's input side")
    ap.add_argument("--patch", type=int, default=8, help="with --clip-size: its patch side")
    ap.add_argument("--train-clip", action="store_true", help="train the CLIP tower too")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import optax

    from diffrestorer_jax import export
    from diffrestorer_jax.data import dead_leaves, degradations, demo_photos
    from diffrestorer_jax.data.gallery import degrade_each_type
    from diffrestorer_jax.models import diffrestorer as dr
    from diffrestorer_jax.parallel import sharding

    config, nets, params = export.load_export(args.checkpoint, names=("clip", "prompt"))
    if args.fresh:
        if args.clip_size:
            config.model.clip["image_size"], config.model.clip["patch_size"] = args.clip_size, args.patch
            nets = dr.build_networks(config.model)
        init = sharding.unbox(jax.jit(lambda k: dr.init_params(nets, k, int(config.image_size)))(
            jax.random.key(args.seed)))
        params = {"clip": init["clip"], "prompt": init["prompt"]}

    t0 = time.time()
    big = demo_photos.train_photos(2 * SIZE)
    close_ups = big.reshape(-1, 2, SIZE, 2, SIZE, 3).transpose(0, 1, 3, 2, 4, 5).reshape(-1, SIZE, SIZE, 3)
    leaves = list(dead_leaves.images(args.dead_leaves, SIZE, seed=args.seed))
    data = jnp.asarray(np.concatenate([demo_photos.train_photos(SIZE), close_ups] + ([np.stack(leaves)] if leaves else [])))
    val = demo_photos.load_photos(demo_photos.VALIDATION, SIZE)
    val_lq = np.concatenate([degrade_each_type(val, s)[0][:, :degradations.NUM_TYPES].reshape(-1, SIZE, SIZE, 3)
                             for s in range(4)])
    val_types = np.tile(np.arange(degradations.NUM_TYPES), len(val_lq) // degradations.NUM_TYPES)
    print(f"{len(data)} training images, {len(val_lq)} validation images ({time.time() - t0:.0f} s)", flush=True)

    def logits(p, lq):
        return dr.visual_prompts(nets, p["prompt"], dr.clip_tokens(nets, p["clip"], lq))["logits"]

    predict = jax.jit(lambda p, lq: jnp.argmax(logits(p, lq), -1))

    def validation(p):
        pred = np.concatenate([np.asarray(predict(p, val_lq[i:i + 64])) for i in range(0, len(val_lq), 64)])
        per_type = [float(np.mean(pred[val_types == t] == t)) for t in range(degradations.NUM_TYPES)]
        return float(np.mean(pred == val_types)), per_type

    trained = {"prompt": params["prompt"]} | ({"clip": params["clip"]} if args.train_clip else {})
    frozen = {} if args.train_clip else {"clip": params["clip"]}
    opt = optax.adam(args.lr)
    opt_state = opt.init(trained)
    degrade_config = degradations.default_degradation_config()

    @jax.jit
    def step(trained, opt_state, key, data, idx):
        k_degrade, k_flip = jax.random.split(key)
        hq = data[idx]
        hq = jnp.where(jax.random.bernoulli(k_flip, 0.5, (idx.shape[0], 1, 1, 1)), hq[:, :, ::-1], hq)
        lq, labels = degradations.degrade(k_degrade, hq, jnp.full(idx.shape, degradations.RANDOM),
                                          degrade_config)
        target = labels["multi_hot"].astype(jnp.float32)
        target = target / target.sum(-1, keepdims=True)  # a mixture: uniform over its types, as stage 1

        def loss(trained):
            out = logits(trained | frozen, lq)
            return optax.softmax_cross_entropy(out, target).mean(), out

        (_, out), grads = jax.value_and_grad(loss, has_aux=True)(trained)
        updates, opt_state = opt.update(grads, opt_state, trained)
        right = labels["multi_hot"][jnp.arange(idx.shape[0]), jnp.argmax(out, -1)]
        return optax.apply_updates(trained, updates), opt_state, jnp.mean(right)

    names = " ".join(degradations.DEGRADATION_TYPES)
    acc, per_type = validation(trained | frozen)
    print(f"step 0 validation {acc:.3f} per type ({names}) {np.round(per_type, 2).tolist()}", flush=True)
    rng, key, seen = np.random.default_rng(args.seed), jax.random.key(args.seed), []
    for i in range(1, args.steps + 1):
        idx = jnp.asarray(rng.integers(0, len(data), args.batch))
        trained, opt_state, right = step(trained, opt_state, jax.random.fold_in(key, i), data, idx)
        seen.append(right)  # on the device: read once per report, not every step
        if i % args.every == 0 or i == args.steps:
            acc, per_type = validation(trained | frozen)
            training = float(np.mean(jax.device_get(seen)))
            seen = []
            print(f"step {i} training {training:.3f} validation {acc:.3f} per type "
                  f"{np.round(per_type, 2).tolist()} ({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
