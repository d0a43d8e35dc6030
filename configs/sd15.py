"""The paper's setting: SD 1.5 UNet + VAE, CLIP ViT-L/14 at 224 px, 512x512 crops.

Stage 1 (prompts + control): AdamW lr 1e-5, batch 16. Stage 2 (decoder): batch 4.
Usage: --config configs/sd15.py:stage2 for stage 2 (the arg picks the stage).
Point config.weights.{unet,vae,clip} at the converted or PyTorch weights you bring.

Pod runs: 'stage1_pod' / 'stage2_pod' (optionally ':<global batch>', e.g. 'stage1_pod:2048') are
the same recipe moved to a global batch that fills a slice by `config_base.scale_for_batch`:
learning rate x sqrt(batch / 16) (stage 2: / 4), the same number of training images (fewer
steps), warm-up and EMA horizon in images too. Default global batch: 1024 for stage 1 and 256 for
stage 2, i.e. 4 and 1 images per chip of a v5e-256; choose B = chips x the most images per chip
that `diffrestorer-aot --topology <slice> --batch B` reports as fitting (benchmarks/RESULTS.md).
Their mesh is fsdp 64 x data (the rest): 64 divides every SD 1.5 width (320 k), so no weight is
left whole on a chip (on fsdp 256, 1920->640 and 320-wide kernels are; benchmarks/state_bytes.py:
0.17 GiB of state + frozen weights per v5e-256 chip against 0.84), and the batch still spreads
over all chips (data x fsdp). It needs a multiple of 64 chips. The on-device degradations draw
their randomness with threefry (`degradation.rng`): with rbg every chip drew the whole global
batch's (15 GiB per v5e chip at 1536 images).
"""
from diffrestorer_jax.config_base import base_config, scale_for_batch

POD_BATCH = {"stage1": 1024, "stage2": 256}


def get_config(arg: str = "stage1"):
    stage, _, batch = arg.partition(":")
    pod = stage.endswith("_pod")
    stage = stage.removesuffix("_pod")
    if stage not in ("stage1", "stage2") or (batch and not pod) or (batch and not batch.isdigit()):
        raise ValueError(f"config arg must be stage1, stage2, stage1_pod[:<global batch>] or "
                         f"stage2_pod[:<global batch>], got {arg!r}")
    c = base_config()
    c.stage = stage
    c.model.dtype = "bfloat16"
    c.model.remat_policy = "save_dots"
    c.train.batch_size = 4 if c.stage == "stage2" else 16
    c.train.num_steps = 200_000
    c.mesh.data, c.mesh.fsdp = 1, -1  # FSDP over every device: the frozen UNet is sharded too
    if pod:
        scale_for_batch(c, int(batch) if batch else POD_BATCH[stage])
        c.mesh.data, c.mesh.fsdp = -1, 64
        c.degradation.rng = "threefry"  # each chip draws only its own images' randomness
    return c
