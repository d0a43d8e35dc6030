#!/usr/bin/env bash
# One-GPU benchmark: ours vs diffusers PyTorch on the same card in one run (< 10 min on one H100).
#   bash benchmarks/gpu.sh [extra gpu_bench.py flags, e.g. --batch 16 --restore_batch 8]
# Installs what it needs when missing (jax[cuda12], torch, diffusers, transformers, this package),
# prints the card, then runs benchmarks/gpu_bench.py (attention check, stage-1 train step images/s
# and MFU at 512^2 bf16, restore images/s at 512^2 with 50 DDIM steps). Output is also saved to
# benchmarks/gpu_results_<card>.txt for RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || { echo "no NVIDIA GPU"; exit 1; }
if ! $PY -c "import jax, sys; sys.exit(0 if jax.devices()[0].platform == 'gpu' else 1)" 2>/dev/null; then
  $PY -m pip install -q "jax[cuda12]"
fi
$PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null \
  || $PY -m pip install -q torch --index-url https://download.pytorch.org/whl/cu124
$PY -c "import diffusers, transformers, flax, optax, ml_collections" 2>/dev/null \
  || $PY -m pip install -q diffusers transformers safetensors
$PY -c "import diffrestorer_jax" 2>/dev/null || $PY -m pip install -q -e .
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.45}  # leave half to torch
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' ' '_')
timeout 570 $PY benchmarks/gpu_bench.py "$@" 2>&1 | tee "benchmarks/gpu_results_${card}.txt"
