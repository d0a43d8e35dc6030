"""FID's Inception-v3 in Flax against torch-fidelity's pure-torch port, with random weights saved in
the real file's layout and loaded by `convert.inception.load_fid_inception`; pytorch-fid's
preprocessing; the exact FID of two feature sets.

The reference (tests/fid_reference.py) is torch-fidelity's module, imported without its package's
torchvision-importing init (`pip install --no-deps torch-fidelity==0.4.0`). Its constructor loads
weights from a file; a subclass skips loading an empty one, so the network keeps torch's random init
(batch-norm statistics are randomised too), and nothing is downloaded. The network runs at SIZE
(>= 75 works; 139 leaves a 3x3 map in the last blocks, so every padding path is exercised) instead
of 299: same weights, a quarter of the work.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import traverse_util
from safetensors.torch import save_file

from diffrestorer_jax.convert.core import CheckpointError
from diffrestorer_jax.convert.inception import load_fid_inception
from diffrestorer_jax.metrics import fid
from diffrestorer_jax.models.inception import FIDInceptionV3

from fid_reference import SIZE, fidelity_inception, random_reference  # noqa: F401  (tests/fid_reference.py)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return random_reference(str(tmp_path_factory.mktemp("fid_weights")))


def test_features_and_logits_match_torch_fidelity(reference, tmp_path):
    ref, pth = reference
    module, params = load_fid_inception(pth, image_size=SIZE)
    images = torch.randint(0, 256, (1, 3, SIZE, SIZE), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():  # at its own size the TF1-style resize is the identity; then (x - 128) / 128
        want_pool, want_logits = (t.numpy() for t in ref(images))
    x = (images.permute(0, 2, 3, 1).numpy().astype(np.float32) - 128.0) / 128.0
    pool, logits = jax.jit(lambda p, x: module.apply({"params": p}, x, logits=True, method="features"))(params, x)
    assert pool.shape == (1, 2048) and logits.shape == (1, 1008)
    np.testing.assert_allclose(np.asarray(pool), want_pool, rtol=1e-4, atol=1e-4 * np.abs(want_pool).max())
    np.testing.assert_allclose(np.asarray(logits), want_logits, rtol=1e-4, atol=1e-4 * np.abs(want_logits).max())

    safetensors = str(tmp_path / "inception.safetensors")  # the same weights, read without torch
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, safetensors)
    same = traverse_util.flatten_dict(load_fid_inception(safetensors)[1])
    assert same.keys() == traverse_util.flatten_dict(params).keys()
    for k, v in traverse_util.flatten_dict(params).items():
        np.testing.assert_array_equal(np.asarray(same[k]), np.asarray(v))


def test_preprocess_is_pytorch_fid_bilinear_resize_and_scaling():
    x = np.random.default_rng(0).random((2, 23, 41, 3)).astype(np.float32)  # up in H, down in W
    module = FIDInceptionV3(image_size=31)
    got = np.asarray(module.apply({}, jnp.asarray(x), method="preprocess"))
    want = 2 * F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=(31, 31), mode="bilinear",
                             align_corners=False) - 1
    np.testing.assert_allclose(got, want.permute(0, 2, 3, 1).numpy(), atol=2e-6)
    same = np.asarray(FIDInceptionV3(image_size=23).apply({}, jnp.asarray(x[:, :, :23]), method="preprocess"))
    np.testing.assert_allclose(same, 2 * x[:, :, :23] - 1, atol=1e-7)


def test_torchvision_imagenet_inception_weights_are_refused(tmp_path):
    path = str(tmp_path / "inception_v3_google.safetensors")
    save_file({"fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000),
               "AuxLogits.fc.weight": torch.zeros(1000, 768)}, path)
    with pytest.raises(CheckpointError, match=r"inception_v3_google\.safetensors: an Inception-v3 but not FID's "
                                              r"\(fc \(1000, 2048\), auxiliary head present\)"):
        load_fid_inception(path)


def test_fid_from_features_is_exact_for_few_and_many_images():
    rng = np.random.default_rng(0)
    mix = rng.normal(size=(64, 64))
    for n in (5, 50, 200):  # fewer images than dimensions (Gram route) and more (covariance route)
        a = rng.normal(size=(n, 64)) @ mix
        b = rng.normal(0.2, 1.1, size=(n + 3, 64)) @ mix
        (mu1, s1), (mu2, s2) = fid.activation_statistics(a), fid.activation_statistics(b)
        ev = np.linalg.eigvals(s1 @ s2).real  # tr sqrt(S1 S2) from the general eigenvalues
        want = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(ev, 0, None)).sum()
        np.testing.assert_allclose(fid.fid_from_features(a, b), want, rtol=1e-7)
    assert abs(fid.fid_from_features(a, a)) < 1e-6 * np.trace(s1)
    with pytest.raises(ValueError, match="at least 2 images"):
        fid.fid_from_features(a[:1], b)
