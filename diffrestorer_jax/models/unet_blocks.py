"""The Stable Diffusion UNet's building blocks, mirroring diffusers' module and parameter names.

Each class has the diffusers name and the same submodule names, so a diffusers key such as
`down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k.weight` lands on
`down_blocks_0/attentions_1/transformer_blocks_0/attn2/to_k/kernel` by `convert.core`'s mechanical
rules. Only what Stable Diffusion 1.x/2.x use is implemented (no dropout: these are frozen or
fine-tuned without it; no adapters, no class embeddings).

The same classes build the ControlNet copy in `control.py`, hence every block takes
`(hidden, temb, context)` and returns what diffusers returns.
NHWC images, [B, L, D] tokens.
"""
from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffrestorer_jax.models.attention import dot_product_attention
from diffrestorer_jax.models.layers import Conv, Dense, GroupNorm, LayerNorm, constrain
from diffrestorer_jax.models.upsample_conv import UpsampleConv

Dtype = Any
IMAGE_AXES = ("activation_batch", "activation_height", "activation_width", "activation_channels")
TOKEN_AXES = ("activation_batch", "activation_length", "activation_embed")

# 'full' recomputes everything in the backward pass (least memory); 'save_dots' keeps matmul/conv
# outputs and recomputes the cheap elementwise work and norms in between.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.checkpoint_dots,
}


def remat_class(cls, policy: str):
    """`cls` wrapped in `nn.remat` with the named policy ('none' returns `cls` unchanged)."""
    if policy not in REMAT_POLICIES:
        raise ValueError(f"remat_policy must be one of {sorted(REMAT_POLICIES)}, got {policy!r}")
    if policy == "none":
        return cls
    return nn.remat(cls, policy=REMAT_POLICIES[policy])


def timestep_embedding(timesteps: jax.Array, dim: int, flip_sin_to_cos: bool = True,
                       freq_shift: float = 0.0, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding of (possibly fractional) timesteps [N] -> [N, dim], in float32.

    Same formula and operation order as diffusers' `get_timestep_embedding`, so fp32 results agree
    to rounding: frequencies exp(-log(max_period) * i / (half - freq_shift)).
    """
    half = dim // 2
    exponent = -np.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """linear_1 -> SiLU -> linear_2 on the sinusoidal embedding (float32: it is tiny and feeds
    every block, so its rounding would spread everywhere)."""
    features: int
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = Dense(self.features, names=("embed", "mlp"), dtype=jnp.float32,
                  param_dtype=self.param_dtype, name="linear_1")(x.astype(jnp.float32))
        return Dense(self.features, names=("mlp", "embed"), dtype=jnp.float32,
                     param_dtype=self.param_dtype, name="linear_2")(nn.silu(x))


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-conv, + projected time embedding, GroupNorm-SiLU-conv, + (1x1-projected) input."""
    out_channels: int
    groups: int = 32
    eps: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.silu(GroupNorm(self.groups, epsilon=self.eps, name="norm1", **kw)(x))
        h = Conv(self.out_channels, 3, name="conv1", **kw)(h)
        t = Dense(self.out_channels, names=("mlp", "embed"), name="time_emb_proj", **kw)(nn.silu(temb))
        h = h + t[:, None, None, :].astype(h.dtype)
        h = nn.silu(GroupNorm(self.groups, epsilon=self.eps, name="norm2", **kw)(h))
        h = Conv(self.out_channels, 3, name="conv2", **kw)(h)
        if x.shape[-1] != self.out_channels:
            x = Conv(self.out_channels, 1, name="conv_shortcut", **kw)(x)
        return constrain(x.astype(h.dtype) + h, IMAGE_AXES)


class Attention(nn.Module):
    """Multi-head attention: bias-free to_q/to_k/to_v, biased to_out_0; self-attention if no context."""
    heads: int
    dim_head: int
    upcast_attention: bool = False
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context=None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        context = x if context is None else context
        inner = self.heads * self.dim_head

        def project(name, src):
            y = Dense(inner, names=("embed", "heads"), use_bias=False, name=name, **kw)(src)
            return y.reshape(y.shape[0], y.shape[1], self.heads, self.dim_head)

        q, k, v = project("to_q", x), project("to_k", context), project("to_v", context)
        out = dot_product_attention(q, k, v, scale=self.dim_head ** -0.5,
                                    implementation=self.attention_impl, upcast=self.upcast_attention)
        out = out.reshape(out.shape[0], out.shape[1], inner)
        return Dense(x.shape[-1], names=("heads", "embed"), name="to_out_0", **kw)(out)


class GEGLU(nn.Module):
    """proj to 2*inner, then value * GELU(gate) (exact erf GELU, as torch's default)."""
    inner: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = Dense(2 * self.inner, names=("embed", "mlp"), dtype=self.dtype,
                  param_dtype=self.param_dtype, name="proj")(x)
        value, gate = jnp.split(h, 2, axis=-1)
        return value * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """diffusers' FeedForward with GEGLU: net_0 (GEGLU), net_1 (dropout, absent), net_2 (linear)."""
    mult: int = 4
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = GEGLU(x.shape[-1] * self.mult, name="net_0", **kw)(x)
        return Dense(x.shape[-1], names=("mlp", "embed"), name="net_2", **kw)(h)


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm self-attention, cross-attention on the context, GEGLU feed-forward."""
    heads: int
    dim_head: int
    upcast_attention: bool = False
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attn = dict(heads=self.heads, dim_head=self.dim_head, upcast_attention=self.upcast_attention,
                    attention_impl=self.attention_impl, **kw)
        x = x + Attention(name="attn1", **attn)(LayerNorm(name="norm1", **kw)(x))
        x = x + Attention(name="attn2", **attn)(LayerNorm(name="norm2", **kw)(x), context)
        x = x + FeedForward(name="ff", **kw)(LayerNorm(name="norm3", **kw)(x))
        return constrain(x, TOKEN_AXES)


class Transformer2DModel(nn.Module):
    """GroupNorm, proj_in (1x1 conv, or linear with `use_linear_projection`), transformer blocks on
    the H*W tokens, proj_out, plus the input. The GroupNorm epsilon is 1e-6 in diffusers."""
    heads: int
    dim_head: int
    num_layers: int = 1
    groups: int = 32
    use_linear_projection: bool = False
    upcast_attention: bool = False
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, hgt, wid, ch = x.shape
        inner = self.heads * self.dim_head
        h = GroupNorm(self.groups, epsilon=1e-6, name="norm", **kw)(x)
        if self.use_linear_projection:
            h = Dense(inner, names=("embed", "heads"), name="proj_in", **kw)(h.reshape(b, hgt * wid, ch))
        else:
            h = Conv(inner, 1, name="proj_in", **kw)(h).reshape(b, hgt * wid, inner)
        h = constrain(h, TOKEN_AXES)
        for i in range(self.num_layers):
            h = BasicTransformerBlock(self.heads, self.dim_head, self.upcast_attention,
                                      self.attention_impl, name=f"transformer_blocks_{i}", **kw)(h, context)
        if self.use_linear_projection:
            h = Dense(ch, names=("heads", "embed"), name="proj_out", **kw)(h).reshape(b, hgt, wid, ch)
        else:
            h = Conv(ch, 1, name="proj_out", **kw)(h.reshape(b, hgt, wid, inner))
        return constrain(h + x.astype(h.dtype), IMAGE_AXES)


class Downsample2D(nn.Module):
    """A stride-2 3x3 convolution with padding 1 (diffusers' `use_conv=True`, `padding=1`)."""
    out_channels: int
    padding: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        return Conv(self.out_channels, 3, stride=2, padding=self.padding, dtype=self.dtype,
                    param_dtype=self.param_dtype, name="conv")(x)


def nearest_resize(x: jax.Array, size: Tuple[int, int]) -> jax.Array:
    """PyTorch's `interpolate(mode='nearest')` on NHWC: source index floor(dst * in/out) in float32."""
    h, w = x.shape[1:3]
    if tuple(size) == (2 * h, 2 * w):
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)

    def index(n_in, n_out):
        scale = np.float32(n_in) / np.float32(n_out)
        return np.minimum(np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int32), n_in - 1)

    return x[:, index(h, size[0])][:, :, index(w, size[1])]


class Upsample2D(nn.Module):
    """Nearest-neighbour x2 (or to `size`, when the down path met odd sizes) then a 3x3 conv."""
    out_channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, size: Optional[Tuple[int, int]] = None):
        size = size if size is not None else (2 * x.shape[1], 2 * x.shape[2])
        if tuple(size) == (2 * x.shape[1], 2 * x.shape[2]):  # on CPU without the upsampled copy
            return UpsampleConv(self.out_channels, dtype=self.dtype, param_dtype=self.param_dtype,
                                name="conv")(x)
        return Conv(self.out_channels, 3, dtype=self.dtype, param_dtype=self.param_dtype,
                    name="conv")(nearest_resize(x, size))


class _BlockBase(nn.Module):
    """Fields shared by all UNet blocks (down, up, mid)."""
    out_channels: int
    num_layers: int = 2
    transformer_layers: int = 1
    heads: int = 8
    groups: int = 32
    eps: float = 1e-5
    use_linear_projection: bool = False
    upcast_attention: bool = False
    attention_impl: str = "auto"
    remat_policy: str = "none"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def resnet(self, name: str):
        cls = remat_class(ResnetBlock2D, self.remat_policy)
        return cls(self.out_channels, self.groups, self.eps, dtype=self.dtype,
                   param_dtype=self.param_dtype, name=name)

    def transformer(self, name: str):
        if self.out_channels % self.heads:
            raise ValueError(f"{self.name}: {self.out_channels} channels do not split into "
                             f"{self.heads} attention heads")
        cls = remat_class(Transformer2DModel, self.remat_policy)
        return cls(self.heads, self.out_channels // self.heads, self.transformer_layers, self.groups,
                   self.use_linear_projection, self.upcast_attention, self.attention_impl,
                   dtype=self.dtype, param_dtype=self.param_dtype, name=name)


class DownBlock2D(_BlockBase):
    """`num_layers` resnets, then an optional stride-2 downsampler; every output is a skip."""
    add_downsample: bool = True
    has_attention = False

    @nn.compact
    def __call__(self, x, temb, context=None):
        skips = []
        for i in range(self.num_layers):
            x = self.resnet(f"resnets_{i}")(x, temb)
            if self.has_attention:
                x = self.transformer(f"attentions_{i}")(x, context)
            skips.append(x)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, dtype=self.dtype, param_dtype=self.param_dtype,
                             name="downsamplers_0")(x)
            x = constrain(x, IMAGE_AXES)
            skips.append(x)
        return x, tuple(skips)


class CrossAttnDownBlock2D(DownBlock2D):
    """DownBlock2D with a Transformer2DModel after each resnet."""
    has_attention = True


class UpBlock2D(_BlockBase):
    """`num_layers` resnets, each fed the concatenation with one skip (last first), then an optional
    upsampler (to `upsample_size` when given)."""
    add_upsample: bool = True
    has_attention = False

    @nn.compact
    def __call__(self, x, skips: Sequence[jax.Array], temb, context=None, upsample_size=None):
        if len(skips) != self.num_layers:
            raise ValueError(f"{self.name}: got {len(skips)} skip features for {self.num_layers} resnets")
        for i in range(self.num_layers):
            skip = skips[-1 - i]
            x = jnp.concatenate([x, skip.astype(x.dtype)], axis=-1)
            x = self.resnet(f"resnets_{i}")(x, temb)
            if self.has_attention:
                x = self.transformer(f"attentions_{i}")(x, context)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, dtype=self.dtype, param_dtype=self.param_dtype,
                           name="upsamplers_0")(x, upsample_size)
            x = constrain(x, IMAGE_AXES)
        return x


class CrossAttnUpBlock2D(UpBlock2D):
    """UpBlock2D with a Transformer2DModel after each resnet."""
    has_attention = True


class UNetMidBlock2DCrossAttn(_BlockBase):
    """resnet, then (transformer, resnet) x num_layers; keeps the channel count."""
    num_layers: int = 1

    @nn.compact
    def __call__(self, x, temb, context):
        x = self.resnet("resnets_0")(x, temb)
        for i in range(self.num_layers):
            x = self.transformer(f"attentions_{i}")(x, context)
            x = self.resnet(f"resnets_{i + 1}")(x, temb)
        return x


DOWN_BLOCKS = {"CrossAttnDownBlock2D": CrossAttnDownBlock2D, "DownBlock2D": DownBlock2D}
UP_BLOCKS = {"CrossAttnUpBlock2D": CrossAttnUpBlock2D, "UpBlock2D": UpBlock2D}
