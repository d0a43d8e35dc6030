"""Samplers (DDPM, DDIM, DPM-Solver++ 2M) as pure functions whose whole loop is one `lax.scan`.

Each step reproduces the matching diffusers scheduler's `step` as Stable Diffusion 1.5 ships it
(scaled-linear betas, `steps_offset=1`, no sample clipping, DDPM variance "fixed_small"; timestep
spacing 'leading' for DDPM/DDIM, 'linspace' for DPM-Solver++), so converted weights sample as they
do in diffusers.

`model_fn(x_t, t)` is pure and jittable, `t` one int32 timestep per row. With classifier-free
guidance it is called once on concat([x_t, x_t]) and returns [unconditional; conditional] outputs;
out = uncond + s * (cond - uncond) with `s` traced. `sampler`, `num_steps`, `strength`,
`timestep_spacing` and `steps_offset` are static (they fix the scan); everything else is traced.
Step i's noise is normal(fold_in(key, i)); with `per_row_keys`, row b's is normal(fold_in(key[b], i)),
the very numbers a batch of that row alone draws with key[b], so a row's sample does not depend on
the rows beside it. With `start_latent` and `strength` < 1 (img2img, as
diffusers' pipeline) the first steps are skipped and sampling starts from start_latent noised to the
first remaining timestep.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from diffrestorer_jax.diffusion.schedules import Schedule, predict_x0_and_eps

SAMPLERS = ("ddpm", "ddim", "dpmpp_2m")
DEFAULT_SPACING = {"ddpm": "leading", "ddim": "leading", "dpmpp_2m": "linspace"}


def _check_sampler(sampler: str) -> None:
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")


# ---------------------------------------------------------------------------------------------
# Timestep tables (host-side numpy; they are static per (sampler, num_steps)).
# ---------------------------------------------------------------------------------------------
def _dpm_timesteps(n_train: int, num_steps: int, spacing: str, steps_offset: int) -> np.ndarray:
    """DPMSolverMultistepScheduler.set_timesteps (lambda_min_clipped=-inf: last timestep = n_train)."""
    if spacing == "linspace":
        return np.linspace(0, n_train - 1, num_steps + 1).round()[::-1][:-1].astype(np.int64)
    if spacing == "leading":
        ratio = n_train // (num_steps + 1)
        return (np.arange(0, num_steps + 1) * ratio).round()[::-1][:-1].astype(np.int64) + steps_offset
    if spacing == "trailing":
        return np.arange(n_train, 0, -n_train / num_steps).round().astype(np.int64) - 1
    raise ValueError(f"unknown timestep_spacing {spacing!r}")


def _ddim_timesteps(n_train: int, num_steps: int, spacing: str, steps_offset: int) -> np.ndarray:
    """DDPMScheduler/DDIMScheduler.set_timesteps."""
    if spacing == "linspace":
        return np.linspace(0, n_train - 1, num_steps).round()[::-1].astype(np.int64)
    if spacing == "leading":
        ratio = n_train // num_steps
        return (np.arange(0, num_steps) * ratio).round()[::-1].astype(np.int64) + steps_offset
    if spacing == "trailing":
        return np.round(np.arange(n_train, 0, -n_train / num_steps)).astype(np.int64) - 1
    raise ValueError(f"unknown timestep_spacing {spacing!r}")


def timesteps_for(sampler: str, schedule: Schedule, num_steps: int, timestep_spacing: str | None = None,
                  steps_offset: int = 1) -> np.ndarray:
    """The descending int32 timesteps diffusers' scheduler visits for num_steps inference steps."""
    _check_sampler(sampler)
    n_train = schedule.num_train_timesteps
    if not 1 <= num_steps <= n_train:
        raise ValueError(f"num_steps must be in [1, {n_train}], got {num_steps}")
    spacing = timestep_spacing or DEFAULT_SPACING[sampler]
    make = _dpm_timesteps if sampler == "dpmpp_2m" else _ddim_timesteps
    return make(n_train, num_steps, spacing, steps_offset).astype(np.int32)


def prev_timesteps_for(sampler: str, schedule: Schedule, timesteps: np.ndarray) -> np.ndarray:
    """The timestep each step lands on (-1 = the clean end), as diffusers computes it.

    DDIM uses t - n_train // num_steps (even when 'trailing' spacing is uneven); DDPM uses the next
    entry of the table. DPM-Solver++ indexes its sigma table instead, so it needs none.
    """
    n = len(timesteps)
    if sampler == "ddim":
        return (timesteps - schedule.num_train_timesteps // n).astype(np.int32)
    return np.concatenate([timesteps[1:], [-1]]).astype(np.int32)


def start_index(num_steps: int, strength: float) -> int:
    """Index of the first step img2img runs (StableDiffusionImg2ImgPipeline.get_timesteps)."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    init_steps = min(int(num_steps * strength), num_steps)
    if init_steps == 0:
        raise ValueError(f"strength {strength} with {num_steps} steps leaves no step to run")
    return max(num_steps - init_steps, 0)


def step_noise(key: jax.Array, step: int | jax.Array, shape) -> jax.Array:
    """The float32 noise a stochastic step i uses: normal(fold_in(key, i)).

    Drawn flat and reshaped: XLA:CPU compiles threefry on a 4-D shape many times slower than on a
    1-D one, and the distribution is the same.
    """
    flat = jax.random.normal(jax.random.fold_in(key, step), (int(np.prod(shape)),), jnp.float32)
    return flat.reshape(shape)


# ---------------------------------------------------------------------------------------------
# One-step updates (pure; exposed for step-by-step parity tests).
# ---------------------------------------------------------------------------------------------
def _alpha_prev(schedule: Schedule, t_prev, final_value):
    """alpha_bar at the landing timestep; t_prev < 0 means the clean end (`final_value`)."""
    ac = schedule.alphas_cumprod
    return jnp.where(t_prev >= 0, ac[jnp.maximum(t_prev, 0)], final_value)


def ddpm_step(schedule: Schedule, model_output, x_t, t, t_prev, noise):
    """Ancestral DDPM step with "fixed_small" variance (posterior variance, Ho et al. eq. 7)."""
    a_t = schedule.alphas_cumprod[t]
    a_prev = _alpha_prev(schedule, t_prev, jnp.float32(1.0))
    beta_prod_t, beta_prod_prev = 1 - a_t, 1 - a_prev
    cur_alpha = a_t / a_prev
    cur_beta = 1 - cur_alpha
    x0, _ = predict_x0_and_eps(schedule, model_output, x_t, t)
    mean = (a_prev**0.5 * cur_beta) / beta_prod_t * x0 + cur_alpha**0.5 * beta_prod_prev / beta_prod_t * x_t
    variance = jnp.maximum(beta_prod_prev / beta_prod_t * cur_beta, 1e-20)
    return jnp.where(t > 0, mean + variance**0.5 * noise, mean)


def ddim_step(schedule: Schedule, model_output, x_t, t, t_prev, eta=0.0, noise=None):
    """DDIM step (Song et al. eq. 12); eta=0 is deterministic, eta=1 is DDPM-like.

    The clean end uses alpha_bar_0 rather than 1 (diffusers' set_alpha_to_one=False, SD's config).
    """
    a_t = schedule.alphas_cumprod[t]
    a_prev = _alpha_prev(schedule, t_prev, schedule.alphas_cumprod[0])
    x0, eps = predict_x0_and_eps(schedule, model_output, x_t, t)
    variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    std = eta * variance**0.5
    x_prev = a_prev**0.5 * x0 + (1 - a_prev - std**2) ** 0.5 * eps
    return x_prev if noise is None else x_prev + std * noise


def dpm_sigmas(schedule: Schedule, timesteps) -> jnp.ndarray:
    """sqrt((1-a)/a) at each timestep plus a final 0 (final_sigmas_type='zero').

    A zero-terminal-SNR schedule has a=0 at the last step; diffusers clamps it to 2**-24 there so
    the solver's log-SNR stays finite, and so do we.
    """
    ac = schedule.alphas_cumprod
    ac = jnp.where(ac == 0, jnp.float32(2.0**-24), ac)
    sig = ((1 - ac) / ac) ** 0.5
    return jnp.concatenate([sig[jnp.asarray(timesteps)], jnp.zeros((1,), jnp.float32)])


def _alpha_sigma(sigma):
    """(alpha_t, sigma_t) of the VP process from the VE sigma = sigma_t / alpha_t."""
    alpha = 1 / ((sigma**2 + 1) ** 0.5)
    return alpha, sigma * alpha


def dpm_x0(prediction_type: str, model_output, x, sigma):
    """DPM-Solver++ works on the data prediction; convert the model's output to it."""
    alpha, sig = _alpha_sigma(sigma)
    if prediction_type == "epsilon":
        return (x - sig * model_output) / alpha
    if prediction_type == "v_prediction":
        return alpha * x - sig * model_output
    if prediction_type == "sample":
        return model_output
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def dpmpp_2m_step(x0, prev_x0, x, sigma_prev_step, sigma_s, sigma_t, first_order):
    """DPM-Solver++(2M) midpoint update from sigma_s to sigma_t (Lu et al. 2022, Alg. 2).

    x0 / prev_x0: data predictions at this and the previous step (sigma_prev_step). `first_order`
    (traced bool) selects the DDIM-equivalent first-order update, used at the first step (no
    history yet) and the last (sigma_t = 0, lower_order_final). Both branches are computed and one
    is selected, so the unused one may hold inf/nan without harm.
    """
    alpha_t, sig_t = _alpha_sigma(sigma_t)
    alpha_s, sig_s = _alpha_sigma(sigma_s)
    alpha_p, sig_p = _alpha_sigma(sigma_prev_step)
    lam_t = jnp.log(alpha_t) - jnp.log(sig_t)
    lam_s = jnp.log(alpha_s) - jnp.log(sig_s)
    lam_p = jnp.log(alpha_p) - jnp.log(sig_p)
    h, h_0 = lam_t - lam_s, lam_s - lam_p
    decay = alpha_t * (jnp.exp(-h) - 1.0)
    first = (sig_t / sig_s) * x - decay * x0
    d1 = (1.0 / (h_0 / h)) * (x0 - prev_x0)
    second = (sig_t / sig_s) * x - decay * x0 - 0.5 * decay * d1
    return jnp.where(first_order, first, second)


# ---------------------------------------------------------------------------------------------
# The scan.
# ---------------------------------------------------------------------------------------------
def guided(model_fn, guidance_scale):
    """model_fn(x, t) -> output with classifier-free guidance folded in (see module docstring)."""

    def call(x, t):
        tvec = jnp.broadcast_to(jnp.asarray(t, jnp.int32), (x.shape[0],))
        if guidance_scale is None:
            return model_fn(x, tvec).astype(jnp.float32)
        out = model_fn(jnp.concatenate([x, x]), jnp.concatenate([tvec, tvec])).astype(jnp.float32)
        uncond, cond = jnp.split(out, 2)
        return uncond + jnp.asarray(guidance_scale, jnp.float32) * (cond - uncond)

    return call


def _is_zero(value) -> bool:
    return isinstance(value, (int, float)) and value == 0


def _scan_ddpm_ddim(net, x, key, schedule, sampler, ts, prevs, idx, eta, per_row_keys):
    stochastic = sampler == "ddpm" or not _is_zero(eta)

    def noise_at(i, shape):
        if per_row_keys:
            return jax.vmap(lambda k: step_noise(k, i, shape[1:]))(key)
        return step_noise(key, i, shape)

    def body(x, step):
        i, t, t_prev = step
        out = net(x, t)
        noise = noise_at(i, x.shape) if stochastic else None
        if sampler == "ddpm":
            return ddpm_step(schedule, out, x, t, t_prev, noise), None
        return ddim_step(schedule, out, x, t, t_prev, jnp.asarray(eta, jnp.float32), noise), None

    x, _ = jax.lax.scan(body, x, (jnp.asarray(idx), jnp.asarray(ts), jnp.asarray(prevs)))
    return x


def _scan_dpm(net, x, schedule, sigmas, ts, idx):
    first_idx, last_idx = int(idx[0]), len(sigmas) - 2

    def body(carry, step):
        x, prev_x0 = carry
        i, t = step
        x0 = dpm_x0(schedule.prediction_type, net(x, t), x, sigmas[i])
        first_order = (i == first_idx) | (i == last_idx)
        x = dpmpp_2m_step(x0, prev_x0, x, sigmas[i - 1], sigmas[i], sigmas[i + 1], first_order)
        return (x, x0), None

    (x, _), _ = jax.lax.scan(body, (x, jnp.zeros_like(x)), (jnp.asarray(idx), jnp.asarray(ts)))
    return x


def _noised_start(sampler, schedule, start_latent, noise, t, sigma):
    """The img2img starting point: the scheduler's own add_noise at the first remaining step."""
    start_latent = jnp.asarray(start_latent, jnp.float32)
    if sampler == "dpmpp_2m":
        alpha, sig = _alpha_sigma(sigma)
        return alpha * start_latent + sig * noise
    a = schedule.alphas_cumprod[t]
    return a**0.5 * start_latent + (1 - a) ** 0.5 * noise


def sample(model_fn, x_T, key, schedule: Schedule, *, sampler: str, num_steps: int, eta=0.0,
           guidance_scale=None, start_latent=None, strength: float = 1.0,
           timestep_spacing: str | None = None, steps_offset: int = 1, per_row_keys: bool = False):
    """Run a whole sampler in one lax.scan and return the final latent x_0 (float32).

    x_T is the initial noise (init_noise_sigma is 1 for all three samplers); with start_latent it
    is the noise that img2img adds to start_latent instead. eta only affects DDIM. `key` is one key,
    or with `per_row_keys` one per row of x_T (see the module docstring).
    """
    ts = timesteps_for(sampler, schedule, num_steps, timestep_spacing, steps_offset)
    if start_latent is None and strength != 1.0:
        raise ValueError("strength < 1 needs a start_latent to start from")
    i0 = 0 if start_latent is None else start_index(num_steps, strength)
    idx = np.arange(i0, num_steps, dtype=np.int32)
    net = guided(model_fn, guidance_scale)
    x = jnp.asarray(x_T, jnp.float32)
    sigmas = dpm_sigmas(schedule, ts) if sampler == "dpmpp_2m" else None
    if start_latent is not None:
        x = _noised_start(sampler, schedule, start_latent, x, ts[i0], None if sigmas is None else sigmas[i0])
    if sampler == "dpmpp_2m":
        return _scan_dpm(net, x, schedule, sigmas, ts[i0:], idx)
    prevs = prev_timesteps_for(sampler, schedule, ts)
    return _scan_ddpm_ddim(net, x, key, schedule, sampler, ts[i0:], prevs[i0:], idx, eta, per_row_keys)
