"""The paper's setting: SD 1.5 UNet + VAE, CLIP ViT-L/14 at 224 px, 512x512 crops.

Stage 1 (prompts + control): AdamW lr 1e-5, batch 16. Stage 2 (decoder): batch 4.
Usage: --config configs/sd15.py:stage2 for stage 2 (the arg picks the stage).
Point config.weights.{unet,vae,clip} at the converted or PyTorch weights you bring.
"""
from diffrestorer_jax.config_base import base_config


def get_config(arg: str = "stage1"):
    c = base_config()
    if arg not in ("stage1", "stage2"):
        raise ValueError(f"config arg must be stage1 or stage2, got {arg!r}")
    c.stage = arg
    c.model.dtype = "bfloat16"
    c.model.remat_policy = "save_dots"
    c.train.batch_size = 4 if c.stage == "stage2" else 16
    c.train.num_steps = 200_000
    c.mesh.data, c.mesh.fsdp = 1, -1  # FSDP over every device: the frozen UNet is sharded too
    return c
