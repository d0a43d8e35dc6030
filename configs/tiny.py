"""A tiny Diff-Restorer for CPU: tests, the demo, and quick experiments (seconds per step).

64x64 images, a 3-level VAE (factor 4 -> 16x16 latents), a 2-level UNet, a 2-layer CLIP. The
control module's conditioning embedder has 2 stride-2 steps to match the VAE factor. The decoder
has the image-level LQ fusion (32 channels): this VAE reconstructs clean photos at only ~20 dB.
Args: "stage1" (default) | "stage2" | "prior_vae" | "prior_unet" | "prior_clip" (the demo's
from-scratch prior).
"""
from diffrestorer_jax.config_base import base_config


def get_config(arg: str = "stage1"):
    c = base_config()
    if arg not in ("stage1", "stage2", "prior_vae", "prior_unet", "prior_clip"):
        raise ValueError(f"config arg must be stage1, stage2, prior_vae, prior_unet or prior_clip, got {arg!r}")
    c.stage = arg
    c.image_size = 64
    c.model.unet = dict(
        sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=4,
        cross_attention_dim=32, norm_num_groups=8, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0,
        use_linear_projection=False, upcast_attention=False)
    c.model.vae = dict(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64), layers_per_block=1, norm_num_groups=8, sample_size=64,
        scaling_factor=0.5)
    c.model.clip = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, image_size=64, patch_size=8, hidden_act="quick_gelu",
                        layer_norm_eps=1e-5, projection_dim=32)
    c.model.prompt = dict(hidden_dim=64, classifier_hidden_dim=64)
    c.model.control = dict(conditioning_channels=(8, 16, 32), use_film=True, context="degradation",
                           control_scale=1.0)
    c.model.decoder = dict(rdb_growth=8, rdb_convs=3, fidelity_weight=1.0, image_fusion_width=32,
                           image_fusion_base="decoder")
    c.sampler.steps = 10
    c.train.batch_size = 8
    c.train.num_steps = 200
    c.train.learning_rate = 1e-3
    c.train.warmup_steps = 10
    c.train.ema_decay = 0.99
    c.train.log_every = 10
    c.train.checkpoint_every = 50
    c.train.gan_start_step = 100
    c.data.kind = "skimage"
    return c
