"""The real train steps keep the batch split over the mesh: no device ever holds image-sized
activations for the whole global batch.

Found at full size (SD 1.5 stage 1, batch 256 on v5e-256: 49.7 GiB of temporaries per chip): the VAE
encode of the HQ latents ran under `vmap` per image, and a vmapped sharding constraint leaves the
mapped axis unconstrained, so GSPMD replicated all 256 images' encoder activations on every chip.
The compiled per-device program of a small config shows the same thing in its shapes, so it is
checked here on 8 CPU devices: with a global batch of 72, every per-device array at an image or
latent resolution must have 9 images, never 72.
"""
import re

import jax
import pytest
from flax.core import meta

from diffrestorer_jax.models import diffrestorer as dr
from diffrestorer_jax.tools import aot
from mini_config import mini_tiny

BATCH = 72  # 9 per device; no channel count of the two configs is 72 (a weight-gradient
# layout [C, H, W, batch per device] would otherwise look like a whole batch)
IMAGE = 48  # VAE levels 48 and 24, latents 24, UNet 24 and 12: none equals the batch


def _config(stage):
    c = mini_tiny(stage)
    c.image_size = IMAGE
    c.mesh.data, c.mesh.fsdp = 2, -1
    c.train.batch_size = BATCH
    c.train.gan_start_step = 0
    return c


def _global_batch_image_arrays(hlo_text):
    """Array shapes whose leading dim is the global batch, followed (after any 1s) by a square
    image or latent resolution."""
    sizes = "|".join(str(s) for s in (IMAGE, IMAGE // 2, IMAGE // 4))
    pattern = re.compile(rf"\b(?:f32|bf16|f16)\[{BATCH},(?:1,)*({sizes}),\1[,\]]")
    return sorted({m.group(0) for m in pattern.finditer(hlo_text)})


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_train_step_never_holds_the_global_batch(stage):
    devices = jax.devices()
    assert len(devices) == 8
    lowered, run = aot.lower_train_step(_config(stage), devices, paired=True)
    assert dict(run.mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    text = lowered.compile().as_text()
    assert f"[{BATCH // 8},{IMAGE},{IMAGE}," in text  # the check below looks at the right shapes
    found = _global_batch_image_arrays(text)
    assert not found, f"per-device arrays with the whole global batch of {BATCH}: {found[:5]}"


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "batched"])
def test_restore_program_splits_rows_and_counts_global_flops(exact):
    """The AOT restore report compiles the restore CLI's own shard_map program: each chip holds the
    whole model and restores batch / chips images. Model FLOPs are global: batch x (once per image +
    steps x per step). XLA counts a loop body once, so with steps=1 its per-chip count is one image
    in exact mode (rows one at a time: the model count is batch x that, not chips x that) and the
    chip's 2 images batched (the model count is chips x that)."""
    c = _config("stage1")
    r = aot.compile_restore(c, jax.devices(), batch=16, steps=1, exact=exact)
    assert r["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}
    nets = dr.build_networks(c.model)
    shapes = meta.unbox(jax.eval_shape(lambda k: dr.init_params(nets, k, IMAGE), jax.random.PRNGKey(0)))
    unet_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(shapes["unet"]))
    # replicated: every chip holds the whole UNet (and the other networks restore uses)
    assert r["memory"]["argument"] > unet_bytes
    images_counted = 1 if exact else 16 // 8
    assert r["model_flops"] == pytest.approx(16 / images_counted * r["xla_flops_per_chip"], rel=0.08)
    with pytest.raises(ValueError, match="multiple of the 8 chips"):
        aot.compile_restore(c, jax.devices(), batch=12, steps=1)

