"""The Degradation-aware Decoder (paper-notes section 5): the SD VAE decoder with the LQ image's
VAE-encoder features fused in at every level through FiLM-modulated residual dense blocks.

The main path is the SD VAE's own `post_quant_conv` and `decoder` (`init_decoder_from_vae` copies
them in). At decoder level k, after its resnets, the LQ encoder feature of the same resolution is
fused [D]:  F <- F_dec + w * ZeroConv1x1(RDB(FiLM_pd(Conv3x3(concat(F_enc, F_dec))))),
with RDB ESRGAN's residual dense block and FiLM_pd a zero-initialised scale/shift from mean(P_D).
The zero convs make the decoder equal the SD VAE decoder at init for any fidelity weight w (traced,
scalar or [N]); w = 0 is the plain VAE decode.

Optional image-level fusion (`image_fusion_width` > 0, off for the SD configs): one more fusion of
the same form after the output conv, with the LQ image itself as F_enc, for small VAEs whose
reconstructions are far below a mildly degraded input. `image_fusion_base='lq'` swaps its inputs:
out = LQ + w * ZeroConv(RDB(FiLM(Conv(concat(decoded, LQ))))), so "change nothing" is where training
starts (the output equals the LQ image at init and at w = 0).
"""
from typing import Any, Dict, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffrestorer_jax.models.control import copy_subtrees
from diffrestorer_jax.models.layers import Conv, Dense, ZeroConv, constrain
from diffrestorer_jax.models.vae import IMAGE_AXES, AutoencoderKL, Decoder

Dtype = Any
_VAE_KEYS_USED = ("latent_channels", "out_channels", "block_out_channels", "layers_per_block",
                  "norm_num_groups", "mid_block_add_attention", "use_post_quant_conv")


class ResidualDenseBlock(nn.Module):
    """ESRGAN's RDB: x + 0.2 * conv_n(cat(x, x1, ..., x_{n-1})), x_j = lrelu(conv_j(cat(x, ..x_{j-1})))."""
    growth: int = 32
    num_convs: int = 5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        feats = [x]
        for j in range(self.num_convs - 1):
            h = Conv(self.growth, 3, name=f"conv{j + 1}", **kw)(jnp.concatenate(feats, axis=-1))
            feats.append(nn.leaky_relu(h, 0.2))
        out = Conv(x.shape[-1], 3, name=f"conv{self.num_convs}", **kw)(jnp.concatenate(feats, axis=-1))
        return constrain(x + 0.2 * out, IMAGE_AXES)


class LevelFusion(nn.Module):
    """(F_dec, F_enc, pooled P_D, w) -> F_dec + w * zero_conv(RDB(FiLM(conv_in(cat(F_enc, F_dec))))).

    The RDB works at `width` channels (default: F_dec's `channels`)."""
    channels: int
    growth: int = 32
    num_convs: int = 5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    width: int = 0

    @nn.compact
    def __call__(self, f_dec, f_enc, pooled, weight):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        width = self.width or self.channels
        h = Conv(width, 3, name="conv_in", **kw)(
            jnp.concatenate([f_enc.astype(self.dtype), f_dec.astype(self.dtype)], axis=-1))
        film = Dense(2 * width, names=("embed", "mlp"), kernel_init=nn.initializers.zeros_init(),
                     name="film", **kw)(pooled.astype(self.dtype))
        scale, shift = jnp.split(film, 2, axis=-1)
        h = h * (1 + scale[:, None, None, :]) + shift[:, None, None, :]
        h = ResidualDenseBlock(self.growth, self.num_convs, name="rdb", **kw)(h)
        h = ZeroConv(self.channels, 1, name="conv_out", **kw)(h)
        return constrain(f_dec + weight * h.astype(f_dec.dtype), IMAGE_AXES)


class DegradationAwareDecoder(nn.Module):
    """(z in latent units [N,h,w,C], lq_features (from `AutoencoderKL.encode(lq, return_features=True)`),
    pooled P_D [N, D], fidelity_weight) -> image [N, h*f, w*f, out_channels] in [-1, 1].

    Fields: the SD VAE's decoder-side config fields + `rdb_growth`, `rdb_convs`,
    `image_fusion_width` (0 = off; else pass `lq_image`, the LQ image in [-1, 1]),
    `image_fusion_base` ('decoder': the image-level fusion corrects the decoded image; 'lq': it
    corrects the LQ image, see the module doc).
    """
    latent_channels: int = 4
    out_channels: int = 3
    block_out_channels: Sequence[int] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    mid_block_add_attention: bool = True
    use_post_quant_conv: bool = True
    rdb_growth: int = 32
    rdb_convs: int = 5
    image_fusion_width: int = 0
    image_fusion_base: str = "decoder"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "auto"

    @classmethod
    def from_vae_config(cls, vae_config: Mapping[str, Any], **overrides) -> "DegradationAwareDecoder":
        """From a diffusers AutoencoderKL config dict (validated by `AutoencoderKL.from_config`);
        `overrides` sets rdb_growth, rdb_convs, dtype, ..."""
        AutoencoderKL.from_config(dict(vae_config))  # refuses VAE variants we do not implement
        kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in vae_config.items() if k in _VAE_KEYS_USED}
        kwargs.update(overrides)
        return cls(**kwargs)

    def setup(self):
        if self.image_fusion_base not in ("decoder", "lq"):
            raise ValueError(f"DegradationAwareDecoder: image_fusion_base must be 'decoder' or 'lq', "
                             f"got {self.image_fusion_base!r}")
        if self.rdb_convs < 2:
            raise ValueError(f"DegradationAwareDecoder: rdb_convs must be >= 2, got {self.rdb_convs}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.decoder = Decoder(self.out_channels, tuple(self.block_out_channels), self.layers_per_block,
                               self.norm_num_groups, self.mid_block_add_attention,
                               attention_impl=self.attention_impl, **kw)
        if self.use_post_quant_conv:
            self.post_quant_conv = Conv(self.latent_channels, 1, **kw)
        self.fusions = [LevelFusion(c, self.rdb_growth, self.rdb_convs, **kw)
                        for c in reversed(tuple(self.block_out_channels))]
        if self.image_fusion_width:
            self.image_fusion = LevelFusion(self.out_channels, self.rdb_growth, self.rdb_convs,
                                            width=self.image_fusion_width, **kw)

    def __call__(self, z, lq_features: Sequence[jax.Array], p_d_pooled, fidelity_weight=1.0, lq_image=None):
        n = len(self.block_out_channels)
        if self.image_fusion_width and lq_image is None:
            raise ValueError("DegradationAwareDecoder: image_fusion_width > 0 needs lq_image (the LQ image "
                             "in [-1, 1])")
        if len(lq_features) != n:
            raise ValueError(f"DegradationAwareDecoder: got {len(lq_features)} LQ feature maps, the decoder "
                             f"has {n} levels (pass AutoencoderKL.encode(lq, return_features=True)[2])")
        w = jnp.asarray(fidelity_weight, self.dtype)
        if w.ndim == 1:
            w = w[:, None, None, None]
        if self.use_post_quant_conv:
            z = self.post_quant_conv(z.astype(self.dtype))
        h = self.decoder.stem(z)
        for k, block in enumerate(self.decoder.up_blocks):
            h = block.run_resnets(h)
            f_enc = lq_features[n - 1 - k]
            if tuple(f_enc.shape) != tuple(h.shape):
                raise ValueError(f"DegradationAwareDecoder: lq_features[{n - 1 - k}] has shape "
                                 f"{tuple(f_enc.shape)}, decoder level {k} has {tuple(h.shape)} (LQ image "
                                 f"and latent sizes must agree with the VAE factor)")
            h = self.fusions[k](h, f_enc, p_d_pooled, w)
            h = block.upsample(h)
        out = self.decoder.head(h)
        if self.image_fusion_width:
            if tuple(lq_image.shape) != tuple(out.shape):
                raise ValueError(f"DegradationAwareDecoder: lq_image has shape {tuple(lq_image.shape)}, "
                                 f"the decoded image {tuple(out.shape)}")
            if self.image_fusion_base == "lq":
                out = self.image_fusion(lq_image.astype(out.dtype), out, p_d_pooled, w)
            else:
                out = self.image_fusion(out, lq_image, p_d_pooled, w)
        return out


def init_decoder_from_vae(decoder_params: Mapping, vae_params: Mapping) -> Dict:
    """The decoder params with `post_quant_conv` and `decoder` copied from the SD VAE's params
    (boxed or plain trees); the fusion params are kept."""
    return copy_subtrees(decoder_params, vae_params, ("post_quant_conv", "decoder"), "init_decoder_from_vae")
