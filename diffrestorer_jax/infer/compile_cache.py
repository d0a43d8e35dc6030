"""Compiling once across runs: JAX's persistent compilation cache for the commands, and a clock of
the time a run spends compiling.

    folder = cache_folder(flag_value)      # the flag, else $DIFFRESTORER_COMPILE_CACHE, else the default
    enable(folder)                         # before the process's first compilation
    with CompileClock() as clock: ...      # clock.seconds, clock.programs, clock.cache_hits

The cache key covers the program, its shapes and shardings, the XLA flags, the backend and the
jax/jaxlib versions, so a second run of the same command on the same machine loads every program
from disk; anything that changes a program compiles it again. The cache never changes a result.
"""
import dataclasses
import os
from typing import Optional

import jax

ENV = "DIFFRESTORER_COMPILE_CACHE"
OFF = ("", "off", "none", "0", "false")
# JAX's monitoring events (jax/_src/dispatch.py, compiler.py): tracing, lowering to MLIR, and the
# backend compilation, which includes reading the persistent cache when it hits.
_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                   "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")
_BACKEND_EVENT = _COMPILE_EVENTS[-1]
_HIT_EVENT = "/jax/compilation_cache/cache_hits"


def default_folder() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "diffrestorer_jax", "xla")


def cache_folder(given: Optional[str] = None) -> Optional[str]:
    """The cache folder to use: `given` (a command's flag), else $DIFFRESTORER_COMPILE_CACHE, else
    `default_folder()`; None when the value is 'off' (or '', 'none', '0', 'false')."""
    value = given if given is not None else os.environ.get(ENV)
    if value is None:
        return default_folder()
    if value.strip().lower() in OFF:
        return None
    return os.path.abspath(os.path.expanduser(value))


def enable(folder: Optional[str]) -> Optional[str]:
    """Turn the persistent cache on in `folder` (created if missing); None leaves it off. Call it
    before the process compiles anything: JAX decides once whether a process uses the cache."""
    if folder is None:
        return None
    os.makedirs(folder, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", folder)
    # Programs that compile in under a second are not worth a file (JAX's default threshold).
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    return folder


@dataclasses.dataclass
class CompileClock:
    """Seconds spent tracing, lowering and compiling (or loading from the persistent cache) while
    it is entered: `seconds` in all, `backend_seconds` of them in XLA's compiler or the cache (the
    rest is tracing and lowering to MLIR, which the cache cannot skip: its key is the lowered
    program). `programs` counts backend compilations, `cache_hits` those the cache answered. Enter
    it again to keep adding."""
    seconds: float = 0.0
    backend_seconds: float = 0.0
    programs: int = 0
    cache_hits: int = 0

    def _on_duration(self, event: str, duration: float, **kwargs) -> None:
        if event in _COMPILE_EVENTS:
            self.seconds += duration
            if event == _BACKEND_EVENT:
                self.backend_seconds += duration
                self.programs += 1

    def _on_event(self, event: str, **kwargs) -> None:
        self.cache_hits += event == _HIT_EVENT

    def __enter__(self):
        jax.monitoring.register_event_duration_secs_listener(self._on_duration)
        jax.monitoring.register_event_listener(self._on_event)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self._on_duration)
        jax.monitoring.unregister_event_listener(self._on_event)
        return False
