"""FID Inception-v3 weights -> `models.inception.FIDInceptionV3` params.

The file people have is pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (torch-fidelity's
`weights-inception-2015-12-05-6726825d.pth` has the same keys), or a safetensors copy of either,
which is read first-class and needs no torch. Pickles go through `torch.load(weights_only=True)`.
Keys mirror the module (`Mixed_5b.branch1x1.conv.weight`, `....bn.running_var`, `fc.weight`), so
loading is the strict mechanical rules of `convert.core`; `num_batches_tracked` counters are
ignored. torchvision's ImageNet Inception-v3 weights are a different network (1000 classes, an
auxiliary head, other pooling) and are refused with that said.
"""
import functools
from typing import Dict, Tuple

from diffrestorer_jax.convert.core import CheckpointError, StateDict, abstract_params, load_into
from diffrestorer_jax.models.inception import FEATURE_DIM, NUM_CLASSES, FIDInceptionV3, example_input

WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"


def load_fid_inception(path: str, image_size: int = 299) -> Tuple[FIDInceptionV3, Dict]:
    """(module, params); `module.apply({'params': params}, x)` maps NHWC [0, 1] images to [N, 2048]."""
    sd = StateDict(path)
    fc = tuple(sd.shape("fc.weight")) if "fc.weight" in sd else None
    if any(k.startswith("AuxLogits.") for k in sd) or (fc is not None and fc != (NUM_CLASSES, FEATURE_DIM)):
        raise CheckpointError(
            f"{path}: an Inception-v3 but not FID's (fc {fc}, auxiliary head "
            f"{'present' if any(k.startswith('AuxLogits.') for k in sd) else 'absent'}): FID needs the "
            f"TensorFlow 2015-12-05 network's weights with {NUM_CLASSES} classes, e.g. pytorch-fid's "
            f"{WEIGHTS_NAME}; torchvision's ImageNet weights give different features")
    module = FIDInceptionV3(image_size=image_size)
    params = load_into(_reference_tree(), sd, ignore_pattern=r"\.num_batches_tracked$",
                       what=f"FID Inception-v3 (pytorch-fid's {WEIGHTS_NAME} layout)")
    return module, params


@functools.lru_cache(maxsize=1)
def _reference_tree():
    """The parameter shapes (the same for every image size); tracing 94 convolutions takes seconds."""
    return abstract_params(FIDInceptionV3(), example_input())
