"""Training from built TFDS datasets through the grain pipeline (config.data.kind = 'tfds').

Two tiny datasets are built once with the real builders (40x40 PNGs): hq_folder (6 clean images)
and paired (haze and noise folders, 3 pairs each, LQ = 255 - GT so a stored LQ is recognisable).
Batches are checked without compiling anything: keys per dataset kind, the stored LQ of paired
records, has_lq = type_id >= 0 in a mixture, global example ids, mixture proportions, readable
errors. Training uses tiny stage-1 runs (32x32 crops, batch 4): one `Run` for the mixture (a
data=2 mesh of fake CPU devices), initialised and compiled once and reused by three `loop.train`
calls (uninterrupted; stopped at the step-2 checkpoint; resumed), which must end with
bit-identical parameters; the hq_folder and paired layouts (other programs; one device) take two
steps each from the same initial state. XLA compiles dominate: ~4 programs, a few minutes.
"""
import math
import os
import re
import subprocess

import jax
import numpy as np
import pytest
from PIL import Image

from configs import tiny
from diffrestorer_jax.data.degradations import DEGRADATION_TYPES, RANDOM
from diffrestorer_jax.data.tfds.build import build_dataset
import procs
from diffrestorer_jax.data import sources
from diffrestorer_jax.parallel.sharding import CompileCounter
from diffrestorer_jax.train import loop
from diffrestorer_jax.train.run import FAST_COMPILE, Run
from diffrestorer_jax.train.checkpoint import Checkpointer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BATCH, SIZE = 4, 32
MIXED = "hq_folder,paired"
PAIRED_TYPES = {DEGRADATION_TYPES.index("haze"), DEGRADATION_TYPES.index("noise")}
KEYS = {"hq_folder": {"hq", "index"}, "paired": {"hq", "lq", "type_id", "index"},
        MIXED: {"hq", "lq", "type_id", "has_lq", "index"}}


def _save(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path)


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tfds")
    rng = np.random.default_rng(0)
    for i in range(6):
        _save(str(root / "hq" / f"{i}.png"), rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))
    for folder in ("hazy", "noisy"):
        for i in range(3):
            gt = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
            _save(str(root / "paired" / folder / "GT" / f"{i}.png"), gt)
            _save(str(root / "paired" / folder / "LQ" / f"{i}.png"), 255 - gt)
    out = str(root / "data")
    assert build_dataset("hq_folder", [str(root / "hq")], out)[0] == 6
    assert build_dataset("paired", [str(root / "paired")], out)[0] == 6
    return out


def config(tfds_dir, kinds, devices=2, **data):
    c = tiny.get_config("stage1")
    c.image_size = SIZE
    c.model.clip.image_size = SIZE
    # num_steps beyond what the tests run: runs stop by max_steps and skip the (slow) export
    c.train.update(batch_size=BATCH, num_steps=1000, checkpoint_every=2, log_every=1, sample_every=0)
    c.mesh = dict(data=devices, fsdp=1, tensor=1)
    c.data.update(kind="tfds", tfds_dir=tfds_dir, tfds_kinds=kinds, num_threads=2, **data)
    return c


def host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def take(data, n):
    return [host(next(data)) for _ in range(n)]


@pytest.mark.parametrize("kinds", ["hq_folder", "paired", MIXED])
def test_batches_carry_stored_lq_and_global_ids(tfds_dir, kinds):
    batches = take(sources.make_data(config(tfds_dir, kinds)), 3)
    for step, b in enumerate(batches):
        assert set(b) == KEYS[kinds]
        assert b["hq"].shape == (BATCH, SIZE, SIZE, 3) and b["hq"].dtype == np.float32
        np.testing.assert_array_equal(b["index"], step * BATCH + np.arange(BATCH))
        if kinds == "hq_folder":
            continue
        paired = b["has_lq"] if "has_lq" in b else np.ones(BATCH, bool)
        if "has_lq" in b:
            np.testing.assert_array_equal(b["has_lq"], b["type_id"] >= 0)
            assert (b["type_id"][~paired] == RANDOM).all()
        # the stored LQ (255 - GT), cropped and flipped with its GT; labels from the type folders
        np.testing.assert_allclose(b["lq"][paired], 1.0 - b["hq"][paired], atol=1e-6)
        assert set(b["type_id"][paired].tolist()) <= PAIRED_TYPES
    if kinds == MIXED:  # weights 1:1 interleave the two datasets
        assert np.mean([b["has_lq"] for b in batches]) == 0.5


def test_mixture_follows_weights(tfds_dir):
    batches = take(sources.make_data(config(tfds_dir, MIXED, mix_weights="3,1")), 4)
    assert np.mean([b["has_lq"] for b in batches]) == 0.25


def test_data_errors_name_the_setting_and_the_build_command(tfds_dir, tmp_path):
    cases = [
        (config(str(tmp_path / "nowhere"), "paired"),
         r"no built 'paired' dataset in .*nowhere.*diffrestorer-build-dataset --kind paired"),
        (config(tfds_dir, "hq_folder,folder"), r"unknown dataset kind 'folder'.*diffrestorer-build-dataset"),
        (config(tfds_dir, "hq_folder", split="test"), r"'test' split.*diffrestorer-build-dataset"),
        (config("", "hq_folder"), r"needs config.data.tfds_dir"),
        (config(tfds_dir, MIXED, mix_weights="1"), r"mix_weights='1'.*one weight per source"),
        (config(tfds_dir, MIXED, mix_weights="1,0"), r"positive"),
    ]
    for c, message in cases:
        with pytest.raises(sources.DataConfigError, match=message):
            sources.make_data(c)


def test_cli_reports_a_missing_dataset_without_a_traceback(tmp_path):
    missing = str(tmp_path / "not_built")
    proc = subprocess.run(
        [*procs.command("diffrestorer-train"), "--config", "configs/tiny.py:stage1",
         "--workdir", str(tmp_path / "run"), "--config.image_size=32", "--config.model.clip.image_size=32",
         "--config.data.kind=tfds", f"--config.data.tfds_dir={missing}", "--config.data.tfds_kinds=paired"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=""))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "diffrestorer-build-dataset --kind paired" in proc.stderr
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


@pytest.fixture(scope="module")
def mixed(tfds_dir, tmp_path_factory):
    """The mixture's Run, initialised once; its initial state (host) and frozen params for the others."""
    c = config(tfds_dir, MIXED)
    run = Run(c, jax.devices()[:2], FAST_COMPILE)
    state, frozen = run.init()
    return dict(run=run, config=c, init=host(state), frozen=frozen)


# Paired only: an hq_folder batch is {'hq', 'index'}, the very program the in-memory source compiles
# (trained through the CLI by test_train_faults.py); its batches are checked above, and HQ records
# are degraded on device in the mixture's run below.
@pytest.mark.parametrize("kinds", ["paired"])
def test_single_kind_trains_with_one_compile(tfds_dir, mixed, kinds, tmp_path):
    # One device: a fifth less compile time; the mixture's run covers batches split over devices.
    c = config(tfds_dir, kinds, devices=1)
    run = Run(c, jax.devices()[:1], FAST_COMPILE)
    state = jax.device_put(mixed["init"], run.plan.state_shardings)  # same init: skip compiling it again
    frozen = jax.device_put(mixed["frozen"], run.plan.frozen_shardings)
    data = sources.make_data(c, run.batch_layout)
    with CompileCounter("jit(step)") as compiles:
        run.compile(data.example_batch())
        for _ in range(2):
            batch = next(data)
            assert all(batch[k].sharding is run.batch_shardings[k] for k in batch)
            state, metrics = run.step(state, frozen, batch)
            assert math.isfinite(float(metrics["loss"])) and int(metrics["skipped"]) == 0
    assert compiles.count == 1


def _losses(text):
    return [float(v) for v in re.findall(r"^step \d+ .*\bloss=(\S+)", text, re.M)]


def test_mixture_resume_through_the_loop_is_bit_identical(mixed, tmp_path, capsys):
    run, c = mixed["run"], mixed["config"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert loop.train(c, str(whole), run=run, max_steps=4) == "done"
    whole_log = capsys.readouterr().out
    assert loop.train(c, str(split), run=run, max_steps=2) == "done"
    with Checkpointer(str(split / "checkpoints")) as ckpt:
        assert ckpt.all_steps() == [2]
        _, _, data_state = ckpt.restore(run.plan.state_target)
    assert data_state == {"step": 2, "pipeline": {"next_index": 2}}  # JSON round trip, prefetch not counted
    assert loop.train(c, str(split), run=run, max_steps=2) == "done"
    split_log = capsys.readouterr().out
    assert "resumed at step 2" in split_log
    losses = _losses(whole_log)
    assert len(losses) == 4 and all(map(math.isfinite, losses))
    assert _losses(split_log) == losses
    finals = []
    for workdir in (whole, split):
        with Checkpointer(str(workdir / "checkpoints")) as ckpt:
            state, _, data_state = ckpt.restore(run.plan.state_target)
        assert int(state.step) == 4 and data_state["step"] == 4
        finals.append(host((state.params, state.ema, state.opt_state)))
    jax.tree.map(np.testing.assert_array_equal, *finals)
