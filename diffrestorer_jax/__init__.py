"""Diff-Restorer in JAX/Flax."""
