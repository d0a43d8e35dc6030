"""Faults and multi-process runs of the real command (`diffrestorer-train`), in subprocesses.

All runs train the same tiny stage-1 program (32x32, synthetic degradations inside the step) on a
(2, 4) data x fsdp mesh for 10 steps, checkpointing every 3:
  ref     one process x 8 fake devices, uninterrupted -> export
  multi   two processes x 4 devices (jax.distributed on localhost) -> the same export as ref
  faults  SIGKILL during a save after step 3's; resume (the interrupted save cleaned up);
          SIGTERM mid-run -> exit 0 with a checkpoint at the current step; resume to the end ->
          parameters bit-identical to ref.
A persistent XLA cache shared by the subprocesses keeps the later launches from recompiling.
"""
import os
import re
import signal
import time

import numpy as np
import pytest

import jax

import procs
from diffrestorer_jax.export import load_export

TRAIN = procs.command("diffrestorer-train")
CACHE = "/tmp/diffrestorer_jax_test_cache"
STEPS = 10
ARGS = ["--config", "configs/tiny.py:stage1", "--fast_compile",
        "--config.image_size=32", "--config.model.clip.image_size=32",
        f"--config.train.num_steps={STEPS}", "--config.train.checkpoint_every=3",
        "--config.train.log_every=1", "--config.train.sample_every=0",
        "--config.mesh.data=2", "--config.mesh.fsdp=4"]


def env(num_devices, **extra):
    return procs.worker_env(num_devices, JAX_COMPILATION_CACHE_DIR=CACHE,
                            JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0, **extra)


def launch(workdir, log, num_devices=8, **extra):
    return procs.Worker(TRAIN, ARGS + ["--workdir", str(workdir)], env(num_devices, **extra), str(log))


def exported(workdir):
    _, _, params = load_export(os.path.join(str(workdir), "export"), names=("prompt", "control"))
    return jax.tree.map(np.asarray, jax.device_get(params))


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    d = tmp_path_factory.mktemp("ref")
    w = launch(d / "run", d / "log.txt")
    assert w.wait(2400) == 0, w.output()[-4000:]
    return exported(d / "run")


def test_two_processes_equal_one(ref, tmp_path):
    envs = [dict(e, JAX_COMPILATION_CACHE_DIR=CACHE, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
            for e in procs.distributed_envs(2, 4)]
    results = procs.run_workers(TRAIN, [ARGS + ["--workdir", str(tmp_path / "run")]] * 2, envs,
                                str(tmp_path), timeout=2400)
    for rc, out in results:
        assert rc == 0, out[-4000:]
    got = exported(tmp_path / "run")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), got, ref)


def test_sigkill_then_sigterm_then_resume_is_bit_identical(ref, tmp_path):
    run, ckdir = tmp_path / "run", tmp_path / "run" / "checkpoints"
    # 1. SIGKILL in the middle of a save after step 3's is committed (Orbax writes a step into a tmp
    # folder and renames it at the end).
    w = launch(run, tmp_path / "log1.txt")
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
    committed = max(int(p.name) for p in ckdir.iterdir() if p.name.isdigit())
    assert committed < interrupted, "the kill should interrupt a save"
    # 2. Resume from the last committed step (the interrupted save's folder is removed); SIGTERM
    # mid-run: checkpoint at the current step, exit 0.
    w = launch(run, tmp_path / "log2.txt")
    resumed = int(w.wait_for(r"resumed at step (\d+)", 2400).group(1))
    assert resumed == committed and not list(ckdir.glob("*tmp*"))
    w.wait_for(rf"^step {resumed + 1} ", 300)
    w.signal(signal.SIGTERM)
    assert w.wait(300) == 0, w.output()[-4000:]
    saved = int(re.search(r"preempted: checkpoint saved at step (\d+)", w.output()).group(1))
    assert resumed < saved < STEPS and (ckdir / str(saved)).is_dir()
    # 3. Resume to the end: the same parameters, bit for bit, as the uninterrupted run.
    w = launch(run, tmp_path / "log3.txt")
    assert int(w.wait_for(r"resumed at step (\d+)", 2400).group(1)) == saved
    assert w.wait(1800) == 0, w.output()[-4000:]
    jax.tree.map(np.testing.assert_array_equal, exported(run), ref)
