"""The denoising training loss: per-example MSE against the schedule's prediction target.

Optional min-SNR-gamma weighting (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR
Weighting Strategy") caps the weight of low-noise timesteps, whose easy targets otherwise dominate
the gradient. The paper's weight is defined on the x0 loss, min(SNR, gamma); a network predicting
eps or v is trained on a rescaled loss, so the weight is divided by what that rescaling multiplies:
    x0 target:  min(SNR, gamma)
    eps target: min(SNR, gamma) / SNR           (|x0 err|^2 = |eps err|^2 / SNR)
    v target:   min(SNR, gamma) / (SNR + 1)     (|x0 err|^2 = |v err|^2 / (SNR + 1))
At SNR = 0 (zero-terminal-SNR schedules) the eps weight is 0/0; its limit is 1, which we use.

Reductions are float32 whatever the model's compute dtype, so bf16 outputs do not lose the loss.
"""
from __future__ import annotations

import jax.numpy as jnp

from diffrestorer_jax.diffusion.schedules import Schedule, snr, velocity


def target_for(schedule: Schedule, x0, noise, t) -> jnp.ndarray:
    """What the network is trained to output for this schedule's prediction type."""
    kind = schedule.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return velocity(schedule, x0, noise, t)
    if kind == "sample":
        return x0
    raise ValueError(f"unknown prediction_type {kind!r}")


def min_snr_weight(schedule: Schedule, t, gamma: float) -> jnp.ndarray:
    """Per-example min-SNR-gamma loss weight for the schedule's prediction type (see module doc)."""
    s = snr(schedule, t)
    capped = jnp.minimum(s, gamma)
    kind = schedule.prediction_type
    if kind == "epsilon":
        return jnp.where(s == 0, 1.0, capped / jnp.where(s == 0, 1.0, s))
    if kind == "v_prediction":
        return capped / (s + 1.0)
    if kind == "sample":
        return capped
    raise ValueError(f"unknown prediction_type {kind!r}")


def diffusion_loss(schedule: Schedule, model_output, x0, noise, t, min_snr_gamma=None) -> jnp.ndarray:
    """Per-example (shape (B,)) float32 MSE, averaged over all non-batch axes, optionally weighted.

    t holds one integer timestep per example. Take the mean over the batch (or a masked mean for
    padded batches) in the caller, which knows which examples are real.
    """
    target = target_for(schedule, x0.astype(jnp.float32), noise.astype(jnp.float32), t)
    err = jnp.square(model_output.astype(jnp.float32) - target)
    per_example = jnp.mean(err.reshape(err.shape[0], -1), axis=1)
    if min_snr_gamma is None:
        return per_example
    return per_example * min_snr_weight(schedule, t, min_snr_gamma)
