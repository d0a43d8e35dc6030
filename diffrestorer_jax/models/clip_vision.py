"""The CLIP image encoder (ViT), frozen, that reads the degraded image for the visual prompts.

Parameter names mirror transformers' `CLIPVisionModel` (`embeddings/patch_embedding/kernel`,
`encoder/layers_3/self_attn/q_proj/kernel`, `post_layernorm/scale`, ...) and, with
`with_projection=True`, `CLIPVisionModelWithProjection`'s `visual_projection`, so
`diffrestorer_jax.convert.clip` loads Hugging Face and OpenAI/open_clip checkpoints mechanically.

Diff-Restorer uses the patch tokens of the last layer *before* the post-layernorm
(`last_hidden_state[:, 1:]`, (B, 256, 1024) for ViT-L/14 at 224 px; see paper-notes.md).
"""
import dataclasses
from typing import Any, Mapping, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffrestorer_jax.models.attention import dot_product_attention
from diffrestorer_jax.models.layers import Conv, Dense, LayerNorm, constrain

Dtype = Any

# CLIP's normalisation statistics (OpenAI; open_clip's ViT-H/14 uses the same).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Named architectures (transformers' CLIPVisionConfig field names). H/14 is LAION's open_clip
# model, trained with exact GELU; the OpenAI models use quick_gelu.
PRESETS = {
    "ViT-B/32": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                     num_attention_heads=12, image_size=224, patch_size=32, projection_dim=512),
    "ViT-B/16": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                     num_attention_heads=12, image_size=224, patch_size=16, projection_dim=512),
    "ViT-L/14": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                     num_attention_heads=16, image_size=224, patch_size=14, projection_dim=768),
    "ViT-L/14@336": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                         num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768),
    "ViT-H/14": dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                     num_attention_heads=16, image_size=224, patch_size=14, projection_dim=1024,
                     hidden_act="gelu"),
}


def quick_gelu(x):
    """OpenAI CLIP's GELU approximation x * sigmoid(1.702 x); the weights were trained with it."""
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {
    "quick_gelu": quick_gelu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # transformers' "gelu" is the exact erf form
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
}


class CLIPAttention(nn.Module):
    hidden_size: int
    num_heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "auto"

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.q_proj = Dense(self.hidden_size, names=("embed", "heads"), **kw)
        self.k_proj = Dense(self.hidden_size, names=("embed", "heads"), **kw)
        self.v_proj = Dense(self.hidden_size, names=("embed", "heads"), **kw)
        self.out_proj = Dense(self.hidden_size, names=("heads", "embed"), **kw)

    def __call__(self, x):
        b, n, _ = x.shape
        head_dim = self.hidden_size // self.num_heads
        split = lambda t: t.reshape(b, n, self.num_heads, head_dim)
        out = dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)),
                                    scale=head_dim ** -0.5, implementation=self.attention_impl)
        return self.out_proj(out.reshape(b, n, self.hidden_size))


class CLIPMLP(nn.Module):
    hidden_size: int
    intermediate_size: int
    hidden_act: str
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.fc1 = Dense(self.intermediate_size, names=("embed", "mlp"), **kw)
        self.fc2 = Dense(self.hidden_size, names=("mlp", "embed"), **kw)

    def __call__(self, x):
        return self.fc2(ACTIVATIONS[self.hidden_act](self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-norm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""
    hidden_size: int
    intermediate_size: int
    num_heads: int
    hidden_act: str
    layer_norm_eps: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "auto"

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.layer_norm1 = LayerNorm(epsilon=self.layer_norm_eps, **kw)
        self.self_attn = CLIPAttention(self.hidden_size, self.num_heads,
                                       attention_impl=self.attention_impl, **kw)
        self.layer_norm2 = LayerNorm(epsilon=self.layer_norm_eps, **kw)
        self.mlp = CLIPMLP(self.hidden_size, self.intermediate_size, self.hidden_act, **kw)

    def __call__(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        x = x + self.mlp(self.layer_norm2(x))
        return constrain(x, ("activation_batch", "activation_length", "activation_embed"))


class CLIPEncoder(nn.Module):
    """Holds `layers_0 ... layers_{N-1}` (transformers' `encoder.layers.N`)."""
    num_layers: int
    layer_kwargs: Mapping[str, Any]

    def setup(self):
        self.layers = [CLIPEncoderLayer(**self.layer_kwargs) for _ in range(self.num_layers)]

    def __call__(self, x):
        states = [x]
        for layer in self.layers:
            x = layer(x)
            states.append(x)
        return x, tuple(states)


class CLIPVisionEmbeddings(nn.Module):
    """Patchify (a conv without bias), prepend the class token, add learned position embeddings."""
    hidden_size: int
    image_size: int
    patch_size: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        self.num_positions = (self.image_size // self.patch_size) ** 2 + 1
        self.patch_embedding = Conv(self.hidden_size, self.patch_size, stride=self.patch_size,
                                    padding=0, use_bias=False, dtype=self.dtype,
                                    param_dtype=self.param_dtype)
        self.class_embedding = self.param(
            "class_embedding", nn.with_logical_partitioning(nn.initializers.normal(1.0), ("embed",)),
            (self.hidden_size,), self.param_dtype)
        self.position_embedding = nn.Embed(
            self.num_positions, self.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "embed")))

    def __call__(self, pixel_values):
        n = pixel_values.shape[0]
        patches = self.patch_embedding(pixel_values.astype(self.dtype))  # [N, g, g, C]
        patches = patches.reshape(n, -1, self.hidden_size)
        if patches.shape[1] + 1 != self.num_positions:
            raise ValueError(f"CLIP vision: got {pixel_values.shape[1]}x{pixel_values.shape[2]} pixels, "
                             f"the model takes {self.image_size}x{self.image_size} (use preprocess())")
        cls = jnp.broadcast_to(self.class_embedding.astype(self.dtype), (n, 1, self.hidden_size))
        x = jnp.concatenate([cls, patches], axis=1)
        return x + self.position_embedding(jnp.arange(self.num_positions))[None]


class CLIPVisionTransformer(nn.Module):
    """transformers' CLIPVisionModel (optionally ...WithProjection) in Linen, NHWC input.

    `__call__(pixel_values [N, S, S, 3], CLIP-normalised)` returns
    `(last_hidden_state [N, 1 + P, C], pooled [N, C] (post-layernorm CLS token),
    hidden_states)`, where `hidden_states` is a tuple of num_hidden_layers + 1 arrays, the first
    the (pre-layernormed) embeddings, exactly as transformers' `output_hidden_states=True`.
    `image_embeds(pooled)` (a method, use `apply(..., method='image_embeds')`) applies
    `visual_projection` when `with_projection`.
    """
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 512
    with_projection: bool = False
    num_channels: int = 3
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "auto"

    def setup(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"CLIP vision: hidden_act {self.hidden_act!r} is not one of "
                             f"{sorted(ACTIVATIONS)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"CLIP vision: hidden_size {self.hidden_size} is not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.embeddings = CLIPVisionEmbeddings(self.hidden_size, self.image_size, self.patch_size, **kw)
        self.pre_layrnorm = LayerNorm(epsilon=self.layer_norm_eps, **kw)  # sic: transformers' name
        self.encoder = CLIPEncoder(self.num_hidden_layers, dict(
            hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_heads=self.num_attention_heads, hidden_act=self.hidden_act,
            layer_norm_eps=self.layer_norm_eps, attention_impl=self.attention_impl, **kw))
        self.post_layernorm = LayerNorm(epsilon=self.layer_norm_eps, **kw)
        if self.with_projection:
            self.visual_projection = Dense(self.projection_dim, names=("embed", None), use_bias=False,
                                           **kw)

    def __call__(self, pixel_values) -> Tuple[jax.Array, jax.Array, Tuple[jax.Array, ...]]:
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        x = constrain(x, ("activation_batch", "activation_length", "activation_embed"))
        last, states = self.encoder(x)
        pooled = self.post_layernorm(last[:, 0])
        if self.with_projection and self.is_initializing():
            self.visual_projection(pooled)  # create its parameters during init
        return last, pooled, states

    def image_embeds(self, pixel_values):
        """The projected pooled embedding (CLIPVisionModelWithProjection's `image_embeds`)."""
        if not self.with_projection:
            raise ValueError("CLIP vision: this model has no visual_projection (with_projection=False)")
        return self.visual_projection(self(pixel_values)[1])

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **overrides) -> "CLIPVisionTransformer":
        """Build from a transformers-style vision config dict; unknown keys (dropout, init) ignored.

        The config's `dtype`/`torch_dtype` is how the PyTorch weights were stored, not a compute
        dtype, so dtypes come only from `overrides`.
        """
        names = {f.name for f in dataclasses.fields(cls)} - {"parent", "name", "dtype", "param_dtype"}
        kwargs = {k: v for k, v in dict(config).items() if k in names}
        kwargs.update(overrides)
        return cls(**kwargs)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "CLIPVisionTransformer":
        """A named architecture: one of PRESETS ('ViT-B/32', 'ViT-B/16', 'ViT-L/14', ...)."""
        if name not in PRESETS:
            raise ValueError(f"unknown CLIP preset {name!r}; known: {sorted(PRESETS)}")
        return cls.from_config(PRESETS[name], **overrides)


def preprocess(images: jax.Array, image_size: int = 224, mean=CLIP_MEAN, std=CLIP_STD) -> jax.Array:
    """Images in [0, 1], NHWC, any size -> CLIP pixel_values [N, image_size, image_size, 3].

    The whole image is resized to a square (bicubic, antialiased when shrinking, like PIL's
    BICUBIC), with no crop: Diff-Restorer's CLIP must see every degraded pixel. transformers'
    CLIPImageProcessor instead resizes the short side to image_size and centre-crops (and rounds
    the resized image to uint8, which we skip): for square inputs the two agree up to that rounding,
    exactly when the input is already image_size x image_size (tested); for other aspect ratios
    ours keeps the borders the processor would crop away, squeezing the image instead.
    """
    images = jnp.asarray(images, jnp.float32)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"CLIP preprocess: expected NHWC RGB images [N, H, W, 3], got {images.shape}")
    n = images.shape[0]
    if images.shape[1:3] != (image_size, image_size):
        images = jax.image.resize(images, (n, image_size, image_size, 3), method="bicubic",
                                  antialias=True)
        images = jnp.clip(images, 0.0, 1.0)  # bicubic overshoots; PIL clamps to the pixel range
    return (images - jnp.asarray(mean)) / jnp.asarray(std)
