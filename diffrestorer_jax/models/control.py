"""The Image-guided Control Module: a ControlNet over the frozen SD UNet, steered by P_D.

Paper-notes section 4. A trainable copy of the UNet's conv_in, time embedding, down blocks and mid
block (built by the same `UNet2DConditionModel._setup_encoder`, so every parameter name equals
diffusers' `ControlNetModel`), fed with
  * the noisy latents z_t, plus the embedded LQ image (`controlnet_cond_embedding`, diffusers'
    `ControlNetConditioningEmbedding`: conv_in, SiLU, (conv, SiLU, stride-2 conv, SiLU) per step,
    zero-initialised conv_out; LQ pixels in [0, 1]) added to conv_in's output;
  * P_D (degradation tokens) as its cross-attention context (the frozen UNet keeps P_S);
  * optionally (`use_film`, [D]) a FiLM per down block from mean-pooled P_D: a zero-initialised Dense
    `film_i` -> (scale, shift), h <- h * (1 + scale) + shift on the block's output (the hidden state
    passed on and its last skip, which are the same tensor). Zero init makes it the identity at
    step 0. diffusers has no such parameters; `convert.control.load_control(use_film=True)` adds them
    zero-initialised.
Outputs: one zero-initialised 1x1 conv per UNet skip (`controlnet_down_blocks_k`; 12 for SD 1.5) and
one on the mid block (`controlnet_mid_block`), all multiplied by `control_scale` (a traced value:
changing it never recompiles). Freshly initialised, every residual is exactly zero, so the UNet's
output with them equals the bare UNet.
"""
from typing import Any, Dict, Mapping, Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp
from flax import traverse_util
from flax.core import meta

from diffrestorer_jax.models.layers import Conv, Dense, ZeroConv, constrain
from diffrestorer_jax.models.unet import UNet2DConditionModel, per_block
from diffrestorer_jax.models.unet_blocks import DOWN_BLOCKS, IMAGE_AXES, REMAT_POLICIES

Dtype = Any

# The parts of a UNet's parameter tree a ControlNet copies (top-level keys, down_blocks_i by prefix).
COPIED_FROM_UNET = ("conv_in", "time_embedding", "down_blocks_", "mid_block")

# ControlNetModel config keys with no UNet counterpart: supported values only.
_CONTROLNET_MUST_BE = {"controlnet_conditioning_channel_order": ("rgb",), "global_pool_conditions": (False,)}
# UNet-only keys that do not matter to the control branch (a UNet config can be passed as is).
_UNET_ONLY = {"up_block_types", "out_channels", "conv_out_kernel"}


class ControlNetConditioningEmbedding(nn.Module):
    """LQ image [N, H, W, in] -> [N, H / 2**(len(channels)-1), W / ..., out_channels] (diffusers')."""
    out_channels: int
    channels: Tuple[int, ...] = (16, 32, 96, 256)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        ch = tuple(self.channels)
        self.conv_in = Conv(ch[0], 3, **kw)
        blocks = []
        for c_in, c_out in zip(ch[:-1], ch[1:]):
            blocks += [Conv(c_in, 3, **kw), Conv(c_out, 3, stride=2, **kw)]
        self.blocks = blocks
        self.conv_out = ZeroConv(self.out_channels, 3, **kw)

    def __call__(self, x):
        h = nn.silu(self.conv_in(x.astype(self.dtype)))
        for block in self.blocks:
            h = nn.silu(block(h))
        return self.conv_out(h)


class ControlModule(UNet2DConditionModel):
    """(z_t [N,h,w,C], timesteps, P_D [N,L,D], LQ [N,H,W,3] in [0,1], control_scale)
    -> (down residuals tuple (one per UNet skip), mid residual), already scaled by control_scale.

    Fields: the UNet's (up-path fields are unused) + `conditioning_channels` (the embedder widths;
    len - 1 stride-2 steps, which must equal the VAE's downsampling factor), `conditioning_in_channels`
    (diffusers' `conditioning_channels`: the LQ image's channel count) and `use_film`.
    """
    conditioning_channels: Tuple[int, ...] = (16, 32, 96, 256)
    conditioning_in_channels: int = 3
    use_film: bool = False

    # ---------------------------------------------------------------- configuration
    @classmethod
    def from_config(cls, config: Mapping[str, Any], **overrides) -> "ControlModule":
        """From a diffusers ControlNetModel config.json dict (or a UNet config: its up-path keys are
        ignored). diffusers' `conditioning_embedding_out_channels` is our `conditioning_channels`,
        its integer `conditioning_channels` our `conditioning_in_channels`."""
        config = dict(config)
        for key, allowed in _CONTROLNET_MUST_BE.items():
            if key in config and config.pop(key) not in allowed:
                raise ValueError(f"ControlNet config: {key} must be {allowed[0]!r}")
        config.pop("addition_embed_type_num_heads", None)
        for key in _UNET_ONLY:
            config.pop(key, None)
        if isinstance(config.get("conditioning_channels"), int):
            config["conditioning_in_channels"] = config.pop("conditioning_channels")
        if "conditioning_embedding_out_channels" in config:
            value = config.pop("conditioning_embedding_out_channels")
            if value is None:
                raise ValueError("ControlNet config: conditioning_embedding_out_channels=None "
                                 "(no conditioning embedder) is not supported")
            config["conditioning_channels"] = tuple(value)
        return super().from_config(config, **overrides)

    @classmethod
    def from_unet_config(cls, unet_config: Mapping[str, Any], **overrides) -> "ControlModule":
        """The control module for a UNet described by a diffusers UNet config dict; `overrides` sets
        conditioning_channels, use_film, dtype, attention_impl, ..."""
        config = {k: v for k, v in dict(unet_config).items() if k != "_class_name"}
        return cls.from_config(config, **overrides)

    def validate(self) -> None:
        """The UNet's checks for the parts a ControlNet has (no up path)."""
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n:
            raise ValueError(f"ControlNet config: {len(self.down_block_types)} down_block_types for "
                             f"{n} block_out_channels")
        bad = [t for t in self.down_block_types if t not in DOWN_BLOCKS]
        if bad:
            raise ValueError(f"ControlNet config: unsupported down block type(s) {bad}; "
                             f"supported: {sorted(DOWN_BLOCKS)}")
        if self.mid_block_type != "UNetMidBlock2DCrossAttn":
            raise ValueError(f"ControlNet config: unsupported mid_block_type {self.mid_block_type!r}")
        if self.act_fn != "silu":
            raise ValueError(f"ControlNet config: unsupported act_fn {self.act_fn!r} (only 'silu')")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy must be one of {sorted(REMAT_POLICIES)}, got {self.remat_policy!r}")
        if len(self.conditioning_channels) < 1:
            raise ValueError("ControlNet config: conditioning_channels must list at least one width")
        self.heads_per_block()
        per_block(self.layers_per_block, n, "layers_per_block")
        per_block(self.transformer_layers_per_block, n, "transformer_layers_per_block")

    @property
    def cond_factor(self) -> int:
        """How much smaller than the LQ image the latents are (2 ** stride-2 steps)."""
        return 2 ** (len(self.conditioning_channels) - 1)

    def skip_channels(self) -> Tuple[int, ...]:
        """Channel count of each UNet skip feature, in diffusers' order (conv_in first)."""
        n = len(self.block_out_channels)
        layers = per_block(self.layers_per_block, n, "layers_per_block")
        out = [self.block_out_channels[0]]
        for i, c in enumerate(self.block_out_channels):
            out += [c] * (layers[i] + (1 if i < n - 1 else 0))
        return tuple(out)

    # ---------------------------------------------------------------- modules
    def setup(self):
        self._setup_encoder()
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.controlnet_cond_embedding = ControlNetConditioningEmbedding(
            self.block_out_channels[0], tuple(self.conditioning_channels), **kw)
        self.controlnet_down_blocks = [ZeroConv(c, 1, **kw) for c in self.skip_channels()]
        self.controlnet_mid_block = ZeroConv(self.block_out_channels[-1], 1, **kw)
        if self.use_film:
            self.film = [Dense(2 * c, names=("embed", "mlp"), kernel_init=nn.initializers.zeros_init(), **kw)
                         for c in self.block_out_channels]

    # ---------------------------------------------------------------- forward
    def __call__(self, sample, timesteps, encoder_hidden_states, controlnet_cond, control_scale=1.0):
        n, hgt, wid = sample.shape[:3]
        want = (n, hgt * self.cond_factor, wid * self.cond_factor, self.conditioning_in_channels)
        if tuple(controlnet_cond.shape) != want:
            raise ValueError(f"ControlModule: controlnet_cond has shape {tuple(controlnet_cond.shape)}, "
                             f"expected {want} (latents {tuple(sample.shape)} x factor {self.cond_factor})")
        temb = self.embed_time(timesteps, n)
        context = encoder_hidden_states.astype(self.dtype)
        h = self.conv_in(sample.astype(self.dtype)) + self.controlnet_cond_embedding(controlnet_cond)
        h = constrain(h, IMAGE_AXES)
        pooled = jnp.mean(encoder_hidden_states.astype(jnp.float32), axis=1).astype(self.dtype)
        skips = (h,)
        for i, block in enumerate(self.down_blocks):
            h, res = block(h, temb, context)
            if self.use_film:
                scale, shift = jnp.split(self.film[i](pooled), 2, axis=-1)
                h = h * (1 + scale[:, None, None, :]) + shift[:, None, None, :]
                res = res[:-1] + (h,)  # the block's output is also its last skip
            skips += res
        h = self.mid_block(h, temb, context)
        s = jnp.asarray(control_scale, self.dtype)
        down = tuple(zc(x) * s for zc, x in zip(self.controlnet_down_blocks, skips))
        return down, self.controlnet_mid_block(h) * s


# ------------------------------------------------------------------------------------------------
def copy_subtrees(dst: Mapping, src: Mapping, prefixes: Sequence[str], what: str) -> Dict:
    """`dst` with every leaf under a top-level key matching `prefixes` (exact, or prefix when it
    ends with '_') replaced by `src`'s leaf at the same path. Pure; works on boxed (logically
    partitioned) or plain trees, keeping `dst`'s boxes. Raises ValueError for a missing or
    differently shaped leaf."""
    def selected(top):
        return any(top == p or (p.endswith("_") and top.startswith(p) and top[len(p):].isdigit())
                   for p in prefixes)

    flat_dst = traverse_util.flatten_dict(dict(dst))
    flat_src = traverse_util.flatten_dict(meta.unbox(dict(src)))
    out, copied = {}, 0
    for path, leaf in flat_dst.items():
        if not selected(path[0]):
            out[path] = leaf
            continue
        if path not in flat_src:
            raise ValueError(f"{what}: source has no parameter {'/'.join(path)}")
        new = flat_src[path]
        old = leaf.unbox() if isinstance(leaf, meta.AxisMetadata) else leaf
        if tuple(jnp.shape(new)) != tuple(jnp.shape(old)):
            raise ValueError(f"{what}: {'/'.join(path)} has shape {tuple(jnp.shape(new))} in the source, "
                             f"{tuple(jnp.shape(old))} in the destination")
        new = jnp.asarray(new, dtype=old.dtype)
        out[path] = leaf.replace_boxed(new) if isinstance(leaf, meta.AxisMetadata) else new
        copied += 1
    if not copied:
        raise ValueError(f"{what}: nothing to copy (no top-level key matches {tuple(prefixes)})")
    return traverse_util.unflatten_dict(out)


def init_control_from_unet(control_params: Mapping, unet_params: Mapping) -> Dict:
    """The control params with conv_in, time_embedding, down_blocks_i and mid_block copied from
    the UNet's (the ControlNet initialisation); everything else (embedder, zero convs, FiLM) kept."""
    return copy_subtrees(control_params, unet_params, COPIED_FROM_UNET, "init_control_from_unet")
