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
    """The fake network in numpy/torch (float32): roughly the ideal eps of N(0, 1) data,
    sqrt(1 - alpha_bar) x, so latents stay O(1) and float32 round-off stays comparable to 1e-5."""
    x = torch.as_tensor(np.asarray(x, np.float32))
    scale = np.float32(0.95 * np.sqrt(np.float32(t) / np.float32(1000.0)))
    return (scale * x + 0.1 * torch.tanh(x)).numpy()


def jax_model(x, t):
    """The same fake network in jax; t is an int32 vector (one per row)."""
    scale = 0.95 * jnp.sqrt(t.astype(jnp.float32) / 1000.0)[:, None, None, None]
    return scale * x + 0.1 * jnp.tanh(x)


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


def diffusers_trajectory(sched, x, noises, eta, monkeypatch, begin=0, model=np_model):
    """Python loop over scheduler.step from step `begin`: (samples (n+1, ...), model outputs)."""
    xs, outs = [np.asarray(x, np.float32)], []
    for i in range(begin, len(sched.timesteps)):
        t = sched.timesteps[i]
        outs.append(model(xs[-1], t))
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


# ---------------------------------------------------------------------------------------------
# Whole runs under jit.
# ---------------------------------------------------------------------------------------------
def cfg_jax_model(x2, t2):
    """Guided convention: first half of the batch unconditional, second half conditional."""
    half = x2.shape[0] // 2
    cond = jnp.concatenate([jnp.zeros((half,)), jnp.ones((half,))])[:, None, None, None]
    return jax_model(x2, t2) + cond * 0.3 * jnp.cos(x2)


def cfg_np_model(scale):
    """The same guided model, combined in numpy: uncond + s * (cond - uncond)."""
    return lambda x, t: np_model(x, t) + np.float32(scale) * 0.3 * np.cos(x)


def run_ours(sampler, schedule, num_steps, x, key, **kw):
    fn = functools.partial(smp.sample, cfg_jax_model if "guidance_scale" in kw else jax_model,
                           sampler=sampler, num_steps=num_steps, **{k: v for k, v in kw.items() if k == "strength"})
    rest = {k: v for k, v in kw.items() if k != "strength"}
    return np.asarray(jax.jit(fn)(x, key, schedule, **rest))


FULL = [("ddim", 0.0, 50), ("ddim", 0.5, 20), ("ddpm", 0.0, 20), ("dpmpp_2m", 0.0, 20)]


@pytest.mark.parametrize("case", FULL, ids=lambda c: "-".join(map(str, c)))
def test_full_jitted_sample_matches_diffusers_loop(case, monkeypatch):
    sampler, eta, num_steps = case
    sched = diffusers_scheduler(sampler)
    sched.set_timesteps(num_steps)
    key = jax.random.key(7)
    x = np.random.default_rng(4).standard_normal(SHAPE).astype(np.float32)
    ref, _ = diffusers_trajectory(sched, x, step_noises(key, num_steps), eta, monkeypatch)
    ours = run_ours(sampler, our_schedule(), num_steps, x, key, eta=jnp.float32(eta))
    assert np.abs(ours - ref[-1]).max() <= TOL


def test_guided_sample_matches_diffusers_loop(monkeypatch):
    """One batched model call per step gives uncond + s * (cond - uncond)."""
    scale = 4.0
    sched = diffusers_scheduler("dpmpp_2m")
    sched.set_timesteps(20)
    x = np.random.default_rng(5).standard_normal(SHAPE).astype(np.float32)
    ref, _ = diffusers_trajectory(sched, x, np.zeros((20,) + SHAPE, np.float32), 0.0, monkeypatch,
                                  model=cfg_np_model(scale))
    ours = run_ours("dpmpp_2m", our_schedule(), 20, x, jax.random.key(0), guidance_scale=jnp.float32(scale))
    assert np.abs(ours - ref[-1]).max() <= TOL


def test_compiles_once_across_keys_and_guidance_scales():
    traces = []

    def generate(x, key, scale):
        traces.append(1)  # runs only while tracing
        return smp.sample(cfg_jax_model, x, key, our_schedule(), sampler="ddim", num_steps=4, eta=0.5,
                          guidance_scale=scale)

    fn = jax.jit(generate)
    x = jnp.ones(SHAPE)
    a = fn(x, jax.random.key(1), jnp.float32(1.0))
    b = fn(x, jax.random.key(2), jnp.float32(7.5))
    assert len(traces) == 1
    assert not np.allclose(a, b)


# ---------------------------------------------------------------------------------------------
# img2img (strength < 1).
# ---------------------------------------------------------------------------------------------
def test_start_index_reproduces_img2img_get_timesteps():
    """StableDiffusionImg2ImgPipeline.get_timesteps: init = min(int(n*s), n); start = n - init."""
    s = our_schedule()
    assert smp.start_index(50, 0.3) == 35  # int(50 * 0.3) = int(15.000000000000002) = 15
    assert smp.timesteps_for("ddim", s, 50)[35] == 281  # leading, offset 1: 981 - 35 * 20
    assert smp.start_index(20, 0.75) == 5
    assert smp.timesteps_for("dpmpp_2m", s, 20)[5] == 749  # linspace: round(999 * 15 / 20)
    assert smp.start_index(20, 1.0) == 0 and smp.start_index(10, 0.15) == 9
    with pytest.raises(ValueError):
        smp.start_index(10, 0.05)  # int(0.5) = 0 steps left
    with pytest.raises(ValueError):
        smp.sample(jax_model, jnp.ones(SHAPE), jax.random.key(0), s, sampler="ddim", num_steps=10, strength=0.5)


@pytest.mark.parametrize("sampler,num_steps,strength", [("ddim", 50, 0.3), ("dpmpp_2m", 20, 0.75)])
def test_img2img_matches_diffusers(sampler, num_steps, strength, monkeypatch):
    sched = diffusers_scheduler(sampler)
    sched.set_timesteps(num_steps)
    begin = smp.start_index(num_steps, strength)
    if sampler == "dpmpp_2m":
        sched.set_begin_index(begin)
    rng = np.random.default_rng(6)
    latent, noise = (rng.standard_normal(SHAPE).astype(np.float32) for _ in range(2))
    t0 = sched.timesteps[begin:begin + 1].repeat(SHAPE[0])
    start = sched.add_noise(torch.from_numpy(latent), torch.from_numpy(noise), t0).numpy()
    noises = np.zeros((num_steps,) + SHAPE, np.float32)
    ref, _ = diffusers_trajectory(sched, start, noises, 0.0, monkeypatch, begin=begin)
    assert len(ref) == num_steps - begin + 1
    ours = run_ours(sampler, our_schedule(), num_steps, noise, jax.random.key(0), start_latent=latent,
                    strength=strength)
    assert np.abs(ours - ref[-1]).max() <= TOL
