"""Stage 1's training targets: the classifier's label for mixed degradations (multi-hot, uniform
over the types applied) and classifier-free guidance's null prompt (`train.null_prompt_prob`)."""
import numpy as np

import jax
import jax.numpy as jnp

from diffrestorer_jax.data import degradations
from diffrestorer_jax.train import stage1
from diffrestorer_jax.train.run import FAST_COMPILE, Run
from mini_config import mini_tiny


def test_mixed_degradation_target_is_uniform_over_its_types(monkeypatch):
    """The step's degrade function turns the degradation's multi-hot labels into its target: 1/k on
    each of a mixed composition's k types, one-hot for a single type; never one random member.
    (`degrade` is replaced by one reporting known labels: compiling the eight real ops takes minutes
    here, and test_degradations covers their labels.)"""
    hot = {0: [1, 0, 1, 0, 0, 0, 1, 0], 1: [0, 0, 0, 0, 1, 0, 0, 0]}

    def fake_degrade(key, images, type_ids, config):
        row = jnp.asarray([hot[0], hot[1]], bool)[jnp.clip(type_ids, 0, 1)]
        return images, {"type_id": type_ids, "multi_hot": row}

    monkeypatch.setattr(degradations, "degrade", fake_degrade)
    fn = stage1.make_degrade(mini_tiny("stage1"))
    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    _, target = fn(keys, jnp.zeros((2, 4, 4, 3)), jnp.asarray([0, 1], jnp.int32))
    np.testing.assert_allclose(np.asarray(target), [np.asarray(hot[0]) / 3.0, hot[1]], rtol=1e-6)


def test_paired_rows_keep_their_stored_type():
    """In a mixture batch the paired rows (has_lq) take their stored type as a one-hot target and
    the degraded-on-device rows the degradation's target."""
    soft = jnp.asarray([[0.5, 0.5] + [0.0] * 6] * 2, jnp.float32)
    fake = lambda key, hq, ids: (hq * 0, soft)  # noqa: E731
    batch = {"hq": jnp.ones((2, 4, 4, 3)), "lq": jnp.full((2, 4, 4, 3), 0.3),
             "type_id": jnp.asarray([5, -1], jnp.int32), "has_lq": jnp.asarray([True, False])}
    lq, target = stage1.lq_and_labels(None, fake, batch, None)
    np.testing.assert_array_equal(np.asarray(target), [np.eye(8)[5], np.asarray(soft[1])])
    np.testing.assert_allclose(np.asarray(lq[:, 0, 0, 0]), [0.3, 0.0])


def _semantic_after_one_step(null_prompt_prob):
    c = mini_tiny("stage1")
    c.image_size = c.model.clip.image_size = 32
    c.train.batch_size = 4
    c.train.warmup_steps = 0
    c.train.weight_decay = 0.0  # so a param without gradient stays exactly where it was
    c.train.null_prompt_prob = null_prompt_prob
    run = Run(c, jax.devices()[:1], FAST_COMPILE)
    state, frozen = run.init()
    before = jax.device_get(state.params["prompt"])
    rng = np.random.default_rng(0)
    batch = {"hq": rng.random((4, 32, 32, 3), np.float32), "lq": rng.random((4, 32, 32, 3), np.float32),
             "type_id": np.arange(4, dtype=np.int32), "index": np.arange(4, dtype=np.int32)}
    state, metrics = run.step(state, frozen, batch)
    after = jax.device_get(state.params["prompt"])
    moved = {name: max(float(np.abs(a - b).max()) for a, b in
                       zip(jax.tree.leaves(after[name]), jax.tree.leaves(before[name])))
             for name in before}
    return moved, jax.device_get(metrics)


def test_null_prompt_probability_reaches_the_loss():
    """With null_prompt_prob=1 every example's semantic prompt is zero, so the semantic branch of
    the prompt processor gets no gradient and (weight decay off) does not move, while the
    degradation branch (control context + classifier) learns. Without the option it would move."""
    moved, metrics = _semantic_after_one_step(1.0)
    assert float(metrics["null_prompts"]) == 1.0
    semantic = [v for k, v in moved.items() if k.startswith("semantic")]
    assert semantic and max(semantic) == 0.0, moved
    assert max(v for k, v in moved.items() if k.startswith("degradation")) > 0, moved
