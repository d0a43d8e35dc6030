"""Test session setup: 8 fake CPU devices (for the sharding tests), the XLA CPU setting the commands
run with (xla_cpu.py), and float32 matmuls.

XLA_FLAGS must be set before JAX starts, so it lives here. The tests compile many small programs and
run each a few times, so XLA's CPU backend optimisations (LLVM passes) cost far more than they save:
level 0 roughly halves compile time and computes the same maths.
"""
import os

from diffrestorer_jax import xla_cpu

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                      "--xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The commands turn JAX's persistent compilation cache on by default; tests that call them in this
# process must not write into the user's cache (tests of the cache give their own folder).
os.environ.setdefault("DIFFRESTORER_COMPILE_CACHE", "off")
xla_cpu.set_cpu_defaults()

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
# The CPU client starts now, with these flags. Tests call commands' mains in this process, and a main
# sets XLA_FLAGS for its own process (the restoring ones leave out an XLA pass): were the client not
# yet made, it would take those flags for every test after it.
jax.devices()
