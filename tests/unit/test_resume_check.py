"""What a resume may change (train/resume_check.py): model, data, seed, batch and weights changes
are refused with a list of them; learning rate, steps, logging and the mesh are allowed; frozen weights
are fingerprinted."""
import jax.numpy as jnp
import pytest

from diffrestorer_jax.config_base import base_config
from diffrestorer_jax.train import resume_check as rc


def saved_and_current():
    saved = base_config()
    return rc._plain(saved), base_config()


def test_refused_and_allowed_changes_are_listed():
    saved, cur = saved_and_current()
    cur.seed = 1
    cur.model.unet = dict(cur.model.unet, block_out_channels=(32, 64))
    cur.data.hq_dir = "/elsewhere"
    cur.train.batch_size = 4
    cur.weights.unet = "weights/other"
    cur.train.learning_rate = 2e-5
    cur.train.num_steps = 5
    cur.mesh.fsdp = 8
    cur.data.num_threads = 16
    refused, allowed = rc.config_changes(saved, cur)
    keys = lambda lines: sorted(line.split(":")[0] for line in lines)  # noqa: E731
    assert keys(refused) == ["data.hq_dir", "model.unet.block_out_channels", "seed", "train.batch_size",
                             "weights.unet"]
    assert keys(allowed) == ["data.num_threads", "mesh.fsdp", "train.learning_rate", "train.num_steps"]
    assert "seed: 0 -> 1" in refused


def test_check_resume_refuses_unless_allowed():
    saved, cur = saved_and_current()
    assert rc.check_resume(saved, cur, {}, {}) == []
    cur.seed = 3
    with pytest.raises(rc.ResumeMismatch, match=r"seed: 0 -> 3[\s\S]*--allow_config_changes"):
        rc.check_resume(saved, cur, {}, {})
    assert rc.check_resume(saved, cur, {}, {}, allow_changes=True) == ["seed: 0 -> 3"]


def test_other_frozen_weights_are_refused():
    w = {"unet": {"conv": {"kernel": jnp.arange(200_000, dtype=jnp.float32).reshape(1000, 200)}}}
    same = {"unet": {"conv": {"kernel": jnp.arange(200_000, dtype=jnp.float32).reshape(1000, 200)}}}
    other = {"unet": {"conv": {"kernel": w["unet"]["conv"]["kernel"].at[0, 0].add(1.0)}}}
    fp = rc.fingerprint(w)
    assert fp == rc.fingerprint(same) and fp != rc.fingerprint(other)
    assert rc.fingerprint({}) == {}
    saved, cur = saved_and_current()
    with pytest.raises(rc.ResumeMismatch, match=r"frozen weights \(unet\) differ"):
        rc.check_resume(saved, cur, fp, rc.fingerprint(other))
    assert rc.check_resume(saved, cur, None, fp) == []  # a checkpoint from before fingerprints


def test_a_field_added_later_counts_as_the_value_that_reproduces_old_runs():
    saved, cur = saved_and_current()
    del saved["degradation"]["rng"]  # a checkpoint saved before degradation.rng existed
    assert rc.config_changes(saved, cur) == ([], [])
    cur.degradation.rng = "threefry"
    assert rc.config_changes(saved, cur)[0] == ["degradation.rng: 'rbg' -> 'threefry'"]


@pytest.mark.parametrize("key,value,other", [("train.degrade_size", 0, 128),
                                             ("weights.init_trained", False, True)])
def test_later_refused_fields_let_older_checkpoints_resume(key, value, other):
    """A checkpoint saved before train.degrade_size or weights.init_trained existed resumes (it ran
    with the value that is now the default); setting the field otherwise is still refused."""
    saved, cur = saved_and_current()
    section, name = key.split(".")
    saved[section].pop(name, None)
    cur[section][name] = value
    assert rc.config_changes(saved, cur) == ([], [])
    cur[section][name] = other
    assert rc.config_changes(saved, cur)[0] == [f"{key}: {value!r} -> {other!r}"]
