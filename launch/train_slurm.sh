#!/usr/bin/env bash
# Train on a SLURM GPU cluster: one process per GPU, all nodes of the allocation.
#
#   sbatch --nodes=2 launch/train_slurm.sh configs/sd15.py:stage1 /shared/runs/sd15_s1 [--config.x=y]
#
# JAX's SLURM detection (used by jax.distributed.initialize() in diffrestorer-train when
# SLURM_NTASKS > 1) reads the coordinator, process count and id from the SLURM env; we also set
# them explicitly so the launch works where auto-detection does not. WORKDIR must be on a shared
# filesystem. Resubmitting the same job resumes from the latest checkpoint; SLURM's SIGTERM before
# a time limit or preemption (--signal) makes every process save at the same step and exit 0.
#SBATCH --job-name=diffrestorer
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --signal=TERM@120
#SBATCH --requeue
set -euo pipefail
CONFIG=${1:?usage: $0 configs/<name>.py[:arg] WORKDIR [--config.x=y ...]}; WORKDIR=${2:?workdir}; shift 2

COORD_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export JAX_COORDINATOR_ADDRESS="${COORD_HOST}:12355"
export JAX_NUM_PROCESSES="$SLURM_NTASKS"

# One task per GPU: each sees one device; JAX_PROCESS_ID comes from the task's rank.
srun --kill-on-bad-exit=1 bash -c '
  export JAX_PROCESS_ID=$SLURM_PROCID CUDA_VISIBLE_DEVICES=$SLURM_LOCALID
  exec diffrestorer-train --config="$0" --workdir="$1" "${@:2}"' "$CONFIG" "$WORKDIR" "$@"
