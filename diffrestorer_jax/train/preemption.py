"""Preemption: turn SIGTERM into "save at the current step, then exit 0".

Cloud TPU/GPU schedulers send SIGTERM some seconds before evicting a job. Dying mid-step would lose
everything since the last periodic checkpoint; exiting non-zero would make the scheduler count a
failure. So the handler only sets a flag, the loop finishes the step it is in, saves, waits for the
write and exits 0.

Multi-host runs must agree on the step at which to stop (hosts get the signal at different times and
a save is a collective). There JAX's own preemption service (started by `jax.distributed.initialize`,
listening for SIGTERM in C++) picks a common step, read through `orbax multihost.reached_preemption`;
installing a Python handler there would replace JAX's, so we don't. A SIGTERM to any one process
stops them all: the service tells every process, and each stops at the same check.

diffrestorer-train makes the guard before `jax.distributed.initialize`, so a SIGTERM while a host
waits for its peers is not fatal either; `distributed_started()` then hands such a signal to JAX's
service (or, on one process, puts our handler back over the one JAX installed).

The guard is made when the run starts, so a signal during data loading, restore, compilation or
sampling is not fatal: it is honoured at the next check (`should_stop`), which the loop makes after
each of those phases and after every step. The service counts checks, not steps: JAX's sync point
is "one past the furthest check any process made", so the counter must start at 0 with the process
(a resumed run's first step number would never meet a sync point set before it), and every process
makes the same sequence of checks.
"""
import logging
import signal
import threading
from typing import Optional, Sequence

import jax
from jax._src import distributed as _distributed
from orbax.checkpoint import multihost


def _multihost() -> bool:
    # the client first: before jax.distributed starts, asking for the process count would start
    # JAX's backend, after which jax.distributed.initialize refuses to run
    return _distributed.global_state.client is not None and jax.process_count() > 1


class PreemptionGuard:
    """`should_stop()` becomes True once a preemption notice (SIGTERM by default) arrived.

    Call it at the same points on every host (after each phase of start-up, after each step). Use as
    a context manager (or call `close()`) to put the previous signal handlers back.
    """

    def __init__(self, signals: Sequence[int] = (signal.SIGTERM,)):
        self._event = threading.Event()
        self._received = None  # the signal that set the event
        self._previous = {}
        self._checks = 0  # the multi-host sync counter (see the module doc)
        self._multihost = _multihost()
        if not self._multihost and threading.current_thread() is threading.main_thread():
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        del frame
        self._received = signum
        if not self._event.is_set():
            logging.warning("received signal %d: will checkpoint after the current step and exit",
                            signum)
        self._event.set()

    def distributed_started(self) -> None:
        """Call after `jax.distributed.initialize` when the guard was made before it. Starting, JAX's
        preemption service replaced our SIGTERM handler: with several processes it now decides when
        all stop, and a signal that came while this one waited for its peers is sent to it again, so
        every process stops at the same check; with one process our handler goes back."""
        self._multihost = _multihost()
        if self._multihost:
            self._previous = {}  # not ours to put back over JAX's handler
            if self._event.is_set():
                self._event.clear()
                signal.raise_signal(self._received)
        else:
            for sig in self._previous:
                signal.signal(sig, self._handle)

    def should_stop(self, step: Optional[int] = None) -> bool:
        """True at the check where every host should save and exit (`step` is for callers' logs)."""
        del step
        if self._multihost:
            self._checks += 1
            return bool(multihost.reached_preemption(self._checks)) or self._event.is_set()
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
