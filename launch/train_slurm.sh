#!/usr/bin/env bash
# Train on a SLURM GPU cluster: one process per GPU, on every node of the allocation. Submit it from
# the root of this checkout, installed once with its GPU extra into .venv on a shared file system:
#
#   python3 -m venv .venv && .venv/bin/pip install -e '.[cuda,gcs]'
#   sbatch --nodes=2 launch/train_slurm.sh configs/sd15.py:stage1 /shared/runs/sd15_s1 \
#       --config.weights.unet=weights/sd15/unet ...
#
# JAX's SLURM detection (used by jax.distributed.initialize() in diffrestorer-train when
# SLURM_NTASKS > 1) reads the coordinator, process count and id from the SLURM env; we also set
# them explicitly so the launch works where auto-detection does not. The coordinator listens on the
# first node's port 20000 + SLURM_JOB_ID % 12000, one per job: two jobs whose first node is the same
# machine (two 4-GPU jobs on an 8-GPU node) must not share it, or the second kills the first one's
# coordinator. The range stays below Linux's ephemeral ports (32768-60999), which outgoing
# connections take; set JAX_COORDINATOR_PORT to choose the port yourself. WORKDIR must be on a file
# system every node sees (or a gs:// bucket). Submitting the same job again resumes from the latest
# checkpoint; SLURM's SIGTERM before the time limit or on preemption (--signal, sent to every task)
# makes every process save the same step and exit 0, and --requeue puts the job back in the queue.
#SBATCH --job-name=diffrestorer
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --signal=TERM@120
#SBATCH --requeue
#SBATCH --output=diffrestorer-%j.log
set -euo pipefail
CONFIG=${1:?usage: $0 configs/<name>.py[:arg] WORKDIR [--config.x=y ...]}; WORKDIR=${2:?workdir}; shift 2
REPO=${SLURM_SUBMIT_DIR:-$PWD}
TRAIN="$REPO/.venv/bin/diffrestorer-train"
[[ -x "$TRAIN" ]] || { echo "$TRAIN not found: install this checkout into .venv first (see the top of $0)" >&2; exit 2; }

COORD_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)  # sed reads all: no SIGPIPE under pipefail
export JAX_COORDINATOR_ADDRESS="${COORD_HOST}:${JAX_COORDINATOR_PORT:-$(( 20000 + SLURM_JOB_ID % 12000 ))}"
export JAX_NUM_PROCESSES="$SLURM_NTASKS"

# One task per GPU: each sees one device; JAX_PROCESS_ID comes from the task's rank. Where SLURM
# already gave each task its own GPU (--gpus-per-task, --gpu-bind), CUDA_VISIBLE_DEVICES names one
# device and is left alone; where every task sees the node's GPUs, task k keeps the k-th of them.
# JAX_LOCAL_DEVICE_IDS=0: that one device is device 0 of the task. Unset, jax.distributed.initialize
# sees SLURM and restricts task k to device k (SLURM_LOCALID), which does not exist when it sees one.
cd "$REPO"
srun --kill-on-bad-exit=1 bash -c '
  export JAX_PROCESS_ID=$SLURM_PROCID JAX_LOCAL_DEVICE_IDS=0
  if [[ -z "${CUDA_VISIBLE_DEVICES:-}" ]]; then
    export CUDA_VISIBLE_DEVICES=$SLURM_LOCALID
  elif [[ "$CUDA_VISIBLE_DEVICES" == *,* ]]; then
    IFS=, read -ra visible <<< "$CUDA_VISIBLE_DEVICES"
    export CUDA_VISIBLE_DEVICES=${visible[$SLURM_LOCALID]}
  fi
  exec "$0" --config="$1" --workdir="$2" "${@:3}"' "$TRAIN" "$CONFIG" "$WORKDIR" "$@"
