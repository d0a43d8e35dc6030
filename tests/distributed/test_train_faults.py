"""Multi-process runs and faults of the real command (`diffrestorer-train`), in subprocesses: what a
pod run does, on the tiny config (32x32, synthetic degradations inside the step) and a (2, 4)
data x fsdp mesh over 8 fake CPU devices, as one process x 8 or two processes x 4 (jax.distributed
on localhost).

  ref      one process: stage 1 for 10 steps (checkpoints every 3, sample restorations every 5 to
           TensorBoard), export; then stage 2 from that export for 4 steps, export.
  multi    two processes, the same two stages: the same exports as ref (two processes reduce in
           another order: equal to float32 rounding, see the tolerance), TensorBoard events with
           the scalars and the sample images, written once (by process 0).
  sigterm  two processes; SIGTERM to ONE of them mid-run: both checkpoint the same step and exit 0;
           resumed on ONE process (8 devices) to the end: the export of an uninterrupted run.
  faults   one process: SIGKILL in the middle of a save after step 3's; resume from the last
           committed step (the interrupted save's folder removed), SIGTERM as soon as it has
           restored (during compilation): exit 0, no step taken, no new checkpoint; resume on TWO
           processes to the end: the export of an uninterrupted run.
A persistent XLA cache shared by the subprocesses keeps the later launches from recompiling.
"""
import os
import re
import signal
import struct
import time

import numpy as np
import pytest

import jax

import procs
from diffrestorer_jax.export import load_export

TRAIN = procs.command("diffrestorer-train")
CACHE = "/tmp/diffrestorer_jax_test_cache"
STEPS, STAGE2_STEPS = 10, 4
COMMON = ["--fast_compile", "--config.image_size=32", "--config.model.clip.image_size=32",
          "--config.train.log_every=1", "--config.mesh.data=2", "--config.mesh.fsdp=4",
          "--config.sampler.steps=2"]
STAGE1 = ["--config", "configs/tiny.py:stage1", *COMMON, f"--config.train.num_steps={STEPS}",
          "--config.train.checkpoint_every=3", "--config.train.sample_every=5"]
# Two processes reduce in another order than one: float32 rounding, amplified by Adam's
# normalisation over a few steps (seen: ~1e-6 relative).
RTOL, ATOL = 1e-5, 1e-6


def stage2_args(init_from):
    return ["--config", "configs/tiny.py:stage2", *COMMON, f"--config.train.num_steps={STAGE2_STEPS}",
            "--config.train.checkpoint_every=2", "--config.train.sample_every=2",
            f"--config.weights.init_from={init_from}"]


def env(num_devices, **extra):
    return procs.worker_env(num_devices, JAX_COMPILATION_CACHE_DIR=CACHE,
                            JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0, **extra)


def launch(args, workdir, log, num_devices=8):
    return procs.Worker(TRAIN, args + ["--workdir", str(workdir)], env(num_devices), str(log))


def launch_two(args, workdir, log_dir):
    """Two processes x 4 devices of one run: [worker 0, worker 1]."""
    envs = [dict(e, JAX_COMPILATION_CACHE_DIR=CACHE, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
            for e in procs.distributed_envs(2, 4)]
    return [procs.Worker(TRAIN, args + ["--workdir", str(workdir)], e, os.path.join(str(log_dir), f"p{i}.log"))
            for i, e in enumerate(envs)]


def finish(workers, timeout=2400):
    try:
        for w in workers:
            assert w.wait(timeout) == 0, w.output()[-4000:]
    finally:
        for w in workers:
            w.kill()


def exported(workdir, names=("prompt", "control")):
    _, _, params = load_export(os.path.join(str(workdir), "export"), names=names)
    return jax.tree.map(np.asarray, jax.device_get(params))


def close(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=RTOL, atol=ATOL), a, b)


def event_tags(logdir):
    """{'scalars': tags, 'images': tags} of the TensorBoard event files in `logdir`."""
    from tensorboardX.proto import event_pb2
    tags = {"scalars": set(), "images": set()}
    files = [f for f in os.listdir(logdir) if f.startswith("events.out.tfevents")]
    for name in files:
        data = open(os.path.join(logdir, name), "rb").read()
        pos = 0
        while pos + 12 <= len(data):
            (n,) = struct.unpack("Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
            pos += 12 + n + 4
            for v in event.summary.value:
                tags["images" if v.HasField("image") else "scalars"].add(v.tag)
    return files, tags


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    d = tmp_path_factory.mktemp("ref")
    finish([launch(STAGE1, d / "s1", d / "s1.txt")])
    finish([launch(stage2_args(d / "s1" / "export"), d / "s2", d / "s2.txt")])
    return {"s1": exported(d / "s1"), "s2": exported(d / "s2", ("decoder",)), "dir": d}


def test_two_processes_equal_one_in_both_stages(ref, tmp_path):
    finish(launch_two(STAGE1, tmp_path / "s1", tmp_path))
    close(exported(tmp_path / "s1"), ref["s1"])
    files, tags = event_tags(tmp_path / "s1" / "tb")
    assert len(files) == 1, files  # process 0 writes, once
    assert {"train/loss", "train/ce", "train/grad_norm"} <= tags["scalars"], tags
    assert {"samples/lq", "samples/restored"} <= tags["images"], tags
    finish(launch_two(stage2_args(tmp_path / "s1" / "export"), tmp_path / "s2", tmp_path))
    close(exported(tmp_path / "s2", ("decoder",)), ref["s2"])
    assert {"samples/restored"} <= event_tags(tmp_path / "s2" / "tb")[1]["images"]


def test_sigterm_to_one_process_then_resume_on_one(ref, tmp_path):
    run, ckdir = tmp_path / "run", tmp_path / "run" / "checkpoints"
    workers = launch_two(STAGE1, run, tmp_path)
    try:
        workers[0].wait_for(r"step 4 \w+=", 2400)  # after the progress bar on its line
        workers[1].signal(signal.SIGTERM)  # one process only: JAX's service tells the other
        finish(workers, 600)
    finally:
        for w in workers:
            w.kill()
    saved = {int(re.search(r"preempted: checkpoint saved at step (\d+)", w.output()).group(1)) for w in workers}
    assert len(saved) == 1, [w.output()[-2000:] for w in workers]  # the same step on both
    step = saved.pop()
    assert 4 <= step < STEPS and (ckdir / str(step)).is_dir()
    assert not (run / "export").exists()
    w = launch(STAGE1, run, tmp_path / "resume1.txt")  # 2 -> 1 process
    assert int(w.wait_for(r"resumed at step (\d+)", 2400).group(1)) == step
    finish([w])
    close(exported(run), ref["s1"])


def test_sigkill_sigterm_during_startup_then_resume_on_two(ref, tmp_path):
    run, ckdir = tmp_path / "run", tmp_path / "run" / "checkpoints"
    # 1. SIGKILL in the middle of a save after step 3's is committed (Orbax writes a step into a tmp
    # folder and renames it at the end).
    w = launch(STAGE1, run, tmp_path / "log1.txt")
    deadline = time.time() + 2400
    later_save = lambda: [p for p in ckdir.glob("*.orbax-checkpoint-tmp*") if not p.name.startswith("3.")]  # noqa: E731
    while not ((ckdir / "3").is_dir() and later_save()):
        assert w.proc.poll() is None, w.output()[-4000:]
        assert time.time() < deadline, w.output()[-4000:]
        time.sleep(0.01)
    w.signal(signal.SIGKILL)
    w.wait(60)
    assert not (run / "export").exists(), "killed run should not have finished"
    interrupted = int(later_save()[0].name.split(".")[0])
    committed = sorted(int(p.name) for p in ckdir.iterdir() if p.name.isdigit())
    assert committed[-1] < interrupted, "the kill should interrupt a save"
    # 2. Resume from the last committed step (the interrupted save's folder is removed); SIGTERM as
    #    soon as it has restored, before its step is compiled: exit 0 at once, nothing trained,
    #    nothing rewritten.
    w = launch(STAGE1, run, tmp_path / "log2.txt")
    resumed = int(w.wait_for(r"resumed at step (\d+)", 2400).group(1))
    assert resumed == committed[-1] and not list(ckdir.glob("*tmp*"))
    w.signal(signal.SIGTERM)
    assert w.wait(600) == 0, w.output()[-4000:]
    assert f"preempted: checkpoint saved at step {resumed}" in w.output(), w.output()[-4000:]
    assert not re.search(rf"step {resumed + 1} \w+=", w.output()), w.output()[-4000:]
    assert sorted(int(p.name) for p in ckdir.iterdir() if p.name.isdigit()) == committed
    # 3. Resume on two processes (1 -> 2) to the end: the uninterrupted run's export.
    workers = launch_two(STAGE1, run, tmp_path)
    assert int(workers[0].wait_for(r"resumed at step (\d+)", 2400).group(1)) == resumed
    finish(workers)
    close(exported(run), ref["s1"])
