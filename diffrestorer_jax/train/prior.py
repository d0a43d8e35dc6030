"""The demo's from-scratch prior (SD and CLIP weights cannot be downloaded offline), trained before
stage 1/2 with `config.stage = 'prior_vae'`, `'prior_unet'`, then optionally `'prior_clip'` (chained
by `weights.init_from`):

  prior_vae    the VAE (AutoencoderKL) as an autoencoder of HQ crops:
               L1(decode(sample of q(z|x)), x) + kl_weight * KL(q(z|x) || N(0, I)), kl_weight 1e-6
               as in LDM's KL-f8 (config.train.kl_weight overrides).
  prior_unet   the UNet as an unconditional latent denoiser: epsilon (or v) MSE on the frozen VAE's
               latents of HQ crops. Its context is all zeros (no text encoder here); stage 1 then
               learns what P_S should feed the cross-attention (whose key/value weights stay at
               their random init during the prior, since a zero context gives them no gradient).
  prior_clip   the CLIP vision tower with the prompt processor's classifier, on cross-entropy alone:
               the LQ image (degraded in the step as in stage 1) -> its degradation type. It stands
               in for CLIP's pretraining, which a random tower lacks: stage 1 then trains its prompt
               processor afresh on the trained tower. Not in the demo recipe yet: reading 64 px
               or 128 px in 16-px patches it named 41-42% of the validation photos' degradations
               right (39% without it); reading 128 px in 8-px patches, 72%, and the decoder
               restored the held-out photos better with its prompts (demo/README.md, 2026-12-07).
"""
from typing import Any, Dict

import jax
import jax.numpy as jnp
import optax

from diffrestorer_jax.diffusion.losses import diffusion_loss
from diffrestorer_jax.models import diffrestorer as dr
from diffrestorer_jax.train import optim
from diffrestorer_jax.train import stage1
from diffrestorer_jax.train import state as st


def _vae_loss(nets, config, params, hq, keys):
    mean, logvar = nets.vae.apply({"params": params}, hq * 2.0 - 1.0, method="encode")
    mean, logvar = mean.astype(jnp.float32), jnp.clip(logvar.astype(jnp.float32), -30.0, 20.0)
    eps = jax.vmap(lambda k: jax.random.normal(k, mean.shape[1:], jnp.float32))(keys)
    z = mean + jnp.exp(0.5 * logvar) * eps
    recon = nets.vae.apply({"params": params}, z, method="decode").astype(jnp.float32)
    l1 = jnp.mean(jnp.abs((recon + 1.0) / 2.0 - hq))
    kl = 0.5 * jnp.mean(jnp.sum(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3)))
    kl_weight = float(config.train.get("kl_weight", 1e-6))
    return l1 + kl_weight * kl, {"l1": l1, "kl": kl}


def _clip_loss(nets, params, lq, labels):
    """Cross-entropy of the classifier's logits on CLIP(LQ) against the stage-1 targets, + accuracy."""
    tokens = dr.clip_tokens(nets, params["clip"], lq)
    logits = dr.visual_prompts(nets, params["prompt"], tokens)["logits"].astype(jnp.float32)
    ce = jnp.mean(optax.softmax_cross_entropy(logits, labels))
    return ce, {"ce": ce, "accuracy": stage1.class_accuracy(logits, labels)}


def make_step(nets: dr.Networks, config, tx, schedule):
    """`step(state, frozen, batch) -> (state, metrics)` for prior_vae, prior_unet or prior_clip."""
    tcfg, stage = config.train, config.stage
    degrade_fn = stage1.make_degrade(config) if stage == "prior_clip" else None
    lr_fn = optim.make_schedule(st.optimizer_config(tcfg))
    accum = max(1, int(tcfg.grad_accum_steps))
    gamma = float(config.diffusion.min_snr_gamma)

    def step(state: st.TrainState, frozen: Dict[str, Any], batch):
        hq = batch["hq"].astype(jnp.float32)
        if stage == "prior_vae":
            (k_z,) = st.step_keys(state, batch["index"], 1)
            loss_fn = lambda p: _vae_loss(nets, config, p["vae"], hq, k_z)  # noqa: E731
        elif stage == "prior_clip":
            (k_deg,) = st.step_keys(state, batch["index"], 1)
            lq, labels = stage1.lq_and_labels(config, degrade_fn, batch, k_deg)
            loss_fn = lambda p: _clip_loss(nets, p, lq, labels)  # noqa: E731
        else:
            k_lat, k_t, k_noise = st.step_keys(state, batch["index"], 3)
            z0, noise, t, z_t = stage1.noisy_latents(nets, schedule, frozen["vae"], hq, k_lat, k_t, k_noise)
            ctx_len = (nets.clip.image_size // nets.clip.patch_size) ** 2
            context = jnp.zeros((hq.shape[0], ctx_len, nets.unet.cross_attention_dim), jnp.float32)

            def loss_fn(p):
                out = nets.unet.apply({"params": p["unet"]}, z_t, t, context)
                mse = jnp.mean(diffusion_loss(schedule, out, z0, noise, t, gamma if gamma > 0 else None))
                return mse, {"mse": mse}

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        new_state, upd = st.apply_gradients(state, grads, tx, tcfg.ema_decay, loss)
        return new_state, {"loss": loss, **aux, **upd, "lr": lr_fn(state.step // accum)}

    return step
