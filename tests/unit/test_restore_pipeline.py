"""restore(): end to end on the tiny config, compiled once, reproducible per image, batched equal to
exact, tiling with memory bounded by the tile."""
import dataclasses
import pathlib

import jax
import jax.extend.core  # noqa: F401  (jaxprs_in_params)
import jax.numpy as jnp
import numpy as np
import pytest

from exports import tiny_params
from diffrestorer_jax.config_base import load_config_file
from diffrestorer_jax.diffusion.schedules import make_schedule
from diffrestorer_jax.export import abstract_params
from diffrestorer_jax.infer import pipeline, tiling
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
    # Seeded random values in every weight (the zero-initialised control and decoder branches act).
    params = jax.tree.map(jnp.asarray, tiny_params(nets))
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


EXACT = dataclasses.replace(SETTINGS, batch_mode="exact")
# Batched vs exact: the same maths, batch N against batch 1 per network call, so XLA's kernels may
# round differently. Measured on the 2-core CPU: 0 to 1e-6 here; the bound leaves room for other
# CPUs' kernels. A row mixed up with its neighbour's, or its noise drawn with the wrong key, differs
# by ~0.1 (the two images of first_run differ by 0.3 on average).
BATCHED_VS_EXACT_ATOL = 1e-4


def test_exact_mode_result_independent_of_batch_and_equal_to_batched(setup, first_run):
    """Exact mode: image 11 in another batch, at another position, with another neighbour: same bits.
    Batched mode (first_run): equal to exact within BATCHED_VS_EXACT_ATOL."""
    nets, params, schedule = setup
    lq, batched = first_run
    exact = restore(nets, params, lq[:2], jax.random.PRNGKey(7), schedule, EXACT, KNOBS,
                    image_ids=jnp.array([10, 11]))
    other = restore(nets, params, jnp.stack([lq[2], lq[1]]), jax.random.PRNGKey(7), schedule,
                    EXACT, KNOBS, image_ids=jnp.array([12, 11]))
    np.testing.assert_array_equal(np.asarray(other["image"][1]), np.asarray(exact["image"][1]))
    assert not np.array_equal(np.asarray(other["image"][0]), np.asarray(exact["image"][0]))
    np.testing.assert_allclose(np.asarray(batched["image"]), np.asarray(exact["image"]),
                               rtol=0, atol=BATCHED_VS_EXACT_ATOL)
    np.testing.assert_allclose(np.asarray(batched["type_probs"]), np.asarray(exact["type_probs"]),
                               rtol=0, atol=BATCHED_VS_EXACT_ATOL)
    assert np.abs(np.asarray(batched["image"][0]) - np.asarray(batched["image"][1])).mean() > 0.05


def _conv_batches(settings, n):
    """The batch sizes of the convolutions restore runs for n images (traced, nothing compiled)."""
    nets = dr.build_networks(tiny_config().model)
    params = unbox(abstract_params(nets, 32))
    lq = jax.ShapeDtypeStruct((n, 32, 32, 3), jnp.float32)
    jaxpr = jax.make_jaxpr(lambda p, x: pipeline.restore_images(
        nets, p, x, jax.random.PRNGKey(0), make_schedule("scaled_linear"), settings, KNOBS))(params, lq)
    found = set()

    def walk(jx):
        for eqn in jx.eqns:
            if eqn.primitive.name == "conv_general_dilated":
                found.add(eqn.invars[0].aval.shape[0])
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)
    walk(jaxpr.jaxpr)
    return found


def test_batched_mode_runs_the_rows_as_one_batch():
    """Batched: every network sees all 3 rows at once (CLIP, VAE and decoder 3, control + UNet the
    6 rows of classifier-free guidance); exact: one image at a time (control + UNet 2 rows)."""
    cfg = dataclasses.replace(SETTINGS, use_cfg=True, steps=1)
    assert _conv_batches(cfg, 3) == {3, 6}
    assert _conv_batches(dataclasses.replace(cfg, batch_mode="exact"), 3) == {1, 2}


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
    one = jax.jit(lambda k: pipeline.restore_rows(nets, params, schedule, SETTINGS, KNOBS, k[None], lq[:1])[0])
    keys = pipeline.sample_keys(jax.random.fold_in(jax.random.PRNGKey(7), 10), 2)
    draws = [np.asarray(one(k)[0]) for k in keys]
    assert np.abs(draws[0] - draws[1]).mean() > 1e-3
    np.testing.assert_allclose(np.asarray(two[0]), (draws[0] + draws[1]) / 2, atol=1e-5)
    with pytest.raises(ValueError, match="samples must be >= 1"):
        restore(nets, params, lq[:1], jax.random.PRNGKey(7), schedule,
                dataclasses.replace(SETTINGS, samples=0), KNOBS)


def test_tiled_memory_does_not_grow_with_the_image():
    """Tiled restore (tiles of 16 latent pixels, 4 per network call; strength < 1, so the VAE encode
    of the start latent is tiled too) compiled for a 512^2 and a 2048^2 image: XLA's temporary
    memory grows by less than one 2048^2 float32 image (the latent accumulators and the per-image
    buffers), not with the number of tiles (16x as many). Before the tiles went through the networks
    in chunks, all of them went at once: 465 MB of temporaries at 512^2, 9.0 GB at 2048^2."""
    nets = dr.build_networks(tiny_config().model)
    params = unbox(abstract_params(nets, 32))
    settings = RestoreSettings(steps=2, strength=0.5, tile=16, tile_overlap=4, tile_batch=4)
    temp = {}
    for side in (512, 2048):
        lq = jax.ShapeDtypeStruct((1, side, side, 3), jnp.float32)
        compiled = restore.lower(nets, params, lq, jax.random.PRNGKey(0), make_schedule("scaled_linear"),
                                 settings, KNOBS).compile()
        temp[side] = compiled.memory_analysis().temp_size_in_bytes
    image_2048 = 2048 * 2048 * 3 * 4
    assert temp[2048] - temp[512] < image_2048, temp
    assert temp[512] < 64 * 2 ** 20, temp  # one chunk of 4 tiles through the tiny networks


def test_tiled_start_latent_is_the_blend_of_tile_encodes(setup):
    """strength < 1 starts from the VAE latents of the LQ image; tiled, they are the weighted blend
    of the encodes of the image's tiles (here computed by hand, tile by tile)."""
    nets, params, _ = setup
    lq = smooth_images(1, 64, seed=5)
    settings = dataclasses.replace(SETTINGS, tile=8, tile_overlap=4, tile_batch=3)
    tiled = jax.jit(lambda x: pipeline.encode_start(nets, params, x, settings))(lq)
    encode = jax.jit(lambda x: dr.encode_latents(nets, params["vae"], x))
    w = np.asarray(tiling.tile_weights(8))[None, :, :, None]
    acc, norm = np.zeros((1, 16, 16, 4)), np.zeros((1, 16, 16, 1))
    for y, x in tiling.tile_positions(16, 16, 8, 4):
        acc[:, y:y + 8, x:x + 8] += w * np.asarray(encode(lq[:, 4 * y:4 * y + 32, 4 * x:4 * x + 32]))
        norm[:, y:y + 8, x:x + 8] += w
    np.testing.assert_allclose(np.asarray(tiled), acc / norm, rtol=1e-5, atol=1e-5)
    whole = np.asarray(jax.jit(lambda x: pipeline.encode_start(nets, params, x, SETTINGS))(lq))
    assert np.abs(whole - acc / norm).mean() > 1e-3  # tiling really happened


def test_bad_size_is_a_clear_error(setup):
    nets, params, schedule = setup
    with pytest.raises(ValueError, match="multiple of"):
        restore(nets, params, jnp.zeros((1, 30, 32, 3)), jax.random.PRNGKey(0), schedule)
