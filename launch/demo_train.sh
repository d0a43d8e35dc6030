#!/usr/bin/env bash
# Recreate the shipped demo checkpoint (demo/checkpoint/) from scratch: `make demo-train`.
#
# No Stable Diffusion / CLIP weights are downloadable offline, so the tiny model learns its own
# prior first, then the two Diff-Restorer stages, each stage starting from the previous export
# (config.weights.init_from):
#   1. prior_vae   the VAE as an autoencoder of clean crops
#   2. prior_unet  the UNet as an unconditional latent denoiser (VAE frozen)
#   3. stage1      visual prompt processor + control module (UNet, VAE, CLIP frozen)
#   4. stage2      the degradation-aware decoder, on 64-px crops
#   5. stage2_whole that decoder fine-tuned on whole 128-px images; the two decoders are averaged
#   6. prior_clip  the CLIP tower and the prompt heads, now reading 128 px in 8-px patches, trained on
#                  the degradation classification alone (every earlier stage's CLIP read 64 px)
#   7. stage1_clip stage 1 again, on that CLIP's prompts
#   8. stage2_clip the averaged decoder trained 600 steps more, on those prompts: the checkpoint
# Training data: the ten skimage photos of diffrestorer_jax/data/demo_photos.TRAIN (whole and 2x2
# close-ups, written to a folder) for stages 1-3 and 7; 600 procedural dead-leaves images for stages
# 4-5 and 8 (never seen by the prior, as the held-out photos are not); the photos at 128 px and 300
# dead-leaves images for stage 6; coffee and rocket are held out for `make demo`.
#
# Stages 6-8 were added on 2026-12-07 to the five before (a classifier that names the degradation
# right is worth about a decibel: demo/README.md); they are the commands that made the shipped
# checkpoint (run from scratch in one go on the AMD VM, 2026-12-08, the first five stages and the
# average came out the shipped ones bit for bit: demo/README.md). Step counts: 2 h 41 min measured on a
# 2-core AMD CPU and about 3 h 50 min on a 2-core Intel one by estimate (see demo/README.md for the
# measured wall times; compiling is a minute or two of each stage). A stage that is stopped (SIGTERM: it saves
# and exits 0) or fails stops the script, before any later stage, with a non-zero exit status; it
# resumes from its last checkpoint when the script is run again (every stage's workdir keeps its
# checkpoints; RUN_DIR/<stage>.log its console output). The export replaces OUT atomically (a kill or
# a full disk leaves the previous one); an OUT that exists and is not an export is refused before
# any training. Override them with the environment:
#   VAE_STEPS UNET_STEPS S1_STEPS S2_STEPS S2W_STEPS CLIP_STEPS S1C_STEPS S2C_STEPS, RUN_DIR (default
#   workdir_demo), OUT (default demo/checkpoint)
set -euo pipefail
cd "$(dirname "$0")/.."
# The commands come from the project's venv (make demo-train puts .venv/bin first on PATH).
RUN_DIR=${RUN_DIR:-workdir_demo}
OUT=${OUT:-demo/checkpoint}
check_out() {  # OUT is replaced by this run's export: never a folder of the user's
  if [ -e "$OUT" ] && ! { [ -f "$OUT/config.json" ] && [ -d "$OUT/params" ]; }; then
    echo "OUT=$OUT exists and is not an export (no config.json + params/): not replacing it; set OUT to another folder" >&2
    exit 2
  fi
}
check_out
VAE_STEPS=${VAE_STEPS:-3000}
UNET_STEPS=${UNET_STEPS:-1000}
S1_STEPS=${S1_STEPS:-1000}
S2_STEPS=${S2_STEPS:-3000}
S2W_STEPS=${S2W_STEPS:-300}
CLIP_STEPS=${CLIP_STEPS:-1500}
S1C_STEPS=${S1C_STEPS:-1000}
S2C_STEPS=${S2C_STEPS:-600}
CONFIG=configs/tiny.py
PHOTOS="$RUN_DIR/photos"
DEAD_LEAVES="$RUN_DIR/dead_leaves"
CLIP_DATA="$RUN_DIR/clip_data"
COMMON=(--config.train.checkpoint_every=50 --config.train.log_every=10 --config.train.sample_every=0
        # a few hundred steps: the EMA (what is exported) must forget the random init quickly
        --config.train.ema_decay=0.9 --config.train.warmup_steps=10)

start=$(date +%s)
mkdir -p "$RUN_DIR"
python -m diffrestorer_jax.cli.demo_photos "$PHOTOS"
# 600 dead-leaves images take a few minutes to draw: kept when a previous run wrote them all
if [ "$(find "$DEAD_LEAVES" -name 'dead_leaves_*.png' 2>/dev/null | wc -l)" -ne 600 ]; then
  python -m diffrestorer_jax.cli.demo_photos "$DEAD_LEAVES" --dead-leaves 600 --size 192 --seed 0
fi
# prior_clip's images, each whole at 128 px (as the CLIP reads a photo `make demo` restores)
python -m diffrestorer_jax.cli.demo_photos "$CLIP_DATA" --size 128
if [ "$(find "$CLIP_DATA" -name 'dead_leaves_*.png' 2>/dev/null | wc -l)" -ne 300 ]; then
  python -m diffrestorer_jax.cli.demo_photos "$CLIP_DATA" --dead-leaves 300 --size 128 --seed 0
fi
# Every stage compiles at XLA's CPU -O1: the prior's steps run 2.5-3.4x faster than at -O0 (measured
# 2026-12-05), which pays for a prior trained 7.5x (VAE) and 5x (UNet) longer than before 2026-12-06,
# and stage 2's 10-step sampler compiles in about a minute.
export XLA_FLAGS="${XLA_FLAGS:-} --xla_backend_optimization_level=1"
PHOTO_DATA=(--config.data.kind=hq_folder "--config.data.hq_dir=$PHOTOS")

stage() {  # [CFG_STAGE=config stage] stage NAME STEPS LR INIT_FROM [extra flags...]
  local name=$1 steps=$2 lr=$3 init=$4
  shift 4
  local t0
  t0=$(date +%s)
  echo "== $name: $steps steps, lr $lr, init_from '${init}' ($(date -u +%H:%M:%S) UTC)"
  # A stage stopped by SIGTERM saves and exits 0 ("training preempted"): only "training done" says it
  # finished and exported, so later stages never start from a previous run's exports. tee ignores the
  # signals a whole process group gets (timeout, scancel, Ctrl-C), so the trainer can still print
  # while it saves (a dead tee would kill it with a broken pipe before its checkpoint).
  PYTHONUNBUFFERED=1 diffrestorer-train --config "$CONFIG:${CFG_STAGE:-$name}" --workdir "$RUN_DIR/$name" \
    "${COMMON[@]}" --config.train.num_steps="$steps" --config.train.learning_rate="$lr" \
    --config.weights.init_from="$init" "$@" 2>&1 | (trap '' TERM INT HUP; exec tee "$RUN_DIR/$name.log")
  if ! grep -qx "training done" "$RUN_DIR/$name.log"; then
    echo "== $name did not finish (stopped or preempted): run the script again to resume it" >&2
    exit 1
  fi
  echo "== $name took $(( $(date +%s) - t0 )) s"
}

stage prior_vae "$VAE_STEPS" 2e-3 "" "${PHOTO_DATA[@]}"
stage prior_unet "$UNET_STEPS" 1e-3 "$RUN_DIR/prior_vae/export" "${PHOTO_DATA[@]}"
stage stage1 "$S1_STEPS" 1e-3 "$RUN_DIR/prior_unet/export" "${PHOTO_DATA[@]}"
# Stage 2, the degradation-aware decoder (demo/README.md, "Towards a checkpoint that restores", has
# the runs behind each choice). No PatchGAN (in a longer trial it doubled the decoder's L1 within 30
# steps). It is trained on exactly the latents `make demo` hands it, 10-step DDIM samples from noise
# (decoder_predicted_prob=1, decoder_sample_steps=10): trained on VAE(HQ) or one-step latents it trusted
# them and imprinted their texture and tint on unseen photos. Its clean images are dead leaves, which
# the prior never saw, degraded at 128 px and cropped to the 64-px training size (degrade_size: the
# degradations and the prompts of a 128-px photo as `make demo` shows it). Six in ten
# clean crops get random intensity levels first (hq_levels_prob), so bright flat and dark clean images
# are seen and left alone. A larger decoder (RDB growth 16, image-level fusion 64 wide) outputs a
# correction of the LQ image (image_fusion_base=lq), trained for per-image PSNR (decoder_pixel_loss=psnr)
# so a mildly degraded input weighs as much as a heavily degraded one. The export restores images up
# to 256 px whole (sampler.tile=64 latent pixels), larger ones by 256-px tiles: the decoder restores
# better with a whole photo than by tiles of its 64-px training size (demo/README.md).
DECODER=(--config.model.decoder.image_fusion_base=lq --config.model.decoder.image_fusion_width=64
         --config.model.decoder.rdb_convs=5 --config.model.decoder.rdb_growth=16 --config.sampler.tile=64)
S2=(--config.data.kind=hq_folder "--config.data.hq_dir=$DEAD_LEAVES" --config.train.gan_start_step=1000000
    "${DECODER[@]}" --config.train.decoder_pixel_loss=psnr --config.train.hq_levels_prob=0.6
    --config.train.decoder_predicted_prob=1.0 --config.train.decoder_sample_steps=10)
stage stage2 "$S2_STEPS" 5e-4 "$RUN_DIR/stage1/export" "${S2[@]}" --config.train.degrade_size=128
# Then the same decoder fine-tuned on whole 128-px images as `make demo` restores them (batch 4, twice
# the pixels per step of stage 2's 8 crops of 64 px; weights.init_trained keeps the trained decoder),
# and the export is the average of the two decoders: the fine-tuned one alone dehazes more and leaves
# the mildly degraded photos more alone, but darkens snow on a bright flat photo it reads as hazy; the
# average keeps most of the gains without that (demo/README.md, 2026-12-06 night).
CFG_STAGE=stage2 stage stage2_whole "$S2W_STEPS" 2.5e-4 "$RUN_DIR/stage2/export" "${S2[@]}" \
  --config.weights.init_trained=True --config.image_size=128 --config.train.batch_size=4
diffrestorer-average-exports "$RUN_DIR/stage2/export" "$RUN_DIR/stage2_whole/export" --weight 0.5 \
  --out "$RUN_DIR/average"

# Every classifier above reads the photo shrunk to 64 px in 8-px patches, which blurs away JPEG blocks,
# light blur and fine noise, and names 39% of the validation photos' degradations right. Read at 128 px
# in 8-px patches (256 tokens) and trained on the degradation classification alone (prior_clip: the
# CLIP tower and prompt heads, batch 32 of whole 128-px images), it names 72%; stage 1 then trains
# the prompt processor and control module again on its prompts, and the averaged decoder 600 steps
# more on them (stage 2's settings). Validation +4.12 / +3.83 dB against the average's +3.12 / +3.20,
# held out +3.38 against +2.65 (demo/README.md, "A CLIP that reads the photo at 128 px").
CLIP=(--config.model.clip.image_size=128 --config.model.clip.patch_size=8)
stage prior_clip "$CLIP_STEPS" 1e-3 "$RUN_DIR/average" "${CLIP[@]}" "${DECODER[@]}" --config.data.kind=hq_folder \
  "--config.data.hq_dir=$CLIP_DATA" --config.image_size=128 --config.train.batch_size=32
CFG_STAGE=stage1 stage stage1_clip "$S1C_STEPS" 1e-3 "$RUN_DIR/prior_clip/export" "${CLIP[@]}" "${DECODER[@]}" \
  "${PHOTO_DATA[@]}" --config.train.degrade_size=128
CFG_STAGE=stage2 stage stage2_clip "$S2C_STEPS" 2.5e-4 "$RUN_DIR/stage1_clip/export" "${S2[@]}" "${CLIP[@]}" \
  --config.train.degrade_size=128 --config.weights.init_trained=True
# An export averaged with itself is copied unchanged (every network is equal in both), written as any
# average is: whole, replacing the folder atomically.
FINAL=(diffrestorer-average-exports "$RUN_DIR/stage2_clip/export" "$RUN_DIR/stage2_clip/export" --weight 0)
"${FINAL[@]}" --out "$RUN_DIR/export"

# The data is indexed by step and every key derives from the seed, so a re-run can give the very
# same parameters (the previous recipe's from-scratch run gave its shipped ones bit for bit; this one's
# were made by these commands in resumed parts: demo/README.md; other CPUs may round differently).
# Say whether this run did, before replacing it.
if [ -d "$OUT" ]; then
  echo "== this run against the checkpoint it replaces ($OUT):"
  diffrestorer-compare-exports "$OUT" "$RUN_DIR/export" || true
fi
# The same copy written again, into OUT: it replaces OUT atomically (a kill or a failed write leaves
# the previous checkpoint), so OUT gets $RUN_DIR/export's parameters.
check_out
mkdir -p "$(dirname "$OUT")"
"${FINAL[@]}" --out "$OUT"
echo "demo checkpoint: $OUT ($(du -sh "$OUT" | cut -f1)); total $(( $(date +%s) - start )) s on $(nproc) cores"
