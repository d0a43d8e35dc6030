#!/usr/bin/env bash
# Recreate the shipped demo checkpoint (demo/checkpoint/) from scratch: `make demo-train`.
#
# No Stable Diffusion / CLIP weights are downloadable offline, so the tiny model learns its own
# prior first, then the two Diff-Restorer stages, each stage starting from the previous export
# (config.weights.init_from):
#   1. prior_vae   the VAE as an autoencoder of clean crops
#   2. prior_unet  the UNet as an unconditional latent denoiser (VAE frozen)
#   3. stage1      visual prompt processor + control module (UNet, VAE, CLIP frozen)
#   4. stage2      the degradation-aware decoder
# Training data: the ten skimage photos of diffrestorer_jax/data/demo_photos.TRAIN (whole and 2x2
# close-ups, written to a folder); coffee and rocket are held out for `make demo`.
#
# Step counts are sized for about an hour on a small CPU (from scratch: 3924 s on a 2-core CPU VM, see
# demo/README.md; compiling is a minute or two of each stage).
# Override them with the environment:
#   VAE_STEPS UNET_STEPS S1_STEPS S2_STEPS, RUN_DIR (default workdir_demo), OUT (default demo/checkpoint)
set -euo pipefail
cd "$(dirname "$0")/.."
# The commands come from the project's venv (make demo-train puts .venv/bin first on PATH).
RUN_DIR=${RUN_DIR:-workdir_demo}
OUT=${OUT:-demo/checkpoint}
VAE_STEPS=${VAE_STEPS:-400}
UNET_STEPS=${UNET_STEPS:-200}
S1_STEPS=${S1_STEPS:-1000}
S2_STEPS=${S2_STEPS:-250}
CONFIG=configs/tiny.py
PHOTOS="$RUN_DIR/photos"
# The tiny CPU model compiles its steps with XLA's backend optimisations off: compiling is most of
# the time at this size, and the step runs at much the same speed.
COMMON=(--fast_compile --config.data.kind=hq_folder "--config.data.hq_dir=$PHOTOS"
        --config.train.checkpoint_every=50 --config.train.log_every=10 --config.train.sample_every=0
        # a few hundred steps: the EMA (what is exported) must forget the random init quickly
        --config.train.ema_decay=0.9 --config.train.warmup_steps=10)

start=$(date +%s)
mkdir -p "$RUN_DIR"
python -m diffrestorer_jax.cli.demo_photos "$PHOTOS"

stage() {  # stage NAME STEPS LR INIT_FROM [extra flags...]
  local name=$1 steps=$2 lr=$3 init=$4
  shift 4
  local t0
  t0=$(date +%s)
  echo "== $name: $steps steps, lr $lr, init_from '${init}' ($(date -u +%H:%M:%S) UTC)"
  diffrestorer-train --config "$CONFIG:$name" --workdir "$RUN_DIR/$name" "${COMMON[@]}" \
    --config.train.num_steps="$steps" --config.train.learning_rate="$lr" \
    --config.weights.init_from="$init" "$@"
  echo "== $name took $(( $(date +%s) - t0 )) s"
}

stage prior_vae "$VAE_STEPS" 2e-3 ""
stage prior_unet "$UNET_STEPS" 1e-3 "$RUN_DIR/prior_vae/export"
stage stage1 "$S1_STEPS" 1e-3 "$RUN_DIR/prior_unet/export"
# No PatchGAN for the demo (tiny.py turns it on at step 100; in a longer trial it doubled the decoder's
# L1 within 30 steps). The decoder sees VAE(HQ) latents and the stage-1 model's own 10-step DDIM
# samples (the latents `make demo` hands it) half and half: trained on VAE(HQ) latents alone it trusted
# the sampler's poor latents and lost 10-17 dB against the input. It fuses the LQ image itself and
# outputs a correction of it (image_fusion_base=lq), trained for per-image PSNR (decoder_pixel_loss=psnr)
# so a mildly degraded input weighs as much as a heavily degraded one. Half its clean crops get random
# intensity levels (hq_levels_prob: narrower, brighter or darker ranges) before they are degraded:
# without them it took low-contrast clean photos (a white clock face, a rocket at night) for haze or low
# light and shifted their brightness, losing up to 30 dB on them. See demo/README.md.
stage stage2 "$S2_STEPS" 1e-3 "$RUN_DIR/stage1/export" --config.train.gan_start_step=1000000 \
  --config.train.decoder_sample_steps=10 --config.model.decoder.image_fusion_base=lq \
  --config.train.decoder_pixel_loss=psnr --config.train.hq_levels_prob=0.5

# The data is indexed by step and every key derives from the seed, so a re-run can give the very
# same parameters: a from-scratch run on a 2-core CPU VM gave the shipped ones bit for bit (demo/README.md;
# other CPUs may round differently). Say whether this run did, before replacing it.
if [ -d "$OUT" ]; then
  echo "== this run against the checkpoint it replaces ($OUT):"
  diffrestorer-compare-exports "$OUT" "$RUN_DIR/stage2/export" || true
fi
rm -rf "$OUT"
mkdir -p "$(dirname "$OUT")"
cp -r "$RUN_DIR/stage2/export" "$OUT"
echo "demo checkpoint: $OUT ($(du -sh "$OUT" | cut -f1)); total $(( $(date +%s) - start )) s on $(nproc) cores"
