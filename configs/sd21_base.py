"""The SD 2.x-base variant: 1024-d context, linear projections, per-block head dims.

Same training recipe as configs/sd15.py; CLIP ViT-L/14 still reads the LQ image (the prompt processor
maps its tokens to the UNet's 1024-d context).
"""
from diffrestorer_jax.config_base import SD21_BASE_UNET, base_config


def get_config(arg: str = "stage1"):
    c = base_config()
    if arg not in ("stage1", "stage2"):
        raise ValueError(f"config arg must be stage1 or stage2, got {arg!r}")
    c.stage = arg
    c.model.unet = dict(SD21_BASE_UNET)
    c.model.dtype = "bfloat16"
    c.model.remat_policy = "save_dots"
    c.train.batch_size = 4 if c.stage == "stage2" else 16
    c.train.num_steps = 200_000
    c.mesh.data, c.mesh.fsdp = 1, -1
    return c
