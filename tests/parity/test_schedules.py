"""Schedules and losses equal diffusers' definitions and the min-SNR formula."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from diffrestorer_jax.diffusion import losses, schedules

SCHEDULES = [  # (kind, beta_start, beta_end, zero_snr)
    ("scaled_linear", 0.00085, 0.012, False),
    ("linear", 0.0001, 0.02, False),
    ("squaredcos_cap_v2", 0.0001, 0.02, False),
    ("scaled_linear", 0.00085, 0.012, True),
]


def pair(kind, start, end, zero_snr, prediction_type="epsilon"):
    ours = schedules.make_schedule(kind, 1000, start, end, prediction_type, zero_snr)
    ref = DDPMScheduler(num_train_timesteps=1000, beta_start=start, beta_end=end, beta_schedule=kind,
                        prediction_type=prediction_type, rescale_betas_zero_snr=zero_snr)
    return ours, ref


@pytest.mark.parametrize("cfg", SCHEDULES, ids=lambda c: f"{c[0]}-zsnr{c[3]}")
def test_tables_match_diffusers(cfg):
    """Same betas / alphas_cumprod up to diffusers' own float32 round-off (it builds them in f32)."""
    ours, ref = pair(*cfg)
    assert ours.betas.dtype == jnp.float32 and ours.alphas_cumprod.shape == (1000,)
    # diffusers recovers zero-SNR betas as 1 - ab[t]/ab[t-1] in float32 (cancellation, ~1e-5
    # error); ours are computed in float64. The samplers only read alphas_cumprod.
    np.testing.assert_allclose(ours.betas, ref.betas.numpy(), rtol=1e-5, atol=1e-5 if cfg[3] else 1e-7)
    np.testing.assert_allclose(ours.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=2e-6, atol=1e-6)
    if cfg[3]:
        assert float(ours.alphas_cumprod[-1]) == 0.0


def test_schedule_is_a_pytree_with_static_config():
    s = schedules.make_schedule(prediction_type="v_prediction")
    leaves, treedef = jax.tree_util.tree_flatten(s)
    assert len(leaves) == 2
    back = jax.tree_util.tree_unflatten(treedef, leaves)
    assert back.prediction_type == "v_prediction" and back.num_train_timesteps == 1000
    with pytest.raises(ValueError):
        schedules.make_schedule(prediction_type="eps")
    with pytest.raises(ValueError):
        schedules.make_schedule("quadratic")


@pytest.mark.parametrize("cfg", SCHEDULES[:1] + SCHEDULES[3:], ids=["sd", "zsnr"])
def test_add_noise_and_velocity_match_diffusers(cfg):
    """Tolerance 5e-6: the two alphas_cumprod tables differ by float32 round-off (<= 5e-7)."""
    ours, ref = pair(*cfg)
    rng = np.random.default_rng(0)
    x0, noise = (rng.standard_normal((4, 8, 8, 4)).astype(np.float32) for _ in range(2))
    t = np.array([0, 1, 500, 999])
    args = (torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t))
    np.testing.assert_allclose(schedules.add_noise(ours, x0, noise, t), ref.add_noise(*args).numpy(), atol=5e-6)
    np.testing.assert_allclose(schedules.velocity(ours, x0, noise, t), ref.get_velocity(*args).numpy(), atol=5e-6)
    scalar = schedules.add_noise(ours, x0, noise, 500)  # one t for the whole batch
    np.testing.assert_allclose(scalar[2], ref.add_noise(*args).numpy()[2], atol=5e-6)


@pytest.mark.parametrize("ptype", ["epsilon", "v_prediction", "sample"])
def test_predict_x0_and_eps_inverts_the_forward_process(ptype):
    s = schedules.make_schedule(prediction_type=ptype)
    rng = np.random.default_rng(1)
    x0, noise = (rng.standard_normal((3, 4, 4, 2)).astype(np.float32) for _ in range(2))
    t = jnp.array([10, 400, 990])
    x_t = schedules.add_noise(s, x0, noise, t)
    out = losses.target_for(s, x0, noise, t)
    x0_hat, eps_hat = schedules.predict_x0_and_eps(s, out, x_t, t)
    np.testing.assert_allclose(x0_hat, x0, atol=5e-4)
    np.testing.assert_allclose(eps_hat, noise, atol=5e-4)


def test_snr_formula():
    ours, ref = pair(*SCHEDULES[0])
    t = np.array([0, 250, 999])
    a = ref.alphas_cumprod.numpy()[t].astype(np.float64)
    np.testing.assert_allclose(schedules.snr(ours, t), a / (1 - a), rtol=1e-5)


def _x0_mse(schedule, out, x_t, x0, t):
    x0_hat, _ = schedules.predict_x0_and_eps(schedule, out, x_t, t)
    return np.mean((np.asarray(x0_hat, np.float64) - x0) ** 2, axis=(1, 2, 3))


@pytest.mark.parametrize("ptype", ["epsilon", "v_prediction", "sample"])
def test_min_snr_weighting_equals_capped_snr_times_x0_error(ptype):
    """Hang et al.: weighted loss == min(SNR, gamma) * ||x0_hat - x0||^2 for every parameterisation."""
    s = schedules.make_schedule(prediction_type=ptype)
    rng = np.random.default_rng(2)
    x0, noise, out = (rng.standard_normal((4, 4, 4, 2)).astype(np.float32) for _ in range(3))
    t = jnp.array([5, 100, 600, 950])
    x_t = schedules.add_noise(s, x0, noise, t)
    gamma = 5.0
    weighted = losses.diffusion_loss(s, out, x0, noise, t, min_snr_gamma=gamma)
    snr = np.asarray(schedules.snr(s, t), np.float64)
    expected = np.minimum(snr, gamma) * _x0_mse(s, out, x_t, x0, t)
    np.testing.assert_allclose(weighted, expected, rtol=2e-3)


def test_min_snr_weights_closed_form_and_zero_snr():
    t = jnp.array([0, 300, 999])
    for ptype, fn in [("epsilon", lambda r, g: np.minimum(r, g) / r),
                      ("v_prediction", lambda r, g: np.minimum(r, g) / (r + 1)),
                      ("sample", np.minimum)]:
        s = schedules.make_schedule(prediction_type=ptype)
        r = np.asarray(schedules.snr(s, t), np.float64)
        np.testing.assert_allclose(losses.min_snr_weight(s, t, 5.0), fn(r, 5.0), rtol=1e-5)
    z = schedules.make_schedule(prediction_type="epsilon", rescale_zero_terminal_snr=True)
    w = losses.min_snr_weight(z, jnp.array([999]), 5.0)
    assert np.isfinite(w).all() and float(w[0]) == 1.0


def test_loss_targets_and_reduction():
    rng = np.random.default_rng(3)
    x0, noise = (rng.standard_normal((2, 4, 4, 2)).astype(np.float32) for _ in range(2))
    t = jnp.array([50, 700])
    for ptype in ["epsilon", "v_prediction", "sample"]:
        s = schedules.make_schedule(prediction_type=ptype)
        target = losses.target_for(s, x0, noise, t)
        assert np.allclose(losses.diffusion_loss(s, target, x0, noise, t), 0.0)
        off = losses.diffusion_loss(s, (target + 0.5).astype(jnp.bfloat16), x0, noise, t)
        assert off.shape == (2,) and off.dtype == jnp.float32
        np.testing.assert_allclose(off, 0.25, rtol=2e-2)
    eps = schedules.make_schedule()
    assert not np.allclose(losses.diffusion_loss(eps, x0, x0, noise, t), 0.0)  # wrong target is caught
