#!/usr/bin/env bash
# One-GPU benchmark: ours vs diffusers PyTorch on the same card in one run (parts share a 560 s budget).
#   bash benchmarks/gpu.sh [extra gpu_bench.py flags, e.g. --batch 16 --restore_batch 8]
# Prints the card, then runs benchmarks/gpu_bench.py one part per process: the cuDNN attention
# check; ours: the stage-1 train step at 512^2 bf16 (images/s and MFU) and restore at 512^2 with 50
# DDIM steps (images/s); the same two in PyTorch; last the side-by-side summary whose final line is
# the benchmarks/RESULTS.md row. Output is also saved to benchmarks/gpu_results_<card>.txt.
# Environment:
#   GPU_BENCH_BUDGET   seconds for all parts together (default 560); a part gets what is left, up
#                      to its own cap, and parts that no longer fit are reported as skipped
#   GPU_BENCH_WHEELS   a folder of wheels to install offline (no index) when the machine has no
#                      network; otherwise missing packages come from PyPI
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's package, installed or not
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || { echo "no NVIDIA GPU"; exit 1; }
card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' ' '_')
log="benchmarks/gpu_results_${card}.txt"
results="benchmarks/gpu_results_${card}.jsonl"
exec > >(tee "$log") 2>&1  # everything below, versions included, lands in the log too
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv,noheader
if [ -n "${GPU_BENCH_WHEELS:-}" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/gpu_bench_site \
    "$GPU_BENCH_WHEELS"/*.whl || exit 1
  export PYTHONPATH=/tmp/gpu_bench_site${PYTHONPATH:+:$PYTHONPATH}
else
  $PY -c "import jax, sys; sys.exit(0 if jax.devices()[0].platform == 'gpu' else 1)" 2>/dev/null \
    || $PY -m pip install -q "jax[cuda12]"
  $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null \
    || $PY -m pip install -q torch --index-url https://download.pytorch.org/whl/cu124
  $PY -c "import diffusers, transformers, flax, optax, ml_collections, grain, dm_pix" 2>/dev/null \
    || $PY -m pip install -q -e . diffusers
fi
$PY -c "import jax, flax, optax, torch, diffusers, transformers as t; print('jax', jax.__version__, jax.devices(), \
'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__, 'diffusers', diffusers.__version__, \
'transformers', t.__version__)" || exit 1
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
rm -f "$results"
budget=${GPU_BENCH_BUDGET:-560}
start=$SECONDS
# The model-FLOP count for MFU runs on the host CPU beside the GPU parts (minutes at SD 1.5 size).
JAX_PLATFORMS=cpu timeout "$budget" $PY benchmarks/gpu_bench.py --part flops --results "$results" "$@" \
  > /tmp/gpu_bench_flops.log 2>&1 &
flops_pid=$!
# part:cap seconds. Each side of a comparison runs alone on the card; the torch parts keep JAX
# from taking GPU memory in case it gets imported. Ours go first: their compiles are the long,
# uncertain part (on an H100 the PyTorch parts took 34 and 38 s, model building included).
for pc in attention:30 train_ours:260 restore_ours:150 train_torch:60 restore_torch:60; do
  part=${pc%%:*} cap=${pc##*:}
  left=$((budget - (SECONDS - start) - 10))
  ((left < cap)) && cap=$left
  if ((cap < 20)); then echo "== $part: skipped, the budget is spent"; continue; fi
  echo "== $part (at most ${cap}s)"
  t0=$SECONDS
  XLA_PYTHON_CLIENT_PREALLOCATE=$([[ $part == *torch ]] && echo false || echo true) \
    timeout "$cap" $PY benchmarks/gpu_bench.py --part "$part" --results "$results" "$@"
  rc=$?
  echo "== $part: rc $rc in $((SECONDS - t0))s$( ((rc == 124)) && echo ' (timed out)')"
done
wait $flops_pid || echo "== flops: rc $? (no MFU figures; see /tmp/gpu_bench_flops.log)"
echo "== summary"
if [ -s "$results" ]; then $PY benchmarks/gpu_bench.py --summary "$results"; else echo "no part produced a figure"; fi
