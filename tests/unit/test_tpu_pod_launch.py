"""launch/train_tpu_pod.sh as a user runs it: training outlives the ssh session that starts it,
--stop makes every worker save and exit, --setup refuses a Python older than 3.11.

No TPU VM is here: `gcloud` is a stand-in on PATH that runs each `tpu-vm ssh --worker=all --command`
on two local "workers" (their own HOME folders) the way sshd would, in a session that ends with the
command; each worker's diffrestorer-train is a stand-in that logs its arguments and environment and
exits 0 on SIGTERM, as the real one does after saving. The launch script itself is the real one.
(What the real diffrestorer-train does with DIFFRESTORER_DISTRIBUTED=1 and SIGTERM is tested in
tests/distributed/test_pod_launch.py.)"""
import os
import subprocess
import sys
import time

import procs

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "launch", "train_tpu_pod.sh")

GCLOUD = """#!/bin/bash
# gcloud compute tpus tpu-vm ssh NAME --zone=Z --worker=W --command CMD: CMD on each worker, in a new
# session (setsid) that is killed when CMD returns, as a closed ssh connection would (SIGHUP)
[[ "$1 $2 $3 $4" == "compute tpus tpu-vm ssh" ]] || { echo "stand-in gcloud: $*" >&2; exit 3; }
shift 4
while (( $# )); do
  case "$1" in --worker=*) worker=${1#--worker=} ;; --command) cmd=$2; shift ;; esac; shift
done
[[ "$worker" == all ]] && workers="0 1" || workers=$worker
for w in $workers; do
  HOME="$FAKE_WORKERS/worker$w" setsid bash -c "$cmd" &
  pid=$!; wait $pid || exit $?
  kill -HUP -- -$pid 2>/dev/null || true  # the session's leftovers, as sshd hangs up
done
"""

TRAIN = f"""#!{sys.executable}
import os, signal, sys, time
print("args", *sys.argv[1:], "distributed", os.environ.get("DIFFRESTORER_DISTRIBUTED"), flush=True)
signal.signal(signal.SIGTERM, lambda *_: (print("saved, exit 0", flush=True), sys.exit(0)))
while True:
    time.sleep(0.1)
"""


def _setup(tmp_path):
    bin_dir, workers = tmp_path / "bin", tmp_path / "workers"
    bin_dir.mkdir()
    procs.executable(bin_dir / "gcloud", GCLOUD)
    for w in (0, 1):
        venv_bin = workers / f"worker{w}" / "diffrestorer_jax" / ".venv" / "bin"
        venv_bin.mkdir(parents=True)
        procs.executable(venv_bin / "diffrestorer-train", TRAIN)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_WORKERS=str(workers),
               TPU_NAME="my-pod", ZONE="us-west4-a", FOLLOW="0")
    return workers, env


def _pod(env, *args, timeout=60):
    return subprocess.run(["bash", SCRIPT, *args], env=env, capture_output=True, text=True, timeout=timeout)


def _logs(workers):
    return [(workers / f"worker{w}" / "train.log").read_text() for w in (0, 1)]


def _wait_for(cond, timeout=30):
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return True
        time.sleep(0.2)
    return False


def test_training_outlives_the_session_and_stop_saves_everywhere(tmp_path):
    workers, env = _setup(tmp_path)
    try:
        _start_and_stop(workers, env)
    finally:  # no stand-in left running when an assertion fails
        subprocess.run(["pkill", "-KILL", "-f", f"{workers}/worker[01]/"], check=False)


def _start_and_stop(workers, env):
    proc = _pod(dict(env, WORKDIR="gs://b/runs/s1"), "configs/sd15.py:stage1_pod", "--config.seed=1",
                "--config.data.tfds_dir=/tmp/my tfds")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("training started") == 2, proc.stdout
    want = ("args --config=configs/sd15.py:stage1_pod --workdir=gs://b/runs/s1 --config.seed=1 "
            "--config.data.tfds_dir=/tmp/my tfds distributed 1")
    assert _wait_for(lambda: all(want in log for log in _logs(workers))), _logs(workers)
    time.sleep(1)  # the sessions that started them are gone: both still run
    assert all("saved" not in log for log in _logs(workers))
    stop = _pod(env, "--stop")
    assert stop.returncode == 0 and stop.stdout.count("stopping") == 2, stop.stdout + stop.stderr
    assert _wait_for(lambda: all("saved, exit 0" in log for log in _logs(workers))), _logs(workers)
    again = _pod(env, "--stop")
    assert again.stdout.count("no training running") == 2, again.stdout


def test_setup_refuses_an_old_python(tmp_path):
    workers, env = _setup(tmp_path)
    old = tmp_path / "bin" / "python3.10"
    procs.executable(old, '#!/bin/bash\n[[ "$1" == -V ]] && { echo "Python 3.10.12"; exit 0; }; exit 1\n')
    # `git archive` and `tpu-vm scp` come first: a checkout and an scp that copies to each worker
    scp = tmp_path / "bin" / "gcloud"
    scp.write_text(scp.read_text().replace('[[ "$1 $2 $3 $4" == "compute tpus tpu-vm ssh" ]]',
                                           '[[ "$4" == scp ]] && exit 0\n[[ "$1 $2 $3 $4" == "compute tpus tpu-vm ssh" ]]'))
    proc = subprocess.run(["bash", SCRIPT, "--setup"], env=dict(env, PYTHON=str(old)), cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Python 3.10.12; diffrestorer_jax needs Python >= 3.11 (set PYTHON=...)" in proc.stderr
    assert not (workers / "worker0" / "diffrestorer_jax" / "setup.py").exists()
