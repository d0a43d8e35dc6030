"""PatchGAN discriminator (pix2pix / taming-transformers NLayerDiscriminator) and hinge losses.

Stage 2 trains the degradation-aware decoder with L1 + LPIPS and, after `gan_start_step`, an
adversarial hinge loss from this discriminator. Layout as in taming's NLayerDiscriminator: a 4x4
stride-2 conv, `n_layers` 4x4 convs (stride 2 but the last, channels doubling up to 8x) with
normalisation and LeakyReLU(0.2), then a 4x4 conv to one logit per patch. GroupNorm replaces
BatchNorm (no batch statistics to carry or synchronise across the mesh). Inputs in [0, 1].
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from diffrestorer_jax.models import layers


class PatchDiscriminator(nn.Module):
    base_channels: int = 64
    n_layers: int = 3
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images):
        kw = dict(dtype=self.dtype, kernel_init=nn.initializers.normal(0.02))
        x = images.astype(self.dtype) * 2.0 - 1.0
        x = nn.leaky_relu(layers.Conv(self.base_channels, 4, stride=2, padding=1, name="conv_0", **kw)(x), 0.2)
        ch = self.base_channels
        for i in range(1, self.n_layers + 1):
            ch = self.base_channels * min(2 ** i, 8)
            stride = 2 if i < self.n_layers else 1
            x = layers.Conv(ch, 4, stride=stride, padding=((1, 2), (1, 2)) if stride == 1 else 1,
                            use_bias=False, name=f"conv_{i}", **kw)(x)
            x = layers.GroupNorm(min(32, ch // 4), dtype=self.dtype, name=f"norm_{i}")(x)
            x = nn.leaky_relu(x, 0.2)
        x = layers.Conv(1, 4, padding=((1, 2), (1, 2)), name="conv_out", **kw)(x)
        return x.astype(jnp.float32)


def hinge_d_loss(logits_real, logits_fake):
    """Discriminator hinge loss: mean(relu(1 - D(x))) + mean(relu(1 + D(G(z)))), halved."""
    return 0.5 * (jnp.mean(nn.relu(1.0 - logits_real)) + jnp.mean(nn.relu(1.0 + logits_fake)))


def hinge_g_loss(logits_fake):
    """Generator side of the hinge GAN: -mean(D(G(z)))."""
    return -jnp.mean(logits_fake)
