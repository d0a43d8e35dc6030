"""LPIPS-VGG weights from the two files people have: a torchvision `vgg16` state dict (ImageNet
weights, e.g. `vgg16-397923af.pth` or a safetensors copy) and the `lpips` package's linear heads
(`lpips/weights/v0.1/vgg.pth`, keys `lin<i>.model.1.weight`).

Both go through the strict loader, so a wrong file is reported with every missing or unexpected key;
the VGG classifier is ignored (LPIPS uses only `features`). A full `lpips.LPIPS` state dict
(`net.slice<k>.<i>.*` trunk keys) is accepted for the trunk as well.
"""
import re
from typing import Dict, Tuple

import jax.numpy as jnp

from diffrestorer_jax.convert.core import RenamedStateDict, StateDict, abstract_params, load_into
from diffrestorer_jax.metrics.lpips import LPIPS

_SLICE_KEY = re.compile(r"^net\.slice\d\.(\d+)\.(weight|bias)$")
_LIN_KEY = re.compile(r"^lin(\d)\.(?:model\.1\.)?weight$")


def _trunk_view(sd):
    """torchvision `features.<i>.*` keys as they are; lpips' `net.slice<k>.<i>.*` renamed to them."""
    if any(k.startswith("features.") for k in sd):
        return sd
    rename = {}
    for k in sd:
        m = _SLICE_KEY.match(k)
        rename[f"features.{m.group(1)}.{m.group(2)}" if m else k] = k
    return RenamedStateDict(sd, rename)


def _lin_view(sd):
    """`lin<i>.model.1.weight` (lpips package, Dropout at index 0) or `lin<i>.weight` -> `lin<i>.weight`;
    anything else keeps its name so the strict loader reports it."""
    rename = {}
    for k in sd:
        m = _LIN_KEY.match(k)
        rename[f"lin{m.group(1)}.weight" if m else k] = k
    return RenamedStateDict(sd, rename)


def load_lpips(vgg_path: str, lin_path: str) -> Tuple[LPIPS, Dict]:
    """(module, params) for LPIPS-VGG; `module.apply({'params': params}, x0, x1)` on [-1, 1] NHWC."""
    module = LPIPS()
    probe = jnp.zeros((1, 16, 16, 3), jnp.float32)
    reference = dict(abstract_params(module, probe, probe))
    trunk = load_into(reference.pop("net"), _trunk_view(StateDict(vgg_path)),
                      ignore_pattern=r"^classifier\.", what="VGG16 trunk (torchvision vgg16 features)")
    lins = load_into(reference, _lin_view(StateDict(lin_path)), what="LPIPS linear heads (lin0..lin4)")
    return module, {"net": trunk, **lins}
