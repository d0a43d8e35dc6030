"""One run per workdir: process 0 holds `<workdir>/run.lock` while it trains, so two runs never race
each other's checkpoint saves, `keep_checkpoints` deletions or the export.

The lock file (created with O_EXCL) names the host, the process id and when it was taken, and is
refreshed while the run lives. A lock left by a run that was killed is stale: on the same host when
its process is gone, on another host (a pre-empted VM's) when it has not been refreshed for
`stale_after_s`. A stale lock is reported and taken over; a live one stops the new run with a message
saying who holds it.
"""
import json
import os
import socket
import time
from typing import Optional

from diffrestorer_jax.atomic import process_alive

LOCK_FILE = "run.lock"


class WorkdirLocked(RuntimeError):
    """Another live run holds the workdir."""


class WorkdirLock:
    """`acquire()` / `refresh()` / `release()`; on processes other than 0 every call is a no-op."""

    def __init__(self, workdir: str, primary: bool = True, stale_after_s: float = 1800.0):
        self.path = os.path.join(os.path.abspath(os.fspath(workdir)), LOCK_FILE)
        self.primary, self.stale_after_s = primary, stale_after_s
        self.held = False

    def _holder(self) -> Optional[dict]:
        try:
            with open(self.path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def _stale_reason(self, holder: Optional[dict]) -> Optional[str]:
        if holder is None:
            return "an unreadable lock file"
        age = time.time() - os.path.getmtime(self.path)
        if holder.get("host") == socket.gethostname():
            if not process_alive(int(holder.get("pid", -1))):
                return f"process {holder.get('pid')} on this host is gone"
            return None
        if age > self.stale_after_s:
            return f"host {holder.get('host')} has not refreshed it for {age / 60:.0f} min"
        return None

    def acquire(self) -> Optional[str]:
        """Take the lock; returns a note when a stale lock was taken over (None otherwise)."""
        if not self.primary:
            return None
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        note = None
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                reason = self._stale_reason(holder)
                if reason is None:
                    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
                    raise WorkdirLocked(
                        f"{os.path.dirname(self.path)} is in use by another run (pid {holder.get('pid')} on "
                        f"{holder.get('host')}, since {since}); wait for it, use another --workdir, or, if "
                        f"that run is gone, delete {self.path}") from None
                note = f"took over the stale lock of a run that is gone ({reason}): {self.path}"
                os.remove(self.path)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}, f)
            self.held = True
            return note
        raise WorkdirLocked(f"could not take {self.path}: another run took it at the same moment")

    def refresh(self) -> None:
        """Show that the holder lives (called at the loop's logging cadence)."""
        if self.held:
            os.utime(self.path)

    def release(self) -> None:
        if self.held:
            holder = self._holder()
            if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
                os.remove(self.path)
            self.held = False
