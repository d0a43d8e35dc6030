"""LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual
Metric"), VGG variant, v0.1, in Flax: the perceptual distance restoration papers report and our
stage-2 decoder loss uses.

distance(x0, x1) = sum over five VGG16 taps l of mean_{h,w} lin_l( (n(f_l(x0)) - n(f_l(x1)))^2 ),
where the inputs are first shifted/scaled by fixed per-channel constants (ImageNet statistics
expressed for [-1, 1] inputs), f_l is the ReLU output at the end of each VGG block (relu1_2 ...
relu5_3), n normalises each pixel's feature vector to unit length, and lin_l is a learned
non-negative 1x1 convolution to one channel.

Parameter names mirror PyTorch so checkpoints load mechanically: the trunk's convolutions are
`net/features_<i>` for torchvision's `vgg16().features.<i>` (i = 0, 2, 5, ... 28), the heads are
`lin0` ... `lin4`. Weights: `diffrestorer_jax.convert.lpips.load_lpips`.
"""
from typing import Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp

from diffrestorer_jax.models.layers import Conv

# torchvision vgg16 `features`: (layer index of each conv, its output channels), grouped by block.
# Each block ends in a ReLU whose output is an LPIPS tap; a 2x2 max-pool sits between blocks.
VGG16_BLOCKS: Tuple[Tuple[Tuple[int, int], ...], ...] = (
    ((0, 64), (2, 64)),
    ((5, 128), (7, 128)),
    ((10, 256), (12, 256), (14, 256)),
    ((17, 512), (19, 512), (21, 512)),
    ((24, 512), (26, 512), (28, 512)),
)
TAP_CHANNELS = (64, 128, 256, 512, 512)

# The `lpips` package's ScalingLayer constants (for inputs in [-1, 1]).
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)


class VGG16Features(nn.Module):
    """The convolutional trunk of VGG16, returning the five block-final ReLU activations."""
    blocks: Sequence = VGG16_BLOCKS

    @nn.compact
    def __call__(self, x):
        taps = []
        for b, block in enumerate(self.blocks):
            if b:
                x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
            for index, channels in block:
                x = nn.relu(Conv(channels, 3, name=f"features_{index}")(x))
            taps.append(x)
        return taps


def normalize_channels(f, eps: float = 1e-10):
    """Unit-length feature vector per pixel (the reference adds eps to the norm, not under the root)."""
    return f / (jnp.sqrt(jnp.sum(f * f, axis=-1, keepdims=True)) + eps)


class LPIPS(nn.Module):
    """LPIPS-VGG distance between NHWC images in [-1, 1]; returns one value per image [N]."""

    @nn.compact
    def __call__(self, x0, x1):
        shift = jnp.asarray(SHIFT, jnp.float32)
        scale = jnp.asarray(SCALE, jnp.float32)
        x = jnp.concatenate([x0, x1], axis=0).astype(jnp.float32)
        feats = VGG16Features(name="net")((x - shift) / scale)
        n = x0.shape[0]
        total = 0.0
        for i, f in enumerate(feats):
            d = jnp.square(normalize_channels(f[:n]) - normalize_channels(f[n:]))
            per_pixel = Conv(1, 1, padding=0, use_bias=False, name=f"lin{i}")(d)
            total = total + jnp.mean(per_pixel, axis=(1, 2, 3))
        return total


def lpips_unit_range(module: LPIPS, params, a, b):
    """LPIPS for images in [0, 1] (what the evaluate command holds): mapped to [-1, 1] first."""
    return module.apply({"params": params}, 2.0 * a - 1.0, 2.0 * b - 1.0)
