"""A tiny self-contained model + train step exercising the scale infrastructure (not a test file).

Shared by test_parallel, test_checkpoint and the worker script toy_worker.py, so that every test and
every subprocess trains the very same program. The net is 2 convs + 2 dense layers built from
`models/layers.py`, so its parameters carry the project's logical axis names; the first conv has 3
input channels, which no 4-way fsdp axis divides (the fallback path).
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from diffrestorer_jax.models import layers
from diffrestorer_jax.parallel import sharding
from diffrestorer_jax.parallel.rules import DEFAULT_RULES
from diffrestorer_jax.train import optim

IMAGE = (8, 8, 3)
BATCH = 8
# A low XLA optimisation level cuts CPU compile time ~4x; both sides of every comparison use it.
FAST_COMPILE = {"xla_backend_optimization_level": 0}
OPTIM = dict(learning_rate=1e-2, warmup_steps=2, schedule="cosine", total_steps=20, grad_clip_norm=1.0)


class ToyNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = layers.constrain(x, ("activation_batch", "activation_height", "activation_width",
                                 "activation_channels"))
        x = nn.silu(layers.Conv(16, 3, name="conv_0")(x))
        x = nn.silu(layers.Conv(32, 3, stride=2, name="conv_1")(x))
        x = x.mean(axis=(1, 2))
        x = nn.silu(layers.Dense(64, names=("embed", "mlp"), name="dense_0")(x))
        return layers.Dense(8, names=("mlp", "embed"), name="dense_1")(x)


def make_tx(**overrides):
    return optim.make_optimizer({**OPTIM, **overrides})


def init_fn(tx, rng):
    """Boxed train state: params, optimizer state, EMA, step and an RNG key (raw uint32)."""
    params = ToyNet().init(rng, jnp.zeros((1,) + IMAGE))["params"]
    return dict(params=params, opt_state=tx.init(params), ema=params, step=jnp.zeros((), jnp.int32),
                rng=jax.random.fold_in(rng, 1))


def make_step(tx, ema_decay=0.9):
    def train_step(state, batch):
        def loss_fn(params):
            pred = ToyNet().apply({"params": params}, batch["x"])
            return jnp.mean((pred - batch["y"]) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        new = dict(params=params, opt_state=opt_state, ema=optim.update_ema(state["ema"], params, ema_decay),
                   step=state["step"] + 1, rng=state["rng"])
        return new, loss
    return train_step


def batch_at(step: int, batch: int = BATCH):
    """The global batch of a step, a pure function of the step (so resumed runs see the same data)."""
    rs = np.random.RandomState(1000 + int(step))
    x = rs.normal(size=(batch,) + IMAGE).astype(np.float32)
    y = np.tanh(x.reshape(batch, -1)[:, :8] * 2.0).astype(np.float32)
    return dict(x=x, y=y)


def batch_shardings(mesh, rules=DEFAULT_RULES):
    return dict(x=sharding.batch_sharding(mesh, 4, rules), y=sharding.batch_sharding(mesh, 2, rules))


def put_batch(batch, shardings):
    """Global arrays from a batch every process knows in full (works single- and multi-process)."""
    return {k: jax.make_array_from_callback(v.shape, shardings[k], lambda idx, v=v: v[idx])
            for k, v in batch.items()}


def plan(mesh, rules=DEFAULT_RULES, seed=0, **optim_overrides):
    """Everything but the state: (tx, targets, state_shardings, batch_shardings, compiled_step)."""
    tx = make_tx(**optim_overrides)
    targets, shard = sharding.plan_sharded(lambda r: init_fn(tx, r), mesh, rules,
                                           jax.random.PRNGKey(seed))
    bsh = batch_shardings(mesh, rules)
    example = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=bsh[k]) for k, v in batch_at(0).items()}
    step = sharding.compile_step(make_step(tx), (shard, bsh), (shard, sharding.replicated(mesh)), (0,),
                                 targets, example, mesh=mesh, rules=rules,
                                 compiler_options=FAST_COMPILE)
    return tx, targets, shard, bsh, step


def init_state(tx, mesh, rules=DEFAULT_RULES, seed=0):
    state, _ = sharding.init_sharded(lambda r: init_fn(tx, r), mesh, rules, jax.random.PRNGKey(seed),
                                     compiler_options=FAST_COMPILE)
    return state


def setup(mesh, rules=DEFAULT_RULES, seed=0, **optim_overrides):
    """Sharded state + AOT-compiled step for `mesh`: (state, state_shardings, compiled_step, batch_sh)."""
    tx, _, shard, bsh, step = plan(mesh, rules, seed, **optim_overrides)
    return init_state(tx, mesh, rules, seed), shard, step, bsh
