"""A training run put together: mesh, rules, networks, the stage's step, given weights, and the
plan of the sharded state; `train.loop.train` drives it (tests and the AOT tools build one directly).

    run = Run(config, devices)            # nothing materialised yet: shapes and shardings only
    state, frozen = run.init()            # one jitted init with out_shardings
    state, metrics = run.step(state, frozen, host_batch)   # compiled once, state donated
"""
import logging
from typing import Any, Dict, Optional

import jax
import numpy as np

from diffrestorer_jax.data import context_crop, sources
from diffrestorer_jax.diffusion import schedules
from diffrestorer_jax.models import diffrestorer as dr
from diffrestorer_jax.parallel import mesh as mesh_lib
from diffrestorer_jax.parallel import rules as rules_lib
from diffrestorer_jax.parallel import sharding
from diffrestorer_jax.train import optim
from diffrestorer_jax.train import state as st

FAST_COMPILE = {"xla_backend_optimization_level": 0}


def load_given(config, nets: dr.Networks) -> Dict[str, Any]:
    """Starting weights of networks this stage does not train (see state.py for the priorities)."""
    frozen = st.frozen_names(config.stage)
    given: Dict[str, Any] = {}
    w = config.weights
    if w.init_trained and not w.init_from:
        raise st.GivenWeightsError("weights.init_trained=True needs weights.init_from: the export whose "
                                   "trained networks the run fine-tunes")
    if w.init_from:
        from diffrestorer_jax.export import load_export
        try:
            _, _, params = load_export(w.init_from)
        except Exception as e:  # noqa: BLE001  orbax/tensorstore raise many types for a damaged export
            raise st.GivenWeightsError(f"weights.init_from={w.init_from}: cannot load the export "
                                       f"({type(e).__name__}: {str(e).split(' See full TensorStore')[0][:200]})") from e
        given.update({n: params[n] for n in frozen})
        if w.init_trained:
            given.update({n: params[n] for n in st.trainable_names(config.stage)})
        logging.info("init_from %s: %s", w.init_from, sorted(given))
    if w.unet or w.vae or w.clip:
        from diffrestorer_jax import convert
        loaders = {"unet": convert.load_unet, "vae": convert.load_vae, "clip": convert.load_clip_vision}
        for name in ("unet", "vae", "clip"):
            path = w[name]
            if path and name in frozen:
                try:
                    given[name] = loaders[name](path)[1]
                except convert.CheckpointError as e:  # names the file and what is wrong with it
                    raise st.GivenWeightsError(f"weights.{name}: {e}") from e
            elif path:
                logging.warning("weights.%s ignored: stage %s trains the %s", name, config.stage, name)
    return given


def make_stage(config, nets):
    """(tx, step_fn, disc, disc_tx) for the config's stage."""
    tx = optim.make_optimizer(st.optimizer_config(config.train))
    schedule = schedules.from_config(config.diffusion)
    disc = disc_tx = None
    stage = config.stage
    if stage == "stage1":
        from diffrestorer_jax.train import stage1
        step = stage1.make_step(nets, config, tx, schedule)
    elif stage == "stage2":
        from diffrestorer_jax.train import stage2
        disc, disc_tx = stage2.make_discriminator(config)
        step = stage2.make_step(nets, config, tx, schedule, disc, disc_tx)
    elif stage in ("prior_vae", "prior_unet", "prior_clip"):
        from diffrestorer_jax.train import prior
        step = prior.make_step(nets, config, tx, schedule)
    else:
        st.trainable_names(stage)  # raises the readable error
    return tx, step, disc, disc_tx


class Run:
    """Everything a run holds but its files (those are `train.loop`'s)."""

    def __init__(self, config, devices=None, compiler_options=None):
        self.config = config
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

    def example_batch(self, keys=sources.HQ_ONLY_KEYS) -> Dict[str, np.ndarray]:
        """Zeros laid out like this run's batches with `keys` (default: clean images, degraded in
        the step; `sources.PAIRED_KEYS` bring their LQ)."""
        return sources.example_batch(keys, int(self.config.train.batch_size),
                                     context_crop.data_size(self.config))

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
        return compiled(state, frozen, sources.global_batch(host_batch, self.batch_shardings))

    def export_params(self, state, frozen) -> Dict[str, Any]:
        return {**frozen, **state.ema}
