"""The host input pipeline: shards, determinism, resume from a saved state, global arrays, crops."""
import itertools

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from diffrestorer_jax.data import pipeline as pl
from diffrestorer_jax.data.degradations import RANDOM

CROP = 8


def _config(**kw):
    c = pl.default_pipeline_config()
    c.crop_size, c.global_batch_size, c.num_threads, c.prefetch_buffer = CROP, 4, 2, 2
    c.update(kw)
    return c


def _flat_images(n):
    """Constant images whose value encodes their index (10 * i); sizes vary, some below the crop."""
    sizes = [(5, 7), (8, 8), (12, 9), (16, 20)]
    return [np.full(sizes[i % 4] + (3,), 10 * i, np.uint8) for i in range(n)]


def _textured_images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (12 + i % 5, 14, 3), dtype=np.uint8) for i in range(n)]


def _ids(batch):
    return np.round(batch["hq"].mean(axis=(1, 2, 3)) * 255 / 10).astype(int).tolist()


def _take(it, n):
    return [jax.tree.map(np.asarray, b) for b in itertools.islice(it, n)]


@pytest.mark.parametrize("n,count", [(10, 2), (11, 2), (12, 3)])
def test_host_shards_disjoint_equal_and_covering(n, count):
    shards = [list(pl.host_shard(list(range(n)), i, count)) for i in range(count)]
    flat = sum(shards, [])
    assert len(set(flat)) == len(flat), "hosts share records"
    assert len({len(s) for s in shards}) == 1, "hosts must run the same number of steps"
    assert sorted(flat) == list(range(n - n % count))


def test_two_hosts_one_epoch_cover_the_data_once():
    source = pl.InMemorySource(_flat_images(16))
    cfg = _config(num_epochs=1)
    seen = []
    for host in range(2):
        it = pl.make_pipeline(source, cfg, process_index=host, process_count=2)
        batches = _take(it, 100)
        assert len(batches) == 4 and all(b["hq"].shape == (2, CROP, CROP, 3) for b in batches)
        seen += sum((_ids(b) for b in batches), [])
    assert sorted(seen) == list(range(16))


def test_deterministic_for_a_seed():
    source = pl.InMemorySource(_textured_images(10))
    a = _take(pl.make_pipeline(source, _config(), process_index=0, process_count=1), 6)
    b = _take(pl.make_pipeline(source, _config(), process_index=0, process_count=1), 6)
    c = _take(pl.make_pipeline(source, _config(seed=1), process_index=0, process_count=1), 6)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["hq"], y["hq"])
    assert any(not np.array_equal(x["hq"], z["hq"]) for x, z in zip(a, c))
    assert a[0]["hq"].dtype == np.float32 and 0 <= a[0]["hq"].min() and a[0]["hq"].max() <= 1
    assert (a[0]["type_id"] == RANDOM).all()
    np.testing.assert_array_equal(a[0]["lq"], a[0]["hq"])  # HQ-only: degraded on device later


def test_resume_from_saved_state_gives_the_same_next_batches():
    source = pl.InMemorySource(_textured_images(10))
    first = pl.make_pipeline(source, _config(device_prefetch=3), process_index=0, process_count=1)
    _take(first, 3)
    state = first.get_state()  # batches already prefetched must not count as consumed
    expected = _take(first, 4)
    second = pl.make_pipeline(source, _config(device_prefetch=3), process_index=0, process_count=1)
    second.set_state(state)
    for x, y in zip(expected, _take(second, 4)):
        np.testing.assert_array_equal(x["hq"], y["hq"])


def test_global_arrays_are_sharded_over_the_mesh():
    mesh = Mesh(np.array(jax.devices()), ("data",))
    sharding = NamedSharding(mesh, P("data"))
    source = pl.InMemorySource(_textured_images(16))
    cfg = _config(global_batch_size=8)
    host = _take(pl.make_pipeline(source, cfg, process_index=0, process_count=1), 1)[0]
    it = pl.make_pipeline(source, cfg, sharding=sharding, process_index=0, process_count=1)
    batch = next(it)
    assert isinstance(batch["hq"], jax.Array) and batch["hq"].sharding == sharding
    assert batch["type_id"].sharding.spec == P("data") and batch["hq"].shape == (8, CROP, CROP, 3)
    np.testing.assert_array_equal(np.asarray(batch["hq"]), host["hq"])


def test_paired_crops_align_and_small_or_mismatched_lq_is_resized():
    hq = _textured_images(4)
    lq = [255 - im for im in hq]
    lq[1] = np.zeros((6, 7, 3), np.uint8)  # a wrongly sized LQ: resized to its HQ
    source = pl.InMemorySource(hq, lq=lq, type_ids=[0, 1, 2, 3])
    batch = _take(pl.make_pipeline(source, _config(shuffle=False), process_index=0, process_count=1), 1)[0]
    assert batch["type_id"].tolist() == [0, 1, 2, 3]
    for i in (0, 2, 3):
        np.testing.assert_allclose(batch["lq"][i], 1.0 - batch["hq"][i], atol=1e-6)
    small = pl.InMemorySource([np.zeros((3, 5, 3), np.uint8)] * 4)
    assert _take(pl.make_pipeline(small, _config(), process_index=0, process_count=1), 1)[0]["hq"].shape[1:] == (CROP, CROP, 3)


def test_bad_settings_are_explained():
    with pytest.raises(ValueError, match="not divisible"):
        pl.make_pipeline(pl.InMemorySource(_flat_images(8)), _config(global_batch_size=3), process_index=0,
                         process_count=2)
    with pytest.raises(ValueError, match="cannot be shared"):
        pl.host_shard([1], 0, 2)
    with pytest.raises(ValueError, match="LQ images"):
        pl.InMemorySource(_flat_images(2), lq=_flat_images(1))


def test_mixture_interleaves_by_weight_deterministically_and_resumes():
    a = pl.InMemorySource(_flat_images(6))                        # ids 0..5, HQ-only
    b = pl.InMemorySource([im + 100 for im in _flat_images(4)],   # ids 10..13, paired
                          lq=_flat_images(4), type_ids=[3] * 4)
    mix = pl.Mixture([a, b], [3, 1])
    cfg = _config(global_batch_size=8)
    batches = _take(pl.make_pipeline(mix, cfg, process_index=0, process_count=1), 6)
    for batch in batches:  # 3:1 within every batch: a deterministic interleave, not a coin flip
        assert (batch["type_id"] == 3).sum() == 2 and (batch["type_id"] == RANDOM).sum() == 6
        ids = np.array(_ids(batch))
        assert set(ids[batch["type_id"] == 3]) <= set(range(10, 14))
        assert set(ids[batch["type_id"] == RANDOM]) <= set(range(6))
    again = pl.make_pipeline(mix, cfg, process_index=0, process_count=1)
    _take(again, 2)
    state = again.get_state()
    resumed = pl.make_pipeline(mix, cfg, process_index=0, process_count=1)
    resumed.set_state(state)
    for x, y in zip(batches[2:], _take(resumed, 4)):
        np.testing.assert_array_equal(x["hq"], y["hq"])
        np.testing.assert_array_equal(x["lq"], y["lq"])
    with pytest.raises(ValueError, match="one weight per source"):
        pl.Mixture([a, b], [1])
    with pytest.raises(ValueError, match="positive"):
        pl.Mixture([a, b], [1, -1])


class _EncodedSource:
    """Records as a built TFDS set holds them (PNG bytes); `bad` indices hold corrupt bytes."""

    def __init__(self, images, bad):
        from diffrestorer_jax.data.image_io import encode_png
        self.records = [{"image": b"\x89PNG broken" if i in bad else encode_png(im), "file_name": f"r{i}"}
                        for i, im in enumerate(images)]

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        return self.records[i]


def test_a_corrupt_record_is_replaced_by_the_next_one_every_time(caplog):
    """An unreadable record never stops the pipeline (nor its resume): the next readable record takes
    its place, the same one every time, and it is reported once with the count."""
    images = _flat_images(8)
    source = _EncodedSource(images, bad={3})
    cfg = _config(shuffle=False, global_batch_size=8)
    with caplog.at_level("WARNING"):
        batch = _take(pl.make_pipeline(source, cfg, process_index=0, process_count=1), 1)[0]
    assert _ids(batch) == [0, 1, 2, 4, 4, 5, 6, 7]
    assert sum("skipping unreadable record 3" in r.message for r in caplog.records) == 1
    again = _take(pl.make_pipeline(source, cfg, process_index=0, process_count=1), 1)[0]
    np.testing.assert_array_equal(again["hq"], batch["hq"])
