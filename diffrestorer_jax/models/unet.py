"""Stable Diffusion's `UNet2DConditionModel` in Flax, equal to diffusers' for SD 1.x and 2.x.

Fields are named like the keys of a diffusers `unet/config.json`, so `from_config(json.load(f))`
builds the same network. The down path (`encode`) is a method of its own because the ControlNet in
`control.py` runs exactly this part (conv_in, time embedding, down blocks, mid block) from the same
setup (`_setup_encoder`).

Dtypes: the sinusoidal + MLP time embedding and conv_norm_out/conv_out run in float32 (they are
cheap, and the predicted noise is the quantity the loss and the sampler see); everything else runs
in `dtype`. The output is float32.
"""
import warnings
from typing import Any, Mapping, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffrestorer_jax.models.layers import Conv, GroupNorm, constrain
from diffrestorer_jax.models.unet_blocks import (DOWN_BLOCKS, IMAGE_AXES, REMAT_POLICIES, UP_BLOCKS,
                                                 TimestepEmbedding, UNetMidBlock2DCrossAttn,
                                                 timestep_embedding)

Dtype = Any
IntOrTuple = Union[int, Tuple[int, ...]]

# diffusers config keys that select features we do not implement; each must hold one of these
# values (the diffusers default), otherwise from_config refuses the config.
_MUST_BE = {
    "act_fn": ("silu",),
    "time_embedding_type": ("positional",),
    "resnet_time_scale_shift": ("default",),
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "addition_embed_type": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "time_cond_proj_dim": (None,),
    "timestep_post_act": (None,),
    "time_embedding_act_fn": (None,),
    "time_embedding_dim": (None,),
    "projection_class_embeddings_input_dim": (None,),
    "addition_time_embed_dim": (None,),
    "class_embeddings_concat": (False,),
    "dual_cross_attention": (False,),
    "only_cross_attention": (False,),
    "mid_block_only_cross_attention": (None, False),
    "cross_attention_norm": (None,),
    "attention_type": ("default",),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1.0,),
    "mid_block_scale_factor": (1.0,),
    "mid_block_type": ("UNetMidBlock2DCrossAttn",),
    "downsample_padding": (1,),
    "reverse_transformer_layers_per_block": (None,),
}
# Keys that do not change the computation (dropout is 0 at inference and we train without it).
_INERT = {"dropout", "addition_embed_type_num_heads", "sample_size"}


def per_block(value, n: int, what: str) -> Tuple:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"UNet config: {what} has {len(value)} entries for {n} blocks: {value}")
        return tuple(value)
    return (value,) * n


class UNet2DConditionModel(nn.Module):
    """The noise-prediction UNet: (latents [N,H,W,C], timesteps, context [N,L,D]) -> [N,H,W,C]."""
    sample_size: Optional[int] = 64
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    down_block_types: Tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    mid_block_type: str = "UNetMidBlock2DCrossAttn"
    up_block_types: Tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    block_out_channels: Tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: IntOrTuple = 2
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 768
    transformer_layers_per_block: IntOrTuple = 1
    # diffusers' SD1 quirk: with num_attention_heads unset, attention_head_dim is the head COUNT.
    attention_head_dim: IntOrTuple = 8
    num_attention_heads: Optional[IntOrTuple] = None
    use_linear_projection: bool = False
    upcast_attention: bool = False
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "auto"
    remat_policy: str = "none"

    # ---------------------------------------------------------------- configuration
    @classmethod
    def from_config(cls, config: Mapping[str, Any], **overrides) -> "UNet2DConditionModel":
        """Build from a diffusers config.json dict; `overrides` sets dtype, attention_impl, ...

        Keys starting with '_' and inert keys are ignored; a key selecting a feature we do not
        implement raises ValueError naming it; unknown keys give a warning and are ignored.
        """
        fields = set(cls.__dataclass_fields__) - {"parent", "name"}
        kwargs = {}
        for key, value in config.items():
            if key.startswith("_") or key in _INERT:
                continue
            if key in _MUST_BE and key not in fields:
                allowed = _MUST_BE[key]
                values = value if isinstance(value, (list, tuple)) else [value]
                if any(v not in allowed for v in values):
                    raise ValueError(f"UNet config: {key}={value!r} is not supported "
                                     f"(only {allowed[0]!r}; this is not an SD 1.x/2.x UNet)")
                continue
            if key not in fields:
                warnings.warn(f"UNet config: ignoring unknown key {key!r}={value!r}")
                continue
            kwargs[key] = tuple(value) if isinstance(value, list) else value
        kwargs.update(overrides)
        module = cls(**kwargs)
        module.validate()
        return module

    def validate(self) -> None:
        """Raise ValueError for configurations this implementation does not cover."""
        n = len(self.block_out_channels)
        for kind, types, known in (("down", self.down_block_types, DOWN_BLOCKS),
                                   ("up", self.up_block_types, UP_BLOCKS)):
            if len(types) != n:
                raise ValueError(f"UNet config: {len(types)} {kind}_block_types for {n} block_out_channels")
            bad = [t for t in types if t not in known]
            if bad:
                raise ValueError(f"UNet config: unsupported {kind} block type(s) {bad}; "
                                 f"supported: {sorted(known)}")
        if self.mid_block_type != "UNetMidBlock2DCrossAttn":
            raise ValueError(f"UNet config: unsupported mid_block_type {self.mid_block_type!r}")
        if self.act_fn != "silu":
            raise ValueError(f"UNet config: unsupported act_fn {self.act_fn!r} (only 'silu')")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy must be one of {sorted(REMAT_POLICIES)}, got {self.remat_policy!r}")
        self.heads_per_block()
        per_block(self.layers_per_block, n, "layers_per_block")
        per_block(self.transformer_layers_per_block, n, "transformer_layers_per_block")

    def heads_per_block(self) -> Tuple[int, ...]:
        """Attention head count of each down block (diffusers: num_attention_heads or, failing
        that, attention_head_dim; both may be per-block tuples)."""
        heads = self.num_attention_heads if self.num_attention_heads is not None else self.attention_head_dim
        return per_block(heads, len(self.block_out_channels), "attention heads")

    @property
    def time_embed_dim(self) -> int:
        return self.block_out_channels[0] * 4

    def _block_kwargs(self):
        return dict(groups=self.norm_num_groups, eps=self.norm_eps,
                    use_linear_projection=self.use_linear_projection,
                    upcast_attention=self.upcast_attention, attention_impl=self.attention_impl,
                    remat_policy=self.remat_policy, dtype=self.dtype, param_dtype=self.param_dtype)

    # ---------------------------------------------------------------- modules
    def setup(self):
        self._setup_encoder()
        self._setup_decoder()

    def _setup_encoder(self):
        """time_embedding, conv_in, down_blocks, mid_block: what a ControlNet copies."""
        n = len(self.block_out_channels)
        heads = self.heads_per_block()
        layers = per_block(self.layers_per_block, n, "layers_per_block")
        tlayers = per_block(self.transformer_layers_per_block, n, "transformer_layers_per_block")
        self.time_embedding = TimestepEmbedding(self.time_embed_dim, param_dtype=self.param_dtype)
        self.conv_in = Conv(self.block_out_channels[0], self.conv_in_kernel, dtype=self.dtype,
                            param_dtype=self.param_dtype)
        self.down_blocks = [
            DOWN_BLOCKS[t](self.block_out_channels[i], num_layers=layers[i], transformer_layers=tlayers[i],
                           heads=heads[i], add_downsample=i < n - 1, **self._block_kwargs())
            for i, t in enumerate(self.down_block_types)]
        self.mid_block = UNetMidBlock2DCrossAttn(
            self.block_out_channels[-1], num_layers=1, transformer_layers=tlayers[-1], heads=heads[-1],
            **self._block_kwargs())

    def _setup_decoder(self):
        """up_blocks and the float32 output head."""
        n = len(self.block_out_channels)
        rev = lambda seq: tuple(reversed(seq))  # noqa: E731
        heads = rev(self.heads_per_block())
        layers = rev(per_block(self.layers_per_block, n, "layers_per_block"))
        tlayers = rev(per_block(self.transformer_layers_per_block, n, "transformer_layers_per_block"))
        channels = rev(self.block_out_channels)
        self.up_blocks = [
            UP_BLOCKS[t](channels[i], num_layers=layers[i] + 1, transformer_layers=tlayers[i],
                         heads=heads[i], add_upsample=i < n - 1, **self._block_kwargs())
            for i, t in enumerate(self.up_block_types)]
        self.conv_norm_out = GroupNorm(self.norm_num_groups, epsilon=self.norm_eps, dtype=jnp.float32,
                                       param_dtype=self.param_dtype)
        self.conv_out = Conv(self.out_channels, self.conv_out_kernel, dtype=jnp.float32,
                             param_dtype=self.param_dtype)

    # ---------------------------------------------------------------- forward pieces
    def embed_time(self, timesteps, batch: int) -> jax.Array:
        """Timesteps (scalar, [1] or [batch]) -> time embedding [batch, 4*C0], float32."""
        t = jnp.asarray(timesteps, jnp.float32).reshape(-1)
        t = jnp.broadcast_to(t, (batch,))
        emb = timestep_embedding(t, self.block_out_channels[0], self.flip_sin_to_cos, self.freq_shift)
        return self.time_embedding(emb)

    def encode(self, sample, temb, context, conv_in_addition=None):
        """conv_in (+ `conv_in_addition`, the ControlNet hint), down blocks, mid block.

        Returns (mid_output, skips): skips are conv_in's output then every down-block output
        (12 for SD 1.5/2.x block counts), the order diffusers' additional residuals use.
        """
        if self.center_input_sample:
            sample = 2 * sample - 1.0
        h = self.conv_in(sample.astype(self.dtype))
        if conv_in_addition is not None:
            h = h + conv_in_addition.astype(h.dtype)
        h = constrain(h, IMAGE_AXES)
        context = context.astype(self.dtype)
        skips = (h,)
        for block in self.down_blocks:
            h, res = block(h, temb, context)
            skips += res
        return self.mid_block(h, temb, context), skips

    def decode(self, h, skips: Sequence[jax.Array], temb, context):
        """Up blocks consuming `skips` from the end, then GroupNorm-SiLU-conv_out in float32."""
        skips = tuple(skips)
        context = context.astype(self.dtype)
        for i, block in enumerate(self.up_blocks):
            n = block.num_layers
            res, skips = skips[-n:], skips[:-n]
            # Odd sizes in the down path: upsample to the next skip's size, like diffusers does.
            size = tuple(skips[-1].shape[1:3]) if skips else None
            h = block(h, res, temb, context, upsample_size=size if i < len(self.up_blocks) - 1 else None)
        h = nn.silu(self.conv_norm_out(h.astype(jnp.float32)))
        return self.conv_out(h)

    def __call__(self, sample, timesteps, encoder_hidden_states,
                 down_block_additional_residuals: Optional[Sequence[jax.Array]] = None,
                 mid_block_additional_residual: Optional[jax.Array] = None):
        """Predict noise. The additional residuals (ControlNet outputs) are added to the skips and
        to the mid-block output; unlike diffusers, down residuals alone are NOT treated as
        T2I-Adapter inputs, they are still added to the skips."""
        temb = self.embed_time(timesteps, sample.shape[0])
        h, skips = self.encode(sample, temb, encoder_hidden_states)
        if down_block_additional_residuals is not None:
            skips = self._add_residuals(skips, down_block_additional_residuals)
        if mid_block_additional_residual is not None:
            h = h + _checked(mid_block_additional_residual, h.shape, "mid_block_additional_residual").astype(h.dtype)
        return self.decode(h, skips, temb, encoder_hidden_states)

    @staticmethod
    def _add_residuals(skips, residuals):
        if len(residuals) != len(skips):
            raise ValueError(f"down_block_additional_residuals: got {len(residuals)} tensors, the UNet has "
                             f"{len(skips)} skip features with shapes {[tuple(s.shape) for s in skips]}")
        return tuple(s + _checked(r, s.shape, f"down_block_additional_residuals[{i}]").astype(s.dtype)
                     for i, (s, r) in enumerate(zip(skips, residuals)))


def _checked(x, shape, what):
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{what} has shape {tuple(x.shape)}, expected {tuple(shape)}")
    return x
