"""The train state, and how the full parameter set of a run is put together on the mesh.

Which networks a stage trains (the rest are frozen: never differentiated, no optimizer state, but
sharded by the same logical rules, the frozen UNet included):

    stage1      prompt + control      (paper stage 1)
    stage2      decoder (+ the PatchGAN discriminator's own params and optimizer state)
    prior_vae   vae                   (the demo's from-scratch prior: no SD weights offline)
    prior_unet  unet
    prior_clip  clip + prompt         (the demo's stand-in for CLIP pretraining: train/prior.py)

Where each network's starting weights come from, in priority order:
  1. `config.weights.unet / vae / clip`: converted pretrained checkpoints (frozen networks only);
  2. `config.weights.init_from`: a previous run's export dir (export.py) supplies every network
     this stage does not train;
  3. a random init from `config.seed`.
A trained network starts fresh, except that the control module is copied from the (given) UNet and
the decoder from the (given) VAE, the paper's initialisation; with `config.weights.init_trained` it
starts from init_from's export instead (fine-tuning). Everything is computed by ONE
jitted function with `out_shardings`, so no array is ever materialised unsharded and XLA drops the
random init of every network that is given.

The state holds the RNG as a raw uint32 key (Orbax-friendly); frozen params are NOT in the state and
are not checkpointed: they are rebuilt identically from the config on resume (threefry is
partition-invariant, so this holds on any mesh).
"""
from typing import Any, Dict, Optional, Tuple

import flax.struct
import jax
import jax.numpy as jnp
from flax.core import meta

from diffrestorer_jax.models import diffrestorer as dr
from diffrestorer_jax.parallel import sharding

TRAINABLE = {
    "stage1": ("prompt", "control"),
    "stage2": ("decoder",),
    "prior_vae": ("vae",),
    "prior_unet": ("unet",),
    "prior_clip": ("clip", "prompt"),
}


@flax.struct.dataclass
class TrainState:
    step: jax.Array          # int32 scalar: optimizer steps taken (micro-steps with accumulation)
    params: Any              # {network name: params} of the trained networks (float32 masters)
    opt_state: Any
    ema: Any                 # EMA of `params` (what gets exported)
    rng: jax.Array           # raw uint32 key; per-step keys are fold_in(rng, step)
    disc_params: Any = None  # stage 2: the PatchGAN discriminator
    disc_opt_state: Any = None


def trainable_names(stage: str) -> Tuple[str, ...]:
    if stage not in TRAINABLE:
        raise ValueError(f"config.stage must be one of {sorted(TRAINABLE)}, got {stage!r}")
    return TRAINABLE[stage]


def frozen_names(stage: str) -> Tuple[str, ...]:
    return tuple(n for n in dr.NETWORKS if n not in trainable_names(stage))


class GivenWeightsError(ValueError):
    """Given weights (weights.init_from's export, weights.unet / vae / clip) cannot be used: not there,
    damaged, not weights, or asked for without what they need. The training command reports it
    without a traceback."""


class GivenWeightsMismatch(GivenWeightsError):
    """Given weights (weights.init_from's export, a converted checkpoint) are not this config's network:
    another model config made them."""


_HINT = ("; given weights must be of this config's architecture: an export (weights.init_from) made with "
         "the same model config (the same --config.model.* overrides), a converted checkpoint "
         "(weights.unet / vae / clip) of the model the config names")


def _rebox(boxed_tree, values, name: str):
    """Put given (unboxed) arrays into a boxed tree, checking paths and shapes with clear errors."""
    from flax import traverse_util
    flat_b = traverse_util.flatten_dict(dict(boxed_tree))
    flat_v = traverse_util.flatten_dict(meta.unbox(dict(values)))
    missing = sorted("/".join(p) for p in flat_b if p not in flat_v)
    extra = sorted("/".join(p) for p in flat_v if p not in flat_b)
    if missing or extra:
        raise GivenWeightsMismatch(f"given '{name}' params do not match the config's '{name}' network: "
                                   f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                                   f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}{_HINT}")
    out = {}
    for path, leaf in flat_b.items():
        old = leaf.unbox() if isinstance(leaf, meta.AxisMetadata) else leaf
        new = flat_v[path]
        if tuple(jnp.shape(new)) != tuple(old.shape):
            raise GivenWeightsMismatch(f"given '{name}' param {'/'.join(path)} has shape "
                                       f"{tuple(jnp.shape(new))}, the config's network wants "
                                       f"{tuple(old.shape)}{_HINT}")
        new = jnp.asarray(new, old.dtype)
        out[path] = leaf.replace_boxed(new) if isinstance(leaf, meta.AxisMetadata) else new
    return traverse_util.unflatten_dict(out)


def full_params(nets: dr.Networks, key, image_size: int, stage: str, given: Dict[str, Any]):
    """All six networks' params (boxed): random init, overridden by `given`, control/decoder
    re-derived from the given UNet/VAE when this stage trains them and they are not given themselves
    (`weights.init_trained`: fine-tuning an export)."""
    from diffrestorer_jax.models.control import init_control_from_unet
    from diffrestorer_jax.models.decoder import init_decoder_from_vae

    params = dr.init_params(nets, key, image_size)
    for name, tree in given.items():
        params[name] = _rebox(params[name], tree, name)
    trained = trainable_names(stage)
    if "control" in trained and "unet" in given and "control" not in given:
        params["control"] = init_control_from_unet(params["control"], params["unet"])
    if "decoder" in trained and "vae" in given and "decoder" not in given:
        params["decoder"] = init_decoder_from_vae(params["decoder"], params["vae"])
    return params


def init_state(nets: dr.Networks, tx, key, image_size: int, stage: str, given: Dict[str, Any],
               disc=None, disc_tx=None):
    """(TrainState, frozen params), both boxed; run under `sharding.init_sharded` / `eval_shape`."""
    k_params, k_rng, k_disc = jax.random.split(key, 3)
    params = full_params(nets, k_params, image_size, stage, given)
    trained = {n: params[n] for n in trainable_names(stage)}
    frozen = {n: params[n] for n in frozen_names(stage)}
    disc_params = disc_opt = None
    if disc is not None:
        disc_params = disc.init(k_disc, jnp.zeros((1, image_size, image_size, 3)))["params"]
        disc_opt = disc_tx.init(disc_params)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=trained, opt_state=tx.init(trained),
                       ema=trained, rng=k_rng, disc_params=disc_params, disc_opt_state=disc_opt)
    return state, frozen


class StatePlan:
    """Abstract state + frozen params with their NamedShardings: built once per run and shared by
    init, the compiled step and checkpoint restore (the same sharding objects everywhere)."""

    def __init__(self, nets, tx, config, mesh, rules, given_abstract: Dict[str, Any],
                 disc=None, disc_tx=None):
        self.nets, self.tx, self.mesh, self.rules = nets, tx, mesh, rules
        self.stage, self.image_size = config.stage, int(config.image_size)
        self.disc, self.disc_tx = disc, disc_tx
        self.key = jax.random.PRNGKey(int(config.seed))
        targets, self.shardings = sharding.plan_sharded(self._init, mesh, rules, self.key, given_abstract)
        self.state_target, self.frozen_target = targets
        self.state_shardings, self.frozen_shardings = self.shardings
        self._materialisers: Dict[Any, Any] = {}

    def _init(self, key, given):
        return init_state(self.nets, self.tx, key, self.image_size, self.stage, given,
                          self.disc, self.disc_tx)

    def given_shardings(self, given: Dict[str, Any]):
        """Shardings for given trees: those of the same networks in the plan (a trained network is
        given when fine-tuning an export: its parameters' shardings)."""
        return {n: self.frozen_shardings[n] if n in self.frozen_shardings else self.state_shardings.params[n]
                for n in given}

    def materialise(self, given: Dict[str, Any], frozen_only: bool = False,
                    compiler_options: Optional[dict] = None):
        """(state, frozen) born sharded; with `frozen_only` (resume), (None, frozen)."""
        given = sharding.shard_tree(given, self.given_shardings(given)) if given else {}
        with sharding.mesh_context(self.mesh, self.rules):
            out = self._materialiser(frozen_only, compiler_options)(self.key, given)
        return (None, out) if frozen_only else out

    def _materialiser(self, frozen_only: bool, compiler_options: Optional[dict]):
        """The jitted init, one per (frozen_only, options) and plan: a second init of the same run
        (a restart in process) reuses the compiled program."""
        key = (frozen_only, tuple(sorted((compiler_options or {}).items())))
        if key not in self._materialisers:
            out_sh = self.frozen_shardings if frozen_only else self.shardings

            def fn(k, g):
                state, frozen = sharding.unbox(self._init(k, g))
                return frozen if frozen_only else (state, frozen)

            self._materialisers[key] = jax.jit(fn, out_shardings=out_sh, compiler_options=compiler_options)
        return self._materialisers[key]


def optimizer_config(train_cfg) -> Dict[str, Any]:
    """config.train's names -> train/optim.py's names."""
    t = train_cfg
    return dict(learning_rate=t.learning_rate, warmup_steps=t.warmup_steps, schedule=t.lr_schedule,
                total_steps=t.num_steps // max(1, t.grad_accum_steps), b1=t.b1, b2=t.b2,
                weight_decay=t.weight_decay, grad_clip_norm=t.clip_grad_norm,
                grad_accum_steps=t.grad_accum_steps)


def apply_gradients(state: TrainState, grads, tx, ema_decay: float, loss) -> Tuple[TrainState, Dict]:
    """One optimizer update of the trained params + EMA, shared by every stage.

    A non-finite loss or gradient is dropped by the optimizer (`optax.apply_if_finite`: params and
    moments untouched) and the EMA is left untouched too; `skipped` and the streak are reported.
    With gradient accumulation the EMA moves once per optimizer update (the last micro-step of a
    window), not per micro-step: `ema_decay` means the same whatever `grad_accum_steps` is.
    The step counter always advances (it indexes the data, so a skipped step is not retried).
    """
    import optax
    from diffrestorer_jax.train import optim

    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    # The gradient norm comes from the optimizer's clipping: a second pass over the gradients here
    # would cost as much again (optim.clip_by_global_norm).
    gnorm = optim.last_grad_norm(opt_state)
    finite = jnp.isfinite(loss) & optim.last_update_finite(opt_state)
    params = optax.apply_updates(state.params, updates)
    ema = optim.update_ema(state.ema, params, ema_decay)
    moved = finite & optim.update_applied(opt_state)
    ema = jax.tree.map(lambda new, old: jnp.where(moved, new, old), ema, state.ema)
    metrics = {"grad_norm": gnorm, "skipped": (~finite).astype(jnp.int32),
               "nonfinite_streak": optim.nonfinite_streak(opt_state).astype(jnp.int32)}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema=ema), metrics


def step_keys(state: TrainState, example_ids, n: int):
    """n per-example keys [n][B] from (seed via state.rng, step, example id): batch-independent."""
    base = jax.random.fold_in(state.rng, state.step)
    keys = jax.vmap(lambda i: jax.random.split(jax.random.fold_in(base, i), n))(example_ids)
    return [keys[:, j] for j in range(n)]
