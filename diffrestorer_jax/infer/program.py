"""The restore program: `pipeline.restore` + colour fix as one SPMD program over a mesh.

Every device of the mesh's 'data' axis runs the single-device program on its own rows of the batch
(`shard_map`), so a row's result cannot depend on the device count and no step communicates. The
restore CLI (`infer.restorer`) runs it; the AOT tools compile it for topologies we do not have.
"""
import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from diffrestorer_jax.infer.colorfix import color_fix, should_color_fix
from diffrestorer_jax.infer.pipeline import RestoreSettings, restore

COLOR_FIX_METHODS = ("none", "wavelet", "adain", "auto")


@functools.lru_cache(maxsize=64)
def restore_program(nets, settings: RestoreSettings, color_method: str, mesh):
    """jit(params, lq [B, H, W, 3], key, schedule, knobs, image_ids [B]) -> (images, type
    probabilities [B, 8], colour fixed? [B]), B a multiple of the mesh's 'data' size.

    `color_method`: 'none', 'wavelet', 'adain', or 'auto' (wavelet, except for images predicted
    hazy or dark). Remembered per process, so later callers with the same networks, settings and
    mesh reuse the compiled programs.
    """
    if color_method not in COLOR_FIX_METHODS:
        raise ValueError(f"colour fix must be one of {', '.join(COLOR_FIX_METHODS)}, got {color_method!r}")

    def body(params, lq, key, schedule, knobs, ids):
        out = restore(nets, params, lq, key, schedule, settings, knobs, image_ids=ids)
        images, probs = out["image"], out["type_probs"]
        if color_method == "none":
            fixed = jnp.zeros(lq.shape[0], bool)
        elif color_method == "auto":
            images = color_fix(images, lq, "wavelet", probs)
            fixed = should_color_fix(probs)
        else:
            images = color_fix(images, lq, color_method)
            fixed = jnp.ones(lq.shape[0], bool)
        return images, probs, fixed

    body.__name__ = "restore_bucket"  # what CompileCounter("restore_bucket") counts
    rows, rep = PartitionSpec("data"), PartitionSpec()
    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(rep, rows, rep, rep, rep, rows),
                                 out_specs=(rows, rows, rows), check_vma=False))
