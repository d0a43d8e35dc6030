"""Noise schedules of discrete-time diffusion and the algebra that uses them.

The definitions follow diffusers' schedulers (DDPM/DDIM/DPM-Solver all share them), because the
weights we load were trained against exactly those numbers: betas -> alphas_cumprod = prod(1 - beta),
x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps, v = sqrt(a_t) eps - sqrt(1 - a_t) x0.

Tables are computed on the host in float64 and rounded once to float32. diffusers builds them in
float32 torch (linspace, cumprod), so the two agree to a few float32 ulps (about 3e-7 absolute),
not bit for bit; tests bound that gap explicitly.

`Schedule` is a pytree: its arrays can be passed through `jit` as arguments (no recompilation when
the numbers change) while `num_train_timesteps` and `prediction_type` are static, because they
select code paths.
"""
from __future__ import annotations

import math

import flax.struct
import jax.numpy as jnp
import numpy as np

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
BETA_SCHEDULES = ("scaled_linear", "linear", "squaredcos_cap_v2")


@flax.struct.dataclass
class Schedule:
    """Float32 tables indexed by integer training timestep t in [0, num_train_timesteps)."""

    betas: jnp.ndarray
    alphas_cumprod: jnp.ndarray
    num_train_timesteps: int = flax.struct.field(pytree_node=False, default=1000)
    prediction_type: str = flax.struct.field(pytree_node=False, default="epsilon")


def _cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """Glide's squared-cosine alpha_bar, discretised and capped at max_beta (Nichol & Dhariwal)."""

    def alpha_bar(s):
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    n = num_train_timesteps
    return np.array(
        [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)],
        dtype=np.float64,
    )


def _base_betas(kind, num_train_timesteps, beta_start, beta_end) -> np.ndarray:
    if kind == "linear":
        return np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float64)
    if kind == "scaled_linear":  # latent diffusion: linear in sqrt(beta)
        return np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=np.float64) ** 2
    if kind in ("squaredcos_cap_v2", "cosine"):
        return _cosine_betas(num_train_timesteps)
    raise ValueError(f"unknown beta schedule {kind!r}; choose one of {BETA_SCHEDULES}")


def rescale_betas_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2023 (Algorithm 1): shift/scale sqrt(alpha_bar) so the last step is pure noise.

    Keeps sqrt(alpha_bar_0) unchanged so the low-noise end of the schedule is untouched; the last
    alpha_bar becomes exactly 0 (SNR 0), which fixes the train/test mismatch of the final step.
    """
    sqrt_ab = np.sqrt(np.cumprod(1.0 - betas))
    first, last = sqrt_ab[0], sqrt_ab[-1]
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    ab = sqrt_ab**2
    alphas = np.concatenate([ab[:1], ab[1:] / ab[:-1]])
    return 1.0 - alphas


def make_schedule(
    kind: str = "scaled_linear",
    num_train_timesteps: int = 1000,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    prediction_type: str = "epsilon",
    rescale_zero_terminal_snr: bool = False,
) -> Schedule:
    """Build a `Schedule`; defaults are Stable Diffusion 1.5's training schedule."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {prediction_type!r}; choose one of {PREDICTION_TYPES}")
    betas = _base_betas(kind, num_train_timesteps, beta_start, beta_end)
    if rescale_zero_terminal_snr:
        betas = rescale_betas_zero_terminal_snr(betas)
    alphas_cumprod = np.cumprod(1.0 - betas)
    if rescale_zero_terminal_snr:
        alphas_cumprod[-1] = 0.0  # exact zero, as the algorithm intends (avoid 1e-17 round-off)
    return Schedule(
        betas=jnp.asarray(betas, jnp.float32),
        alphas_cumprod=jnp.asarray(alphas_cumprod, jnp.float32),
        num_train_timesteps=num_train_timesteps,
        prediction_type=prediction_type,
    )


def from_config(diffusion) -> Schedule:
    """The schedule a run config's `diffusion` section describes (training and restoring share it)."""
    d = diffusion
    return make_schedule(str(d.schedule), int(d.num_train_timesteps), float(d.beta_start),
                         float(d.beta_end), str(d.prediction_type), bool(d.rescale_zero_terminal_snr))


def _at(table: jnp.ndarray, t, ndim: int) -> jnp.ndarray:
    """table[t] shaped to broadcast against an ndim-array whose leading axes are t's axes."""
    t = jnp.asarray(t, jnp.int32)
    value = table[t]
    return value.reshape(value.shape + (1,) * (ndim - value.ndim))


def _coefs(schedule: Schedule, t, ndim: int):
    """(sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t)) broadcastable to an ndim-array."""
    a = _at(schedule.alphas_cumprod, t, ndim)
    return jnp.sqrt(a), jnp.sqrt(1.0 - a)


def add_noise(schedule: Schedule, x0, noise, t) -> jnp.ndarray:
    """Forward process q(x_t | x0); t is a scalar or one timestep per example (leading axis)."""
    sa, sb = _coefs(schedule, t, jnp.ndim(x0))
    return sa * x0 + sb * noise


def velocity(schedule: Schedule, x0, noise, t) -> jnp.ndarray:
    """The v-prediction target (Salimans & Ho 2022): v = sqrt(a) eps - sqrt(1-a) x0."""
    sa, sb = _coefs(schedule, t, jnp.ndim(x0))
    return sa * noise - sb * x0


def predict_x0_and_eps(schedule: Schedule, model_output, x_t, t):
    """Turn a model output of the schedule's prediction type into (x0_hat, eps_hat).

    Same formulas as diffusers' DDIM step, so samplers built on it match it. At SNR 0 (alpha_bar=0)
    the epsilon parameterisation cannot give x0 (division by zero): use v_prediction there.
    """
    sa, sb = _coefs(schedule, t, jnp.ndim(x_t))
    kind = schedule.prediction_type
    if kind == "epsilon":
        return (x_t - sb * model_output) / sa, model_output
    if kind == "sample":
        return model_output, (x_t - sa * model_output) / sb
    if kind == "v_prediction":
        return sa * x_t - sb * model_output, sa * model_output + sb * x_t
    raise ValueError(f"unknown prediction_type {kind!r}")


def snr(schedule: Schedule, t) -> jnp.ndarray:
    """Signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t), float32, shaped like t."""
    a = schedule.alphas_cumprod[jnp.asarray(t, jnp.int32)]
    return a / (1.0 - a)
