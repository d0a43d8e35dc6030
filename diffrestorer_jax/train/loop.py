"""The training loop shared by every stage: build, resume, run the compiled step, checkpoint, export.

    train(config, workdir) -> 'done' | 'preempted'

1. Mesh from `config.mesh`, logical rules from `config.logical_axis_rules`.
2. Networks from `config.model`; given weights (pretrained `config.weights.*`, or the frozen/prior
   networks of a previous run's export, `config.weights.init_from`); a `StatePlan` (abstract state +
   the one set of NamedShardings used by init, the step and restore).
3. Resume from `<workdir>/checkpoints` if it has a checkpoint (state + data position), else init.
   Frozen params are rebuilt (same weights, same seed), never checkpointed.
4. The stage's step compiled ahead of time once (explicit shardings, state donated).
5. Per step: batch -> step; metrics every `log_every` (TensorBoard + tqdm); non-finite streak check;
   checkpoint every `checkpoint_every`; sample restorations every `sample_every`; SIGTERM ->
   checkpoint at the current step and return 'preempted' (the CLI exits 0).
6. At the end: a final checkpoint and `<workdir>/export` (EMA of the trained networks + the frozen).

Data: `StepIndexedImages`, an in-memory source whose batch at step s is a pure function of
(seed, s): random crops/flips of a fixed image set, with global example ids. Its checkpointed state
is just the step, so a resumed run sees exactly the data an uninterrupted one would.
"""
import logging
import os
import time
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

from diffrestorer_jax.diffusion import schedules
from diffrestorer_jax.models import diffrestorer as dr
from diffrestorer_jax.parallel import mesh as mesh_lib
from diffrestorer_jax.parallel import rules as rules_lib
from diffrestorer_jax.parallel import sharding
from diffrestorer_jax.train import optim
from diffrestorer_jax.train import state as st
from diffrestorer_jax.train.checkpoint import Checkpointer
from diffrestorer_jax.train.metrics_writer import MetricsWriter
from diffrestorer_jax.train.preemption import PreemptionGuard

FAST_COMPILE = {"xla_backend_optimization_level": 0}


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------
class StepIndexedImages:
    """Batches of random crops (+ flips) of in-memory HQ images; batch(step) depends only on
    (seed, step). State = {'step': next step}. Example ids are global: step * batch + i."""

    def __init__(self, images: np.ndarray, batch_size: int, crop: int, seed: int, flip: bool = True,
                 step: int = 0):
        if images.shape[1] < crop or images.shape[2] < crop:
            raise ValueError(f"training images are {images.shape[1:3]}, smaller than the {crop}px crop")
        self.images, self.batch_size, self.crop = images.astype(np.float32), batch_size, crop
        self.seed, self.flip, self.step = seed, flip, step

    def batch(self, step: int) -> Dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, step])
        n, h, w, _ = self.images.shape
        idx = rng.integers(0, n, self.batch_size)
        top = rng.integers(0, h - self.crop + 1, self.batch_size)
        left = rng.integers(0, w - self.crop + 1, self.batch_size)
        flips = rng.random(self.batch_size) < 0.5 if self.flip else np.zeros(self.batch_size, bool)
        hq = np.stack([self.images[i, y:y + self.crop, x:x + self.crop] for i, y, x in zip(idx, top, left)])
        hq = np.where(flips[:, None, None, None], hq[:, :, ::-1], hq)
        ids = np.arange(self.batch_size, dtype=np.int32) + np.int32(step * self.batch_size % (2 ** 31 - 1))
        return {"hq": np.ascontiguousarray(hq, np.float32), "index": ids}

    def __next__(self):
        out = self.batch(self.step)
        self.step += 1
        return out

    def get_state(self) -> Dict[str, Any]:
        return {"step": int(self.step)}

    def set_state(self, state: Dict[str, Any]) -> None:
        self.step = int(state["step"])


def load_training_images(config) -> np.ndarray:
    """HQ images for the in-memory source: scikit-image's photos ('skimage') or a folder."""
    size = int(config.image_size)
    load = int(round(size * 1.5))
    kind = config.data.kind
    if kind == "skimage":
        from diffrestorer_jax.data import demo_photos  # never the held-out coffee / rocket
        return demo_photos.train_photos(load)
    if kind == "hq_folder":
        from diffrestorer_jax.data.gallery import square
        from diffrestorer_jax.data.image_io import read_image
        folder = config.data.hq_dir
        exts = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
        files = sorted(f for f in os.listdir(folder) if f.lower().endswith(exts)) if folder else []
        if not files:
            raise FileNotFoundError(f"config.data.hq_dir={folder!r} holds no images ({', '.join(exts)})")
        return np.stack([square(read_image(os.path.join(folder, f)), load) for f in files])
    raise NotImplementedError(f"config.data.kind={kind!r}: the training loop's built-in source reads "
                              "'skimage' or 'hq_folder'")


def global_batch(host_batch: Dict[str, np.ndarray], shardings) -> Dict[str, jax.Array]:
    """Every process holds the whole (small) global batch; each device takes its slice."""
    return {k: jax.make_array_from_callback(v.shape, shardings[k], lambda idx, v=v: v[idx])
            for k, v in host_batch.items()}


# ------------------------------------------------------------------------------------------------
# Building a run
# ------------------------------------------------------------------------------------------------
def make_schedule(config) -> schedules.Schedule:
    d = config.diffusion
    return schedules.make_schedule(d.schedule, d.num_train_timesteps, d.beta_start, d.beta_end,
                                   d.prediction_type, d.rescale_zero_terminal_snr)


def load_given(config, nets: dr.Networks) -> Dict[str, Any]:
    """Starting weights of networks this stage does not train (see state.py for the priorities)."""
    frozen = st.frozen_names(config.stage)
    given: Dict[str, Any] = {}
    w = config.weights
    if w.init_from:
        from diffrestorer_jax.train.export import load_export
        _, _, params = load_export(w.init_from)
        given.update({n: params[n] for n in frozen})
        logging.info("init_from %s: %s", w.init_from, sorted(given))
    if w.unet or w.vae or w.clip:
        from diffrestorer_jax import convert
        loaders = {"unet": convert.load_unet, "vae": convert.load_vae, "clip": convert.load_clip_vision}
        for name in ("unet", "vae", "clip"):
            path = w[name]
            if path and name in frozen:
                given[name] = loaders[name](path)[1]
            elif path:
                logging.warning("weights.%s ignored: stage %s trains the %s", name, config.stage, name)
    return given


def make_stage(config, nets):
    """(tx, step_fn, disc, disc_tx) for the config's stage."""
    tx = optim.make_optimizer(st.optimizer_config(config.train))
    schedule = make_schedule(config)
    disc = disc_tx = None
    stage = config.stage
    if stage == "stage1":
        from diffrestorer_jax.train import stage1
        step = stage1.make_step(nets, config, tx, schedule)
    elif stage == "stage2":
        from diffrestorer_jax.train import stage2
        disc, disc_tx = stage2.make_discriminator(config)
        step = stage2.make_step(nets, config, tx, schedule, disc, disc_tx)
    elif stage in ("prior_vae", "prior_unet"):
        from diffrestorer_jax.train import prior
        step = prior.make_step(nets, config, tx, schedule)
    else:
        st.trainable_names(stage)  # raises the readable error
    return tx, step, disc, disc_tx


class Run:
    """Everything a run holds; built by `build_run`, stepped by `train` (tests drive it directly)."""

    def __init__(self, config, workdir: str, devices=None, compiler_options=None):
        self.config, self.workdir = config, os.path.abspath(workdir)
        self.mesh = mesh_lib.make_mesh(config.mesh, devices)
        self.rules = rules_lib.get_rules(config)
        self.nets = dr.build_networks(config.model)
        self.tx, self.step_fn, disc, disc_tx = make_stage(config, self.nets)
        self.given = load_given(config, self.nets)
        given_abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), self.given)
        self.plan = st.StatePlan(self.nets, self.tx, config, self.mesh, self.rules, given_abstract,
                                 disc, disc_tx)
        self.compiler_options = compiler_options
        self.batch_shardings = None
        self.replicated = sharding.replicated(self.mesh)
        self.compiled = None

    def init(self):
        return self.plan.materialise(self.given, compiler_options=self.compiler_options)

    def frozen(self):
        return self.plan.materialise(self.given, frozen_only=True,
                                     compiler_options=self.compiler_options)[1]

    def example_batch(self) -> Dict[str, np.ndarray]:
        """The host batch layout of the built-in source: {'hq', 'index'} (paired runs add 'lq',
        'type_id'; pass such a batch to `compile`)."""
        b, s = int(self.config.train.batch_size), int(self.config.image_size)
        return {"hq": np.zeros((b, s, s, 3), np.float32), "index": np.zeros((b,), np.int32)}

    def compile(self, example_batch: Optional[Dict[str, np.ndarray]] = None):
        """AOT-compile the step once for the batch layout (shapes fixed by the config)."""
        if self.compiled is None:
            example = self.example_batch() if example_batch is None else example_batch
            self.batch_shardings = {k: sharding.batch_sharding(self.mesh, np.ndim(v), self.rules)
                                    for k, v in example.items()}
            abstract = {k: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype,
                                                sharding=self.batch_shardings[k])
                        for k, v in example.items()}
            self.compiled = sharding.compile_step(
                self.step_fn, (self.plan.state_shardings, self.plan.frozen_shardings, self.batch_shardings),
                (self.plan.state_shardings, self.replicated), (0,), self.plan.state_target,
                self.plan.frozen_target, abstract, mesh=self.mesh, rules=self.rules,
                compiler_options=self.compiler_options)
        return self.compiled

    def step(self, state, frozen, host_batch):
        compiled = self.compile(host_batch)
        return compiled(state, frozen, global_batch(host_batch, self.batch_shardings))

    def export_params(self, state, frozen) -> Dict[str, Any]:
        return {**frozen, **state.ema}


# ------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------
def _sample_images(run: Run, state, frozen, lq: np.ndarray, step: int) -> Dict[str, np.ndarray]:
    """Restorations of a fixed LQ batch with the current EMA params (stage 1/2 only)."""
    from diffrestorer_jax.infer.pipeline import RestoreSettings, restore
    params = run.export_params(state, frozen)
    settings = RestoreSettings(steps=int(run.config.sampler.steps))
    out = restore(run.nets, params, jnp.asarray(lq), jax.random.PRNGKey(step), make_schedule(run.config),
                  settings)
    return {"lq": lq, "restored": np.asarray(out["image"])}


def _sample_lq(run: Run, data: StepIndexedImages) -> np.ndarray:
    from diffrestorer_jax.data import degradations
    hq = data.batch(2 ** 31 - 1)["hq"][:4]  # a step no run reaches: fixed held-out crops
    fn = degradations.make_degrade_fn(degradations.default_degradation_config(run.config.degradation.preset))
    ids = np.arange(len(hq), dtype=np.int32) % degradations.NUM_TYPES
    return np.asarray(fn(jax.random.key(run.config.seed), jnp.asarray(hq), jnp.asarray(ids))[0])


def train(config, workdir: str, devices=None, compiler_options=None, max_steps: Optional[int] = None,
          guard: Optional[PreemptionGuard] = None) -> str:
    """Train until `config.train.num_steps` (or `max_steps` more steps); 'done' | 'preempted'."""
    run = Run(config, workdir, devices, compiler_options)
    tcfg = config.train
    ckpt = Checkpointer(os.path.join(run.workdir, "checkpoints"), tcfg.checkpoint_every,
                        tcfg.keep_checkpoints)
    data = StepIndexedImages(load_training_images(config), int(tcfg.batch_size), int(config.image_size),
                             int(config.seed), bool(config.data.flip))
    latest = ckpt.latest_step()
    if latest is not None:
        state, _, data_state = ckpt.restore(run.plan.state_target)
        data.set_state(data_state)
        frozen = run.frozen()
        logging.info("resumed from step %d of %s", latest, ckpt.directory)
        print(f"resumed at step {int(jax.device_get(state.step))}", flush=True)
    else:
        state, frozen = run.init()
    start = int(jax.device_get(state.step))
    end = int(tcfg.num_steps) if max_steps is None else min(int(tcfg.num_steps), start + max_steps)
    writer = MetricsWriter(os.path.join(run.workdir, "tb"), int(tcfg.num_steps), start)
    if config.stage == "stage2" and not (tcfg.lpips_vgg and tcfg.lpips_lin):
        logging.warning("LPIPS is off: config.train.lpips_vgg / lpips_lin are not set")
    compiled = run.compile()
    # Processes finish compiling at different times; meet before the first collective (see barrier).
    mesh_lib.barrier(f"train step compiled at {start}")
    sample_lq = None
    own_guard = guard is None
    guard = PreemptionGuard() if own_guard else guard
    status, history, t_last, n_last = "done", [], time.time(), 0
    try:
        step = start
        while step < end:
            state, metrics = run.step(state, frozen, next(data))
            step += 1
            history.append(metrics)
            writer.advance()
            if step % int(tcfg.log_every) == 0 or step == end:
                values = _mean_metrics(history)
                history = []
                dt = time.time() - t_last
                n = step - start - n_last
                values.update(step_time=dt / max(n, 1), images_per_s=n * int(tcfg.batch_size) / max(dt, 1e-9))
                t_last, n_last = time.time(), step - start
                writer.scalars(step, values)
                print(f"step {step} " + " ".join(f"{k}={v:.5g}" for k, v in values.items()), flush=True)
                optim.check_nonfinite_streak(state.opt_state, int(tcfg.max_consecutive_skips), step)
            ckpt.maybe_save(step, state, config, data.get_state())
            if (config.stage in ("stage1", "stage2") and int(tcfg.sample_every) > 0
                    and step % int(tcfg.sample_every) == 0):
                sample_lq = _sample_lq(run, data) if sample_lq is None else sample_lq
                writer.images(step, _sample_images(run, state, frozen, sample_lq, step))
            if guard.should_stop(step):
                ckpt.save(step, state, config, data.get_state())
                ckpt.wait()
                print(f"preempted: checkpoint saved at step {step}", flush=True)
                status = "preempted"
                break
        if status == "done":
            ckpt.save(step, state, config, data.get_state())
            ckpt.wait()
            if step >= int(tcfg.num_steps):
                from diffrestorer_jax.train.export import save_export
                save_export(os.path.join(run.workdir, "export"), run.export_params(state, frozen), config)
                print(f"exported to {os.path.join(run.workdir, 'export')}", flush=True)
    finally:
        ckpt.close()
        writer.close()
        if own_guard:
            guard.close()
    return status


def _mean_metrics(history):
    host = jax.device_get(history)
    keys = host[0].keys()
    out = {k: float(np.mean([h[k] for h in host])) for k in keys}
    if "nonfinite_streak" in keys:
        out["nonfinite_streak"] = float(host[-1]["nonfinite_streak"])
        out["skipped"] = float(np.sum([h["skipped"] for h in host]))
    return out
