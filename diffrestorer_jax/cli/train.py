"""diffrestorer-train: train Diff-Restorer (either stage, or the demo's from-scratch prior).

    diffrestorer-train --config configs/tiny.py:stage1 --workdir runs/tiny_s1 [--config.x=y ...]

The stage comes from the config (`stage`: stage1 | stage2 | prior_vae | prior_unet | prior_clip).
Re-running the same command resumes from the workdir's latest checkpoint. SIGTERM (preemption) saves
a checkpoint at the current step and exits 0. On several hosts (TPU pod, SLURM) run the same command
on every host; `jax.distributed` is initialised from the environment (see launch/train_*.sh). The
console shows progress, metrics, warnings and errors; library INFO logging goes to `--log_dir` if
given, or to the console with `--verbosity=0`.
"""
import logging
import sys

from absl import app, flags
from ml_collections import config_flags

from diffrestorer_jax.cli import startup

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/<name>.py[:arg]", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory: checkpoints, TensorBoard, export")
_FAST = flags.DEFINE_bool("fast_compile", False, "XLA backend optimisation level 0 (CPU tests)")
_ALLOW = flags.DEFINE_bool("allow_config_changes", False, "resume even though the workdir's checkpoint "
                           "was made with another model, data, seed, batch or frozen weights (not "
                           "another model's shapes: those cannot restore)")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv) -> int:
    del argv
    startup.prepare_process()
    startup.absl_console()
    from diffrestorer_jax.train.preemption import PreemptionGuard
    guard = PreemptionGuard()  # from here on a SIGTERM is a request to save and stop, not death,
    # also while this host waits for the others in jax.distributed.initialize
    from diffrestorer_jax.parallel.mesh import DistributedInitError, maybe_initialize_distributed
    try:
        if maybe_initialize_distributed():  # before any other JAX call
            guard.distributed_started()
    except DistributedInitError as e:
        print(f"error: {e}", file=sys.stderr)
        guard.close()
        return 2
    from diffrestorer_jax.data.sources import DataConfigError
    from diffrestorer_jax.train import loop, run
    from diffrestorer_jax.train.checkpoint import DamagedCheckpoint, ShapeMismatch
    from diffrestorer_jax.train.resume_check import ResumeMismatch
    from diffrestorer_jax.train.state import GivenWeightsError
    from diffrestorer_jax.train.workdir_lock import WorkdirLocked
    try:
        status = loop.train(_CONFIG.value, _WORKDIR.value, guard=guard,
                            compiler_options=run.FAST_COMPILE if _FAST.value else None,
                            allow_config_changes=_ALLOW.value)
    except (FloatingPointError, DataConfigError, ResumeMismatch, ShapeMismatch, DamagedCheckpoint,
            WorkdirLocked, GivenWeightsError, OSError) as e:
        # the non-finite streak, data that is not there, a workdir of another run or in use, a
        # damaged checkpoint, given weights that are missing, damaged or of another model config, a
        # workdir that cannot be written: a message, not a traceback (which goes to the INFO log)
        logging.info("training stopped", exc_info=True)
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        guard.close()
    print(f"training {status}", flush=True)
    return 0


def run() -> None:
    """The console script."""
    app.run(main)


if __name__ == "__main__":
    run()
