"""The training loop shared by every stage: resume or init, run the compiled step, checkpoint, export.

    train(config, workdir) -> 'done' | 'preempted'

Per step: batch -> step; metrics every `log_every` (TensorBoard + console); non-finite streak check;
checkpoint every `checkpoint_every`; sample restorations every `sample_every`; SIGTERM -> checkpoint
at the current step and return 'preempted'. A run resumes from `<workdir>/checkpoints` (state + data
position; frozen params are rebuilt, never checkpointed, and must match the checkpoint's: see
resume_check.py) and ends with a final checkpoint and `<workdir>/export` (EMA of the trained networks
+ the frozen ones). One run at a time per workdir (workdir_lock.py).
"""
import logging
import time
from typing import Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

from diffrestorer_jax import paths
from diffrestorer_jax.data import degradations, sources
from diffrestorer_jax.diffusion import schedules
from diffrestorer_jax.export import save_export
from diffrestorer_jax.infer.pipeline import RestoreSettings, restore
from diffrestorer_jax.parallel import mesh as mesh_lib
from diffrestorer_jax.train import optim, resume_check
from diffrestorer_jax.train.checkpoint import Checkpointer
from diffrestorer_jax.train.metrics_writer import MetricsWriter
from diffrestorer_jax.train.preemption import PreemptionGuard
from diffrestorer_jax.train.run import Run
from diffrestorer_jax.train.workdir_lock import WorkdirLock


def _sample_images(run: Run, state, frozen, lq: np.ndarray, step: int) -> Dict[str, np.ndarray]:
    """Restorations of a fixed LQ batch with the current EMA params (stage 1/2 only)."""
    params = run.export_params(state, frozen)
    settings = RestoreSettings(steps=int(run.config.sampler.steps))
    out = restore(run.nets, params, jnp.asarray(lq), jax.random.PRNGKey(step),
                  schedules.from_config(run.config.diffusion), settings)
    return {"lq": lq, "restored": np.asarray(out["image"])}


def _sample_lq(run: Run, data) -> np.ndarray:
    """A fixed batch of degraded crops (one type each) for the periodic sample restorations."""
    hq = data.sample_hq(4)
    fn = degradations.make_degrade_fn(degradations.default_degradation_config(run.config.degradation.preset))
    ids = np.arange(len(hq), dtype=np.int32) % degradations.NUM_TYPES
    return np.asarray(fn(jax.random.key(run.config.seed), jnp.asarray(hq), jnp.asarray(ids))[0])


def train(config, workdir: str, devices=None, compiler_options=None, max_steps: Optional[int] = None,
          guard: Optional[PreemptionGuard] = None, run: Optional[Run] = None,
          allow_config_changes: bool = False) -> str:
    """Train until `config.train.num_steps` (or `max_steps` more steps); 'done' | 'preempted'.

    `run`: a `Run` already built for this very config (devices, compiler options), reused with its
    compiled step and init, e.g. to restart in the same process; `workdir` says where to write
    (local or a URL such as gs://). `allow_config_changes`: resume even where the checkpoint's
    config or frozen weights differ. The preemption guard is up before anything else, so a SIGTERM
    while the run builds, loads data, restores or compiles is honoured at the next check, not fatal.
    """
    own_guard = guard is None
    guard = PreemptionGuard() if own_guard else guard
    try:
        return _train(config, workdir, devices, compiler_options, max_steps, guard, run, allow_config_changes)
    finally:
        if own_guard:
            guard.close()


def _train(config, workdir, devices, compiler_options, max_steps, guard: PreemptionGuard,
           run: Optional[Run], allow_config_changes: bool) -> str:
    run = Run(config, devices, compiler_options) if run is None else run
    workdir = paths.path(workdir)  # gs://... stays a URL (os.path would make it local)
    if workdir.exists() and not workdir.is_dir():  # before the data and weights load
        raise NotADirectoryError(f"--workdir {workdir}: exists and is not a folder")
    tcfg = config.train
    # Data first: a data mistake stops the run before anything is written.
    data = sources.make_data(config, run.batch_layout)
    lock = WorkdirLock(workdir, primary=jax.process_index() == 0)
    note = lock.acquire()
    if note:
        logging.warning(note)
    ckpt = Checkpointer(workdir / "checkpoints", tcfg.checkpoint_every, tcfg.keep_checkpoints)
    run_info = {"frozen_fingerprint": resume_check.fingerprint(run.given)}
    try:
        state, frozen = _resume_or_init(run, config, data, ckpt, run_info, allow_config_changes)
        return _loop(run, config, workdir, data, ckpt, lock, run_info, state, frozen, max_steps, guard)
    finally:
        ckpt.close()
        lock.release()


def _resume_or_init(run, config, data, ckpt, run_info, allow_config_changes):
    """(state, frozen): from the latest checkpoint (checked against this run) or a fresh init."""
    latest = ckpt.latest_step()
    if latest is not None:
        # checked before the state is read: another model's state would not even restore
        for line in resume_check.check_resume(
                ckpt.saved_config(latest), config, ckpt.saved_run_info(latest).get("frozen_fingerprint"),
                run_info["frozen_fingerprint"], allow_config_changes):
            print(f"changed since the checkpoint: {line}", flush=True)
        state, _, data_state = ckpt.restore(run.plan.state_target)
        data.set_state(data_state)
        frozen = run.frozen()
        logging.info("resumed from step %d of %s", latest, ckpt.directory)
        print(f"resumed at step {int(jax.device_get(state.step))}", flush=True)
        return state, frozen
    return run.init()


def _loop(run, config, workdir, data, ckpt, lock, run_info, state, frozen, max_steps, guard):
    tcfg = config.train
    start = int(jax.device_get(state.step))
    end = int(tcfg.num_steps) if max_steps is None else min(int(tcfg.num_steps), start + max_steps)
    writer = MetricsWriter(workdir / "tb", int(tcfg.num_steps), start)
    stop = guard.should_stop(start)  # a signal during build, data loading, restore or init
    if not stop:
        run.compile(data.example_batch())
        # Processes finish compiling at different times; meet before the first collective (see barrier).
        mesh_lib.barrier(f"train step compiled at {start}")
        stop = guard.should_stop(start)
    sample_lq = None
    status, history, t_last, n_last = "done", [], time.time(), 0
    try:
        step = start
        if stop:  # at `start`: nothing trained since the checkpoint (if any), so none is rewritten
            ckpt.save(step, state, config, data.get_state(), run_info=run_info)
            ckpt.wait()
            print(f"preempted: checkpoint saved at step {step}", flush=True)
            status = "preempted"
        while status == "done" and step < end:
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
                writer.print(f"step {step} " + " ".join(f"{k}={v:.5g}" for k, v in values.items()))
                lock.refresh()
                optim.check_nonfinite_streak(state.opt_state, int(tcfg.max_consecutive_skips), step)
                if state.disc_opt_state is not None:
                    optim.check_nonfinite_streak(state.disc_opt_state, int(tcfg.max_consecutive_skips),
                                                 step, what="discriminator")
            ckpt.maybe_save(step, state, config, data.get_state(), run_info=run_info)
            if (config.stage in ("stage1", "stage2") and int(tcfg.sample_every) > 0
                    and step % int(tcfg.sample_every) == 0):
                sample_lq = _sample_lq(run, data) if sample_lq is None else sample_lq
                writer.images(step, _sample_images(run, state, frozen, sample_lq, step))
            if guard.should_stop(step):
                ckpt.save(step, state, config, data.get_state(), run_info=run_info)
                ckpt.wait()
                print(f"preempted: checkpoint saved at step {step}", flush=True)
                status = "preempted"
                break
        if status == "done":
            ckpt.save(step, state, config, data.get_state(), run_info=run_info)
            ckpt.wait()
            if step >= int(tcfg.num_steps):
                save_export(workdir / "export", run.export_params(state, frozen), config)
                print(f"exported to {workdir / 'export'}", flush=True)
    finally:
        writer.close()
    return status


def _mean_metrics(history):
    host = jax.device_get(history)
    keys = host[0].keys()
    out = {k: float(np.mean([h[k] for h in host])) for k in keys}
    if "nonfinite_streak" in keys:
        out["nonfinite_streak"] = float(host[-1]["nonfinite_streak"])
        out["skipped"] = float(np.sum([h["skipped"] for h in host]))
    return out
