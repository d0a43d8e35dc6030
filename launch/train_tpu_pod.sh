#!/usr/bin/env bash
# Train on every worker of a Cloud TPU VM pod slice (e.g. v5litepod-256, v4-32, v5p-64), from your
# own machine (gcloud installed and logged in), in the root of this checkout.
#
#   # once per TPU VM: copy this checkout to every worker and install it there (jax[tpu], gcsfs)
#   TPU_NAME=my-pod ZONE=us-west4-a launch/train_tpu_pod.sh --setup
#   # train; the same command again resumes from the latest checkpoint in WORKDIR
#   TPU_NAME=my-pod ZONE=us-west4-a WORKDIR=gs://my-bucket/runs/sd15_s1 \
#     launch/train_tpu_pod.sh configs/sd15.py:stage1_pod --config.x=y ...
#
# The same command runs on all workers (--worker=all), with DIFFRESTORER_DISTRIBUTED=1: a TPU VM
# lists its workers only in its metadata server, so this tells diffrestorer-train to call
# jax.distributed.initialize(), which finds its peers there (on a one-host TPU VM, a job of one
# process). WORKDIR must be a bucket (gs://...) every worker can write: checkpoints (each
# worker writes its own shards), TensorBoard logs and the export go there. Weights and datasets may
# be gs:// paths too. On preemption (SIGTERM to any worker) every worker saves the same step and
# exits 0; run the same command again to resume. Each worker's console goes to ~/train.log there.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
REMOTE_DIR=diffrestorer_jax
ssh_all() { gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command "$1"; }

if [[ "${1:-}" == "--setup" ]]; then
  tarball=$(mktemp --suffix=.tar.gz)
  git archive --format=tar.gz -o "$tarball" HEAD
  gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME":~/diffrestorer_jax.tar.gz --zone="$ZONE" --worker=all
  rm -f "$tarball"
  ssh_all "set -e; rm -rf ~/$REMOTE_DIR && mkdir -p ~/$REMOTE_DIR && tar -xzf ~/diffrestorer_jax.tar.gz -C ~/$REMOTE_DIR &&
    cd ~/$REMOTE_DIR && python3 -m venv .venv && .venv/bin/pip install -q --upgrade pip &&
    .venv/bin/pip install -q -e '.[tpu,gcs]' && .venv/bin/python -c 'import jax; print(jax.device_count(), \"devices\")'"
  exit 0
fi

CONFIG=${1:?usage: $0 --setup | $0 configs/<name>.py[:arg] [--config.x=y ...]}; shift
: "${WORKDIR:?set WORKDIR (a gs:// bucket path every worker can write)}"
EXTRA=$(printf ' %q' "$@")
ssh_all "cd ~/$REMOTE_DIR && set -o pipefail &&
  DIFFRESTORER_DISTRIBUTED=1 .venv/bin/diffrestorer-train --config=$CONFIG --workdir=$WORKDIR $EXTRA 2>&1 | tee -a ~/train.log"
