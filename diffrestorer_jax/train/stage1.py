"""Stage 1: train the visual prompt processor and the control module (SD UNet, VAE, CLIP frozen).

One step, all on device:
  LQ     = degrade(HQ) with per-example keys from (seed, step, example id), or the batch's paired LQ
  z_0    = VAE(HQ) latents (posterior sample, frozen);  t ~ U[0, T);  z_t = add_noise(z_0, eps, t)
  P_S, P_D, logits = prompt_processor(CLIP(LQ))
  out    = UNet(z_t, t, P_S, + control(z_t, t, P_D, LQ) residuals)
  loss   = diffusion MSE (epsilon or v target, optional min-SNR weights)
           + classifier_weight * cross-entropy(logits, degradation target)
Metrics: loss terms, classifier accuracy, grad norm, lr, skipped (non-finite) updates.

The classifier's target [D] is the multi-hot set of types applied, normalised to sum 1: a single
type is its one-hot class, a mixed composition of k types puts 1/k on each member (softmax
cross-entropy against that distribution), so the predicted probabilities say which types are
present and in what share; accuracy counts the arg-max as right when it is one of the members.
A paired example's target is its stored type.

Classifier-free guidance [D]: inference's unconditional branch is a zero semantic prompt P_S (with
P_D and the LQ control kept; infer/pipeline.py). With `train.null_prompt_prob` p > 0 each example's
P_S is replaced by zeros with probability p (its own key), so the model learns that branch and a
guidance scale > 1 means something; p = 0 (the base default: the paper trains without it) leaves
the program exactly as without the option.
"""
from typing import Any, Dict

import jax
import jax.numpy as jnp
import optax

from diffrestorer_jax.data import context_crop, degradations, photometric
from diffrestorer_jax.diffusion import schedules
from diffrestorer_jax.diffusion.losses import diffusion_loss
from diffrestorer_jax.models import diffrestorer as dr
from diffrestorer_jax.train import optim
from diffrestorer_jax.train import state as st


def class_target(multi_hot) -> jax.Array:
    """Types applied [B, N] (bool or 0/1) -> the classifier's target distribution (see the module
    doc): uniform over the members."""
    hot = multi_hot.astype(jnp.float32)
    return hot / jnp.maximum(hot.sum(-1, keepdims=True), 1.0)


def class_accuracy(logits, targets) -> jax.Array:
    """Share of examples whose arg-max type is one of the types applied (target > 0)."""
    hit = jnp.take_along_axis(targets, jnp.argmax(logits, -1)[:, None], -1)[:, 0] > 0
    return jnp.mean(hit.astype(jnp.float32))


def make_degrade(config):
    """(keys [B], hq [B,H,W,3], type ids [B]) -> (lq, class targets [B, N]); one key per example."""
    deg_cfg = degradations.default_degradation_config(config.degradation.preset,
                                                      config.degradation.get("rng", "rbg"))

    def one(key, image, type_id):
        lq, labels = degradations.degrade(jax.random.wrap_key_data(key), image[None], type_id[None],
                                          deg_cfg)
        return lq[0], class_target(labels["multi_hot"][0])

    return jax.vmap(one)


def lq_and_labels(config, degrade_fn, batch, key):
    """The LQ batch and its class targets [B, N]: synthetic, paired, or a per-example mix (`has_lq`)."""
    hq = batch["hq"]
    type_ids = batch.get("type_id", jnp.full(hq.shape[:1], degradations.RANDOM, jnp.int32))
    stored = jax.nn.one_hot(type_ids, degradations.NUM_TYPES, dtype=jnp.float32)
    if "lq" in batch and "has_lq" not in batch:
        return batch["lq"], stored
    lq, labels = degrade_fn(key, hq, type_ids)
    if "lq" in batch:
        mask = batch["has_lq"].astype(bool)
        lq = jnp.where(mask[:, None, None, None], batch["lq"], lq)
        labels = jnp.where(mask[:, None], stored, labels)
    return lq, labels


def null_prompt_mask(keys, prob: float) -> jax.Array:
    """[B] True where an example's semantic prompt is dropped (classifier-free guidance training)."""
    return jax.vmap(lambda k: jax.random.bernoulli(k, prob))(keys)


def augment_hq(config, batch, keys):
    """The batch's HQ images with `train.hq_levels_prob` random intensity levels (data/photometric.py)
    on the examples that are degraded on device (a paired example's LQ is fixed, so its HQ is too)."""
    hq = batch["hq"].astype(jnp.float32)
    prob = float(config.train.get("hq_levels_prob", 0.0))
    if prob <= 0.0 or ("lq" in batch and "has_lq" not in batch):
        return hq
    out = photometric.random_levels(keys, hq, prob, float(config.train.get("hq_levels_min_contrast", 0.3)))
    if "has_lq" in batch:
        out = jnp.where(batch["has_lq"].astype(bool)[:, None, None, None], hq, out)
    return out


def uses_hq_levels(config) -> bool:
    return float(config.train.get("hq_levels_prob", 0.0)) > 0.0


def noisy_latents(nets, schedule, vae_params, hq, keys_lat, keys_t, keys_noise, max_t=None):
    """(z_0, noise, t, z_t) with per-example randomness; t uniform in [0, max_t or T)."""
    z0 = dr.encode_latents(nets, vae_params, hq, example_keys=keys_lat)
    z0 = jax.lax.stop_gradient(z0.astype(jnp.float32))
    t = jax.vmap(lambda k: jax.random.randint(k, (), 0, max_t or schedule.num_train_timesteps))(keys_t)
    noise = jax.vmap(lambda k: jax.random.normal(k, z0.shape[1:], jnp.float32))(keys_noise)
    return z0, noise, t, schedules.add_noise(schedule, z0, noise, t)


def make_step(nets: dr.Networks, config, tx, schedule):
    """`step(state, frozen, batch) -> (state, metrics)`; batch = {'hq', 'index'[, 'type_id', 'lq',
    'has_lq']}, images NHWC in [0, 1], index = global example ids (the per-example keys)."""
    tcfg, ctl = config.train, config.model.control
    degrade_fn = make_degrade(config)
    lr_fn = optim.make_schedule(st.optimizer_config(tcfg))
    accum = max(1, int(tcfg.grad_accum_steps))

    levels = uses_hq_levels(config)
    p_null = float(tcfg.get("null_prompt_prob", 0.0))
    if not 0.0 <= p_null <= 1.0:
        raise ValueError(f"train.null_prompt_prob={p_null}: a probability in [0, 1]")

    crop = context_crop.degrade_size(config) > 0  # degrade a larger image, train on a crop of it

    def step(state: st.TrainState, frozen: Dict[str, Any], batch):
        # keys beyond the 4th only with their option (levels, null prompts, crop, in that order), so
        # a run without an option draws what it did before the option existed
        keys = st.step_keys(state, batch["index"], 4 + int(levels) + int(p_null > 0) + int(crop))
        k_deg, k_lat, k_t, k_noise = keys[:4]
        if levels:
            batch = dict(batch, hq=augment_hq(config, batch, keys[4]))
        hq = batch["hq"].astype(jnp.float32)
        lq, labels = lq_and_labels(config, degrade_fn, batch, k_deg)
        tokens = jax.lax.stop_gradient(dr.clip_tokens(nets, frozen["clip"], lq))  # the whole image
        if crop:
            hq, lq = context_crop.crop_pair(keys[-1], hq, lq, int(config.image_size))
        z0, noise, t, z_t = noisy_latents(nets, schedule, frozen["vae"], hq, k_lat, k_t, k_noise)

        dropped = null_prompt_mask(keys[4 + int(levels)], p_null) if p_null > 0 else None

        def loss_fn(params):
            prompts = dr.visual_prompts(nets, params["prompt"], tokens)
            semantic = None
            if dropped is not None:
                semantic = jnp.where(dropped[:, None, None], jnp.zeros_like(prompts["semantic"]),
                                     prompts["semantic"])
            out = dr.denoise(nets, params["control"], frozen["unet"], z_t, t, prompts, lq,
                             control_scale=ctl.control_scale, context_mode=ctl.context,
                             semantic=semantic)
            gamma = config.diffusion.min_snr_gamma
            mse = jnp.mean(diffusion_loss(schedule, out, z0, noise, t, gamma if gamma > 0 else None))
            logits = prompts["logits"].astype(jnp.float32)
            ce = jnp.mean(optax.softmax_cross_entropy(logits, labels))
            acc = class_accuracy(logits, labels)
            return mse + tcfg.classifier_weight * ce, {"mse": mse, "ce": ce, "accuracy": acc}

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        new_state, upd = st.apply_gradients(state, grads, tx, tcfg.ema_decay, loss)
        metrics = {"loss": loss, **aux, **upd, "lr": lr_fn(state.step // accum)}
        if dropped is not None:
            metrics["null_prompts"] = jnp.mean(dropped.astype(jnp.float32))
        return new_state, metrics

    return step
