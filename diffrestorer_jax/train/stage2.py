"""Stage 2: train the degradation-aware decoder (CLIP, prompts, control, UNet, VAE frozen).

One step:
  LQ       = degrade(HQ) (per-example keys) or the paired LQ, as in stage 1
  z_0      = the decoder's latent, by `train.decoder_latents`: 'hq' (VAE(HQ)), 'predicted' (the
             frozen stage-1 model's estimate from LQ: a one-step estimate at a random t by default,
             or, with `train.decoder_sample_steps` N > 0, an N-step DDIM sample from noise, exactly
             what inference hands the decoder) or 'mixed' (predicted with `decoder_predicted_prob`);
             the paper mixes VAE(HQ) latents with sampled ones
  image    = decoder(z_0, VAE-encoder features of LQ, mean(P_D))
  loss     = pixel loss + lpips_weight * LPIPS (when lpips_vgg/lpips_lin are configured)
             + gan_weight * hinge generator loss from a traced `step >= gan_start_step`
Pixel loss (`train.decoder_pixel_loss`): 'l1' ([D]) or 'psnr', mean over images of log10(MSE), so a
mildly degraded image weighs as much as a badly degraded one. The PatchGAN discriminator is updated
in the same compiled step (its own AdamW state), gated by the same traced condition, so switching
the GAN on never recompiles; a run whose GAN never starts (gan_start_step >= num_steps) leaves
the discriminator out of its program.
"""
import logging
from typing import Any, Dict

import jax
import jax.numpy as jnp
import optax

from diffrestorer_jax.data import context_crop
from diffrestorer_jax.diffusion import samplers, schedules
from diffrestorer_jax.models import diffrestorer as dr
from diffrestorer_jax.train import discriminator as disc_lib
from diffrestorer_jax.train import optim
from diffrestorer_jax.train import stage1
from diffrestorer_jax.train import state as st


def make_discriminator(config):
    """(PatchDiscriminator, its optimizer): same AdamW settings as the decoder."""
    d = config.model.get("discriminator", None) or {}
    net = disc_lib.PatchDiscriminator(base_channels=int(d.get("base_channels", 64)),
                                      n_layers=int(d.get("n_layers", 3)),
                                      dtype=dr.compute_dtype(config.model.dtype))
    return net, optim.make_optimizer(st.optimizer_config(config.train))


def load_lpips(config):
    """(module, params) when both LPIPS weight paths are configured, else None (logged once)."""
    t = config.train
    if not (t.lpips_vgg and t.lpips_lin):
        logging.warning("stage 2: LPIPS is off (set train.lpips_vgg and train.lpips_lin to the "
                        "torchvision VGG16 and LPIPS linear-layer weights to turn it on)")
        return None
    from diffrestorer_jax.convert.lpips import load_lpips as _load
    return _load(t.lpips_vgg, t.lpips_lin)


PIXEL_LOSSES = ("l1", "psnr")


def pixel_loss(image, hq, kind: str):
    """The decoder's reconstruction term for images [N, H, W, 3] in [0, 1] (see the module doc)."""
    if kind == "l1":
        return jnp.mean(jnp.abs(image - hq))
    if kind == "psnr":
        # 1e-10 floors the MSE at 100 dB: a perfect image must not send the loss to -inf
        mse = jnp.mean(jnp.square(image - hq), axis=tuple(range(1, image.ndim)))
        return jnp.mean(jnp.log10(mse + 1e-10))
    raise ValueError(f"train.decoder_pixel_loss={kind!r}: use one of {', '.join(PIXEL_LOSSES)}")


def sampled_latents(nets: dr.Networks, frozen, schedule, prompts, lq, noise, num_steps: int,
                    control_scale=1.0, context_mode: str = "degradation"):
    """The frozen stage-1 model's DDIM sample (eta 0, strength 1) from `noise`, for a whole batch:
    row i is what inference (infer/pipeline.py) gives image i from the same starting noise."""
    def model_fn(z, t):
        return dr.denoise(nets, frozen["control"], frozen["unet"], z, jnp.full((z.shape[0],), t), prompts,
                          lq, control_scale=control_scale, context_mode=context_mode)
    return samplers.sample(model_fn, noise, None, schedule, sampler="ddim", num_steps=num_steps)


def shuffled_prompts(p_d, keys, prob: float):
    """Each example's degradation prompt [B, ...] is, with probability `prob` (its key [B]), the next
    example's in the batch (rolled by one), so the decoder cannot tell a swapped one from the prompt
    alone."""
    swap = jax.vmap(lambda k: jax.random.bernoulli(k, prob))(keys)
    return jnp.where(swap.reshape((-1,) + (1,) * (p_d.ndim - 1)), jnp.roll(p_d, 1, axis=0), p_d)


def make_step(nets: dr.Networks, config, tx, schedule, disc, disc_tx, lpips=None):
    """`step(state, frozen, batch) -> (state, metrics)`, batch as in stage 1."""
    tcfg = config.train
    degrade_fn = stage1.make_degrade(config)
    lpips = load_lpips(config) if lpips is None else lpips
    lr_fn = optim.make_schedule(st.optimizer_config(tcfg))
    accum = max(1, int(tcfg.grad_accum_steps))
    fidelity = float(config.model.decoder.get("fidelity_weight", 1.0))
    latents = str(tcfg.get("decoder_latents", "hq"))
    if latents not in ("hq", "predicted", "mixed"):
        raise ValueError(f"train.decoder_latents={latents!r}: use 'hq', 'predicted' or 'mixed'")
    pixel = str(tcfg.get("decoder_pixel_loss", "l1"))
    if pixel not in PIXEL_LOSSES:
        raise ValueError(f"train.decoder_pixel_loss={pixel!r}: use one of {', '.join(PIXEL_LOSSES)}")
    p_predicted = {"hq": 0.0, "predicted": 1.0}.get(latents, float(tcfg.get("decoder_predicted_prob", 0.5)))
    ctl = config.model.control
    # Largest t for 'predicted' latents: near SNR 0 an epsilon model's one-step estimate divides by
    # sqrt(alpha_bar) ~ 0.07 and is mostly noise; a sampler never hands the decoder that.
    max_t = int(tcfg.get("decoder_max_timestep", 0)) or None
    sample_steps = int(tcfg.get("decoder_sample_steps", 0))
    if sample_steps < 0:
        raise ValueError(f"train.decoder_sample_steps={sample_steps}: use 0 (one-step estimates) or a "
                         "number of DDIM steps")

    levels = stage1.uses_hq_levels(config)
    crop = context_crop.degrade_size(config) > 0  # degrade a larger image, train on a crop of it
    # The decoder sees another example's degradation prompt with this probability (the sampler keeps
    # the right one), so it learns to check the prompt against the image instead of obeying it. The
    # other example is the next one in the step's batch, so this draw depends on the batch's order.
    shuffle = float(tcfg.get("decoder_prompt_shuffle_prob", 0.0))
    if not 0.0 <= shuffle <= 1.0:
        raise ValueError(f"train.decoder_prompt_shuffle_prob={shuffle}: a probability in [0, 1]")
    if shuffle > 0 and int(tcfg.batch_size) < 2:
        raise ValueError(f"train.decoder_prompt_shuffle_prob={shuffle} needs a batch of 2 or more "
                         f"(train.batch_size={int(tcfg.batch_size)}): prompts are swapped within the batch")
    # A run whose GAN never starts (gan_start_step >= num_steps) leaves the discriminator out of its
    # program: its passes, multiplied by zero, took ~10% of the demo recipe's stage-2 step.
    gan = int(tcfg.gan_start_step) < int(tcfg.num_steps)

    def step(state: st.TrainState, frozen: Dict[str, Any], batch):
        n_keys = 2 if p_predicted == 0.0 else 5
        keys = st.step_keys(state, batch["index"], n_keys + int(levels) + int(crop) + int(shuffle > 0))
        k_crop = keys[n_keys + int(levels)] if crop else None
        if levels:  # the option keys come last, so the other draws are those of a run without them
            batch = dict(batch, hq=stage1.augment_hq(config, batch, keys[n_keys]))
        hq = batch["hq"].astype(jnp.float32)
        if p_predicted == 0.0:
            k_deg, k_lat = keys[:2]
        else:
            k_deg, k_lat, k_t, k_noise, k_mix = keys[:5]
        lq, _ = stage1.lq_and_labels(config, degrade_fn, batch, k_deg)
        prompts = dr.visual_prompts(nets, frozen["prompt"], dr.clip_tokens(nets, frozen["clip"], lq))
        if crop:  # prompts from the whole image, everything else on the crop (as tiled inference)
            hq, lq = context_crop.crop_pair(k_crop, hq, lq, int(config.image_size))
        if p_predicted == 0.0:
            z0 = dr.encode_latents(nets, frozen["vae"], hq, example_keys=k_lat)
        else:
            z_hq, noise, t, z_t = stage1.noisy_latents(nets, schedule, frozen["vae"], hq, k_lat, k_t,
                                                       k_noise, max_t=max_t)
            if sample_steps:  # z_t's per-example noise doubles as the sampler's starting noise
                z_pred = sampled_latents(nets, frozen, schedule, prompts, lq, noise, sample_steps,
                                         ctl.control_scale, ctl.context)
            else:
                out = dr.denoise(nets, frozen["control"], frozen["unet"], z_t, t, prompts, lq,
                                 control_scale=ctl.control_scale, context_mode=ctl.context)
                z_pred, _ = schedules.predict_x0_and_eps(schedule, out.astype(jnp.float32), z_t, t)
            use = jax.vmap(lambda k: jax.random.bernoulli(k, p_predicted))(k_mix)
            z0 = jnp.where(use[:, None, None, None], z_pred, z_hq)
        feats = dr.lq_features(nets, frozen["vae"], lq)
        if shuffle > 0:
            prompts = dict(prompts, degradation=shuffled_prompts(prompts["degradation"], keys[-1], shuffle))
        z0, feats, prompts = jax.lax.stop_gradient((z0, feats, prompts))
        gan_on = state.step >= int(tcfg.gan_start_step)

        def loss_fn(params):
            image = dr.decode(nets, params["decoder"], z0, feats, prompts, lq, fidelity)
            l1 = jnp.mean(jnp.abs(image - hq))
            terms = {"l1": l1}  # logged whatever the pixel loss, so runs compare
            loss = l1
            if pixel != "l1":
                loss = terms[pixel] = pixel_loss(image, hq, pixel)
            if lpips is not None:
                from diffrestorer_jax.metrics.lpips import lpips_unit_range
                lp = jnp.mean(lpips_unit_range(lpips[0], lpips[1], image, hq))
                terms["lpips"] = lp
                loss = loss + tcfg.lpips_weight * lp
            if gan:
                g = disc_lib.hinge_g_loss(disc.apply({"params": state.disc_params}, image))
                terms["gan_g"] = g
                loss = loss + jnp.where(gan_on, tcfg.gan_weight, 0.0) * g
            return loss, (terms, image)

        (loss, (terms, image)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        new_state, upd = st.apply_gradients(state, grads, tx, tcfg.ema_decay, loss)
        metrics = {"loss": loss, **terms, **upd, "lr": lr_fn(state.step // accum)}
        if not gan:
            return new_state, metrics

        def d_loss_fn(dp):
            real = disc.apply({"params": dp}, hq)
            fake = disc.apply({"params": dp}, jax.lax.stop_gradient(image))
            return disc_lib.hinge_d_loss(real, fake)

        d_loss, d_grads = jax.value_and_grad(d_loss_fn)(state.disc_params)
        d_updates, d_opt = disc_tx.update(d_grads, state.disc_opt_state, state.disc_params)
        d_params = optax.apply_updates(state.disc_params, d_updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(gan_on, a, b), new, old)  # noqa: E731
        new_state = new_state.replace(disc_params=keep(d_params, state.disc_params),
                                      disc_opt_state=keep(d_opt, state.disc_opt_state))
        return new_state, {**metrics, "gan_d": d_loss, "gan_on": gan_on.astype(jnp.float32)}

    return step
