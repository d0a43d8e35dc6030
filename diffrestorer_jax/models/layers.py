"""Small building blocks shared by every network, each parameter tagged with logical axis names.

The logical vocabulary (mapped to mesh axes by the rules in `diffrestorer_jax.parallel.rules` and the
configs) is:
  'embed'     input width of a dense layer (the model's residual width)
  'mlp'       output width of a dense layer that widens (feed-forward, time embedding)
  'heads'     the attention projection width (q/k/v outputs, out-projection inputs)
  'conv_in'   input channels of a convolution
  'conv_out'  output channels of a convolution
  'norm'      scale and bias of a normalisation layer
Spatial kernel axes are never sharded (None). Activations use
  ('activation_batch', 'activation_height', 'activation_width', 'activation_channels') for images and
  ('activation_batch', 'activation_length', 'activation_embed') for token sequences.

Padding mirrors PyTorch: `padding=1` in a 3x3 PyTorch conv is ((1, 1), (1, 1)) here, so stride-2
convolutions sample the same pixels as the reference.
"""
from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp

from diffrestorer_jax.models.conv_grad import conv_general_dilated
from diffrestorer_jax.models.group_norm import GroupNorm  # noqa: F401 (re-exported: the networks' GroupNorm)

Dtype = Any


def _partitioned(init, names):
    return nn.with_logical_partitioning(init, tuple(names))


def Dense(features: int, *, names: Sequence[Optional[str]] = ("embed", "mlp"), use_bias: bool = True,
          dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, name: Optional[str] = None,
          kernel_init=nn.initializers.lecun_normal(), bias_init=nn.initializers.zeros_init()) -> nn.Dense:
    """A dense layer whose (in, out) kernel carries the logical names `names`."""
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
                    kernel_init=_partitioned(kernel_init, names),
                    bias_init=_partitioned(bias_init, names[-1:]))


def Conv(features: int, kernel_size: int = 3, *, stride: int = 1, padding: Any = None,
         use_bias: bool = True, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
         name: Optional[str] = None, kernel_init=nn.initializers.lecun_normal(),
         bias_init=nn.initializers.zeros_init()) -> nn.Conv:
    """A 2D NHWC convolution with PyTorch-style symmetric padding (default: kernel_size // 2).

    Its gradients on CPU skip XLA's per-step kernel transposes where the kernel outweighs the
    activation (`conv_grad`); the forward pass and other platforms are plain `lax` convolutions."""
    if padding is None:
        padding = kernel_size // 2
    if isinstance(padding, int):
        padding = ((padding, padding), (padding, padding))
    return nn.Conv(features, (kernel_size, kernel_size), strides=(stride, stride), padding=padding,
                   use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
                   conv_general_dilated=conv_general_dilated,
                   kernel_init=_partitioned(kernel_init, (None, None, "conv_in", "conv_out")),
                   bias_init=_partitioned(bias_init, ("conv_out",)))


def ZeroConv(features: int, kernel_size: int = 1, **kwargs) -> nn.Conv:
    """A convolution initialised to zero: a new branch that is the identity's no-op at step 0."""
    return Conv(features, kernel_size, kernel_init=nn.initializers.zeros_init(), **kwargs)


def LayerNorm(*, epsilon: float = 1e-5, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
              name: Optional[str] = None) -> nn.LayerNorm:
    """LayerNorm with PyTorch's default epsilon (1e-5; Flax's default is 1e-6)."""
    return nn.LayerNorm(epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, name=name,
                        scale_init=_partitioned(nn.initializers.ones_init(), ("norm",)),
                        bias_init=_partitioned(nn.initializers.zeros_init(), ("norm",)))


def constrain(x, names: Tuple[Optional[str], ...]):
    """Shard an activation by logical names (a no-op outside a mesh / axis-rules context)."""
    return nn.with_logical_constraint(x, names)
