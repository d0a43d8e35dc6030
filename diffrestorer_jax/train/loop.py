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

Data (`make_data`): for config.data.kind 'skimage' / 'hq_folder', `StepIndexedImages`, an
in-memory source whose batch at step s is a pure function of (seed, s): random crops/flips of a
fixed image set; its checkpointed state is just the step. For 'tfds', `PipelineBatches`: the grain
pipeline (data/pipeline.py) over datasets built by launch/build_dataset.py, one kind or a weighted
mixture; its state is the step and grain's position. Either way batches carry global example ids
step * batch + i (the per-example RNG keys), and a resumed run sees exactly the data an
uninterrupted one would.
"""
import logging
import os
import time
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffrestorer_jax.data import pipeline as pl
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
class DataConfigError(ValueError):
    """A data setting that cannot work; the message names the setting and how to fix it."""


def example_ids(step: int, batch_size: int) -> np.ndarray:
    """Global example ids of step's batch, step * batch + i (int32): the per-example RNG keys."""
    return np.arange(batch_size, dtype=np.int32) + np.int32(step * batch_size % (2 ** 31 - 1))


def example_batch(keys, batch_size: int, size: int) -> Dict[str, np.ndarray]:
    """Zeros laid out like a real batch with `keys` (what `Run.compile` compiles for)."""
    image, one = (batch_size, size, size, 3), (batch_size,)
    layout = {"hq": (image, np.float32), "lq": (image, np.float32), "type_id": (one, np.int32),
              "has_lq": (one, np.bool_), "index": (one, np.int32)}
    return {k: np.zeros(*layout[k]) for k in keys}


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
        return {"hq": np.ascontiguousarray(hq, np.float32), "index": example_ids(step, self.batch_size)}

    def example_batch(self) -> Dict[str, np.ndarray]:
        return example_batch(("hq", "index"), self.batch_size, self.crop)

    def sample_hq(self, n: int) -> np.ndarray:
        """Fixed crops for the periodic sample restorations (a step no run reaches)."""
        return self.batch(2 ** 31 - 1)["hq"][:n]

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
    raise DataConfigError(f"config.data.kind={kind!r}: use 'skimage', 'hq_folder' or 'tfds'")


class PipelineBatches:
    """The grain input pipeline as the loop's data: global batches placed with the step's shardings.

    Keys by dataset kinds: hq_folder {'hq', 'index'} (LQ synthesised in the step, the same program
    as the in-memory source); paired {'hq', 'lq', 'type_id', 'index'} (the stored LQ as given, no
    degradation ops compiled); a mixture adds 'has_lq' = type_id >= 0, so paired records keep their
    LQ and HQ-only ones are degraded on device. 'index' is `example_ids(step)`, laid out from the
    whole global array on every process, so ids never depend on how hosts split a batch.
    State: {'step', 'pipeline': grain's position of the next batch (device prefetch accounted)}.
    """

    def __init__(self, source, pipeline_config, keys, shardings=None, *, process_index=None,
                 process_count=None):
        self.source, self.pipeline_config, self.keys = source, pipeline_config, tuple(keys)
        self.batch_size, self.crop = int(pipeline_config.global_batch_size), int(pipeline_config.crop_size)
        self.shardings = shardings
        index = jax.process_index() if process_index is None else process_index
        count = jax.process_count() if process_count is None else process_count
        dataset = pl.build_dataset(source, pipeline_config, process_index=index, process_count=count)
        placed = None if shardings is None else {k: shardings[k] for k in self.keys if k != "index"}
        self.pipeline = pl.InputPipeline(dataset.map(self._select), placed, pipeline_config.device_prefetch)
        self.step = 0

    def _select(self, batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        out = {k: batch[k] for k in ("hq", "lq", "type_id") if k in self.keys}
        if "has_lq" in self.keys:
            out["has_lq"] = batch["type_id"] >= 0
        return out

    def __next__(self):
        batch = dict(next(self.pipeline))
        ids = {"index": example_ids(self.step, self.batch_size)}
        batch.update(ids if self.shardings is None else global_batch(ids, self.shardings))
        self.step += 1
        return batch

    def get_state(self) -> Dict[str, Any]:
        return {"step": int(self.step), "pipeline": self.pipeline.get_state()}

    def set_state(self, state: Dict[str, Any]) -> None:
        if "pipeline" not in state:
            raise DataConfigError(f"the checkpoint's data state {state} is not the grain pipeline's: "
                                  "was this run started with another config.data.kind?")
        self.step = int(state["step"])
        self.pipeline.set_state(state["pipeline"])

    def example_batch(self) -> Dict[str, np.ndarray]:
        return example_batch(self.keys, self.batch_size, self.crop)

    def sample_hq(self, n: int) -> np.ndarray:
        """Fixed crops for the periodic sample restorations: the first batch of the pipeline with
        another seed, read as one host (so every process gets the same)."""
        cfg = self.pipeline_config.copy_and_resolve_references()
        cfg.seed, cfg.device_prefetch, cfg.num_threads = cfg.seed + 1, 1, 1
        first = next(PipelineBatches(self.source, cfg, ("hq",), process_index=0, process_count=1))
        return np.asarray(first["hq"][:n])


def pipeline_config(config) -> ml_collections.ConfigDict:
    """The grain pipeline's settings from the run config (crop, global batch, seed, flip, threads)."""
    c = pl.default_pipeline_config()
    c.crop_size, c.global_batch_size = int(config.image_size), int(config.train.batch_size)
    c.seed, c.flip = int(config.seed), bool(config.data.flip)
    c.num_threads, c.prefetch_buffer = int(config.data.num_threads), int(config.data.prefetch)
    c.device_prefetch = int(config.data.device_prefetch)
    return c


def tfds_source(config):
    """(source, kinds): the built dataset of config.data.tfds_kinds in tfds_dir, or a `Mixture`."""
    from diffrestorer_jax.data.tfds.build import load_source
    d = config.data
    kinds = [k.strip() for k in str(d.tfds_kinds).split(",") if k.strip()]
    if not kinds:
        raise DataConfigError("config.data.tfds_kinds is empty: name 'hq_folder', 'paired' or both "
                              "('hq_folder,paired')")
    if not d.tfds_dir:
        raise DataConfigError("config.data.kind='tfds' needs config.data.tfds_dir: the --out folder of "
                              "launch/build_dataset.py")
    try:
        sources = [load_source(str(d.tfds_dir), k, str(d.split)) for k in kinds]
    except (ValueError, FileNotFoundError) as e:
        raise DataConfigError(f"config.data (tfds_dir={d.tfds_dir!r}, tfds_kinds={d.tfds_kinds!r}): "
                              f"{e}") from None
    if len(sources) == 1:
        return sources[0], kinds
    try:
        weights = [float(w) for w in str(d.mix_weights).split(",")] if str(d.mix_weights).strip() else None
        return pl.Mixture(sources, weights), kinds
    except ValueError as e:
        raise DataConfigError(f"config.data.mix_weights={d.mix_weights!r} for tfds_kinds="
                              f"{d.tfds_kinds!r}: {e}") from None


def batch_keys(kinds) -> tuple:
    """The step's batch keys for these dataset kinds (see `PipelineBatches`)."""
    if set(kinds) == {"hq_folder"}:
        return ("hq", "index")
    if set(kinds) == {"paired"}:
        return ("hq", "lq", "type_id", "index")
    return ("hq", "lq", "type_id", "has_lq", "index")


def make_data(config, run: Optional["Run"] = None):
    """The loop's data for config.data.kind: `next(data)` -> batch, `get_state` / `set_state`
    (checkpointed with the model), `example_batch()` (what to compile for), `sample_hq(n)`.

    With `run`, the grain pipeline places its batches with `run`'s batch shardings (fixed here, so
    the compiled step gets the very same objects); without, it yields host numpy batches.
    """
    b, size = int(config.train.batch_size), int(config.image_size)
    if config.data.kind != "tfds":
        return StepIndexedImages(load_training_images(config), b, size, int(config.seed),
                                 bool(config.data.flip))
    source, kinds = tfds_source(config)
    keys = batch_keys(kinds)
    shardings = None if run is None else run.batch_layout(example_batch(keys, b, size))
    return PipelineBatches(source, pipeline_config(config), keys, shardings)


def global_batch(host_batch: Dict[str, np.ndarray], shardings) -> Dict[str, jax.Array]:
    """Every process holds the whole (small) global batch; each device takes its slice. Values that
    are jax.Arrays already (the grain pipeline's, made from per-process data) pass through."""
    return {k: v if isinstance(v, jax.Array) else
            jax.make_array_from_callback(v.shape, shardings[k], lambda idx, v=v: v[idx])
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
        self._frozen = None

    def init(self):
        state, self._frozen = self.plan.materialise(self.given, compiler_options=self.compiler_options)
        return state, self._frozen

    def frozen(self):
        """The frozen params (a resume): a pure function of (seed, given weights) that no step
        changes, so computed once per Run."""
        if self._frozen is None:
            self._frozen = self.plan.materialise(self.given, frozen_only=True,
                                                 compiler_options=self.compiler_options)[1]
        return self._frozen

    def example_batch(self) -> Dict[str, np.ndarray]:
        """The host batch layout of the built-in source: {'hq', 'index'} (paired runs add 'lq',
        'type_id'; pass such a batch to `compile`)."""
        b, s = int(self.config.train.batch_size), int(self.config.image_size)
        return {"hq": np.zeros((b, s, s, 3), np.float32), "index": np.zeros((b,), np.int32)}

    def batch_layout(self, example: Dict[str, Any]) -> Dict[str, jax.sharding.NamedSharding]:
        """The batch's shardings, fixed by the first layout given: the compiled step and the input
        pipeline use these very objects. A batch with other keys is refused (it would recompile)."""
        if self.batch_shardings is None:
            self.batch_shardings = {k: sharding.batch_sharding(self.mesh, np.ndim(v), self.rules)
                                    for k, v in example.items()}
        if set(example) != set(self.batch_shardings):
            raise ValueError(f"batch keys {sorted(example)} differ from this run's batch layout "
                             f"{sorted(self.batch_shardings)}")
        return self.batch_shardings

    def compile(self, example_batch: Optional[Dict[str, np.ndarray]] = None):
        """AOT-compile the step once for the batch layout (shapes fixed by the config)."""
        if self.compiled is None:
            example = self.example_batch() if example_batch is None else example_batch
            shardings = self.batch_layout(example)
            dtype = lambda v: v.dtype if hasattr(v, "dtype") else np.asarray(v).dtype  # noqa: E731
            abstract = {k: jax.ShapeDtypeStruct(np.shape(v), dtype(v), sharding=shardings[k])
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


def _sample_lq(run: Run, data) -> np.ndarray:
    from diffrestorer_jax.data import degradations
    hq = data.sample_hq(4)
    fn = degradations.make_degrade_fn(degradations.default_degradation_config(run.config.degradation.preset))
    ids = np.arange(len(hq), dtype=np.int32) % degradations.NUM_TYPES
    return np.asarray(fn(jax.random.key(run.config.seed), jnp.asarray(hq), jnp.asarray(ids))[0])


def train(config, workdir: str, devices=None, compiler_options=None, max_steps: Optional[int] = None,
          guard: Optional[PreemptionGuard] = None, run: Optional[Run] = None) -> str:
    """Train until `config.train.num_steps` (or `max_steps` more steps); 'done' | 'preempted'.

    `run`: a `Run` already built for this very config (devices, compiler options), reused with its
    compiled step and init, e.g. to restart in the same process; `workdir` says where to write.
    """
    run = Run(config, workdir, devices, compiler_options) if run is None else run
    workdir = os.path.abspath(workdir)
    tcfg = config.train
    data = make_data(config, run)  # first: a data mistake stops the run before anything is written
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), tcfg.checkpoint_every,
                        tcfg.keep_checkpoints)
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
    writer = MetricsWriter(os.path.join(workdir, "tb"), int(tcfg.num_steps), start)
    if config.stage == "stage2" and not (tcfg.lpips_vgg and tcfg.lpips_lin):
        logging.warning("LPIPS is off: config.train.lpips_vgg / lpips_lin are not set")
    run.compile(data.example_batch())
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
                save_export(os.path.join(workdir, "export"), run.export_params(state, frozen), config)
                print(f"exported to {os.path.join(workdir, 'export')}", flush=True)
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
