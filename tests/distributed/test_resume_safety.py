"""A workdir belongs to one run: the real loop refuses a workdir held by a live run, and refuses to
resume a checkpoint made with another seed, model or frozen weights, before it reads the state or
compiles anything (the checkpoint here holds a zero state of the tiny config's plan)."""
import os

import jax
import jax.numpy as jnp
import pytest

from configs import tiny
from diffrestorer_jax.train import loop
from diffrestorer_jax.train.checkpoint import Checkpointer, ShapeMismatch
from diffrestorer_jax.train.resume_check import ResumeMismatch
from diffrestorer_jax.train.run import Run
from diffrestorer_jax.train.workdir_lock import WorkdirLock, WorkdirLocked


def small(seed=0):
    c = tiny.get_config("stage1")
    c.image_size, c.model.clip.image_size, c.train.batch_size, c.seed = 32, 32, 2, seed
    c.mesh = dict(data=1, fsdp=1, tensor=1)
    return c


def checkpoint_of(config, workdir):
    """A committed step-1 checkpoint of `config`'s state layout (zeros: its values are never read)."""
    run = Run(config, jax.devices()[:1])
    zeros = jax.tree.map(lambda t: jnp.zeros(t.shape, t.dtype, device=t.sharding), run.plan.state_target)
    with Checkpointer(os.path.join(workdir, "checkpoints")) as ckpt:
        ckpt.save(1, zeros, config, {"step": 1}, run_info={"frozen_fingerprint": {}})


def test_a_held_workdir_is_refused_before_anything_is_written(tmp_path):
    holder = WorkdirLock(str(tmp_path))
    holder.acquire()
    try:
        with pytest.raises(WorkdirLocked, match="in use by another run"):
            loop.train(small(), str(tmp_path), devices=jax.devices()[:1])
        assert os.listdir(tmp_path) == ["run.lock"]
    finally:
        holder.release()


def test_resuming_another_runs_checkpoint_is_refused(tmp_path):
    checkpoint_of(small(seed=0), str(tmp_path))
    with pytest.raises(ResumeMismatch, match=r"seed: 0 -> 7"):
        loop.train(small(seed=7), str(tmp_path), devices=jax.devices()[:1])
    other_model = small()
    other_model.model.prompt = dict(other_model.model.prompt, hidden_dim=32)
    with pytest.raises(ResumeMismatch, match=r"model.prompt.hidden_dim: 64 -> 32"):
        loop.train(other_model, str(tmp_path), devices=jax.devices()[:1])
    assert not os.path.exists(tmp_path / "run.lock")  # released on the way out
    with Checkpointer(str(tmp_path / "checkpoints")) as ckpt:
        assert ckpt.all_steps() == [1]  # nothing was written


def test_other_shapes_cannot_resume_even_when_changes_are_allowed(tmp_path):
    """--allow_config_changes lets a changed model resume, but not one of other shapes: its state
    cannot restore, and the error names the arrays and what to do instead (not orbax's words)."""
    checkpoint_of(small(), str(tmp_path))
    other_model = small()
    other_model.model.prompt = dict(other_model.model.prompt, hidden_dim=32)
    with pytest.raises(ShapeMismatch, match=r"(?s)arrays differ: .*prompt.*saved \(64,\), now \(32,\)"
                                            r".*cannot resume, even with --allow_config_changes"):
        loop.train(other_model, str(tmp_path), devices=jax.devices()[:1], allow_config_changes=True)
    assert not os.path.exists(tmp_path / "run.lock")
    with Checkpointer(str(tmp_path / "checkpoints")) as ckpt:
        assert ckpt.all_steps() == [1]
