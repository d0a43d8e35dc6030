"""Preemption: turn SIGTERM into "save at the current step, then exit 0".

Cloud TPU/GPU schedulers send SIGTERM some seconds before evicting a job. Dying mid-step would lose
everything since the last periodic checkpoint; exiting non-zero would make the scheduler count a
failure. So the handler only sets a flag, the loop finishes the step it is in, saves, waits for the
write and exits 0.

Multi-host runs must agree on the step at which to stop (hosts get the signal at different times and
a save is a collective). There JAX's own preemption service (started by `jax.distributed.initialize`,
listening for SIGTERM in C++) picks a common step, read through `orbax multihost.reached_preemption`;
installing a Python handler there would replace JAX's, so we don't.
"""
import logging
import signal
import threading
from typing import Sequence

import jax
from jax._src import distributed as _distributed
from orbax.checkpoint import multihost


def _multihost() -> bool:
    return jax.process_count() > 1 and _distributed.global_state.client is not None


class PreemptionGuard:
    """`should_stop(step)` becomes True once a preemption notice (SIGTERM by default) arrived.

    Call it once per step, on every host, with the step just completed. Use as a context manager (or
    call `close()`) to put the previous signal handlers back.
    """

    def __init__(self, signals: Sequence[int] = (signal.SIGTERM,)):
        self._event = threading.Event()
        self._previous = {}
        self._multihost = _multihost()
        if not self._multihost and threading.current_thread() is threading.main_thread():
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        del frame
        if not self._event.is_set():
            logging.warning("received signal %d: will checkpoint after the current step and exit",
                            signum)
        self._event.set()

    def should_stop(self, step: int) -> bool:
        """True at the step where every host should save and exit."""
        if self._multihost:
            return bool(multihost.reached_preemption(int(step))) or self._event.is_set()
        return self._event.is_set()

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
