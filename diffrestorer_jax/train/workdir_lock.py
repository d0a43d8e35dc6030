"""One run per workdir: process 0 holds `<workdir>/run.lock` while it trains, so two runs never race
each other's checkpoint saves, `keep_checkpoints` deletions or the export.

The lock file names the host, the process id, when it was taken and when it was last refreshed (the
run refreshes it at every log line). A lock left by a run that was killed is stale: on the same host
when its process is gone, on another host (a pre-empted VM's) when it has not been refreshed for
`stale_after_s`. A stale lock is reported and taken over; a live one stops the new run with a
message saying who holds it. On a local disk the file is created exclusively (O_EXCL); on a bucket
(gs://) creation is check-then-write, which narrows the race to the same second.
"""
import json
import os
import socket
import time
from typing import Optional

from diffrestorer_jax import paths
from diffrestorer_jax.atomic import process_alive

LOCK_FILE = "run.lock"


class WorkdirLocked(RuntimeError):
    """Another live run holds the workdir."""


class WorkdirLock:
    """`acquire()` / `refresh()` / `release()`; on processes other than 0 every call is a no-op."""

    def __init__(self, workdir, primary: bool = True, stale_after_s: float = 1800.0):
        self.path = paths.path(workdir) / LOCK_FILE
        self.primary, self.stale_after_s = primary, stale_after_s
        self.held = False

    def _record(self, since: float) -> str:
        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": since,
                           "refreshed": time.time()})

    def _holder(self) -> Optional[dict]:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def _stale_reason(self, holder: Optional[dict]) -> Optional[str]:
        if holder is None:
            return "an unreadable lock file"
        if holder.get("host") == socket.gethostname():
            return None if process_alive(int(holder.get("pid", -1))) else \
                f"process {holder.get('pid')} on this host is gone"
        age = time.time() - float(holder.get("refreshed", holder.get("since", 0)))
        if age > self.stale_after_s:
            return f"host {holder.get('host')} has not refreshed it for {age / 60:.0f} min"
        return None

    def _create(self) -> bool:
        """Create the lock file if there is none; False if one is there."""
        if paths.is_url(self.path):
            if self.path.exists():
                return False
            self.path.write_text(self._record(time.time()))
            return True
        try:
            fd = os.open(os.fspath(self.path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(self._record(time.time()))
        return True

    def acquire(self) -> Optional[str]:
        """Take the lock; returns a note when a stale lock was taken over (None otherwise)."""
        if not self.primary:
            return None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        note = None
        for _ in range(2):
            if self._create():
                self.held = True
                self._since = time.time()
                return note
            holder = self._holder()
            reason = self._stale_reason(holder)
            if reason is None:
                since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
                raise WorkdirLocked(
                    f"{self.path.parent} is in use by another run (pid {holder.get('pid')} on "
                    f"{holder.get('host')}, since {since}); wait for it, use another --workdir, or, if "
                    f"that run is gone, delete {self.path}")
            note = f"took over the stale lock of a run that is gone ({reason}): {self.path}"
            self.path.unlink()
        raise WorkdirLocked(f"could not take {self.path}: another run took it at the same moment")

    def refresh(self) -> None:
        """Show that the holder lives (called at the loop's logging cadence)."""
        if self.held:
            self.path.write_text(self._record(self._since))

    def release(self) -> None:
        if self.held:
            holder = self._holder()
            if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
                self.path.unlink()
            self.held = False
