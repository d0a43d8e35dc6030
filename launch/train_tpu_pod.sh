#!/usr/bin/env bash
# Train on every worker of a Cloud TPU VM pod slice (e.g. v4-32, v5p-64).
#
#   TPU_NAME=my-pod ZONE=us-central2-b WORKDIR=gs://bucket/runs/sd15_s1 \
#     launch/train_tpu_pod.sh configs/sd15.py:stage1 [--config.x=y ...]
#
# The same command runs on all workers (--worker=all). Each worker's JAX finds its peers from the
# TPU metadata: diffrestorer-train calls jax.distributed.initialize() when TPU_WORKER_HOSTNAMES lists
# several hosts. WORKDIR must be shared storage (a GCS bucket): Orbax writes each host's shards
# there, and a re-run of this script resumes from the latest checkpoint (e.g. after preemption:
# SIGTERM makes every host save at the same step and exit 0).
# Assumes the repo is checked out at ~/diffrestorer_jax with its venv on every worker.
set -euo pipefail
CONFIG=${1:?usage: $0 configs/<name>.py[:arg] [--config.x=y ...]}; shift
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${WORKDIR:?set WORKDIR}"
EXTRA=$(printf ' %q' "$@")

gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command "
  cd ~/diffrestorer_jax && . .venv/bin/activate &&
  diffrestorer-train --config=$CONFIG --workdir=$WORKDIR $EXTRA 2>&1 | tee -a ~/train.log"
