"""The optimizer: schedule shape, non-finite skipping with a readable streak, accumulation, EMA."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from diffrestorer_jax.train import optim


def _params():
    return {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}


def test_warmup_then_cosine_and_constant():
    cos = optim.make_schedule(dict(learning_rate=1.0, warmup_steps=4, schedule="cosine", total_steps=12))
    np.testing.assert_allclose([cos(0), cos(2), cos(4), cos(12)], [0.0, 0.5, 1.0, 0.0], atol=1e-6)
    assert 0.0 < cos(8) < 1.0
    const = optim.make_schedule(dict(learning_rate=0.5, warmup_steps=2))
    np.testing.assert_allclose([const(0), const(1), const(2), const(100)], [0.0, 0.25, 0.5, 0.5])
    with pytest.raises(ValueError, match="'constant' or 'cosine'"):
        optim.make_schedule(dict(schedule="linear"))


def test_nonfinite_updates_are_skipped_and_counted():
    tx = optim.make_optimizer(dict(learning_rate=0.1))
    params = _params()
    state = tx.init(params)
    good = jax.tree.map(jnp.ones_like, params)
    bad = {"w": good["w"].at[0, 0].set(jnp.nan), "b": good["b"]}
    for expected_streak in (1, 2):
        updates, state = tx.update(bad, state, params)
        params_after = optax.apply_updates(params, updates)
        jax.tree.map(np.testing.assert_array_equal, params_after, params)  # untouched
        assert int(optim.nonfinite_streak(state)) == expected_streak
    with pytest.raises(FloatingPointError, match="2 optimizer updates in a row"):
        optim.check_nonfinite_streak(state, limit=2, step=7)
    optim.check_nonfinite_streak(state, limit=3)
    updates, state = tx.update(good, state, params)
    assert int(optim.nonfinite_streak(state)) == 0 and int(optax.tree_utils.tree_get(state, "total_notfinite")) == 2
    assert float(jnp.abs(updates["w"]).max()) > 0


def test_accumulation_equals_one_big_batch():
    """Two micro-batch gradients averaged by MultiSteps = one update with the mean gradient."""
    cfg = dict(learning_rate=0.1, grad_clip_norm=0.5)
    params = _params()
    g1 = jax.tree.map(lambda p: p * 0.3, params)
    g2 = jax.tree.map(lambda p: -p * 0.1 + 1.0, params)
    acc = optim.make_optimizer(dict(cfg, grad_accum_steps=2))
    s = acc.init(params)
    u1, s = acc.update(g1, s, params)
    assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(u1))  # no update mid-accumulation
    u2, s = acc.update(g2, s, params)
    one = optim.make_optimizer(cfg)
    u, _ = one.update(jax.tree.map(lambda a, b: (a + b) / 2, g1, g2), one.init(params), params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), u2, u)
    assert optim.nonfinite_streak(s) is not None  # readable through the MultiSteps wrapper


def test_clipping_and_weight_decay_mask():
    """A 1e6 gradient spike must not freeze Adam's next steps (its second moment would, unclipped)."""
    params = _params()
    spike = jax.tree.map(lambda p: jnp.ones_like(p) * 1e6, params)
    normal = jax.tree.map(jnp.ones_like, params)

    def second_step_size(clip):
        tx = optim.make_optimizer(dict(learning_rate=1.0, b1=0.0, weight_decay=0.0, grad_clip_norm=clip))
        s = tx.init(params)
        _, s = tx.update(spike, s, params)
        u, _ = tx.update(normal, s, params)
        return float(jnp.abs(u["w"]).max())

    assert second_step_size(1.0) > 0.5 and second_step_size(0.0) < 1e-3
    zero = jax.tree.map(jnp.zeros_like, params)
    for mask, b_moves in (("all", True), ("matrices", False)):
        tx = optim.make_optimizer(dict(learning_rate=1.0, weight_decay=0.1, weight_decay_mask=mask))
        u, _ = tx.update(zero, tx.init(params), params)
        assert bool(jnp.any(u["b"] != 0)) == b_moves and bool(jnp.any(u["w"] != 0))


def test_clipping_matches_optax_and_keeps_the_norm():
    """Our clipping is optax's (same updates, clipped or not), and the norm it computed is what the
    train step logs (NaN after a skipped update); through MultiSteps it is the accumulated one's."""
    params = _params()
    grads = {"w": jnp.full((2, 3), 0.7), "b": jnp.array([0.5, -2.0, 1.0])}
    norm = float(np.sqrt(6 * 0.49 + 0.25 + 4.0 + 1.0))
    for clip in (0.5, 100.0):   # clipped, not clipped: the transform alone (Adam would hide scale)
        ours, _ = optim.clip_by_global_norm(clip).update(grads, optim.clip_by_global_norm(clip).init(params))
        theirs, _ = optax.clip_by_global_norm(clip).update(grads, optax.EmptyState())
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), ours, theirs)
    for clip in (0.5, 100.0, 0.0):
        tx = optim.make_optimizer(dict(learning_rate=0.1, grad_clip_norm=clip))
        ref = optax.chain(*([optax.clip_by_global_norm(clip)] if clip > 0 else []),
                          optax.adamw(0.1, weight_decay=1e-2))
        u, s = tx.update(grads, tx.init(params), params)
        u_ref, _ = ref.update(grads, ref.init(params), params)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), u, u_ref)
        np.testing.assert_allclose(float(optim.last_grad_norm(s)), norm, rtol=1e-6)
        assert bool(optim.last_update_finite(s))
    bad = {"w": grads["w"].at[0, 0].set(jnp.inf), "b": grads["b"]}
    _, s = tx.update(bad, s, params)
    assert not bool(optim.last_update_finite(s)) and np.isnan(float(optim.last_grad_norm(s)))
    acc = optim.make_optimizer(dict(learning_rate=0.1, grad_accum_steps=2))
    s = acc.init(params)
    _, s = acc.update(grads, s, params)
    assert float(optim.last_grad_norm(s)) == 0.0   # nothing applied yet (the initial state)
    _, s = acc.update(jax.tree.map(lambda g: 3 * g, grads), s, params)   # mean gradient: 2 * grads
    np.testing.assert_allclose(float(optim.last_grad_norm(s)), 2 * norm, rtol=1e-6)


def test_update_ema():
    ema = {"w": jnp.zeros(3)}
    out = optim.update_ema(ema, {"w": jnp.ones(3, jnp.bfloat16)}, 0.9)
    np.testing.assert_allclose(out["w"], 0.1, rtol=1e-6)
    assert out["w"].dtype == jnp.float32


def test_ema_moves_once_per_optimizer_update_under_accumulation():
    """With grad_accum_steps=2 the EMA stays put on the first micro-step and moves once, by one
    decay, when the accumulated update is applied (it used to move on every micro-step)."""
    from diffrestorer_jax.train import state as st
    params = {"net": _params()}
    tx = optim.make_optimizer(dict(learning_rate=0.1, grad_accum_steps=2))
    state = st.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                          ema=jax.tree.map(jnp.zeros_like, params), rng=jax.random.PRNGKey(0))
    grads = jax.tree.map(jnp.ones_like, params)
    state1, _ = st.apply_gradients(state, grads, tx, 0.5, jnp.float32(1.0))
    jax.tree.map(np.testing.assert_array_equal, state1.params, params)  # mid-window: nothing moves
    jax.tree.map(np.testing.assert_array_equal, state1.ema, state.ema)
    state2, _ = st.apply_gradients(state1, grads, tx, 0.5, jnp.float32(1.0))
    assert any(float(jnp.abs(a - b).max()) > 0 for a, b in
               zip(jax.tree.leaves(state2.params), jax.tree.leaves(params)))
    want = jax.tree.map(lambda p: 0.5 * p, state2.params)  # 0.5 * ema(=0) + 0.5 * new params
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), state2.ema, want)
    # without accumulation every update moves it
    tx1 = optim.make_optimizer(dict(learning_rate=0.1))
    s = state.replace(opt_state=tx1.init(params))
    s1, _ = st.apply_gradients(s, grads, tx1, 0.5, jnp.float32(1.0))
    assert float(jnp.abs(s1.ema["net"]["b"]).max()) > 0
