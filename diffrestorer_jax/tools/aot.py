"""Ahead-of-time compilation for accelerator slices we do not have (maxtext `train_compile.py` style).

With `libtpu` installed, this CPU host can build abstract TPU devices for a named slice
(`jax.experimental.topologies`), put the config's mesh over them, and lower + compile a step for
ShapeDtypeStructs that carry shardings. Nothing runs; XLA's TPU compiler reports per-chip memory
(`memory_analysis`) and FLOPs (`cost_analysis`), which is what decides whether a config fits a slice.

    devices = topology.topology_devices("v5e-256")  # parallel/topology.py: the chip table
    report = compile_train_step(config, devices)   # or compile_restore(config, devices, batch, steps)
    print(format_report(report, topology.tpu_spec("v5e-256").generation))

FLOP counts. `xla_flops_per_chip` is XLA's count for the partitioned (per-chip) program after
optimisation, remat recompute included. XLA's cost model counts a loop body once (it does not know
trip counts), so for restore, whose images (`lax.map`) and denoising steps (`lax.scan`) are loops,
it is one image and one step. `model_flops` is our count of the *global* work: the step lowered for
one CPU device with remat off and every attention as XLA's plain dots (`target_backend("flops")`),
counted by XLA's HLO cost model on the un-optimised module (every dot and convolution from its
shapes: 2 x M x N x K, 2 x out elements x kernel volume x C_in), so it is the textbook "useful work"
number MFU is defined against; restore is counted part by part (CLIP + prompts + decoder once per
image, control + UNet once per denoising step) with no loop in between. Implied step time at a given
MFU is model_flops / (chips x peak x MFU).
"""
import logging
import math
import time
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta

from diffrestorer_jax.data import sources
from diffrestorer_jax.diffusion import schedules
from diffrestorer_jax.export import abstract_params
from diffrestorer_jax.infer import pipeline
from diffrestorer_jax.infer.program import abstract_weights, cast_weights, restore_program
from diffrestorer_jax.models import attention
from diffrestorer_jax.models import diffrestorer as dr
from diffrestorer_jax.parallel import mesh as mesh_lib
from diffrestorer_jax.parallel import sharding
from diffrestorer_jax.parallel.topology import GiB
from diffrestorer_jax.train.run import Run

# ------------------------------------------------------------------------------------------------
# Compiling
# ------------------------------------------------------------------------------------------------
def _cost(obj) -> Dict[str, float]:
    c = obj.cost_analysis()
    if isinstance(c, (list, tuple)):
        c = c[0] if c else {}
    return dict(c or {})


def _memory(compiled) -> Dict[str, int]:
    m = compiled.memory_analysis()
    out = {k: int(getattr(m, f"{k}_size_in_bytes", 0)) for k in
           ("argument", "output", "temp", "alias", "generated_code")}
    out["total"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
    return out


def lower_train_step(config, devices, paired: bool = False, backend: str = "tpu"):
    """(lowered step, Run) for the config's stage, its mesh over `devices`, its batch; attention
    implementations chosen for `backend` (see `attention.target_backend`)."""
    run = Run(config, devices=devices)
    # paired: the batch brings its LQ (no degradation in the step); else clean images degraded on device
    example = run.example_batch(sources.PAIRED_KEYS if paired else sources.HQ_ONLY_KEYS)
    batch_sh = {k: sharding.batch_sharding(run.mesh, np.ndim(v), run.rules) for k, v in example.items()}
    abstract = {k: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype, sharding=batch_sh[k])
                for k, v in example.items()}
    jitted = jax.jit(run.step_fn, in_shardings=(run.plan.state_shardings, run.plan.frozen_shardings,
                                                 batch_sh),
                     out_shardings=(run.plan.state_shardings, run.replicated), donate_argnums=(0,))
    with sharding.mesh_context(run.mesh, run.rules), attention.target_backend(backend):
        lowered = jitted.lower(run.plan.state_target, run.plan.frozen_target, abstract)
    return lowered, run


def restore_config(config, dtype: str):
    """The config as the restore CLI runs it on an accelerator: compute in `dtype`."""
    c = config.copy_and_resolve_references()
    c.model.dtype = dtype
    return c


def lower_restore(config, devices, batch: int, steps: int, dtype: str = "bfloat16",
                  weights: str = "replicated", exact: bool = False, backend: str = "tpu"):
    """(lowered, mesh) of the restore CLI's own program (`infer.program.restore_program`): a
    shard_map over a data-only mesh, every chip restoring its own rows (as one batch, or one at a
    time with `exact`), the weights cast to `dtype` and replicated or sharded as the CLI places them
    (`infer.program.place_weights`); attention as it is chosen for `backend`."""
    if batch % len(devices):
        raise ValueError(f"restore batch {batch} must be a multiple of the {len(devices)} chips")
    mesh = mesh_lib.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, devices)
    nets = dr.build_networks(restore_config(config, dtype).model)
    size = int(config.image_size)
    rep, rows = sharding.replicated(mesh), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    abstract = lambda tree, sh: jax.tree.map(  # noqa: E731
        lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype, sharding=sh), tree)
    params = abstract_weights(cast_weights(_abstract_params(nets, size), dtype), mesh, weights)
    lq = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32, sharding=rows)
    ids = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=rows)
    key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=rep)
    sched = abstract(schedules.from_config(config.diffusion), rep)
    knobs = abstract(pipeline.Knobs(*np.float32([1.0, 1.0, 1.0, 0.0])), rep)
    settings = pipeline.RestoreSettings(sampler=config.sampler.name, steps=int(steps),
                                        batch_mode="exact" if exact else "batched")
    program = restore_program(nets, settings, "none", mesh, weights)
    with attention.target_backend(backend):
        lowered = program.lower(params, lq, key, sched, knobs, ids)
    return lowered, mesh


def _abstract_params(nets, size: int):
    return meta.unbox(abstract_params(nets, size))


def _for_counting(config):
    """Remat off (its recompute is not model work) and attention 'auto', which `target_backend("flops")`
    turns into XLA dots the cost model can count (an explicit 'cudnn' or 'pallas_tpu' would not lower
    for the CPU, and a kernel call hides its FLOPs)."""
    c = config.copy_and_resolve_references()
    c.model.remat_policy = "none"
    c.model.attention_impl = "auto"
    # One CPU device: a pod config's mesh (e.g. fsdp 64) would not fit it.
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor, c.mesh.dcn_data, c.mesh.dcn_fsdp = 1, 1, 1, 1, 1
    return c


def compile_train_step(config, devices, count_model_flops: bool = True, paired: bool = False,
                       compiler_options: Optional[dict] = None, backend: str = "tpu") -> Dict[str, Any]:
    """Compile the config's stage step for `devices`; memory, FLOPs, compile time (a dict).

    `paired`: the batch brings its LQ images, so the step has no on-device degradation (the
    degradation pipeline is most of the HLO and of the compile time, little of the memory/FLOPs).
    """
    t0 = time.time()
    lowered, run = lower_train_step(config, devices, paired, backend=backend)
    t1 = time.time()
    compiled = lowered.compile(compiler_options)
    t2 = time.time()
    report = {"what": config.stage + (" (paired LQ)" if paired else ""), "mesh": dict(run.mesh.shape), "batch": int(config.train.batch_size),
              "remat": config.model.remat_policy, "attention": config.model.attention_impl,
              "lower_s": t1 - t0, "compile_s": t2 - t1,
              "memory": _memory(compiled), "xla_flops_per_chip": _cost(compiled).get("flops", float("nan")),
              "chips": len(devices), "images_per_step": int(config.train.batch_size)}
    if count_model_flops:
        try:
            report["model_flops"] = model_flops_train(config, paired)
        except Exception as e:  # the count is a side number: never lose a compile of many minutes to it
            logging.exception("counting the model FLOPs failed")
            report["model_flops_error"] = f"{type(e).__name__}: {e}"
    return report


def _hlo_flops(lowered) -> float:
    flops = _cost(lowered).get("flops")
    if not flops or not math.isfinite(flops):
        raise RuntimeError("XLA's cost model gave no FLOP count for this module")
    return float(flops)


def model_flops_train(config, paired: bool = False) -> float:
    """Global FLOPs of one train step without remat recompute: the step for the global batch lowered
    for one CPU device (XLA's cost model answers only for a backend it has a client for, and one
    device means no partitioning), every attention as plain dots."""
    lowered, _ = lower_train_step(_for_counting(config), jax.devices("cpu")[:1], paired, backend="flops")
    return _hlo_flops(lowered)


def model_flops_restore(config, batch: int, steps: int) -> Dict[str, float]:
    """Global FLOPs of restoring `batch` images with `steps` denoising steps, as the restore CLI
    runs it (`RestoreSettings` from the config's sampler): {'per_image_once': CLIP + prompt heads +
    LQ encoder features + degradation-aware decoder, 'per_step': control module + UNet for one image
    (two rows with CFG), 'total': batch x (per_image_once + steps x per_step)}."""
    nets = dr.build_networks(_for_counting(config).model)
    size, f = int(config.image_size), nets.vae_factor
    settings = pipeline.RestoreSettings(sampler=config.sampler.name, steps=int(steps))
    knobs = pipeline.Knobs(*np.float32([1.0, 1.0, 1.0, 0.0]))
    params = _abstract_params(nets, size)
    lq = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    latent = jax.ShapeDtypeStruct((1, size // f, size // f, nets.latent_channels), jnp.float32)

    def once(params, lq, z0):
        prompts = dr.visual_prompts(nets, params["prompt"], dr.clip_tokens(nets, params["clip"], lq))
        image = pipeline.decode_latents(nets, params, z0, lq, prompts, knobs, settings)
        return image, prompts

    cpu = jax.devices("cpu")[0]
    with attention.target_backend("flops"), jax.default_device(cpu):
        fixed = _hlo_flops(jax.jit(once).lower(params, lq, latent))
        prompts = jax.eval_shape(once, params, lq, latent)[1]
        rows = 2 if settings.use_cfg else 1
        z = jax.ShapeDtypeStruct((rows,) + latent.shape[1:], jnp.float32)
        t = jax.ShapeDtypeStruct((rows,), jnp.int32)
        step = _hlo_flops(jax.jit(lambda p, pr, lq, z, t: pipeline.denoiser(
            nets, p, pr, lq, knobs, settings)(z, t)).lower(params, prompts, lq, z, t))
    return {"per_image_once": fixed, "per_step": step, "total": batch * (fixed + steps * step)}


def compile_restore(config, devices, batch: int, steps: int, count_model_flops: bool = True,
                    dtype: str = "bfloat16", weights: str = "replicated", exact: bool = False,
                    compiler_options: Optional[dict] = None, backend: str = "tpu") -> Dict[str, Any]:
    """Compile the restore program (the whole sampler loop, `steps` denoising steps) for `batch`
    images, weights and compute in `dtype`, weights `replicated` or `sharded`, rows batched (or one
    at a time with `exact`).

    The sampler is a `lax.scan`, so per-step memory does not grow with `steps`: a short `steps`
    gives the same per-chip memory. The model FLOPs (`model_flops_restore`) are for `steps`, and the
    report also gives them at 50 steps.
    """
    t0 = time.time()
    lowered, mesh = lower_restore(config, devices, batch, steps, dtype, weights, exact, backend)
    t1 = time.time()
    compiled = lowered.compile(compiler_options)
    t2 = time.time()
    mode = "exact" if exact else "batched"
    report = {"what": f"restore ({steps} steps, {dtype}, {weights} weights, {mode})",
              "mesh": dict(mesh.shape), "batch": batch,
              "remat": config.model.remat_policy, "lower_s": t1 - t0, "compile_s": t2 - t1,
              "memory": _memory(compiled), "xla_flops_per_chip": _cost(compiled).get("flops", float("nan")),
              # XLA counts a loop body once: the sampler's scan is one denoising step, and in exact
              # mode the per-row map is one image; batched, the chip's rows are one batch.
              "xla_flops_note": ("loop bodies counted once: one image, one denoising step" if exact else
                                 "loop bodies counted once: the chip's images, one denoising step"),
              "chips": len(devices), "images_per_step": batch, "steps": steps}
    if count_model_flops:
        parts = model_flops_restore(config, batch, steps)
        report["model_flops"] = parts["total"]
        report["model_flops_parts"] = parts
    return report


# ------------------------------------------------------------------------------------------------
# Reporting
# ------------------------------------------------------------------------------------------------
def _gib(n) -> str:
    return f"{n / GiB:7.2f} GiB"


def format_report(report: Dict[str, Any], gen, mfus=(0.3, 0.4, 0.5)) -> str:
    """`gen`: the device's facts (a topology.TpuGeneration or topology.GpuCard)."""
    m = report["memory"]
    hbm = gen.hbm_bytes
    device = getattr(gen, "label", f"TPU {gen.name}")
    attention = f", attention {report['attention']}" if "attention" in report else ""
    lines = [
        f"{report['what']}: batch {report['batch']} on {report['chips']} x {device}, "
        f"mesh {report['mesh']}, remat {report['remat']}{attention}",
        f"  lower {report['lower_s']:.1f} s, compile {report['compile_s']:.1f} s",
        "  per chip: argument " + _gib(m["argument"]) + ", output " + _gib(m["output"])
        + ", temp " + _gib(m["temp"]) + ", alias " + _gib(m["alias"]),
        f"  per chip: total {_gib(m['total'])} of {_gib(hbm)} HBM ({100 * m['total'] / hbm:.0f}%)"
        f" -> {'FITS' if m['total'] <= hbm else 'DOES NOT FIT'}",
    ]
    xla = report["xla_flops_per_chip"]
    note = report.get("xla_flops_note")
    lines.append(f"  FLOPs: XLA per chip {xla:.4g} (x{report['chips']} chips = {xla * report['chips']:.4g},"
                 f" remat recompute included{'; ' + note if note else ''})")
    mf = report.get("model_flops")
    if mf is not None and math.isfinite(mf):
        ratio = "" if note else f"; XLA/model = {xla * report['chips'] / mf:.2f}"
        lines.append(f"  FLOPs: model (global, HLO count without remat) {mf:.4g} = "
                     f"{mf / report['images_per_step']:.4g} per image{ratio}")
        parts = report.get("model_flops_parts")
        if parts:
            lines.append(f"  FLOPs: per image {parts['per_image_once']:.4g} once (CLIP, prompts, LQ "
                         f"features, decoder) + {parts['per_step']:.4g} per denoising step "
                         f"(control + UNet); {report['steps']} steps here, at 50 steps "
                         f"{parts['per_image_once'] + 50 * parts['per_step']:.4g} per image")
        for u in mfus:
            t = mf / (report["chips"] * gen.peak_bf16_flops * u)
            lines.append(f"  at MFU {u:.0%}: {t * 1e3:.1f} ms per step, "
                         f"{report['images_per_step'] / t:.0f} images/s "
                         f"(peak {gen.peak_bf16_flops / 1e12:.0f} TFLOP/s bf16 per chip)")
    if report.get("model_flops_error"):
        lines.append(f"  FLOPs: model count failed ({report['model_flops_error']})")
    return "\n".join(lines)


def fits(report: Dict[str, Any], gen) -> bool:
    return report["memory"]["total"] <= gen.hbm_bytes
