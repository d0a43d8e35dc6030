"""The Inception-v3 network FID is defined with (Heusel et al. 2017), in Flax, NHWC.

This is the TensorFlow "2015-12-05" graph as pytorch-fid ports it (`pt_inception-2015-12-05-
6726825d.pth`; torch-fidelity's `weights-inception-2015-12-05-6726825d.pth` has the same keys), not
torchvision's ImageNet Inception-v3: the blocks differ where TF's graph did (FIDInceptionA / C / E_1
average-pool without counting the zero padding; FIDInceptionE_2 max-pools in its pool branch), and
the classifier has 1008 outputs. FID uses the 2048-d global average pool after Mixed_7c.

Input: NHWC images in [0, 1]. `preprocess` resizes them to `image_size` (299) with bilinear
interpolation (half-pixel centres, no antialiasing: PyTorch's `F.interpolate(mode='bilinear',
align_corners=False)`, as pytorch-fid does) and scales to [-1, 1] (2x - 1). `features` runs the
network on prepared images; `__call__` does both. Every convolution is conv (no bias) -> batch norm
(inference statistics, eps 1e-3) -> ReLU.

Parameter names mirror the PyTorch module (`Mixed_6b/branch7x7_2/conv/kernel`,
`.../bn/{scale,bias,running_mean,running_var}`, `fc/{kernel,bias}`), so the converter
(`diffrestorer_jax.convert.inception`) is the mechanical rules of `convert.core`.
"""
from typing import Any, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

Size = Union[int, Tuple[int, int]]
FEATURE_DIM = 2048
NUM_CLASSES = 1008  # TF's graph: 1000 ImageNet classes + 8 unused
BN_EPS = 1e-3


def _pair(v: Size) -> Tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


class FrozenBatchNorm(nn.Module):
    """Batch norm with fixed statistics; its four arrays are parameters named as PyTorch's keys."""
    epsilon: float = BN_EPS
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones_init(), (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (c,), jnp.float32)
        mean = self.param("running_mean", nn.initializers.zeros_init(), (c,), jnp.float32)
        var = self.param("running_var", nn.initializers.ones_init(), (c,), jnp.float32)
        mult = scale * jax.lax.rsqrt(var + self.epsilon)
        return (x * mult.astype(self.dtype) + (bias - mean * mult).astype(self.dtype)).astype(self.dtype)


class BasicConv2d(nn.Module):
    """conv (no bias) -> frozen batch norm -> ReLU; `padding` as PyTorch's (symmetric per axis)."""
    features: int
    kernel_size: Size
    stride: int = 1
    padding: Size = 0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        ph, pw = _pair(self.padding)
        x = nn.Conv(self.features, _pair(self.kernel_size), strides=(self.stride, self.stride),
                    padding=((ph, ph), (pw, pw)), use_bias=False, dtype=self.dtype,
                    precision=jax.lax.Precision.HIGHEST, name="conv",
                    kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                             (None, None, "conv_in", "conv_out")))(x)
        return nn.relu(FrozenBatchNorm(dtype=self.dtype, name="bn")(x))


def _avg_pool_same(x):
    """3x3 stride-1 average pool that, like TF's, ignores the zero padding at the borders."""
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_same(x):
    return nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))


def _max_pool_reduce(x):
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class FIDInceptionA(nn.Module):
    pool_features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        conv = lambda f, k, name, p=0: BasicConv2d(f, k, padding=p, dtype=self.dtype, name=name)  # noqa: E731
        b1 = conv(64, 1, "branch1x1")(x)
        b5 = conv(64, 5, "branch5x5_2", 2)(conv(48, 1, "branch5x5_1")(x))
        b3 = conv(64, 1, "branch3x3dbl_1")(x)
        b3 = conv(96, 3, "branch3x3dbl_3", 1)(conv(96, 3, "branch3x3dbl_2", 1)(b3))
        bp = conv(self.pool_features, 1, "branch_pool")(_avg_pool_same(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        conv = lambda f, k, name, s=1, p=0: BasicConv2d(f, k, s, p, dtype=self.dtype, name=name)  # noqa: E731
        b3 = conv(384, 3, "branch3x3", 2)(x)
        bd = conv(96, 3, "branch3x3dbl_2", 1, 1)(conv(64, 1, "branch3x3dbl_1")(x))
        bd = conv(96, 3, "branch3x3dbl_3", 2)(bd)
        return jnp.concatenate([b3, bd, _max_pool_reduce(x)], axis=-1)


class FIDInceptionC(nn.Module):
    channels_7x7: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7
        conv = lambda f, k, name, p=0: BasicConv2d(f, k, padding=p, dtype=self.dtype, name=name)  # noqa: E731
        b1 = conv(192, 1, "branch1x1")(x)
        b7 = conv(c7, 1, "branch7x7_1")(x)
        b7 = conv(c7, (1, 7), "branch7x7_2", (0, 3))(b7)
        b7 = conv(192, (7, 1), "branch7x7_3", (3, 0))(b7)
        bd = conv(c7, 1, "branch7x7dbl_1")(x)
        bd = conv(c7, (7, 1), "branch7x7dbl_2", (3, 0))(bd)
        bd = conv(c7, (1, 7), "branch7x7dbl_3", (0, 3))(bd)
        bd = conv(c7, (7, 1), "branch7x7dbl_4", (3, 0))(bd)
        bd = conv(192, (1, 7), "branch7x7dbl_5", (0, 3))(bd)
        bp = conv(192, 1, "branch_pool")(_avg_pool_same(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        conv = lambda f, k, name, s=1, p=0: BasicConv2d(f, k, s, p, dtype=self.dtype, name=name)  # noqa: E731
        b3 = conv(320, 3, "branch3x3_2", 2)(conv(192, 1, "branch3x3_1")(x))
        b7 = conv(192, 1, "branch7x7x3_1")(x)
        b7 = conv(192, (1, 7), "branch7x7x3_2", 1, (0, 3))(b7)
        b7 = conv(192, (7, 1), "branch7x7x3_3", 1, (3, 0))(b7)
        b7 = conv(192, 3, "branch7x7x3_4", 2)(b7)
        return jnp.concatenate([b3, b7, _max_pool_reduce(x)], axis=-1)


class FIDInceptionE(nn.Module):
    """E_1 (Mixed_7b) average-pools its pool branch without the padding; E_2 (Mixed_7c) max-pools."""
    pool: str = "avg"  # 'avg' (E_1) or 'max' (E_2)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        conv = lambda f, k, name, p=0: BasicConv2d(f, k, padding=p, dtype=self.dtype, name=name)  # noqa: E731
        b1 = conv(320, 1, "branch1x1")(x)
        b3 = conv(384, 1, "branch3x3_1")(x)
        b3 = jnp.concatenate([conv(384, (1, 3), "branch3x3_2a", (0, 1))(b3),
                              conv(384, (3, 1), "branch3x3_2b", (1, 0))(b3)], axis=-1)
        bd = conv(384, 3, "branch3x3dbl_2", 1)(conv(448, 1, "branch3x3dbl_1")(x))
        bd = jnp.concatenate([conv(384, (1, 3), "branch3x3dbl_3a", (0, 1))(bd),
                              conv(384, (3, 1), "branch3x3dbl_3b", (1, 0))(bd)], axis=-1)
        pooled = _avg_pool_same(x) if self.pool == "avg" else _max_pool_same(x)
        bp = conv(192, 1, "branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
    """FID's Inception-v3: NHWC images in [0, 1] -> [N, 2048] pool features (see the module doc).

    `image_size`: the side images are resized to (299 for FID; smaller only in tests, since the
    network accepts any side >= 75). `__call__(x, logits=True)` also returns the 1008 logits.
    """
    image_size: Optional[int] = 299
    dtype: Any = jnp.float32

    def preprocess(self, x):
        """[N, H, W, 3] in [0, 1] -> [N, S, S, 3] in [-1, 1] (bilinear resize, then 2x - 1)."""
        x = jnp.asarray(x, jnp.float32)
        if self.image_size is not None and x.shape[1:3] != (self.image_size, self.image_size):
            x = jax.image.resize(x, (x.shape[0], self.image_size, self.image_size, x.shape[3]),
                                 method="bilinear", antialias=False)
        return 2.0 * x - 1.0

    @nn.compact
    def features(self, x, logits: bool = False):
        """Prepared images ([-1, 1], any side >= 75) -> [N, 2048] (and [N, 1008] logits if asked)."""
        d = self.dtype
        conv = lambda f, k, name, s=1, p=0: BasicConv2d(f, k, s, p, dtype=d, name=name)  # noqa: E731
        x = conv(32, 3, "Conv2d_1a_3x3", 2)(x.astype(d))
        x = conv(32, 3, "Conv2d_2a_3x3")(x)
        x = _max_pool_reduce(conv(64, 3, "Conv2d_2b_3x3", 1, 1)(x))
        x = conv(80, 1, "Conv2d_3b_1x1")(x)
        x = _max_pool_reduce(conv(192, 3, "Conv2d_4a_3x3")(x))
        for name, pool_features in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):
            x = FIDInceptionA(pool_features, dtype=d, name=name)(x)
        x = InceptionB(dtype=d, name="Mixed_6a")(x)
        for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
            x = FIDInceptionC(c7, dtype=d, name=name)(x)
        x = InceptionD(dtype=d, name="Mixed_7a")(x)
        x = FIDInceptionE("avg", dtype=d, name="Mixed_7b")(x)
        x = FIDInceptionE("max", dtype=d, name="Mixed_7c")(x)
        pool = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        # The classifier is part of the weights file (its 1008 classes tell FID's network from
        # torchvision's); unused by FID, so jit drops it unless `logits` is asked for.
        out = nn.Dense(NUM_CLASSES, precision=jax.lax.Precision.HIGHEST, name="fc")(pool)
        return (pool, out) if logits else pool

    def __call__(self, x, logits: bool = False):
        return self.features(self.preprocess(x), logits)


def example_input(image_size: int = 75) -> jnp.ndarray:
    """The smallest input that traces the whole network (for `abstract_params`)."""
    return jnp.zeros((1, image_size, image_size, 3), jnp.float32)


__all__: Sequence[str] = ("FIDInceptionV3", "FEATURE_DIM", "NUM_CLASSES", "example_input")
