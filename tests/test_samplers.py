"""Samplers equal diffusers' schedulers step by step and end to end, and compile once.

The "model" is a fixed smooth function of (x_t, t) written twice (numpy/torch and jax), so any
difference comes from the sampler, not the network. Schedulers are built with SD 1.5's scheduler
config values (scaled_linear 0.00085..0.012, steps_offset 1, clip_sample False,
set_alpha_to_one False), plus v-prediction / zero-terminal-SNR variants.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from diffusers.schedulers import scheduling_ddpm

from diffrestorer_jax.diffusion import samplers as smp
from diffrestorer_jax.diffusion.schedules import make_schedule

SHAPE = (2, 8, 8, 4)
TOL = 1e-5
SD_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                beta_schedule="scaled_linear", steps_offset=1)


def np_model(x, t):
    """The fake network in numpy/torch (float32)."""
    x = torch.as_tensor(np.asarray(x, np.float32))
    scale = 0.5 + float(t) / 2000.0
    return (torch.tanh(x) * scale + 0.05 * x).numpy()


def jax_model(x, t):
    """The same fake network in jax; t is an int32 vector (one per row)."""
    scale = 0.5 + t.astype(jnp.float32)[:, None, None, None] / 2000.0
    return jnp.tanh(x) * scale + 0.05 * x


def diffusers_scheduler(sampler, prediction_type="epsilon", spacing=None, zero_snr=False):
    kw = dict(SD_BETAS, prediction_type=prediction_type, rescale_betas_zero_snr=zero_snr)
    if spacing:
        kw["timestep_spacing"] = spacing
    if sampler == "ddim":
        return DDIMScheduler(clip_sample=False, set_alpha_to_one=False, **kw)
    if sampler == "ddpm":
        return DDPMScheduler(clip_sample=False, variance_type="fixed_small", **kw)
    return DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2,
                                       lower_order_final=True, **kw)


def our_schedule(prediction_type="epsilon", zero_snr=False):
    return make_schedule("scaled_linear", 1000, 0.00085, 0.012, prediction_type, zero_snr)


def step_noises(key, num_steps):
    """Our per-step noise for every step, (num_steps, *SHAPE), computed in one call."""
    return np.array(jax.vmap(lambda i: smp.step_noise(key, i, SHAPE))(jnp.arange(num_steps)))


def diffusers_step(sched, out, t, sample, noise, eta, monkeypatch):
    """One scheduler.step; stochastic schedulers get `noise` as their variance noise."""
    out, sample, noise = (torch.from_numpy(np.array(a, np.float32)) for a in (out, sample, noise))
    if isinstance(sched, DDIMScheduler):
        return sched.step(out, t, sample, eta=eta, variance_noise=noise if eta > 0 else None).prev_sample
    if isinstance(sched, DDPMScheduler):
        monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda *a, **k: noise)
    return sched.step(out, t, sample).prev_sample


def diffusers_trajectory(sched, x, noises, eta, monkeypatch, begin=0):
    """Python loop over scheduler.step from step `begin`: (samples (n+1, ...), model outputs)."""
    xs, outs = [np.asarray(x, np.float32)], []
    for i in range(begin, len(sched.timesteps)):
        t = sched.timesteps[i]
        outs.append(np_model(xs[-1], t))
        xs.append(diffusers_step(sched, outs[-1], t, xs[-1], noises[i], eta, monkeypatch).numpy())
    return np.stack(xs), np.stack(outs)


CASES = [  # (sampler, prediction_type, spacing, zero_snr, eta)
    ("ddim", "epsilon", None, False, 0.0),
    ("ddim", "epsilon", None, False, 0.7),
    ("ddim", "v_prediction", "trailing", True, 0.0),
    ("ddpm", "epsilon", None, False, 0.0),
    ("ddpm", "v_prediction", None, False, 0.0),
    ("dpmpp_2m", "epsilon", None, False, 0.0),
    ("dpmpp_2m", "v_prediction", "trailing", True, 0.0),
]


def our_steps(sampler, schedule, ts, prevs, xs, outs, noises, eta):
    """Our one-step function applied to every step of a reference trajectory at once (vmap)."""
    n = len(ts)
    idx = jnp.arange(n)
    if sampler == "ddim":
        step = lambda o, x, t, tp, z: smp.ddim_step(schedule, o, x, t, tp, eta, z)  # noqa: E731
        return jax.vmap(step)(outs, xs, ts, prevs, noises)
    if sampler == "ddpm":
        step = lambda o, x, t, tp, z: smp.ddpm_step(schedule, o, x, t, tp, z)  # noqa: E731
        return jax.vmap(step)(outs, xs, ts, prevs, noises)
    sig = smp.dpm_sigmas(schedule, ts)
    x0s = jax.vmap(lambda o, x, s: smp.dpm_x0(schedule.prediction_type, o, x, s))(outs, xs, sig[:n])
    prev_x0s = jnp.concatenate([jnp.zeros_like(x0s[:1]), x0s[:-1]])
    first = (idx == 0) | (idx == n - 1)
    return jax.vmap(smp.dpmpp_2m_step)(x0s, prev_x0s, xs, sig[idx - 1], sig[idx], sig[idx + 1], first)


@pytest.mark.parametrize("num_steps", [20, 50])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_step_by_step_matches_diffusers(case, num_steps, monkeypatch):
    """Each of our steps, fed diffusers' sample and model output, lands on diffusers' next sample."""
    sampler, ptype, spacing, zero_snr, eta = case
    sched = diffusers_scheduler(sampler, ptype, spacing, zero_snr)
    sched.set_timesteps(num_steps)
    schedule = our_schedule(ptype, zero_snr)
    ts = smp.timesteps_for(sampler, schedule, num_steps, spacing)
    np.testing.assert_array_equal(ts, sched.timesteps.numpy())
    x = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    noises = step_noises(jax.random.key(3), num_steps)
    xs, outs = diffusers_trajectory(sched, x, noises, eta, monkeypatch)
    ours = jax.jit(our_steps, static_argnums=(0,))(
        sampler, schedule, ts, smp.prev_timesteps_for(sampler, schedule, ts), xs[:-1], outs, noises, eta)
    err = np.abs(np.asarray(ours) - xs[1:]).reshape(num_steps, -1).max(axis=1)
    assert err.max() <= TOL, f"worst step {err.argmax()} (t={ts[err.argmax()]}): {err.max():.2e}"
