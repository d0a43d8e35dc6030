"""Diff-Restorer in JAX/Flax."""
from diffrestorer_jax.xla_cpu import set_cpu_defaults as _set_cpu_defaults

_set_cpu_defaults()
