"""Mesh, rules, sharded init and compile-once on 8 fake CPU devices (conftest sets the count)."""
import logging

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import toy_train
from diffrestorer_jax.parallel import mesh as mesh_lib
from diffrestorer_jax.parallel import rules as rules_lib
from diffrestorer_jax.parallel import sharding


def _train(mesh, steps=3, keep_at=3):
    """Set up and train `steps` steps inside a compile counter; host copies of the state at `keep_at`."""
    with sharding.CompileCounter("train_step") as counter:
        state, shard, step, bsh = toy_train.setup(mesh)
        init = jax.device_get(state["params"])
        losses = []
        for i in range(steps):
            state, loss = step(state, toy_train.put_batch(toy_train.batch_at(i), bsh))
            losses.append(float(loss))
            if i + 1 == keep_at:
                kept = jax.device_get(state)
        jax.block_until_ready(state)
    return dict(losses=losses[:keep_at], init=init, kept=kept, state=state, shard=shard, compiles=counter.count,
                compiled_names=counter.names)


@pytest.fixture(scope="module")
def run_2x4():
    """One 5-step run on the (2, 4) mesh, shared by the placement, parity and compile-once tests."""
    return _train(mesh_lib.make_mesh({"data": 2, "fsdp": 4, "tensor": 1}), steps=5)


def test_make_mesh_sizes_and_errors():
    m = mesh_lib.make_mesh({"data": 2, "fsdp": -1, "tensor": 1})
    assert dict(m.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert dict(mesh_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1},
                                   devices=jax.devices()[:1]).shape) == {"data": 1, "fsdp": 1, "tensor": 1}
    with pytest.raises(ValueError, match="multiply to 6, but there are 8 devices"):
        mesh_lib.make_mesh({"data": 2, "fsdp": 3, "tensor": 1})
    with pytest.raises(ValueError, match="not divisible by 3"):
        mesh_lib.make_mesh({"data": 3, "fsdp": -1, "tensor": 1})
    hybrid = mesh_lib.make_mesh({"data": 1, "fsdp": 4, "tensor": 1, "dcn_data": 2})
    assert dict(hybrid.shape) == {"data": 2, "fsdp": 4, "tensor": 1}


def test_maybe_initialize_distributed_is_noop_on_one_host(monkeypatch):
    for k in ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(k, raising=False)
    assert mesh_lib.maybe_initialize_distributed() is False


def test_rules_override_from_config():
    rules = rules_lib.get_rules({"logical_axis_rules": [["mlp", None], ["extra", ["data", "fsdp"]]]})
    assert dict(rules).get("mlp") is None
    assert dict(rules)["extra"] == ("data", "fsdp")
    assert dict(rules)["embed"] == "fsdp"
    assert rules_lib.get_rules(None) == rules_lib.DEFAULT_RULES


def test_partition_specs_follow_rules_with_fallback(caplog):
    mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
    tx = toy_train.make_tx()
    abstract = jax.eval_shape(lambda r: toy_train.init_fn(tx, r), jax.random.PRNGKey(0))
    sharding._LOGGED_FALLBACKS.clear()  # logged once per process: an earlier test may have hit this one
    with caplog.at_level(logging.INFO):
        sh = sharding.tree_shardings(abstract, mesh, rules_lib.DEFAULT_RULES)
        sharding.tree_shardings(abstract, mesh, rules_lib.DEFAULT_RULES)
    p = sh["params"]
    assert p["conv_1"]["kernel"].spec == P(None, None, "fsdp", "tensor")
    assert p["dense_0"]["kernel"].spec == P("fsdp", "tensor")
    assert p["dense_1"]["kernel"].spec == P("tensor", "fsdp")
    # 3 input channels do not divide fsdp=4: the axis moves to the 16 output channels
    assert p["conv_0"]["kernel"].spec == P(None, None, None, ("tensor", "fsdp"))
    assert sh["step"].spec == P()
    # Adam moments are sharded like their parameters (memory is split, not just the weights).
    mu = sh["opt_state"].inner_state[1][0].mu
    assert mu["dense_0"]["kernel"].spec == P("fsdp", "tensor")
    fallback_logs = [r for r in caplog.records if "does not divide" in r.getMessage()]
    assert len(fallback_logs) >= 1
    assert len({r.getMessage() for r in fallback_logs}) == len(fallback_logs)  # each one only once


def test_non_dividing_weights_move_to_another_dim_or_say_they_are_replicated(caplog):
    """A weight whose rule's dimension the fsdp axis does not divide is split along another of its
    dimensions that it does divide (SD 1.5's 320/640 channels on 256 chips: the 1280/2560 side);
    only when none does is it replicated, with a warning that says so."""
    mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
    spec = P(None, None, "fsdp", "tensor")
    assert sharding.fit_spec(spec, (3, 3, 12, 16), mesh) == P(None, None, None, ("tensor", "fsdp"))
    assert sharding.fit_spec(P("fsdp", "tensor"), (12, 40), mesh) == P(None, ("tensor", "fsdp"))
    assert sharding.fit_spec(spec, (3, 3, 16, 12), mesh) == spec  # divides: unchanged
    sharding._LOGGED_FALLBACKS.clear()
    with caplog.at_level(logging.WARNING):
        assert sharding.fit_spec(spec, (3, 3, 12, 20), mesh, "w") == P(None, None, None, "tensor")
    assert any("replicated over ['fsdp']" in r.getMessage() for r in caplog.records)


def test_init_sharded_places_arrays_as_planned(run_2x4):
    kernel = run_2x4["state"]["params"]["dense_0"]["kernel"]
    assert kernel.sharding == run_2x4["shard"]["params"]["dense_0"]["kernel"]
    assert kernel.addressable_shards[0].data.shape == (32 // 4, 64)


def test_mesh_2x4_matches_one_device(run_2x4):
    one = _train(mesh_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1]))
    np.testing.assert_allclose(run_2x4["losses"], one["losses"], rtol=1e-5, atol=1e-6)
    moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), one["kept"]["params"], one["init"])
    assert min(jax.tree.leaves(moved)) > 0  # the 3 steps really changed every parameter
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 run_2x4["kept"]["params"], one["kept"]["params"])


def test_compile_once_over_five_steps(run_2x4):
    assert run_2x4["compiles"] == 1, run_2x4["compiled_names"]


def test_compile_counter_sees_recompiles():
    """The counter must be able to fail: a plain jit fed a new shape compiles again."""
    def train_step_probe(x):
        return x * 2

    f = jax.jit(train_step_probe)
    with sharding.CompileCounter("train_step_probe") as counter:
        f(np.ones(3, np.float32))
        f(np.ones(3, np.float32))
        f(np.ones(4, np.float32))
    assert counter.count == 2
