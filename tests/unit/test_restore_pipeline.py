"""restore(): end to end on the tiny config, compiled once, reproducible per image, tiling."""
import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffrestorer_jax.config_base import load_config_file
from diffrestorer_jax.diffusion.schedules import make_schedule
from diffrestorer_jax.infer import pipeline
from diffrestorer_jax.infer.pipeline import Knobs, RestoreSettings, restore
from diffrestorer_jax.models import diffrestorer as dr
from diffrestorer_jax.parallel.sharding import unbox

ROOT = pathlib.Path(__file__).resolve().parents[2]


def tiny_config():
    return load_config_file(str(ROOT / "configs" / "tiny.py"))


@pytest.fixture(scope="module")
def setup():
    cfg = tiny_config()
    nets = dr.build_networks(cfg.model)
    params = unbox(jax.jit(lambda k: dr.init_params(nets, k, 32))(jax.random.PRNGKey(0)))
    # Perturb the zero-initialised branches so control and decoder fusion really act.
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    leaves = [x + 0.02 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    params = jax.tree.unflatten(tree, leaves)
    schedule = make_schedule("scaled_linear")
    return nets, params, schedule


def smooth_images(n, size, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.linspace(0, 1, size), np.linspace(0, 1, size), indexing="ij")
    imgs = [np.stack([0.5 + 0.3 * np.sin(2 * np.pi * (a * yy + b * xx)) for a, b in rng.uniform(0.2, 1, (3, 2))], -1)
            for _ in range(n)]
    return jnp.asarray(np.stack(imgs), jnp.float32)


# Every test below reuses the settings and shapes of `first_run` where it can: each new shape or
# setting compiles the whole pipeline again, which dominates this file's time.
SETTINGS = RestoreSettings(steps=2, sampler="ddim")
KNOBS = Knobs(eta=0.5)  # stochastic DDIM steps too: their noise must be per image


@pytest.fixture(scope="module")
def first_run(setup):
    nets, params, schedule = setup
    lq = smooth_images(3, 32, seed=3)
    out = restore(nets, params, lq[:2], jax.random.PRNGKey(7), schedule, SETTINGS, KNOBS,
                  image_ids=jnp.array([10, 11]))
    return lq, out


def test_end_to_end_shape_and_finite(first_run):
    lq, out = first_run
    assert out["image"].shape == lq[:2].shape
    assert out["type_probs"].shape == (2, 8)
    assert np.isfinite(np.asarray(out["image"])).all()
    assert float(out["image"].min()) >= 0 and float(out["image"].max()) <= 1
    np.testing.assert_allclose(np.asarray(out["type_probs"]).sum(-1), 1.0, rtol=1e-5)


def test_image_result_independent_of_batch(setup, first_run):
    """Image 11 in another batch, at another position, with another neighbour: same bits."""
    nets, params, schedule = setup
    lq, out = first_run
    other = restore(nets, params, jnp.stack([lq[2], lq[1]]), jax.random.PRNGKey(7), schedule,
                    SETTINGS, KNOBS, image_ids=jnp.array([12, 11]))
    np.testing.assert_array_equal(np.asarray(other["image"][1]), np.asarray(out["image"][1]))
    assert not np.array_equal(np.asarray(other["image"][0]), np.asarray(out["image"][0]))


def test_compiles_once_over_seeds_and_guidance(setup):
    nets, params, schedule = setup
    lq = smooth_images(1, 32)
    settings = RestoreSettings(steps=2, use_cfg=True)
    before = restore._cache_size()
    a = restore(nets, params, lq, jax.random.PRNGKey(1), schedule, settings, Knobs(guidance_scale=1.5))
    b = restore(nets, params, lq, jax.random.PRNGKey(2), schedule, settings, Knobs(guidance_scale=4.0))
    assert restore._cache_size() == before + 1
    assert not np.array_equal(np.asarray(a["image"]), np.asarray(b["image"]))


def test_tiled_close_to_untiled_without_seams(setup, first_run):
    nets, params, schedule = setup
    lq, whole = first_run
    tiled = restore(nets, params, lq[:2], jax.random.PRNGKey(7), schedule,
                    dataclasses.replace(SETTINGS, tile=6, tile_overlap=4), KNOBS,
                    image_ids=jnp.array([10, 11]))["image"]
    whole = np.asarray(whole["image"])
    tiled = np.asarray(tiled)
    # Random weights and per-tile GroupNorm statistics (VAE encoder/decoder see only their tile)
    # make tiles differ from the whole image more than a trained model's would (measured ~0.06);
    # a wrong tile position or blend weight gives errors of the order of the image itself (~0.3).
    assert np.abs(whole - tiled).mean() < 0.1
    # No seams: the tiled image's row-to-row change is nowhere much larger than the untiled one's.
    grad_t = np.abs(np.diff(tiled, axis=1)).mean(axis=(0, 2, 3))
    grad_w = np.abs(np.diff(whole, axis=1)).mean(axis=(0, 2, 3))
    assert (grad_t - grad_w).max() < 0.05


def test_samples_average_the_posterior_draws(setup, first_run):
    """samples=2: the mean of the two draws keyed by sample_keys(image key, 2), each one the very
    single-sample restoration of that key; they differ, so the average really mixes two draws."""
    nets, params, schedule = setup
    lq, _ = first_run
    two = restore(nets, params, lq[:1], jax.random.PRNGKey(7), schedule,
                  dataclasses.replace(SETTINGS, samples=2), KNOBS, image_ids=jnp.array([10]))["image"]
    one = jax.jit(lambda k: pipeline.restore_one(nets, params, schedule, SETTINGS, KNOBS, k, lq[:1])[0])
    keys = pipeline.sample_keys(jax.random.fold_in(jax.random.PRNGKey(7), 10), 2)
    draws = [np.asarray(one(k)[0]) for k in keys]
    assert np.abs(draws[0] - draws[1]).mean() > 1e-3
    np.testing.assert_allclose(np.asarray(two[0]), (draws[0] + draws[1]) / 2, atol=1e-5)
    with pytest.raises(ValueError, match="samples must be >= 1"):
        restore(nets, params, lq[:1], jax.random.PRNGKey(7), schedule,
                dataclasses.replace(SETTINGS, samples=0), KNOBS)


def test_bad_size_is_a_clear_error(setup):
    nets, params, schedule = setup
    with pytest.raises(ValueError, match="multiple of"):
        restore(nets, params, jnp.zeros((1, 30, 32, 3)), jax.random.PRNGKey(0), schedule)
