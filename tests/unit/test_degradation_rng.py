"""`degradation.rng` (data/degradations.py): with 'threefry' each training example's degradation
comes from its own key, whatever batch it is in, and under a mesh each device draws only its own
examples' randomness; 'rbg' (the default) draws the batch from its first key on every device."""
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from diffrestorer_jax.config_base import load_config_file
from diffrestorer_jax.data import degradations as D
from diffrestorer_jax.train import stage1

B, SIZE = 8, 32


def _config(rng):
    c = load_config_file("configs/tiny.py:stage1")
    c.degradation.rng = rng
    return c


def _inputs():
    keys = jax.random.key_data(jax.random.split(jax.random.key(0), B))
    hq = jnp.asarray(np.random.default_rng(0).random((B, SIZE, SIZE, 3), np.float32))
    return keys, hq, jnp.full((B,), D.RANDOM, jnp.int32)


def test_threefry_example_does_not_depend_on_its_batch():
    fn = jax.jit(stage1.make_degrade(_config("threefry")))
    keys, hq, types = _inputs()
    whole, _ = fn(keys, hq, types)
    part, _ = fn(keys[3:5], hq[3:5], types[3:5])
    # the same draws; batched image operations may round differently
    np.testing.assert_allclose(np.asarray(part), np.asarray(whole[3:5]), atol=1e-6)
    # rbg: the same rows in another batch get other draws (the batch's first key and the row's
    # position decide)
    rbg = jax.jit(stage1.make_degrade(_config("rbg")))
    moved = np.abs(np.asarray(rbg(keys[3:5], hq[3:5], types[3:5])[0]) - np.asarray(rbg(keys, hq, types)[0][3:5]))
    assert moved.max() > 0.05


def _largest_random_bits(rng):
    """The most uint32 values (random bits) one device's compiled program holds in one array."""
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    rows = NamedSharding(mesh, PartitionSpec("data"))
    keys, hq, types = _inputs()
    args = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rows) for a in (keys, hq, types)]
    text = jax.jit(stage1.make_degrade(_config(rng))).lower(*args).compile().as_text()
    return max(math.prod(int(d) for d in dims.split(",") if d) for dims in re.findall(r"u32\[([0-9,]*)\]", text))


def test_threefry_draws_only_the_devices_own_examples_under_a_mesh():
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (tests/conftest.py fakes them on CPU)")
    per_example = 9 * 128 + SIZE * SIZE * 10  # uniforms: 128 scalars per op + 10 image-sized fields
    assert _largest_random_bits("rbg") >= B * per_example  # the global batch's, on every device
    assert _largest_random_bits("threefry") <= per_example  # B / 8 = 1 example per device


def test_unknown_rng_is_refused():
    with pytest.raises(ValueError, match="degradation rng must be one of"):
        D.default_degradation_config("default", "philox")
