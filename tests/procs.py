"""Run JAX workers and the installed commands as subprocesses: own env (device count), own log
file, free ports.

Not a test file: the harness behind test_checkpoint / test_multiprocess (a worker script in tests/)
and the tests of the real commands (`command("diffrestorer-train")`, started the same way).
"""
import os
import re
import signal
import stat
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

import portpicker

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(REPO, "tests")


def command(name: str) -> List[str]:
    """The installed console script `name` (`pip install -e .` puts it beside this Python) as argv."""
    path = os.path.join(os.path.dirname(sys.executable), name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: the commands are installed by `pip install -e .` (make install)")
    return [path]


def executable(path, text: str) -> None:
    """Write `text` to `path` (a pathlib.Path) as an executable file: stand-ins for srun, gcloud and
    the installed commands in the launch-script tests."""
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def script(name: str) -> List[str]:
    """A worker script in tests/ as argv."""
    return [sys.executable, os.path.join(TESTS, name)]


def worker_env(num_devices: int, **extra: str) -> Dict[str, str]:
    """The parent's env with `num_devices` fake CPU devices and the repo importable."""
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    # XLA CPU aborts a process whose devices' threads do not all reach a collective within 40 s;
    # on a loaded 2-core host 8 fake devices' threads can be starved that long (seen, 2026-12-04)
    flags = (f"--xla_force_host_platform_device_count={num_devices} "
             "--xla_cpu_collective_call_terminate_timeout_seconds=900")
    env.update(XLA_FLAGS=flags, JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([REPO, TESTS, env.get("PYTHONPATH", "")]),
               PYTHONUNBUFFERED="1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def distributed_envs(num_processes: int, devices_per_process: int) -> List[Dict[str, str]]:
    """One env per process for `jax.distributed.initialize` on localhost (read by
    `parallel.mesh.maybe_initialize_distributed`), sharing a fresh coordinator port."""
    address = f"localhost:{portpicker.pick_unused_port()}"
    # 900 s without a heartbeat before a process is declared dead (JAX's 100 s killed both
    # processes of a run on a host at load 60, 2026-12-04)
    return [worker_env(devices_per_process, JAX_COORDINATOR_ADDRESS=address,
                       JAX_NUM_PROCESSES=num_processes, JAX_PROCESS_ID=i,
                       DIFFRESTORER_HEARTBEAT_TIMEOUT_S=900)
            for i in range(num_processes)]


def forced_envs(num_processes: int, devices_per_process: int, **extra) -> List[Dict[str, str]]:
    """One env per process for a launch that only says "this is multi-host"
    (DIFFRESTORER_DISTRIBUTED=1, as launch/train_tpu_pod.sh does) and leaves the rest to JAX: the
    coordinator in JAX_COORDINATOR_ADDRESS (which JAX reads itself) and the process count and id
    in a fake Open MPI env, which JAX's cluster detection reads but `maybe_initialize_distributed`
    does not look at. (A GCE TPU VM gives them through its metadata server, which only a TPU VM has.)"""
    address = f"localhost:{portpicker.pick_unused_port()}"
    return [worker_env(devices_per_process, DIFFRESTORER_DISTRIBUTED=1, JAX_COORDINATOR_ADDRESS=address,
                       OMPI_MCA_orte_hnp_uri="1531576320.0;tcp://127.0.0.1:34911",
                       OMPI_COMM_WORLD_SIZE=num_processes, OMPI_COMM_WORLD_RANK=i,
                       OMPI_COMM_WORLD_LOCAL_RANK=i, DIFFRESTORER_HEARTBEAT_TIMEOUT_S=900, **extra)
            for i in range(num_processes)]


class Worker:
    """One subprocess (argv from `command` or `script`, then `args`) whose stdout+stderr go to
    `log_path` (no pipe to fill up and block)."""

    def __init__(self, argv: Sequence[str], args: Sequence[str], env: Dict[str, str], log_path: str):
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen([*argv, *map(str, args)], env=env, cwd=REPO,
                                     stdout=self._log, stderr=subprocess.STDOUT)

    def output(self) -> str:
        """The log so far, with progress bars' carriage returns read as line breaks (as a terminal
        shows them), so `^...` patterns with re.MULTILINE match lines printed after a bar update."""
        with open(self.log_path) as f:
            return f.read().replace("\r", "\n")

    def wait_for(self, pattern: str, timeout: float = 120.0) -> re.Match:
        """Block until a line matching `pattern` is printed; fail with the log if it dies or times out."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            match = re.search(pattern, self.output(), re.MULTILINE)
            if match:
                return match
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited {self.proc.returncode} before {pattern!r}:\n"
                                     f"{self.output()[-4000:]}")
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {pattern!r}:\n{self.output()[-4000:]}")

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 300.0) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def run_workers(argv: Sequence[str], args: Sequence[Sequence[str]], envs: Sequence[Dict[str, str]],
                log_dir: str, timeout: float = 300.0) -> List[tuple]:
    """Start one worker per (args, env) at once, wait for all; [(returncode, output), ...].

    Any worker left running at the timeout (e.g. peers of a crashed process blocked in a collective)
    is killed, so a failing test never leaves orphans.
    """
    workers = [Worker(argv, a, e, os.path.join(log_dir, f"worker_{i}.log"))
               for i, (a, e) in enumerate(zip(args, envs))]
    deadline = time.time() + timeout
    results = []
    try:
        for w in workers:
            rc: Optional[int]
            try:
                rc = w.wait(max(1.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                rc = None
            results.append((rc, w.output()))
    finally:
        for w in workers:
            w.kill()
    return results
