"""The XLA CPU backend setting this project runs with, put into XLA_FLAGS before JAX starts.

jax 0.10's CPU backend hands matmuls, convolutions and elementwise fusions to the YNNPACK library.
On the x86 CPUs we measured, its convolutions and elementwise loops were slower than XLA's own
(Eigen convolutions, XLA-fused loops) while its matmuls were faster: giving YNNPACK only the matmuls
took the SD 1.5 UNet forward at a 64x64 latent from 1.19x to 0.84x of PyTorch's time on the same
machine (benchmarks/RESULTS.md). GPU and TPU backends ignore the flag.

It only takes effect if set before JAX creates its CPU client (the first computation, not the
import), which importing `diffrestorer_jax` first guarantees. An explicit choice in XLA_FLAGS wins;
DIFFRESTORER_XLA_CPU_DEFAULTS=0 leaves XLA_FLAGS alone (e.g. for a jaxlib without the flag).
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
