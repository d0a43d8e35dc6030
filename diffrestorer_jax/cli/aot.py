"""diffrestorer-aot: compile Diff-Restorer's steps for a TPU slice or an 8-GPU host on this (CPU)
host, and report memory and FLOPs.

    diffrestorer-aot --config configs/sd15.py:stage1 --topology v5e-256 --batch 256 \
        [--what train|restore] [--num_slices 2] [--restore_steps 2] [--config.x=y ...]
    diffrestorer-aot --config configs/sd15.py:stage1 --topology h100x8 --batch 16

TPU topologies need `libtpu` (pip install -e .[tpu_aot]) but no TPU; h100x8 / h200x8 need the
CUDA PJRT plugin (pip install -e .[gpu_aot], best in an environment of its own) but no GPU, and
compile attention with XLA's implementation (cuDNN's needs a GPU to build its kernels). `--what
train` compiles the config's stage step, `--what restore` the restore CLI's whole program (CLIP,
prompts, the sampler's lax.scan over `--restore_steps` denoising steps, decoder; `--restore_dtype`,
`--restore_weights`, `--restore_exact` as the CLI's --dtype, --weights, --exact). The printout gives
per chip: argument / output / temp /
total bytes against the chip's HBM, XLA's FLOPs beside our model FLOP count, the step time implied at
a few MFUs, and the compile time. Exit status 1 if it does not fit; 2, with a one-line message, for
input it cannot compile (an unknown topology, a batch the chips cannot split), so a sweep can tell
"does not fit" from a mistake.
"""
import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from diffrestorer_jax.cli import startup

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/<name>.py[:arg]", lock_config=False)
_TOPOLOGY = flags.DEFINE_string("topology", "v5e-256", "TPU slice (v4-32, v5e-256, v5p-128, v6e-256, "
                                "...) or GPU host (h100x8, h200x8)")
_SLICES = flags.DEFINE_integer("num_slices", 1, "slices joined over DCN (set config.mesh.dcn_* too)")
_BATCH = flags.DEFINE_integer("batch", None, "global batch (default: config.train.batch_size)")
_WHAT = flags.DEFINE_enum("what", "train", ["train", "restore", "stage1", "stage2"],
                          "train = the config's stage step (stage1/stage2 are aliases that also set "
                          "config.stage), or restore")
_STEPS = flags.DEFINE_integer("restore_steps", 2, "denoising steps compiled into restore (memory "
                              "per step does not depend on it; the report also gives FLOPs at 50)")
_RESTORE_DTYPE = flags.DEFINE_enum("restore_dtype", "bfloat16", ["bfloat16", "float32"],
                                   "restore: weights and compute dtype (the CLI's default on TPU: bfloat16)")
_RESTORE_WEIGHTS = flags.DEFINE_enum("restore_weights", "replicated", ["replicated", "sharded"],
                                     "restore: weights replicated on every chip or sharded over them")
_RESTORE_EXACT = flags.DEFINE_bool("restore_exact", False, "restore: images one at a time per chip "
                                   "(the CLI's --exact) instead of as one batch")
_PAIRED = flags.DEFINE_bool("paired", False, "train step with paired LQ in the batch (no on-device "
                            "degradation: most of the HLO and compile time, little memory/FLOPs)")
_EFFORT = flags.DEFINE_float("effort", None, "XLA exec_time_optimization_effort in [-1, 1] (-1: faster "
                             "compile, less optimised schedule; memory numbers may be pessimistic)")
_MFU = flags.DEFINE_list("mfu", ["0.3", "0.4", "0.5"], "MFUs at which to print the implied step time")
flags.mark_flags_as_required(["config"])


def main(argv) -> int:
    del argv
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile for the topology; never grab a real device
    startup.prepare_process()
    startup.absl_console()
    from diffrestorer_jax.parallel import topology
    from diffrestorer_jax.tools import aot
    config = _CONFIG.value
    if _WHAT.value in ("stage1", "stage2"):
        config.stage = _WHAT.value
    if _BATCH.value:
        config.train.batch_size = _BATCH.value
    try:
        gpu = topology.is_gpu(_TOPOLOGY.value)
        gen = topology.accelerator(_TOPOLOGY.value)
        devices = topology.topology_devices(_TOPOLOGY.value, _SLICES.value)
    except (ValueError, RuntimeError) as e:  # an unknown name, a missing libtpu or CUDA plugin
        print(f"error: --topology {_TOPOLOGY.value}: {e}", file=sys.stderr)
        return 2
    where = "" if gpu else f", topology {topology.tpu_spec(_TOPOLOGY.value).topology_name}"
    print(f"{_TOPOLOGY.value} x {_SLICES.value} slice(s): {len(devices)} devices "
          f"({devices[0].device_kind}){where}", flush=True)
    if gpu and config.model.attention_impl in ("auto", "cudnn"):
        print("attention: XLA's (cuDNN's fused kernel cannot be built without a GPU)", flush=True)
        config.model.attention_impl = "xla"
    mfus = tuple(float(u) for u in _MFU.value)
    opts = dict(topology.GPU_AOT_OPTIONS) if gpu else {}
    if _EFFORT.value is not None:
        opts["exec_time_optimization_effort"] = _EFFORT.value
    opts, backend = opts or None, "gpu" if gpu else "tpu"
    try:
        if _WHAT.value == "restore":
            batch = _BATCH.value or int(config.train.batch_size)
            report = aot.compile_restore(config, devices, batch, _STEPS.value, dtype=_RESTORE_DTYPE.value,
                                         weights=_RESTORE_WEIGHTS.value, exact=_RESTORE_EXACT.value,
                                         compiler_options=opts, backend=backend)
        else:
            report = aot.compile_train_step(config, devices, paired=_PAIRED.value, compiler_options=opts,
                                            backend=backend)
    except ValueError as e:  # e.g. jax's IndivisibleError: a batch the mesh cannot split
        logging.info("compilation refused", exc_info=True)
        print(f"error: cannot compile for {_TOPOLOGY.value} (batch {config.train.batch_size}, mesh "
              f"{dict(config.mesh)}): {str(e)[:400]}", file=sys.stderr)
        return 2
    print(aot.format_report(report, gen, mfus))
    return 0 if aot.fits(report, gen) else 1


def run() -> None:
    """The console script."""
    app.run(main)


if __name__ == "__main__":
    run()
