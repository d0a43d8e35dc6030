"""data/context_crop.py: degrade a larger image, train on a crop of it (train.degrade_size)."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest


def _config(image_size, degrade_size):
    return ml_collections.ConfigDict(dict(image_size=image_size, train=dict(degrade_size=degrade_size)))


def test_sizes():
    from diffrestorer_jax.data import context_crop
    assert context_crop.data_size(_config(64, 0)) == 64 and context_crop.degrade_size(_config(64, 0)) == 0
    assert context_crop.data_size(_config(64, 64)) == 64 and context_crop.degrade_size(_config(64, 64)) == 0
    assert context_crop.data_size(_config(64, 128)) == 128 and context_crop.degrade_size(_config(64, 128)) == 128
    with pytest.raises(ValueError, match="degrade_size=32"):
        context_crop.degrade_size(_config(64, 32))
    # configs written before the option have no such field
    assert context_crop.data_size(ml_collections.ConfigDict(dict(image_size=64, train=dict()))) == 64


def test_crop_pair_cuts_the_same_window_of_both():
    from diffrestorer_jax.data import context_crop
    rng = np.random.default_rng(0)
    hq = jnp.asarray(rng.random((16, 12, 12, 3)), jnp.float32)
    lq = hq * 2 + 1  # a pixel-wise function of hq: equal windows stay related the same way
    keys = jax.random.key_data(jax.random.split(jax.random.key(0), 16))
    a, b = context_crop.crop_pair(keys, hq, lq, 5)
    assert a.shape == b.shape == (16, 5, 5, 3)
    np.testing.assert_allclose(np.asarray(b), np.asarray(a) * 2 + 1, rtol=1e-6)
    x, h = np.asarray(a), np.asarray(hq)
    corners = set()
    for i in range(16):  # each crop is a window of its own image
        hits = [(y, z) for y in range(8) for z in range(8) if np.array_equal(h[i, y:y + 5, z:z + 5], x[i])]
        assert hits
        corners.add(hits[0])
    assert len(corners) > 4  # windows vary over the batch
    again = context_crop.crop_pair(keys, hq, lq, 5)[0]
    np.testing.assert_array_equal(np.asarray(again), x)
