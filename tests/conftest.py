"""Test session setup: 8 fake CPU devices (for the sharding tests) and float32 matmuls.

XLA_FLAGS must be set before jax is imported anywhere, so it lives here. The tests compile many small
programs and run each a few times, so XLA's CPU backend optimisations (LLVM passes) cost far more
than they save: level 0 roughly halves compile time and computes the same maths.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                      "--xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
