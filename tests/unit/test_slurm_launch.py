"""launch/train_slurm.sh gives each task one GPU, whether or not SLURM already bound one per task.

SLURM is not here: `srun` and `scontrol` are stand-ins on PATH that start two local tasks the way
srun sets them up (SLURM_PROCID, SLURM_LOCALID), and diffrestorer-train is a stand-in that prints
what it was given, or joins the two tasks with the project's real jax.distributed start; the launch
script itself is the real one."""
import os
import subprocess
import sys

import portpicker

import pytest

import procs

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "launch", "train_slurm.sh")


def _launch(tmp_path, visible, **extra_env):
    bin_dir, submit = tmp_path / "bin", tmp_path / "checkout"
    (submit / ".venv" / "bin").mkdir(parents=True, exist_ok=True)
    bin_dir.mkdir(exist_ok=True)
    procs.executable(submit / ".venv" / "bin" / "diffrestorer-train",
                '#!/bin/bash\necho "task $JAX_PROCESS_ID gpu $CUDA_VISIBLE_DEVICES'
                ' coordinator $JAX_COORDINATOR_ADDRESS args $*"\n')
    procs.executable(bin_dir / "scontrol", "#!/bin/bash\necho node-a\necho node-b\n")
    procs.executable(bin_dir / "srun", '#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\n'
                'for i in 0 1; do SLURM_PROCID=$i SLURM_LOCALID=$i "$@"; done\n')
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "JAX_COORDINATOR_PORT")}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", SLURM_SUBMIT_DIR=str(submit), SLURM_JOB_NODELIST="node-[a-b]",
               SLURM_NTASKS="2", SLURM_JOB_ID="4242")
    if visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible
    env.update(extra_env)
    out = subprocess.run(["bash", SCRIPT, "configs/sd15.py:stage1", "/shared/run", "--config.seed=1"], env=env,
                         capture_output=True, text=True, timeout=60, check=True).stdout
    return out.splitlines()


@pytest.mark.parametrize("visible,want", [
    (None, ["0", "1"]),              # nothing set: task k takes GPU k
    ("4,5,6,7", ["4", "5"]),         # every task sees the node's GPUs: task k keeps the k-th
    ("3", ["3", "3"]),               # SLURM bound one GPU per task already: left alone
])
def test_each_task_gets_one_gpu(tmp_path, visible, want):
    lines = _launch(tmp_path, visible)
    assert lines == [f"task {k} gpu {g} coordinator node-a:24242 args --config=configs/sd15.py:stage1 "
                     "--workdir=/shared/run --config.seed=1" for k, g in enumerate(want)]


def _coordinators(tmp_path, **env):
    return {line.split(" coordinator ")[1].split()[0] for line in _launch(tmp_path, None, **env)}


def test_each_job_gets_its_own_coordinator_port(tmp_path):
    """Two jobs whose first node is the same machine (two 4-GPU jobs on one 8-GPU node) must not share
    the coordinator's port: the second job's coordinator cannot bind it, and its tasks kill the first
    job's (all jobs got 12355 before). The port follows the job id, below Linux's ephemeral ports;
    JAX_COORDINATOR_PORT still chooses it."""
    ports = []
    for job in ("101", "102", "11999", "12000", "4294967294"):
        (address,) = _coordinators(tmp_path, SLURM_JOB_ID=job)
        host, port = address.split(":")
        assert host == "node-a" and 20000 <= int(port) < 32768, address
        ports.append(int(port))
    assert len(set(ports)) == len(ports), ports
    assert _coordinators(tmp_path, SLURM_JOB_ID="101", JAX_COORDINATOR_PORT="12399") == {"node-a:12399"}


# diffrestorer-train's first step (cli/train.py), then what the process's GPU runtime would be told
TRAIN_JOINS = f"""#!{sys.executable}
import os
import jax
from jax._src import xla_bridge
from diffrestorer_jax.parallel.mesh import maybe_initialize_distributed
assert maybe_initialize_distributed()
row = (os.environ["JAX_PROCESS_ID"], os.environ["CUDA_VISIBLE_DEVICES"], xla_bridge.CUDA_VISIBLE_DEVICES.value,
       jax.process_count())
with open(os.path.join(os.environ["REPORTS"], "task" + os.environ["JAX_PROCESS_ID"]), "w") as f:
    f.write(" ".join(map(str, row)))  # a file per task: two tasks' prints can interleave on one pipe
jax.distributed.shutdown()
"""


@pytest.mark.parametrize("visible", [None, "4,5,6,7", "3"])
def test_jax_distributed_asks_each_task_for_a_device_it_sees(tmp_path, visible):
    """The two tasks join through the real jax.distributed.initialize (CPU here). JAX sees SLURM and
    restricts each process's CUDA devices to `jax_cuda_visible_devices`: those are indices into the
    task's CUDA_VISIBLE_DEVICES, one device, so only 0 exists. Before JAX_LOCAL_DEVICE_IDS=0 task 1
    asked for device 1 (SLURM_LOCALID): on a GPU, an invalid device ordinal."""
    bin_dir, submit = tmp_path / "bin", tmp_path / "checkout"
    (submit / ".venv" / "bin").mkdir(parents=True)
    bin_dir.mkdir()
    procs.executable(submit / ".venv" / "bin" / "diffrestorer-train", TRAIN_JOINS)
    procs.executable(bin_dir / "scontrol", "#!/bin/bash\necho localhost\necho node-b\n")
    procs.executable(bin_dir / "srun", '#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\n'
                'for i in 0 1; do SLURM_PROCID=$i SLURM_LOCALID=$i "$@" & pids+=($!); done\n'
                'for p in "${pids[@]}"; do wait "$p" || exit 1; done\n')
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "JAX_LOCAL_DEVICE_IDS")}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", SLURM_SUBMIT_DIR=str(submit), SLURM_JOB_NODELIST="localhost",
               SLURM_STEP_NODELIST="localhost", SLURM_JOB_ID="7", SLURM_NTASKS="2", JAX_PLATFORMS="cpu",
               JAX_COORDINATOR_PORT=str(portpicker.pick_unused_port()), PYTHONPATH=REPO,
               REPORTS=str(tmp_path))
    if visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible
    proc = subprocess.run(["bash", SCRIPT, "configs/tiny.py", str(tmp_path / "run")], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [(tmp_path / f"task{k}").read_text().split() for k in (0, 1)]
    assert [r[0] for r in rows] == ["0", "1"] and all(r[3] == "2" for r in rows), rows
    for _, cuda_visible, jax_ids, _ in rows:
        sees = len(cuda_visible.split(","))
        assert sees == 1 and all(int(i) < sees for i in jax_ids.split(",")), rows
