"""Checkpoint save/restore across meshes, preemption by SIGTERM, resume after SIGKILL (bit for bit)."""
import os
import re
import signal
import time

import jax
import numpy as np
import pytest

import damage
import procs
import toy_train
from diffrestorer_jax.parallel import mesh as mesh_lib
from diffrestorer_jax.parallel import sharding
from diffrestorer_jax.checksums import state_checksums
from diffrestorer_jax.train.checkpoint import Checkpointer, DamagedCheckpoint

WORKER = procs.script("toy_worker.py")
# The signal tests are about the process lifecycle, not the mesh: 2 devices compile faster than 8.
SMALL = ["--mesh", "1,2,1"]


def _mesh(data, fsdp, n=8):
    return mesh_lib.make_mesh({"data": data, "fsdp": fsdp, "tensor": 1}, devices=jax.devices()[:n])


def _assert_tree_equal(a, b):
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(a), jax.device_get(b))


def test_save_2x4_restore_on_8x1_and_one_device(tmp_path):
    tx = toy_train.make_tx()
    state = toy_train.init_state(tx, _mesh(2, 4))
    targets = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    expected = jax.device_get(state)
    blob = b"\x00iterator-state\xff"
    with Checkpointer(tmp_path / "ck", save_every=1, keep=2) as ckpt:
        assert ckpt.maybe_save(1, state, {"lr": 1e-2}, blob)
    ckpt = Checkpointer(tmp_path / "ck")
    assert ckpt.latest_step() == 1
    for mesh in (_mesh(8, 1), _mesh(1, 1, n=1)):
        new_targets, new_shard = sharding.plan_sharded(
            lambda r: toy_train.init_fn(tx, r), mesh, toy_train.DEFAULT_RULES, jax.random.PRNGKey(0))
        restored, config, data = ckpt.restore(new_targets)
        _assert_tree_equal(restored, expected)
        assert config == {"lr": 1e-2} and data == blob
        kernel = restored["params"]["dense_0"]["kernel"]
        assert kernel.sharding == new_shard["params"]["dense_0"]["kernel"]
        assert len(kernel.sharding.device_set) == mesh.size
    with pytest.raises(FileNotFoundError, match="at step 7"):
        ckpt.restore(targets, step=7)
    ckpt.close()


def test_a_damaged_file_never_restores_as_other_numbers(tmp_path):
    """Orbax's files carry no checksum: a byte changed on disk restored as other numbers, silently.
    The checksums saved with each step catch it, name the array and the step to go back to. (Some
    bytes of the data file are read by no array: old tree nodes of Orbax's append-only store, so each
    changed byte may also restore the saved numbers, or fail in Orbax; never other numbers.)"""
    mesh = _mesh(2, 4)
    tx = toy_train.make_tx()
    state = toy_train.init_state(tx, mesh)
    expected = jax.device_get(state)
    targets = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    with Checkpointer(tmp_path / "ck", save_every=1, keep=2) as ckpt:
        ckpt.maybe_save(1, state)
        ckpt.maybe_save(2, state)

    def restore():
        with Checkpointer(tmp_path / "ck") as ckpt:
            return ckpt.restore(targets)[0]

    outcomes, message = damage.load_after_each_changed_byte(
        damage.largest_file(tmp_path / "ck" / "2" / "state"), restore, DamagedCheckpoint)
    for restored in outcomes:
        if not isinstance(restored, str):  # a byte no array reads: the saved numbers
            _assert_tree_equal(restored, expected)
    assert "damaged" in outcomes, outcomes
    assert re.search(r"at step 2 is damaged: \d+ array\(s\) read back are not what was saved "
                     r"\([a-z_0-9.\[\]]+.*\)\. Move .*ck/2 out of the folder to resume from step 1\.", message), message
    with Checkpointer(tmp_path / "ck") as ckpt:
        restored, _, _ = ckpt.restore(targets, step=1)
    _assert_tree_equal(restored, expected)


def test_checksums_are_the_same_on_any_mesh_and_see_one_changed_bit():
    tx = toy_train.make_tx()
    state = toy_train.init_state(tx, _mesh(2, 4))
    host = jax.device_get(state)
    sums = state_checksums(state)
    assert sums == state_checksums(host) == state_checksums(jax.device_put(host, jax.devices()[0]))
    kernel = np.array(host["params"]["dense_0"]["kernel"])
    kernel.view(np.uint32)[1, 2] ^= 1 << 31  # the sign bit of one element
    changed = state_checksums({**host, "params": {**host["params"], "dense_0": {
        **host["params"]["dense_0"], "kernel": kernel}}})
    assert [k for k in sums if sums[k] != changed[k]] == ["params.dense_0.kernel"]


def test_keep_last_k_and_interval(tmp_path):
    mesh = _mesh(1, 1, n=1)
    tx = toy_train.make_tx()
    state = toy_train.init_state(tx, mesh)
    with Checkpointer(tmp_path / "ck", save_every=2, keep=2) as ckpt:
        saved = [ckpt.maybe_save(s, state) for s in range(1, 8)]
    assert saved == [False, True, False, True, False, True, False]
    assert Checkpointer(tmp_path / "ck").all_steps() == [4, 6]


def test_compile_once_including_after_restore(tmp_path):
    """Restored arrays carry the planned shardings, so the AOT step takes them; the count stays 1."""
    mesh = _mesh(2, 4)
    with sharding.CompileCounter("train_step") as counter:
        tx, targets, _, bsh, step = toy_train.plan(mesh)
        state = toy_train.init_state(tx, mesh)
        with Checkpointer(tmp_path / "ck", save_every=3) as ckpt:
            for i in range(3):
                state, _ = step(state, toy_train.put_batch(toy_train.batch_at(i), bsh))
            ckpt.maybe_save(3, state)
        state, _, _ = Checkpointer(tmp_path / "ck").restore(targets)
        for i in range(3, 6):
            state, _ = step(state, toy_train.put_batch(toy_train.batch_at(i), bsh))
        jax.block_until_ready(state)
    assert counter.count == 1, counter.names


def test_sigterm_checkpoints_current_step_and_exits_zero(tmp_path):
    workdir = tmp_path / "ck"
    worker = procs.Worker(WORKER, [*SMALL, "--workdir", workdir, "--steps", 10_000, "--save_every", 1000,
                                   "--sleep", 0.2], procs.worker_env(2), str(tmp_path / "log"))
    try:
        worker.wait_for(r"^STEP 3$", timeout=240)
        worker.signal(signal.SIGTERM)
        assert worker.wait(120) == 0, worker.output()[-3000:]
    finally:
        worker.kill()
    stopped = int(worker.wait_for(r"^PREEMPTED (\d+)$", 1).group(1))
    assert stopped >= 3
    assert Checkpointer(workdir).all_steps() == [stopped]  # the interval alone would have saved none


def _params(path):
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def test_sigkill_then_resume_is_bit_identical(tmp_path):
    steps = [*SMALL, "--steps", 8, "--save_every", 2]
    full = procs.Worker(WORKER, [*steps, "--workdir", tmp_path / "full", "--out", tmp_path / "full.npz"],
                        procs.worker_env(2), str(tmp_path / "full.log"))
    killed_dir = tmp_path / "killed"
    killed = procs.Worker(WORKER, [*steps, "--workdir", killed_dir, "--sleep", 0.3],
                          procs.worker_env(2), str(tmp_path / "killed.log"))
    try:
        killed.wait_for(r"^STEP 5$", timeout=240)
        deadline = time.time() + 60
        while not os.path.isdir(killed_dir / "4"):  # orbax renames step 4's tmp dir once committed
            assert killed.proc.poll() is None and time.time() < deadline, killed.output()[-3000:]
            time.sleep(0.02)
        killed.signal(signal.SIGKILL)
        assert killed.wait(60) == -signal.SIGKILL
        assert "DONE" not in killed.output()
        assert full.wait(240) == 0, full.output()[-3000:]
    finally:
        killed.kill()
        full.kill()
    resumed = procs.Worker(WORKER, [*steps, "--workdir", killed_dir, "--out", tmp_path / "resumed.npz"],
                           procs.worker_env(2), str(tmp_path / "resumed.log"))
    assert resumed.wait(240) == 0, resumed.output()[-3000:]
    start = int(resumed.wait_for(r"^START (\d+)$", 1).group(1))
    assert 4 <= start < 8
    assert "COMPILES 1" in resumed.output()
    a, b = _params(tmp_path / "full.npz"), _params(tmp_path / "resumed.npz")
    assert a.keys() == b.keys() and len(a) == 8
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
