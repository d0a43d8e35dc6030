#!/usr/bin/env bash
# Train on every worker of a Cloud TPU VM pod slice (e.g. v5litepod-256, v4-32, v5p-64), from your
# own machine (gcloud installed and logged in), in the root of this checkout (a git clone).
#
#   # once per TPU VM: copy this checkout's HEAD commit to every worker and install it there
#   # (jax[tpu], gcsfs; needs Python >= 3.11 there: PYTHON=python3.11 picks the interpreter)
#   TPU_NAME=my-pod ZONE=us-west4-a launch/train_tpu_pod.sh --setup
#   # train; the same command again resumes from the latest checkpoint in WORKDIR
#   TPU_NAME=my-pod ZONE=us-west4-a WORKDIR=gs://my-bucket/runs/sd15_s1 \
#     launch/train_tpu_pod.sh configs/sd15.py:stage1_pod --config.x=y ...
#   TPU_NAME=my-pod ZONE=us-west4-a launch/train_tpu_pod.sh --logs   # follow worker 0's log again
#   TPU_NAME=my-pod ZONE=us-west4-a launch/train_tpu_pod.sh --stop   # save the same step everywhere, exit
#
# Training starts in the background on every worker (--worker=all), detached from the ssh session, so
# closing this terminal or losing the connection does not stop it; this command then follows worker
# 0's log (Ctrl-C stops following, not training; FOLLOW=0 returns at once). Each worker's console goes
# to ~/train.log there. It runs with DIFFRESTORER_DISTRIBUTED=1: a TPU VM lists its workers only in
# its metadata server, so this tells diffrestorer-train to call jax.distributed.initialize(), which
# finds its peers there (on a one-host TPU VM, a job of one process). WORKDIR must be a bucket
# (gs://...) every worker can write: checkpoints (each worker writes its own shards), TensorBoard logs
# and the export go there. Weights and datasets may be gs:// paths too. On preemption or --stop
# (SIGTERM to the workers) every worker saves the same step and exits 0; run the same command again to
# resume. A second start while a run lives on the same WORKDIR is refused (WORKDIR/run.lock).
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
REMOTE_DIR=diffrestorer_jax
PYTHON=${PYTHON:-python3}
ssh_workers() { gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker="$1" --command "$2"; }
follow() { ssh_workers 0 "tail -n 50 -F ~/train.log"; }

case "${1:-}" in
  --setup)
    tarball=$(mktemp --suffix=.tar.gz)
    git archive --format=tar.gz -o "$tarball" HEAD
    if [[ -n "$(git status --porcelain --untracked-files=no)" ]]; then
      echo "note: uncommitted changes are not copied (the workers get HEAD, $(git rev-parse --short HEAD))" >&2
    fi
    gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME":~/diffrestorer_jax.tar.gz --zone="$ZONE" --worker=all
    rm -f "$tarball"
    ssh_workers all "set -e; $PYTHON -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
      { echo \"\$(hostname): $PYTHON is \$($PYTHON -V 2>&1); diffrestorer_jax needs Python >= 3.11 (set PYTHON=...)\" >&2; exit 2; }
      rm -rf ~/$REMOTE_DIR && mkdir -p ~/$REMOTE_DIR && tar -xzf ~/diffrestorer_jax.tar.gz -C ~/$REMOTE_DIR &&
      cd ~/$REMOTE_DIR && $PYTHON -m venv .venv && .venv/bin/pip install -q --upgrade pip &&
      .venv/bin/pip install -q -e '.[tpu,gcs]' && .venv/bin/python -c 'import jax; print(jax.device_count(), \"devices\")'"
    exit 0 ;;
  --logs) follow; exit 0 ;;
  --stop)
    # SIGTERM is what a preemption sends: every worker saves the same step and exits 0
    ssh_workers all "pkill -TERM -f \"\$HOME/$REMOTE_DIR/[.]venv/bin/diffrestorer-train\" && echo \"\$(hostname): stopping\" ||
      echo \"\$(hostname): no training running\""
    exit 0 ;;
esac

CONFIG=${1:?usage: $0 --setup | --logs | --stop | configs/<name>.py[:arg] [--config.x=y ...]}; shift
: "${WORKDIR:?set WORKDIR (a gs:// bucket path every worker can write)}"
ARGS=$(printf ' %q' "--config=$CONFIG" "--workdir=$WORKDIR" "$@")
# setsid + nohup + no terminal: the run outlives the ssh session that starts it; HUP is ignored from
# before the fork, so a hang-up that comes before setsid/nohup have run cannot end it either
ssh_workers all "cd ~/$REMOTE_DIR && echo \"== \$(date -u): diffrestorer-train starts\" >> ~/train.log &&
  trap '' HUP && { DIFFRESTORER_DISTRIBUTED=1 setsid nohup \$HOME/$REMOTE_DIR/.venv/bin/diffrestorer-train$ARGS >> ~/train.log 2>&1 < /dev/null & } &&
  echo \"\$(hostname): training started (log: ~/train.log)\""
if [[ "${FOLLOW:-1}" != 0 ]]; then
  echo "following worker 0's log; Ctrl-C stops following, not training ($0 --logs to follow again, --stop to stop)"
  follow
fi
