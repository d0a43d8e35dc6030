"""One run per workdir (train/workdir_lock.py): a live holder stops a second run with its name; a
stale lock (dead process on this host, or another host silent for too long) is reported and taken."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from diffrestorer_jax.train.workdir_lock import LOCK_FILE, WorkdirLock, WorkdirLocked


def write_lock(workdir, host, pid, age_s=0.0):
    path = os.path.join(workdir, LOCK_FILE)
    with open(path, "w") as f:
        json.dump({"host": host, "pid": pid, "since": time.time() - age_s}, f)
    os.utime(path, (time.time() - age_s, time.time() - age_s))
    return path


def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_live_run_keeps_the_workdir(tmp_path):
    first = WorkdirLock(str(tmp_path))
    assert first.acquire() is None and os.path.isfile(tmp_path / LOCK_FILE)
    with pytest.raises(WorkdirLocked, match=rf"pid {os.getpid()} on {socket.gethostname()}"):
        WorkdirLock(str(tmp_path)).acquire()
    first.release()
    assert not os.path.exists(tmp_path / LOCK_FILE)
    second = WorkdirLock(str(tmp_path))
    assert second.acquire() is None
    second.release()


def test_a_killed_runs_lock_is_reported_and_taken_over(tmp_path):
    write_lock(tmp_path, socket.gethostname(), dead_pid())
    lock = WorkdirLock(str(tmp_path))
    note = lock.acquire()
    assert "stale lock" in note and "is gone" in note
    assert json.load(open(tmp_path / LOCK_FILE))["pid"] == os.getpid()
    lock.release()


def test_another_hosts_lock_is_stale_only_when_silent(tmp_path):
    write_lock(tmp_path, "other-host", 1234, age_s=60)
    with pytest.raises(WorkdirLocked, match="other-host"):
        WorkdirLock(str(tmp_path), stale_after_s=1800).acquire()
    write_lock(tmp_path, "other-host", 1234, age_s=3600)
    lock = WorkdirLock(str(tmp_path), stale_after_s=1800)
    assert "has not refreshed it for 60 min" in lock.acquire()
    lock.release()


def test_only_process_zero_locks(tmp_path):
    lock = WorkdirLock(str(tmp_path), primary=False)
    assert lock.acquire() is None and not os.path.exists(tmp_path / LOCK_FILE)
    lock.refresh()
    lock.release()
