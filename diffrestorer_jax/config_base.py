"""Defaults shared by every config in `configs/`, and the model presets they pick from.

Configs are ml_collections ConfigDicts (big_vision style): `configs/<name>.py` defines
`get_config(arg)`, starting from `base_config()` here and changing what differs. Model sub-configs
use the field names of the reference implementations (diffusers config.json, transformers
CLIPVisionConfig), so a converted checkpoint's config can be dropped in as it is.
"""
import importlib.util
import os

import ml_collections


SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, attention_head_dim=8,
    cross_attention_dim=768, norm_num_groups=32, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0,
    use_linear_projection=False, upcast_attention=False)

SD21_BASE_UNET = dict(SD15_UNET, attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024,
                      use_linear_projection=True)

SD_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
    sample_size=512, scaling_factor=0.18215)

CLIP_VIT_L14 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                    num_attention_heads=16, image_size=224, patch_size=14, hidden_act="quick_gelu",
                    layer_norm_eps=1e-5, projection_dim=768)


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    # stage1: prompt processor + control module; stage2: degradation-aware decoder;
    # prior_vae / prior_unet / prior_clip: the from-scratch prior of the demo (no SD or CLIP weights
    # available offline; train/prior.py).
    c.stage = "stage1"
    c.image_size = 512  # training crop, pixels

    c.model = ml_collections.ConfigDict()
    c.model.dtype = "float32"  # compute dtype; "bfloat16" on accelerators
    c.model.attention_impl = "auto"
    c.model.remat_policy = "none"  # none | full | save_dots
    c.model.unet = dict(SD15_UNET)
    c.model.vae = dict(SD_VAE)
    c.model.clip = dict(CLIP_VIT_L14)
    c.model.prompt = dict(hidden_dim=1024, classifier_hidden_dim=512)
    c.model.control = dict(conditioning_channels=(16, 32, 96, 256), use_film=True,
                           context="degradation", control_scale=1.0)
    # image_fusion_width > 0 adds a fusion of the LQ image itself after the output conv (models/decoder.py;
    # not in the paper: for small VAEs that reconstruct far below a mildly degraded input);
    # image_fusion_base 'lq' makes that fusion correct the LQ image instead of the decoded one
    c.model.decoder = dict(rdb_growth=32, rdb_convs=5, fidelity_weight=1.0, image_fusion_width=0,
                           image_fusion_base="decoder")
    c.model.discriminator = dict(base_channels=64, n_layers=3)  # stage-2 PatchGAN (train/discriminator.py)

    # Pretrained weights users bring (diffusers folders, single-file SD, HF / OpenAI CLIP), or None
    # for a random init (tests, the from-scratch demo prior). init_trained: the networks the stage
    # trains start from init_from's export too (fine-tuning an export, e.g. at another image size)
    # instead of a fresh init (control from the UNet, decoder from the VAE); only for an export in
    # which they were trained (an export before stage 1 carries a random control module along).
    c.weights = ml_collections.ConfigDict(dict(unet="", vae="", clip="", init_from="", init_trained=False))

    c.diffusion = ml_collections.ConfigDict(dict(
        schedule="scaled_linear", num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
        prediction_type="epsilon", rescale_zero_terminal_snr=False, min_snr_gamma=0.0))
    # tile: the latent tile images larger than it are restored by (-1: the training size over the VAE
    # factor; 0: never tile); the restore commands' --tile overrides it.
    c.sampler = ml_collections.ConfigDict(dict(name="ddim", steps=50, eta=0.0, guidance_scale=1.0,
                                               strength=1.0, tile=-1))

    c.train = ml_collections.ConfigDict(dict(
        batch_size=16, num_steps=100_000, learning_rate=1e-5, warmup_steps=500, lr_schedule="constant",
        weight_decay=1e-2, b1=0.9, b2=0.999, clip_grad_norm=1.0, grad_accum_steps=1, ema_decay=0.9999,
        classifier_weight=0.1, max_consecutive_skips=20,
        # stage 1: probability of training an example with a zero semantic prompt (the null prompt
        # of classifier-free guidance, sampler.guidance_scale); 0 = the paper's training, no CFG
        null_prompt_prob=0.0,
        # stage 2 (decoder): L1 + LPIPS + PatchGAN hinge after gan_start_step
        lpips_weight=1.0, gan_weight=0.1, gan_start_step=10_000, lpips_vgg="", lpips_lin="",
        # the decoder's latents: 'hq' (VAE of HQ), 'predicted' (the stage-1 model's one-step z_0
        # estimate at t < decoder_max_timestep, 0 = any) or 'mixed' (predicted w.p. decoder_predicted_prob);
        # decoder_sample_steps N > 0: 'predicted' is an N-step DDIM sample from noise instead
        decoder_latents="mixed", decoder_predicted_prob=0.5, decoder_max_timestep=0, decoder_sample_steps=0,
        decoder_pixel_loss="l1",  # or 'psnr': mean log10 MSE per image (train/stage2.py)
        # stage 2: the decoder is shown its batch neighbour's degradation prompt with this probability
        decoder_prompt_shuffle_prob=0.0,
        # stages 1 and 2: random intensity levels of clean images before degrading them, with this
        # probability per image (0 = off; data/photometric.py)
        hq_levels_prob=0.0, hq_levels_min_contrast=0.3,
        # stages 1 and 2: degrade clean images of this side whole, prompts from the whole image, and
        # train on an image_size crop, as tiled inference of larger images (0 = off; data/context_crop.py)
        degrade_size=0,
        kl_weight=1e-6,  # prior_vae: KL weight of the from-scratch VAE (LDM KL-f8's)
        log_every=50, checkpoint_every=1000, keep_checkpoints=3, sample_every=5000))

    # Training data (data/sources.py `make_data`); crops are image_size, batches train.batch_size.
    #   kind 'skimage'    the bundled demo photos, in memory
    #        'hq_folder'  the images in hq_dir, in memory (small sets; LQ synthesised on device)
    #        'tfds'       datasets built by diffrestorer-build-dataset into tfds_dir, read by the grain
    #                     pipeline (data/pipeline.py): tfds_kinds 'hq_folder' (degraded on device),
    #                     'paired' (real LQ + type label) or 'hq_folder,paired' (a mixture sampled
    #                     by mix_weights, e.g. '1,1'; empty = equal), from split `split`.
    #   num_threads / prefetch: grain read threads and host prefetch buffer (elements) per host;
    #   device_prefetch: global batches put on the devices ahead of the step.
    c.data = ml_collections.ConfigDict(dict(
        kind="hq_folder", hq_dir="", flip=True,
        tfds_dir="", tfds_kinds="hq_folder", mix_weights="", split="train",
        num_threads=4, prefetch=8, device_prefetch=2))
    # preset "default" or "paper_protocol"; rng "rbg" (fast to compile on CPU) or "threefry" (drawn
    # per example and split over the devices with the batch: the pod configs; see
    # data.degradations.default_degradation_config)
    c.degradation = ml_collections.ConfigDict(dict(preset="default", rng="rbg"))

    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, dcn_data=1, dcn_fsdp=1))
    # (logical name, mesh axes) pairs overriding diffrestorer_jax.parallel.rules.DEFAULT_RULES by name.
    c.logical_axis_rules = ()
    return c


def scale_for_batch(c: ml_collections.ConfigDict, batch: int) -> ml_collections.ConfigDict:
    """The config's recipe (tuned at its own `train.batch_size`) moved to global batch `batch`, so a
    pod run trains as the paper's would, only on more images per step:

      learning_rate  x sqrt(batch / old batch): the square-root rule for Adam-type optimisers (an
                     update's noise scales with 1/sqrt(batch); Malladi et al. 2022, "On the SDEs
                     and scaling rules for adaptive gradient algorithms"). Linear scaling is for SGD.
      num_steps      the same number of training images: x old batch / batch;
      warmup_steps   the same number of images too, at least 50 steps;
      ema_decay      decay ** (batch / old batch): the EMA averages over the same number of images
                     (0.9999 per step at 16 is a 10,000-step horizon; at 1024 it would outlast the run).
    """
    old = int(c.train.batch_size)
    ratio = batch / old
    t = c.train
    t.batch_size = int(batch)
    t.learning_rate = float(t.learning_rate) * ratio ** 0.5
    t.num_steps = max(1, int(round(t.num_steps / ratio)))
    t.warmup_steps = max(50, int(round(t.warmup_steps / ratio)))
    t.ema_decay = float(t.ema_decay) ** ratio
    t.checkpoint_every = max(50, int(round(t.checkpoint_every / ratio)))
    t.log_every = max(1, int(round(t.log_every / ratio)))
    t.sample_every = max(50, int(round(t.sample_every / ratio)))
    return c


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """'configs/tiny.py:stage1' -> that file's get_config('stage1'), as `--config` reads it (for
    scripts that take a config without absl flags, e.g. the benchmarks)."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} does not exist")
    module_spec = importlib.util.spec_from_file_location(f"_config_{os.path.basename(path)[:-3]}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()
