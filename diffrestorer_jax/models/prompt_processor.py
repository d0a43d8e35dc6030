"""The Visual Prompt Processor: CLIP patch tokens -> semantic prompts P_S and degradation prompts P_D.

Paper [P]: a semantic branch B_s of three MLP layers and a degradation branch B_d of two, LayerNorm +
LeakyReLU after each layer but the last; a "simple MLP" classifier C on the degradation embedding
predicts one of the 8 degradation types (its cross-entropy is the degradation-aware guidance loss).
Decisions [D] (paper-notes.md): widths hidden -> hidden -> context_dim, applied per token; the
classifier reads mean-pooled P_D. PyTorch conventions are kept (LayerNorm eps 1e-5, LeakyReLU slope
0.01) so a PyTorch port of these heads loads exactly.

Parameter names mirror a PyTorch `nn.Sequential` of (Linear, LayerNorm, LeakyReLU, ...), i.e.
`semantic.0.weight` -> `semantic_0/kernel`, so weights trained elsewhere convert mechanically.
"""
from typing import Any, Dict

import flax.linen as nn
import jax.numpy as jnp

from diffrestorer_jax.models.layers import Dense, LayerNorm, constrain

NUM_DEGRADATION_TYPES = 8
LEAKY_SLOPE = 0.01  # torch.nn.LeakyReLU default


def _mlp(x, widths, prefix: str, dtype, param_dtype):
    """Linear layers with LayerNorm + LeakyReLU between them (not after the last).

    Called inside a compact method, so the layers belong to the caller and are named like the
    entries of a PyTorch `nn.Sequential`: Linear at index 3*i, LayerNorm at 3*i + 1.
    """
    for i, width in enumerate(widths):
        x = Dense(width, dtype=dtype, param_dtype=param_dtype, name=f"{prefix}_{3 * i}")(x)
        if i < len(widths) - 1:
            x = LayerNorm(dtype=dtype, param_dtype=param_dtype, name=f"{prefix}_{3 * i + 1}")(x)
            x = nn.leaky_relu(x, LEAKY_SLOPE)
    return x


class VisualPromptProcessor(nn.Module):
    """CLIP patch tokens [N, T, clip_dim] -> dict(semantic [N,T,C], degradation [N,T,C], logits [N,8])."""
    context_dim: int = 768
    hidden_dim: int = 1024
    classifier_hidden_dim: int = 512
    num_types: int = NUM_DEGRADATION_TYPES
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, clip_tokens) -> Dict[str, jnp.ndarray]:
        x = constrain(clip_tokens.astype(self.dtype),
                      ("activation_batch", "activation_length", "activation_embed"))
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        p_s = _mlp(x, (self.hidden_dim, self.hidden_dim, self.context_dim), "semantic", **kw)
        p_d = _mlp(x, (self.hidden_dim, self.context_dim), "degradation", **kw)
        # The classifier sees the whole image's degradation: mean over tokens, in float32.
        pooled = jnp.mean(p_d.astype(jnp.float32), axis=1)
        logits = _mlp(pooled, (self.classifier_hidden_dim, self.num_types), "classifier",
                      dtype=jnp.float32, param_dtype=self.param_dtype)
        return {"semantic": p_s, "degradation": p_d, "logits": logits}
