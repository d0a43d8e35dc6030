"""LPIPS-VGG parity with the `lpips` package, through weights saved to files and `load_lpips`.

`lpips` imports torchvision at import time only to build `tv.vgg16(pretrained=...).features`, and
torchvision does not import beside our torch. So a stand-in `torchvision.models.vgg16` is put in
`sys.modules` while `lpips` is imported: it builds the same `features` Sequential in plain torch
(torchvision's exact layer indices) with random weights. Everything else (scaling layer, the slices
at relu1_2..relu5_3, normalisation, linear heads, spatial average) is the real package's code;
nothing is downloaded (lin weights come from `model_path`, the trunk from the stand-in).
Install it with `pip install --no-deps lpips==0.1.4`: its declared torchvision dependency would pull
a torchvision that fails to import beside our torch and breaks other libraries' optional imports.
"""
import os
import sys
import types

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
from safetensors.torch import save_file  # noqa: E402

from diffrestorer_jax.convert.core import CheckpointError  # noqa: E402
from diffrestorer_jax.convert.lpips import load_lpips  # noqa: E402
from diffrestorer_jax.metrics.lpips import VGG16_BLOCKS  # noqa: E402

RTOL = 1e-4


def _torch_vgg16_features():
    """torchvision's vgg16 `features` layout: conv3x3+ReLU, max-pool between blocks (31 layers)."""
    layers, c_in = [], 3
    for b, block in enumerate(VGG16_BLOCKS):
        if b:
            layers.append(torch.nn.MaxPool2d(2, 2))
        for index, c_out in block:
            assert len(layers) == index, "layer indices must match torchvision's"
            layers += [torch.nn.Conv2d(c_in, c_out, 3, padding=1), torch.nn.ReLU(inplace=True)]
            c_in = c_out
    layers.append(torch.nn.MaxPool2d(2, 2))
    return torch.nn.Sequential(*layers)


@pytest.fixture(scope="module")
def lpips_pkg():
    """The real `lpips` package, imported with a stand-in torchvision that never downloads."""
    tv = types.ModuleType("torchvision")
    tv.models = types.ModuleType("torchvision.models")
    tv.models.vgg16 = lambda pretrained=False, **_: types.SimpleNamespace(
        features=_torch_vgg16_features())
    saved = {k: sys.modules.get(k) for k in ("torchvision", "torchvision.models")}
    sys.modules.update({"torchvision": tv, "torchvision.models": tv.models})
    try:
        for k in [k for k in sys.modules if k == "lpips" or k.startswith("lpips.")]:
            del sys.modules[k]
        lpips = pytest.importorskip("lpips", reason="pip install --no-deps lpips==0.1.4 (its torchvision "
                                    "dependency does not import beside our torch)")
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return lpips


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Random trunk (safetensors, with a classifier to ignore) and random non-negative lin heads (.pth)."""
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("lpips")
    feats = _torch_vgg16_features()
    trunk = {f"features.{k}": v for k, v in feats.state_dict().items()}
    trunk["classifier.0.weight"] = torch.zeros(4, 8)
    save_file(trunk, str(d / "vgg16.safetensors"))
    lins = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1)
            for i, c in enumerate((64, 128, 256, 512, 512))}
    torch.save(lins, str(d / "lin.pth"))
    return feats, str(d / "vgg16.safetensors"), str(d / "lin.pth")


def _reference(lpips_pkg, feats, lin_path, x0, x1):
    model = lpips_pkg.LPIPS(net="vgg", pretrained=True, model_path=lin_path, verbose=False)
    trunk = model.net
    state = {}
    for s in range(1, 6):  # put our random trunk into the package's slices
        for name, _ in getattr(trunk, f"slice{s}").named_parameters():
            state[f"slice{s}.{name}"] = feats.state_dict()[name]
    trunk.load_state_dict(state)
    to_t = lambda a: torch.from_numpy(np.array(a)).permute(0, 3, 1, 2)
    with torch.no_grad():
        return model(to_t(x0), to_t(x1)).reshape(-1).numpy()


def _images():
    k0, k1 = jax.random.split(jax.random.PRNGKey(0))
    x0 = jax.random.uniform(k0, (2, 48, 64, 3), minval=-1, maxval=1)
    x1 = np.clip(x0 + 0.3 * jax.random.normal(k1, x0.shape), -1, 1)
    return np.asarray(x0), np.asarray(x1)


def test_parity_with_lpips_package(lpips_pkg, files):
    feats, vgg_path, lin_path = files
    module, params = load_lpips(vgg_path, lin_path)
    x0, x1 = _images()
    apply = jax.jit(lambda p, a, b: module.apply({"params": p}, a, b))
    got = np.asarray(apply(params, x0, x1))
    want = _reference(lpips_pkg, feats, lin_path, x0, x1)
    assert got.shape == (2,) and want.min() > 0
    np.testing.assert_allclose(got, want, rtol=RTOL)
    np.testing.assert_allclose(apply(params, x0, x0), 0.0, atol=1e-7)

    # the package's own calibrated heads (a CUDA-saved pickle) load too, and agree as well
    real_lin = os.path.join(os.path.dirname(lpips_pkg.__file__), "weights", "v0.1", "vgg.pth")
    _, params_real = load_lpips(vgg_path, real_lin)
    np.testing.assert_allclose(apply(params_real, x0, x1),
                               _reference(lpips_pkg, feats, real_lin, x0, x1), rtol=RTOL)


def test_wrong_files_are_reported(files):
    _, vgg_path, lin_path = files
    with pytest.raises(CheckpointError, match="missing.*lin0/kernel"):
        load_lpips(vgg_path, vgg_path)  # trunk file given for the heads
    with pytest.raises(CheckpointError, match="features_0"):
        load_lpips(lin_path, lin_path)
