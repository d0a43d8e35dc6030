"""The Stable Diffusion VAE (diffusers `AutoencoderKL`) in Flax Linen, NHWC, images in [-1, 1].

Parameter names mirror diffusers (`encoder/down_blocks_0/resnets_1/conv1/kernel`), so a diffusers or
CompVis checkpoint loads by the mechanical rules of `convert.core`.

Level-by-level use (the degradation-aware decoder). The Decoder is a `setup` module whose submodules
are plain attributes (`conv_in`, `mid_block`, `up_blocks[k]` with `.resnets[j]` / `.upsamplers[0]`,
`conv_norm_out`, `conv_out`) and whose `__call__` is a plain loop over them, so a subclass can extend
`setup()` with fusion modules and re-write `__call__` with a hook between levels, keeping every
pretrained parameter name. `Encoder.__call__(x, return_features=True)` returns one feature map per
down level, and `features[i]` has the resolution AND channel count of decoder level
`up_blocks[n - 1 - i]` before its upsampler (see `Encoder`).
"""
import math
from typing import Any, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffrestorer_jax.models.attention import dot_product_attention
from diffrestorer_jax.models.layers import Conv, Dense, GroupNorm, constrain
from diffrestorer_jax.models.upsample_conv import UpsampleConv

Dtype = Any
IMAGE_AXES = ("activation_batch", "activation_height", "activation_width", "activation_channels")
# diffusers builds every VAE norm with eps 1e-6 (not PyTorch's default 1e-5).
VAE_NORM_EPS = 1e-6


class ResnetBlock2D(nn.Module):
    """The VAE resnet block: GN-SiLU-conv twice plus a (1x1-conv) shortcut; no time embedding."""
    out_channels: int
    groups: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = GroupNorm(self.groups, epsilon=VAE_NORM_EPS, name="norm1", **kw)(x)
        h = Conv(self.out_channels, 3, name="conv1", **kw)(nn.silu(h))
        h = GroupNorm(self.groups, epsilon=VAE_NORM_EPS, name="norm2", **kw)(h)
        h = Conv(self.out_channels, 3, name="conv2", **kw)(nn.silu(h))
        if x.shape[-1] != self.out_channels:
            x = Conv(self.out_channels, 1, name="conv_shortcut", **kw)(x)
        return constrain(x + h, IMAGE_AXES)


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv after padding one zero row/column at the bottom/right only.

    This asymmetric pad is what diffusers (and the original LDM) do in the VAE encoder; a symmetric
    padding would sample shifted pixels and break parity with pretrained weights.
    """
    channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        return Conv(self.channels, 3, stride=2, padding=((0, 1), (0, 1)), name="conv",
                    dtype=self.dtype, param_dtype=self.param_dtype)(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv (`upsample_conv`: on CPU without the upsampled copy)."""
    channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        return UpsampleConv(self.channels, name="conv", dtype=self.dtype, param_dtype=self.param_dtype)(x)


class VAEAttention(nn.Module):
    """Single-head self-attention over all pixels with a GroupNorm in front and a residual.

    diffusers sets the head dim to the channel count, so there is exactly one head; the softmax is
    computed in float32 (diffusers' `upcast_softmax=True`).
    """
    groups: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x):
        b, hgt, wid, c = x.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = GroupNorm(self.groups, epsilon=VAE_NORM_EPS, name="group_norm", **kw)(x)
        h = h.reshape(b, hgt * wid, c)
        q, k, v = (Dense(c, names=("embed", "heads"), name=n, **kw)(h).reshape(b, hgt * wid, 1, c)
                   for n in ("to_q", "to_k", "to_v"))
        a = dot_product_attention(q, k, v, scale=1.0 / math.sqrt(c), upcast=True,
                                  implementation=self.attention_impl)
        a = Dense(c, names=("heads", "embed"), name="to_out_0", **kw)(a.reshape(b, hgt * wid, c))
        return constrain(x + a.reshape(b, hgt, wid, c), IMAGE_AXES)


class UNetMidBlock2D(nn.Module):
    """resnets_0 -> attentions_0 -> resnets_1 at the bottleneck resolution (channels unchanged)."""
    channels: int
    groups: int = 32
    add_attention: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "auto"

    def setup(self):
        kw = dict(groups=self.groups, dtype=self.dtype, param_dtype=self.param_dtype)
        self.resnets = [ResnetBlock2D(self.channels, **kw) for _ in range(2)]
        if self.add_attention:
            self.attentions = [VAEAttention(attention_impl=self.attention_impl, **kw)]

    def __call__(self, x):
        x = self.resnets[0](x)
        if self.add_attention:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class DownEncoderBlock2D(nn.Module):
    """`num_layers` resnets, then (unless last) a stride-2 downsampler.

    Returns (output, features): `features` is the last resnet's output, BEFORE the downsampler, i.e.
    at this level's full resolution with `out_channels` channels.
    """
    out_channels: int
    num_layers: int = 2
    groups: int = 32
    add_downsample: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.resnets = [ResnetBlock2D(self.out_channels, self.groups, **kw) for _ in range(self.num_layers)]
        if self.add_downsample:
            self.downsamplers = [Downsample2D(self.out_channels, **kw)]

    def __call__(self, x) -> Tuple[jax.Array, jax.Array]:
        for resnet in self.resnets:
            x = resnet(x)
        features = x
        if self.add_downsample:
            x = self.downsamplers[0](x)
        return x, features


class UpDecoderBlock2D(nn.Module):
    """`num_layers` resnets (layers_per_block + 1 in the decoder), then (unless last) a x2 upsampler.

    A fusing subclass of `Decoder` calls `block.resnets[j]` and `block.upsamplers[0]` itself to insert
    work between the resnets and the upsampler (where the matching encoder feature lives).
    """
    out_channels: int
    num_layers: int = 3
    groups: int = 32
    add_upsample: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.resnets = [ResnetBlock2D(self.out_channels, self.groups, **kw) for _ in range(self.num_layers)]
        if self.add_upsample:
            self.upsamplers = [Upsample2D(self.out_channels, **kw)]

    def run_resnets(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        return x

    def upsample(self, x):
        return self.upsamplers[0](x) if self.add_upsample else x

    def __call__(self, x):
        return self.upsample(self.run_resnets(x))


class Encoder(nn.Module):
    """conv_in -> down_blocks -> mid_block -> GN/SiLU -> conv_out (2 x latent channels: mean, logvar).

    With `return_features=True` also returns `features`, a list of n = len(block_out_channels) maps:
    `features[i]` is the output of `down_blocks[i]`'s last resnet, before its downsampler, shape
    [B, H / 2**i, W / 2**i, block_out_channels[i]] (features[0] is at the input resolution). It lines
    up with decoder level `up_blocks[n - 1 - i]` after its resnets and before its upsampler (same
    resolution, same channels). The deepest map (i = n - 1) is taken before the mid block.
    """
    out_channels: int  # latent channels; conv_out emits twice this (mean and logvar)
    block_out_channels: Sequence[int] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    mid_block_add_attention: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "auto"

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        ch, n = tuple(self.block_out_channels), len(self.block_out_channels)
        self.conv_in = Conv(ch[0], 3, **kw)
        self.down_blocks = [DownEncoderBlock2D(c, self.layers_per_block, self.norm_num_groups,
                                               add_downsample=i < n - 1, **kw) for i, c in enumerate(ch)]
        self.mid_block = UNetMidBlock2D(ch[-1], self.norm_num_groups, self.mid_block_add_attention,
                                        attention_impl=self.attention_impl, **kw)
        self.conv_norm_out = GroupNorm(self.norm_num_groups, epsilon=VAE_NORM_EPS, **kw)
        self.conv_out = Conv(2 * self.out_channels, 3, **kw)

    def __call__(self, x, return_features: bool = False):
        h = self.conv_in(x)
        features = []
        for block in self.down_blocks:
            h, f = block(h)
            features.append(f)
        h = self.mid_block(h)
        h = self.conv_out(nn.silu(self.conv_norm_out(h)))
        return (h, features) if return_features else h


class Decoder(nn.Module):
    """conv_in -> mid_block -> up_blocks (deepest first) -> GN/SiLU -> conv_out, a plain loop.

    `up_blocks[k]` works at resolution latent * 2**k with `reversed(block_out_channels)[k]` channels
    and (for k < n - 1) upsamples x2 at its end.
    """
    out_channels: int = 3
    block_out_channels: Sequence[int] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    mid_block_add_attention: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "auto"

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        rev, n = tuple(reversed(tuple(self.block_out_channels))), len(self.block_out_channels)
        self.conv_in = Conv(rev[0], 3, **kw)
        self.mid_block = UNetMidBlock2D(rev[0], self.norm_num_groups, self.mid_block_add_attention,
                                        attention_impl=self.attention_impl, **kw)
        self.up_blocks = [UpDecoderBlock2D(c, self.layers_per_block + 1, self.norm_num_groups,
                                           add_upsample=k < n - 1, **kw) for k, c in enumerate(rev)]
        self.conv_norm_out = GroupNorm(self.norm_num_groups, epsilon=VAE_NORM_EPS, **kw)
        self.conv_out = Conv(self.out_channels, 3, **kw)

    def stem(self, z):
        """Latent (after post_quant_conv) -> the input of up_blocks[0]."""
        return self.mid_block(self.conv_in(z))

    def head(self, h):
        """Output of the last up block -> image."""
        return self.conv_out(nn.silu(self.conv_norm_out(h)))

    def __call__(self, z):
        h = self.stem(z)
        for block in self.up_blocks:
            h = block(h)
        return self.head(h)


_IGNORED_CONFIG_KEYS = {"_class_name", "_diffusers_version", "_name_or_path", "force_upcast",
                        "latents_mean", "latents_std", "act_fn"}


class AutoencoderKL(nn.Module):
    """The SD VAE. Fields are named as in diffusers' `vae/config.json`.

    encode(x) -> (mean, logvar) in latent units (multiply by `scaling_factor` for the diffusion model);
    decode(z) -> image (z in latent units, i.e. already divided by `scaling_factor`);
    __call__(x) -> decode(mean) (used by `init`, it touches every parameter).
    """
    in_channels: int = 3
    out_channels: int = 3
    down_block_types: Sequence[str] = ("DownEncoderBlock2D",) * 4
    up_block_types: Sequence[str] = ("UpDecoderBlock2D",) * 4
    block_out_channels: Sequence[int] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: Any = 512
    scaling_factor: float = 0.18215
    shift_factor: Optional[float] = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "auto"

    @classmethod
    def from_config(cls, config: Dict[str, Any], **overrides) -> "AutoencoderKL":
        """Build from a diffusers config dict; raises ValueError on a VAE variant we do not implement."""
        config = dict(config)
        if config.get("act_fn", "silu") != "silu":
            raise ValueError(f"AutoencoderKL: act_fn={config['act_fn']!r} is not supported (only 'silu')")
        for key, want in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            bad = [t for t in config.get(key, ()) if t != want]
            if bad:
                raise ValueError(f"AutoencoderKL: {key} {bad} not supported (only {want})")
        fields = set(cls.__dataclass_fields__) - {"parent", "name"}
        unknown = set(config) - fields - _IGNORED_CONFIG_KEYS
        if unknown:
            raise ValueError(f"AutoencoderKL: unknown config keys {sorted(unknown)}")
        kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in config.items() if k in fields}
        kwargs.update(overrides)
        return cls(**kwargs)

    def setup(self):
        if len(self.down_block_types) != len(self.block_out_channels):
            raise ValueError(f"AutoencoderKL: {len(self.down_block_types)} down_block_types but "
                             f"{len(self.block_out_channels)} block_out_channels")
        common = dict(block_out_channels=tuple(self.block_out_channels), layers_per_block=self.layers_per_block,
                      norm_num_groups=self.norm_num_groups, mid_block_add_attention=self.mid_block_add_attention,
                      dtype=self.dtype, param_dtype=self.param_dtype,
                      attention_impl=self.attention_impl)
        self.encoder = Encoder(self.latent_channels, **common)
        self.decoder = Decoder(self.out_channels, **common)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if self.use_quant_conv:
            self.quant_conv = Conv(2 * self.latent_channels, 1, **kw)
        if self.use_post_quant_conv:
            self.post_quant_conv = Conv(self.latent_channels, 1, **kw)

    def encode(self, x, return_features: bool = False):
        """x: [B, H, W, in_channels] in [-1, 1] -> (mean, logvar) [B, H/f, W/f, latent_channels]
        (+ encoder features, see `Encoder`). logvar is clamped to [-30, 20] like diffusers."""
        h, features = self.encoder(x, return_features=True)
        if self.use_quant_conv:
            h = self.quant_conv(h)
        mean, logvar = jnp.split(h, 2, axis=-1)
        logvar = jnp.clip(logvar, -30.0, 20.0)
        return (mean, logvar, features) if return_features else (mean, logvar)

    def decode(self, z):
        """z: latents in latent units [B, h, w, latent_channels] -> image [B, h*f, w*f, out_channels]."""
        if self.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, x):
        mean, _ = self.encode(x)
        return self.decode(mean)

