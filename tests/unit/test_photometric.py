"""data/photometric.py random_levels and the stages' use of it (train/stage1.augment_hq)."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from diffrestorer_jax.data.photometric import random_levels
from diffrestorer_jax.train.stage1 import augment_hq


def _keys(n, seed=0):
    return jax.random.key_data(jax.random.split(jax.random.key(seed), n))


def _images(n, seed=0):
    return jnp.asarray(np.random.default_rng(seed).uniform(0, 1, (n, 8, 8, 3)), jnp.float32)


def test_levels_are_a_narrower_range_inside_0_1():
    hq = _images(64)
    out = np.asarray(random_levels(_keys(64), hq, prob=1.0, min_contrast=0.3))
    x = np.asarray(hq)
    for a, b in zip(out, x):
        # out = lo + c * hq exactly: recover c and lo by least squares and check the ranges
        c, lo = np.polyfit(b.ravel(), a.ravel(), 1)
        np.testing.assert_allclose(a, lo + c * b, atol=1e-5)
        assert 0.3 - 1e-5 <= c <= 1 + 1e-5 and -1e-6 <= lo and lo + c <= 1 + 1e-5
    assert out.min() >= 0 and out.max() <= 1
    # not one fixed mapping: contrasts and offsets vary over the batch
    assert np.std(out.mean(axis=(1, 2, 3))) > 0.05


def test_probability_and_determinism():
    hq = _images(200)
    np.testing.assert_array_equal(np.asarray(random_levels(_keys(200), hq, prob=0.0)), np.asarray(hq))
    a = np.asarray(random_levels(_keys(200), hq, prob=0.5))
    np.testing.assert_array_equal(a, np.asarray(random_levels(_keys(200), hq, prob=0.5)))
    changed = np.abs(a - np.asarray(hq)).max(axis=(1, 2, 3)) > 1e-6
    assert 0.35 < changed.mean() < 0.65
    with pytest.raises(ValueError, match="min_contrast"):
        random_levels(_keys(2), hq[:2], prob=1.0, min_contrast=0.0)


def _config(prob):
    return ml_collections.ConfigDict(dict(train=dict(hq_levels_prob=prob, hq_levels_min_contrast=0.3)))


def test_augment_hq_leaves_paired_examples_and_off_switch_alone():
    hq = _images(4)
    keys = _keys(4)
    np.testing.assert_array_equal(np.asarray(augment_hq(_config(0.0), {"hq": hq}, keys)), np.asarray(hq))
    # all paired: the HQ must match its fixed LQ, so it is never remapped
    paired = {"hq": hq, "lq": hq}
    np.testing.assert_array_equal(np.asarray(augment_hq(_config(1.0), paired, keys)), np.asarray(hq))
    # a mix: only the synthetic examples (has_lq 0) move
    mixed = {"hq": hq, "lq": hq, "has_lq": jnp.array([1, 0, 1, 0])}
    out = np.asarray(augment_hq(_config(1.0), mixed, keys))
    np.testing.assert_array_equal(out[[0, 2]], np.asarray(hq)[[0, 2]])
    assert np.abs(out[[1, 3]] - np.asarray(hq)[[1, 3]]).max() > 1e-3
