"""The degradation generator: shapes, range, determinism, labels, parameter effects, JPEG vs Pillow.

One compiled `degrade` on a 64-px batch serves every test (compiling is the slow part on CPU).
The parameter tests read the parameters each sample *reports* and check they move the damage the
way physics says, across a batch of one photo, so a reported value that does nothing fails.
"""
import io

import jax
import numpy as np
import pytest
from PIL import Image

from diffrestorer_jax.data import degradations as D
from diffrestorer_jax.data.gallery import sample_photos
from diffrestorer_jax.data.jpeg import jpeg_compress

SIZE = 64
PER_TYPE = 8


@pytest.fixture(scope="module")
def batch():
    """PER_TYPE samples of each type on one photo, then 8 mixed and 8 random samples on four photos."""
    photos = sample_photos(SIZE)
    ids = np.repeat(np.arange(D.NUM_TYPES), PER_TYPE).tolist() + [D.MIXED] * 8 + [D.RANDOM] * 8
    images = np.concatenate([np.repeat(photos[:1], D.NUM_TYPES * PER_TYPE, 0), np.tile(photos, (4, 1, 1, 1))])
    fn = D.make_degrade_fn()
    lq, labels = fn(jax.random.key(0), images, np.array(ids, np.int32))
    again, _ = fn(jax.random.key(0), images, np.array(ids, np.int32))
    other, _ = fn(jax.random.key(1), images, np.array(ids, np.int32))
    return dict(images=images, ids=np.array(ids), lq=np.asarray(lq), again=np.asarray(again),
                other=np.asarray(other), labels=jax.tree.map(np.asarray, labels))


def _rows(batch, name):
    t = D.DEGRADATION_TYPES.index(name)
    return slice(t * PER_TYPE, (t + 1) * PER_TYPE)


def _mse(batch, rows):
    return ((batch["lq"][rows] - batch["images"][rows]) ** 2).mean(axis=(1, 2, 3))


def _rank_corr(a, b):
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return np.corrcoef(ra, rb)[0, 1]


def test_shapes_range_and_finite(batch):
    assert batch["lq"].shape == batch["images"].shape and batch["lq"].dtype == np.float32
    assert np.isfinite(batch["lq"]).all()
    assert batch["lq"].min() >= 0.0 and batch["lq"].max() <= 1.0


def test_deterministic_for_a_key_and_different_for_another(batch):
    np.testing.assert_array_equal(batch["lq"], batch["again"])
    assert np.abs(batch["lq"] - batch["other"]).mean() > 1e-3


@pytest.mark.parametrize("name", D.DEGRADATION_TYPES)
def test_each_type_changes_the_image_and_is_labelled(batch, name):
    rows = _rows(batch, name)
    assert (_mse(batch, rows) > 1e-5).all(), f"{name} left an image unchanged"
    labels = batch["labels"]
    t = D.DEGRADATION_TYPES.index(name)
    assert (labels["type_id"][rows] == t).all()
    assert (labels["multi_hot"][rows] == np.eye(D.NUM_TYPES, dtype=bool)[t]).all()
    assert not labels["mixed"][rows].any()
    for other, params in D.PARAM_NAMES.items():
        for p in params:
            if other != name:
                assert (labels[p][rows] == 0).all(), f"{p} reported for a {name} sample"


def test_mixed_labels(batch):
    labels, rows = batch["labels"], batch["ids"] == D.MIXED
    counts = labels["multi_hot"][rows].sum(-1)
    assert labels["mixed"][rows].all() and ((counts >= 2) & (counts <= 3)).all()
    hot_of_label = labels["multi_hot"][rows][np.arange(rows.sum()), labels["type_id"][rows]]
    assert hot_of_label.all(), "a mixed sample's type_id must be one of its applied types"
    rand = batch["ids"] == D.RANDOM
    assert ((labels["type_id"][rand] >= 0) & (labels["type_id"][rand] < D.NUM_TYPES)).all()


# (type, reported parameter, expected sign of its rank correlation with the damage)
EFFECTS = [("noise", "noise_sigma", +1), ("motion_blur", "blur_spread", +1), ("jpeg", "jpeg_quality", -1),
           ("haze", "haze_beta", +1), ("low_light", "low_light_exposure", -1),
           ("raindrop", "raindrop_count", +1), ("rain", "rain_density", +1), ("snow", "snow_opacity", +1)]


@pytest.mark.parametrize("name,param,sign", EFFECTS)
def test_reported_parameter_moves_the_damage(batch, name, param, sign):
    rows = _rows(batch, name)
    values, damage = batch["labels"][param][rows], _mse(batch, rows)
    keep = values > 0  # noise: Poisson samples report sigma 0
    assert keep.sum() >= 4 and np.ptp(values[keep]) > 0, f"{param} did not vary"
    corr = _rank_corr(values[keep], damage[keep])
    assert sign * corr > 0.3, f"{param} vs damage rank correlation {corr:.2f} (expected sign {sign})"


def test_paper_protocol_preset_fixes_noise_and_jpeg():
    cfg = D.default_degradation_config("paper_protocol")
    assert tuple(cfg.noise.sigma) == (50.0, 50.0) and cfg.noise.poisson_prob == 0.0
    assert tuple(cfg.jpeg.quality) == (10, 10)
    with pytest.raises(ValueError, match="unknown degradation preset"):
        D.default_degradation_config("nope")


def test_type_names():
    assert D.DEGRADATION_TYPES == ("motion_blur", "haze", "jpeg", "low_light", "noise", "raindrop", "rain", "snow")
    assert D.type_id("jpeg") == 2 and D.type_id("mixed") == D.MIXED
    with pytest.raises(ValueError, match="unknown degradation"):
        D.type_id("fog")


def _psnr(a, b):
    return 10 * np.log10(1.0 / np.mean((a - b) ** 2))


def test_jpeg_close_to_pillow():
    """Our DCT-domain JPEG vs Pillow's encoder+decoder at the same quality on natural photos."""
    photos = sample_photos(96)[:, :88, :80]  # not multiples of 16: exercises the edge padding
    fn = jax.jit(jax.vmap(jpeg_compress, in_axes=(0, None)))
    for quality in (10, 40, 75):
        ours = np.asarray(fn(photos, float(quality)))
        for photo, mine in zip(photos, ours):
            buf = io.BytesIO()
            Image.fromarray(np.round(photo * 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
            ref = np.asarray(Image.open(buf), np.float32) / 255.0
            assert _psnr(mine, ref) >= 30.0, f"quality {quality}: PSNR(ours, Pillow) {_psnr(mine, ref):.1f} dB"
            assert _psnr(ref, photo) < _psnr(mine, ref), "JPEG must differ from the input more than from Pillow"


def test_legacy_and_typed_keys_give_the_same_stream():
    a, b = D.as_fast_key(jax.random.PRNGKey(3)), D.as_fast_key(jax.random.key(3))
    np.testing.assert_array_equal(jax.random.key_data(a), jax.random.key_data(b))
    assert not np.array_equal(jax.random.key_data(a), jax.random.key_data(D.as_fast_key(jax.random.key(4))))
