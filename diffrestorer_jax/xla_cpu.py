"""The XLA CPU backend settings this project runs with, put into XLA_FLAGS before JAX starts.

- jax 0.10's CPU backend hands matmuls, convolutions and elementwise fusions to the YNNPACK library.
  On x86 its convolutions and elementwise loops were slower than XLA's own while its matmuls were
  faster, so YNNPACK gets only the matmuls.
- For the restoring commands only (`restore=True`: restore, demo, app, evaluate): without XLA CPU's
  `tree_reduction_rewriter`. That pass rewrites every reduction over more than 32 elements into a
  reduce-window tree, each run as a loop of its own: it speeds the reductions over the pixels
  (GroupNorm, 2-3x) and slows those along the minor axis (softmax, LayerNorm), ~1,000 of them per
  tiny restore. Without it the attention-heavy denoising steps run faster, and GroupNorm builds its
  own trees for the pixels (`tree_reduction_pass_disabled`, models/group_norm.py): same process,
  same inputs, the tiny restore 1.14x images/s at 10 DDIM steps; SD 1.5 at 256² and 12 steps 1.01x.
  Training keeps XLA's default: `make demo-train`'s decoder steps ran 5-9% slower without the pass
  (the tiny stage-1 step ~10% faster; Intel host, 2026-12-07), and the recipe keeps its rounding.
  Results move by float rounding (~1e-6). GPU's pass of that job is named `tree-reduction-rewriter`
  and is not touched; TPU programs compile the same either way.
Measurements: benchmarks/RESULTS.md. GPU and TPU backends ignore the YNNPACK flag.

It only takes effect if set before JAX creates its CPU client (the first computation, not the
import): the commands (`diffrestorer_jax.cli`) call `set_cpu_defaults()` first thing in their main;
a program of your own can do the same. Importing the package changes nothing. An explicit choice in
XLA_FLAGS wins (each flag on its own); DIFFRESTORER_XLA_CPU_DEFAULTS=0 leaves XLA_FLAGS alone
(e.g. for a jaxlib without the flags).
"""
import os
from typing import MutableMapping

YNN_FLAG = "xla_cpu_experimental_ynn_fusion_type"
YNN_MATMULS_ONLY = "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"
DISABLE_PASSES_FLAG = "xla_disable_hlo_passes"
CPU_TREE_REDUCTION_PASS = "tree_reduction_rewriter"
DEFAULTS = ((YNN_FLAG, YNN_MATMULS_ONLY),)
RESTORE_DEFAULTS = DEFAULTS + ((DISABLE_PASSES_FLAG, CPU_TREE_REDUCTION_PASS),)


def set_cpu_defaults(env: MutableMapping[str, str] = os.environ, *, restore: bool = False) -> bool:
    """Add each flag of DEFAULTS (RESTORE_DEFAULTS for a restoring command) to env['XLA_FLAGS'] unless
    the user set that flag or opted out. Returns whether it changed anything."""
    if env.get("DIFFRESTORER_XLA_CPU_DEFAULTS", "1") == "0":
        return False
    flags = env.get("XLA_FLAGS", "")
    wanted = RESTORE_DEFAULTS if restore else DEFAULTS
    missing = [f"--{name}={value}" for name, value in wanted if name not in flags]
    if not missing:
        return False
    env["XLA_FLAGS"] = " ".join([flags, *missing]).strip()
    return True


def tree_reduction_pass_disabled(env: MutableMapping[str, str] = os.environ) -> bool:
    """Whether env's XLA_FLAGS leave out XLA CPU's tree_reduction_rewriter (as the restoring commands
    do), so that code which needs its reduction trees must build them itself (models/group_norm.py)."""
    for flag in env.get("XLA_FLAGS", "").split():
        name, _, value = flag.lstrip("-").partition("=")
        if name == DISABLE_PASSES_FLAG and CPU_TREE_REDUCTION_PASS in value.split(","):
            return True
    return False
