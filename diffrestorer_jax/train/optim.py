"""The optimizer: AdamW with warm-up, clipping, gradient accumulation and non-finite skipping; EMA.

Layers, outermost first:
  MultiSteps(k)      accumulate k micro-batch gradients, so the paper's batch 16 fits on small devices;
  apply_if_finite    a NaN/Inf update is dropped (params and moments untouched) and counted, instead
                     of silently poisoning the run; the loop reads the streak and stops after N;
  clip_by_global_norm  ours: optax's clipping, keeping the norm it computed for the step's metrics
  adamw(schedule)    linear warm-up, then constant or cosine decay.
Config keys (all optional; see DEFAULTS): learning_rate, warmup_steps, schedule, total_steps,
end_lr_factor, b1, b2, eps, weight_decay, weight_decay_mask, grad_clip_norm, grad_accum_steps.
"""
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax

DEFAULTS = dict(
    learning_rate=1e-5,     # the paper's AdamW lr for both stages
    warmup_steps=0,
    schedule="constant",    # 'constant' | 'cosine'
    total_steps=100_000,    # cosine horizon (in optimizer updates, i.e. after accumulation)
    end_lr_factor=0.0,      # cosine ends at learning_rate * end_lr_factor
    b1=0.9,
    b2=0.999,
    eps=1e-8,
    weight_decay=1e-2,      # PyTorch AdamW's default, which the paper's (PyTorch) training used
    weight_decay_mask="all",  # 'all' (PyTorch parity) | 'matrices' (skip biases and norm scales)
    grad_clip_norm=1.0,     # <= 0 disables clipping
    grad_accum_steps=1,
)

# apply_if_finite applies a non-finite update once its limit is reached; the loop must stop first,
# so its own limit is set out of reach and the policy lives in `check_nonfinite_streak`.
_NEVER = 2 ** 30


def _cfg(config, key):
    value = config.get(key, None) if config is not None and hasattr(config, "get") else None
    return DEFAULTS[key] if value is None else value


def make_schedule(config: Mapping = None) -> optax.Schedule:
    """Learning rate per optimizer update: linear warm-up from 0, then constant or cosine."""
    lr, warmup = float(_cfg(config, "learning_rate")), int(_cfg(config, "warmup_steps"))
    kind = _cfg(config, "schedule")
    if kind == "constant":
        if warmup <= 0:
            return optax.constant_schedule(lr)
        return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup),
                                     optax.constant_schedule(lr)], [warmup])
    if kind == "cosine":
        total = max(int(_cfg(config, "total_steps")), warmup + 1)
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, total,
                                                  lr * float(_cfg(config, "end_lr_factor")))
    raise ValueError(f"optimizer schedule must be 'constant' or 'cosine', got {kind!r}")


def _decay_mask(kind: str):
    if kind == "all":
        return None
    if kind == "matrices":
        return lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
    raise ValueError(f"weight_decay_mask must be 'all' or 'matrices', got {kind!r}")


class GradNormState(NamedTuple):
    """The global norm of the last gradient the optimizer applied (before clipping)."""
    grad_norm: jax.Array


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """optax.clip_by_global_norm's clipping (none if max_norm <= 0) that keeps the norm in its state.

    The train step logs that norm instead of computing its own: a pass over the gradients is not
    free (XLA CPU writes the squares out before summing them; benchmarks/RESULTS.md)."""
    def init(params):
        del params
        return GradNormState(jnp.zeros([], jnp.float32))

    def update(updates, state, params=None):
        del state, params
        norm = global_norm(updates)
        if max_norm > 0:
            updates = jax.tree.map(
                lambda g: jnp.where(norm < max_norm, g, (g / norm.astype(g.dtype)) * max_norm), updates)
        return updates, GradNormState(norm)

    return optax.GradientTransformation(init, update)


def make_optimizer(config: Mapping = None) -> optax.GradientTransformation:
    """The full optimizer described in the module docstring, from a (possibly sparse) config."""
    steps = [clip_by_global_norm(float(_cfg(config, "grad_clip_norm"))),
             optax.adamw(make_schedule(config), b1=float(_cfg(config, "b1")),
                         b2=float(_cfg(config, "b2")), eps=float(_cfg(config, "eps")),
                         weight_decay=float(_cfg(config, "weight_decay")),
                         mask=_decay_mask(_cfg(config, "weight_decay_mask")))]
    tx = optax.apply_if_finite(optax.chain(*steps), max_consecutive_errors=_NEVER)
    accum = int(_cfg(config, "grad_accum_steps"))
    return optax.MultiSteps(tx, every_k_schedule=accum) if accum > 1 else tx


def last_grad_norm(opt_state) -> jax.Array:
    """Global norm of the last applied gradient (accumulated, with grad_accum_steps > 1); NaN if
    the last update was skipped as non-finite."""
    norm = optax.tree_utils.tree_get(opt_state, "grad_norm")
    return jnp.where(last_update_finite(opt_state), norm, jnp.nan)


def last_update_finite(opt_state) -> jax.Array:
    """Whether the last update's gradient was finite (so it was applied)."""
    return optax.tree_utils.tree_get(opt_state, "last_finite")


def nonfinite_streak(opt_state) -> jax.Array:
    """Consecutive skipped (non-finite) updates so far; 0 after any finite update."""
    return optax.tree_utils.tree_get(opt_state, "notfinite_count")


def update_applied(opt_state) -> jax.Array:
    """Whether the update just computed moves the params: always without gradient accumulation;
    with it (optax.MultiSteps), only on the last micro-step of each accumulation window."""
    mini_step = optax.tree_utils.tree_get(opt_state, "mini_step")
    return jnp.asarray(True) if mini_step is None else mini_step == 0


def check_nonfinite_streak(opt_state, limit: int, step: Any = None, what: str = "optimizer") -> None:
    """Raise a readable error when `limit` (> 0) updates in a row were non-finite.

    Reads one scalar from the device; call it at the loop's logging cadence, not necessarily every
    step. `what` names the optimizer in the message (the stage-2 discriminator has its own).
    """
    streak = int(jax.device_get(nonfinite_streak(opt_state)))
    if limit > 0 and streak >= limit:
        raise FloatingPointError(
            f"{streak} {what} updates in a row had non-finite gradients (at step {step}); the run "
            "stops rather than train on garbage. Lower the learning rate, check the data for NaNs, or "
            "raise the limit (config.train.max_consecutive_skips) and resume from the last checkpoint.")


def update_ema(ema_params, params, decay: float):
    """ema <- decay * ema + (1 - decay) * params, in the EMA's dtype (float32 master copies)."""
    return jax.tree.map(lambda e, p: (decay * e + (1.0 - decay) * p.astype(e.dtype)).astype(e.dtype),
                        ema_params, params)


def global_norm(tree) -> jax.Array:
    """Global L2 norm of a gradient tree, in float32."""
    return optax.tree.norm(jax.tree.map(lambda g: g.astype(jnp.float32), tree))
