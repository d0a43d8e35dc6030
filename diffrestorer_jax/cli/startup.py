"""What every command does before its work: XLA's CPU setting before JAX starts, and a console a
person can read (progress, metrics, warnings and errors; library INFO logging only when asked)."""
import logging
import os
from typing import Optional

from absl import flags
from absl import logging as absl_logging

from diffrestorer_jax import xla_cpu


def prepare_process(backend_optimization_level: Optional[int] = None, *, restore: bool = False) -> None:
    """XLA_FLAGS for this process, before JAX creates its client: the CPU defaults (xla_cpu.py; those
    of a restoring command with `restore`) and, when given (and XLA_FLAGS does not set it), XLA CPU's
    LLVM optimisation level (0 compiles small programs about twice as fast; 1 compiles nearly as fast
    and runs elementwise work much faster)."""
    xla_cpu.set_cpu_defaults(restore=restore)
    flags_now = os.environ.get("XLA_FLAGS", "")
    if backend_optimization_level is not None and "xla_backend_optimization_level" not in flags_now:
        os.environ["XLA_FLAGS"] = (f"{flags_now} --xla_backend_optimization_level="
                                   f"{int(backend_optimization_level)}").strip()


def absl_console() -> None:
    """For absl commands, first thing in main: library INFO (Orbax's lines per save, JAX's) stays off
    the console unless `--verbosity=0` (or higher) asks for it; with `--log_dir`, everything at INFO
    goes to absl's log file there and the console keeps warnings and errors."""
    f = flags.FLAGS
    if f.log_dir:
        if not f["verbosity"].present:
            absl_logging.set_verbosity(absl_logging.INFO)
        if not f["stderrthreshold"].present:
            f.stderrthreshold = "warning"
        absl_logging.get_absl_handler().use_absl_log_file()
    elif not f["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)


def quiet_console() -> None:
    """For argparse commands: Python logging at WARNING on the console (absl's pre-flag-parsing
    notice is not printed)."""
    logging.getLogger().setLevel(logging.WARNING)
    absl_logging.set_verbosity(absl_logging.WARNING)
    absl_logging.use_python_logging(quiet=True)
