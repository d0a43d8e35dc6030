"""torch-fidelity's pure-torch FID Inception-v3 as a reference with random weights (for the FID parity
test and the evaluate command's FID test). Not a test file.

torch-fidelity's package `__init__` imports torchvision, which does not import beside our CPU torch,
so its `feature_extractor_inceptionv3` module is imported with the package's folder registered
directly (its own imports are torch-only); `pip install --no-deps torch-fidelity==0.4.0`.
"""
import importlib.util
import os
import sys
import types

import pytest
import torch

SIZE = 139


def fidelity_inception():
    """torch-fidelity's FeatureExtractorInceptionV3 module, without its torchvision-importing package init."""
    if "torch_fidelity" not in sys.modules:  # (find_spec refuses the registered folder: no __spec__)
        spec = importlib.util.find_spec("torch_fidelity")
        if spec is None:
            pytest.skip("pip install --no-deps torch-fidelity==0.4.0 (the FID Inception reference)")
        package = types.ModuleType("torch_fidelity")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["torch_fidelity"] = package
    import torch_fidelity.feature_extractor_inceptionv3 as module
    return module


def random_reference(tmp_dir, size=SIZE):
    """(torch reference network at `size`, path of its weights saved as a .pth state dict)."""
    base = fidelity_inception().FeatureExtractorInceptionV3

    class Reference(base):
        INPUT_IMAGE_SIZE = size

        def load_state_dict(self, state_dict, strict=True, assign=False):
            return super().load_state_dict(state_dict, strict, assign) if state_dict else None

    empty = os.path.join(tmp_dir, "empty.pth")
    torch.save({}, empty)
    torch.manual_seed(0)
    ref = Reference("inception-v3-compat", ["2048", "logits"], feature_extractor_weights_path=empty)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    path = os.path.join(tmp_dir, "pt_inception-random.pth")
    torch.save(ref.state_dict(), path)
    return ref, path
