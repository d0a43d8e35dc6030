"""The XLA CPU backend setting this project runs with, put into XLA_FLAGS before JAX starts.

jax 0.10's CPU backend hands matmuls, convolutions and elementwise fusions to the YNNPACK library.
On x86 its convolutions and elementwise loops were slower than XLA's own while its matmuls were
faster, so YNNPACK gets only the matmuls (measurements in benchmarks/RESULTS.md). GPU and TPU
backends ignore the flag.

It only takes effect if set before JAX creates its CPU client (the first computation, not the
import): the commands (`diffrestorer_jax.cli`) call `set_cpu_defaults()` first thing in their main;
a program of your own can do the same. Importing the package changes nothing. An explicit choice in
XLA_FLAGS wins; DIFFRESTORER_XLA_CPU_DEFAULTS=0 leaves XLA_FLAGS alone (e.g. for a jaxlib without
the flag).
"""
import os
from typing import MutableMapping

YNN_FLAG = "xla_cpu_experimental_ynn_fusion_type"
YNN_MATMULS_ONLY = "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"


def set_cpu_defaults(env: MutableMapping[str, str] = os.environ) -> bool:
    """Add --xla_cpu_experimental_ynn_fusion_type=<matmuls only> to env['XLA_FLAGS'] unless the user
    set that flag or opted out. Returns whether it changed anything."""
    if env.get("DIFFRESTORER_XLA_CPU_DEFAULTS", "1") == "0":
        return False
    flags = env.get("XLA_FLAGS", "")
    if YNN_FLAG in flags:
        return False
    env["XLA_FLAGS"] = f"{flags} --{YNN_FLAG}={YNN_MATMULS_ONLY}".strip()
    return True
