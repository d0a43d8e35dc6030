"""launch/demo_train.sh (`make demo-train`): a stage stopped by SIGTERM stops the script, and the export
replaces OUT only as a whole and only when OUT is an export.

No training here: `python` (the photo folders), diffrestorer-train, diffrestorer-average-exports and
diffrestorer-compare-exports are stand-ins on PATH; the launch script itself is the real one, copied
into a fake checkout (it works from its checkout's root). The stand-in diffrestorer-train logs each
stage it starts and writes the stage's export; told to (FAKE_STOP=<stage>) it prints what the real one
prints after a SIGTERM ("training preempted") and exits 0 as the real one does. The stand-in
diffrestorer-average-exports writes to --out as the real one does through atomic.py: a failed write
(FAKE_DISK_FULL_AT=<out>) leaves --out as it was (tests/unit/test_atomic.py tests that part)."""
import json
import os
import shutil
import signal
import subprocess
import time

import procs

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "launch", "demo_train.sh")
STAGES = ["prior_vae", "prior_unet", "stage1", "stage2", "stage2_whole", "prior_clip", "stage1_clip", "stage2_clip"]

PYTHON = """#!/bin/bash
# python -m diffrestorer_jax.cli.demo_photos DIR [--dead-leaves N ...]
mkdir -p "$3"
if [[ "${4:-}" == --dead-leaves ]]; then (cd "$3" && touch $(seq -f 'dead_leaves_%05g.png' 0 $(( $5 - 1 ))))
else touch "$3/camera.png"; fi
"""

TRAIN = """#!/bin/bash
all_args=("$@")
while (( $# )); do
  case "$1" in --workdir) wd=$2; shift ;; --config.train.num_steps=*) steps=${1#*=} ;; esac; shift
done
name=$(basename "$wd"); echo "$name" >> "$FAKE_LOG"
mkdir -p "$(dirname "$wd")"; printf '%s\n' "${all_args[@]}" > "$wd.args"
echo "step 10 loss=1"
if [[ "${FAKE_WAIT_FOR_TERM:-}" == "$name" ]]; then  # a long stage: SIGTERM saves, printing as it goes
  trap 'sleep 0.3; echo "preempted: checkpoint saved at step 10"; echo saved > "$wd.saved"
        echo "training preempted"; exit 0' TERM
  touch "$FAKE_READY"
  while true; do sleep 0.1; done
fi
if [[ "${FAKE_STOP:-}" == "$name" ]]; then
  echo "preempted: checkpoint saved at step 10"; echo "training preempted"; exit 0
fi
mkdir -p "$wd/export/params"; echo "$name $steps steps, run $FAKE_RUN" > "$wd/export/config.json"
echo "training done"
"""

AVERAGE = """#!/bin/bash
# A B --weight W --out OUT: writes OUT whole or, when the write fails, leaves it as it was
out=${@: -1}
[[ "$out" == "${FAKE_DISK_FULL_AT:-}" ]] && { echo "No space left on device" >&2; exit 1; }
rm -rf "$out.new"; mkdir -p "$out.new/params"; cat "$1/config.json" "$2/config.json" > "$out.new/config.json"
rm -rf "$out"; mv "$out.new" "$out"
"""


def _checkout(tmp_path):
    root, bin_dir = tmp_path / "checkout", tmp_path / "bin"
    (root / "launch").mkdir(parents=True)
    bin_dir.mkdir()
    shutil.copy(SCRIPT, root / "launch")
    procs.executable(bin_dir / "python", PYTHON)
    procs.executable(bin_dir / "diffrestorer-train", TRAIN)
    procs.executable(bin_dir / "diffrestorer-average-exports", AVERAGE)
    procs.executable(bin_dir / "diffrestorer-compare-exports", '#!/bin/bash\necho "compared $*"\n')
    shipped = root / "demo" / "checkpoint"
    (shipped / "params").mkdir(parents=True)
    (shipped / "config.json").write_text("shipped\n")
    return root, bin_dir


def _run(root, bin_dir, run, **env):
    log = root / f"stages_run{run}"
    log.write_text("")
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_LOG=str(log), FAKE_RUN=str(run),
               **{k: str(v) for k, v in env.items()})
    proc = subprocess.run(["bash", str(root / "launch" / "demo_train.sh")], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)
    return proc, log.read_text().split()


def test_a_stopped_stage_stops_the_script(tmp_path):
    """Run 1 completes; run 2 trains the prior longer and its first stage gets SIGTERM (saves, exits
    0). Before, the later stages then ran from run 1's exports and run 1's decoders replaced OUT as
    run 2's checkpoint, exit status 0."""
    root, bin_dir = _checkout(tmp_path)
    proc, stages = _run(root, bin_dir, 1)
    assert proc.returncode == 0, proc.stderr
    assert stages == STAGES
    first = (root / "demo" / "checkpoint" / "config.json").read_text()
    # the last stage's export, copied (averaged with itself)
    assert first == "stage2_clip 600 steps, run 1\nstage2_clip 600 steps, run 1\n"

    proc, stages = _run(root, bin_dir, 2, FAKE_STOP="prior_vae", VAE_STEPS=6000)
    assert proc.returncode != 0
    assert stages == ["prior_vae"]
    assert "prior_vae did not finish (stopped or preempted): run the script again to resume it" in proc.stderr
    assert "demo checkpoint" not in proc.stdout
    assert (root / "demo" / "checkpoint" / "config.json").read_text() == first
    assert "training preempted" in (root / "workdir_demo" / "prior_vae.log").read_text()


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path):
    """Before, OUT was removed, then the export copied: a copy that failed (a full disk; a kill does
    the same) left no checkpoint at all."""
    root, bin_dir = _checkout(tmp_path)
    # the disk fills once training is done: writing the checkpoint fails, by cp or by the command
    procs.executable(bin_dir / "cp", '#!/bin/bash\necho "cp: No space left on device" >&2; exit 1\n')
    proc, stages = _run(root, bin_dir, 1, FAKE_DISK_FULL_AT="demo/checkpoint")
    assert proc.returncode != 0 and stages == STAGES
    assert (root / "demo" / "checkpoint" / "config.json").read_text() == "shipped\n"
    assert (root / "demo" / "checkpoint" / "params").is_dir()


def test_an_out_that_is_not_an_export_is_refused_before_training(tmp_path):
    """OUT naming a folder of the user's was deleted unasked, after hours of training."""
    root, bin_dir = _checkout(tmp_path)
    mine = tmp_path / "my results"
    mine.mkdir()
    (mine / "thesis.tex").write_text("draft")
    (mine / "config.json").write_text("{}")  # a config.json alone does not make an export
    proc, stages = _run(root, bin_dir, 1, OUT=mine)
    assert proc.returncode != 0 and stages == []
    assert "is not an export" in proc.stderr
    assert sorted(os.listdir(mine)) == ["config.json", "thesis.tex"]
    assert (mine / "thesis.tex").read_text() == "draft"

    proc, stages = _run(root, bin_dir, 1, OUT=tmp_path / "new" / "export")  # absent: written
    assert proc.returncode == 0 and stages == STAGES, proc.stderr
    assert (tmp_path / "new" / "export" / "config.json").read_text() == \
        (root / "workdir_demo" / "export" / "config.json").read_text()


def test_a_sigterm_to_the_whole_process_group_still_saves(tmp_path):
    """timeout, scancel and Ctrl-C signal the whole process group, tee included. Before, tee died at
    once and the trainer, printing as it saved, was killed by the broken pipe before its checkpoint."""
    root, bin_dir = _checkout(tmp_path)
    log, ready = root / "stages", tmp_path / "ready"
    log.write_text("")
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_LOG=str(log), FAKE_RUN="1",
               FAKE_WAIT_FOR_TERM="prior_vae", FAKE_READY=str(ready))
    proc = subprocess.Popen(["bash", str(root / "launch" / "demo_train.sh")], cwd=root, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert time.monotonic() < deadline and proc.poll() is None, "the stage never started"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
        saved, stage_log = root / "workdir_demo" / "prior_vae.saved", root / "workdir_demo" / "prior_vae.log"
        # tee writes the trainer's last lines after the trainer has saved: wait for both (under load
        # the log's last line came a moment after the saved file)
        deadline = time.monotonic() + 10
        while not (saved.exists() and "training preempted" in stage_log.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert saved.exists(), "the stage was killed before it saved"
        assert "training preempted" in stage_log.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_the_last_stage_trains_the_shipped_model(tmp_path):
    """The flags that shape the networks in the recipe's last stage are the shipped checkpoint's
    config (demo/checkpoint/config.json): a recipe that drifted from what was shipped (the CLIP's
    image size or patches, the decoder's width) would train another model under the same name."""
    root, bin_dir = _checkout(tmp_path)
    proc, stages = _run(root, bin_dir, 1)
    assert proc.returncode == 0, proc.stderr
    flags = (root / "workdir_demo" / "stage2_clip.args").read_text().splitlines()
    model = {}
    for flag in flags:
        if flag.startswith("--config.model.") or flag.startswith("--config.sampler."):
            key, value = flag[len("--config."):].split("=", 1)
            model[key] = value
    assert {"model.clip.image_size", "model.clip.patch_size", "model.decoder.rdb_growth",
            "sampler.tile"} <= set(model)
    with open(os.path.join(REPO, "demo", "checkpoint", "config.json")) as f:
        shipped = json.load(f)
    for key, value in model.items():
        section, *names = key.split(".")
        got = shipped[section]
        for name in names:
            got = got[name]
        assert str(got).lower() == value.lower(), (key, got, value)
