"""launch/train_slurm.sh gives each task one GPU, whether or not SLURM already bound one per task.

SLURM is not here: `srun` and `scontrol` are stand-ins on PATH that start two local tasks the way
srun sets them up (SLURM_PROCID, SLURM_LOCALID), and diffrestorer-train is a stand-in that prints
what it was given; the launch script itself is the real one."""
import os
import stat
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "launch", "train_slurm.sh")


def _executable(path, text):
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def _launch(tmp_path, visible):
    bin_dir, submit = tmp_path / "bin", tmp_path / "checkout"
    (submit / ".venv" / "bin").mkdir(parents=True)
    bin_dir.mkdir()
    _executable(submit / ".venv" / "bin" / "diffrestorer-train",
                '#!/bin/bash\necho "task $JAX_PROCESS_ID gpu $CUDA_VISIBLE_DEVICES args $*"\n')
    _executable(bin_dir / "scontrol", "#!/bin/bash\necho node-a\necho node-b\n")
    _executable(bin_dir / "srun", '#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\n'
                'for i in 0 1; do SLURM_PROCID=$i SLURM_LOCALID=$i "$@"; done\n')
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", SLURM_SUBMIT_DIR=str(submit), SLURM_JOB_NODELIST="node-[a-b]",
               SLURM_NTASKS="2")
    if visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible
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
    assert lines == [f"task {k} gpu {g} args --config=configs/sd15.py:stage1 --workdir=/shared/run "
                     "--config.seed=1" for k, g in enumerate(want)]
