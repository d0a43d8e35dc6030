"""All the randomness one degradation op needs, drawn up front in a single RNG call per sample.

Why: every `jax.random` call compiles to its own hash kernel, and XLA:CPU spends seconds on each
(threefry on image-sized arrays ~10 s); with ~60 calls across eight ops the degrade function took
minutes to compile. So `degrade` draws one flat uniform vector per sample, cuts it into per-op
`Draws` by a static layout, and ops read scalars and image-sized fields from it in order. Each op
owns its slice, so its parameters depend only on (key, sample, op), not on which other ops ran.
"""
import jax
import jax.numpy as jnp

SCALARS_PER_OP = 128  # enough for the largest op (raindrop: 2 + 4 x max_drops)


class Draws:
    """Uniforms for one op: `scalars` [S] handed out in order, `fields` [H, W, F] image-sized."""

    def __init__(self, scalars: jax.Array, fields: jax.Array):
        self._scalars = scalars
        self._fields = fields
        self._next = 0

    def uniforms(self, n: int) -> jax.Array:
        """The next n scalars in [0, 1)."""
        if self._next + n > self._scalars.shape[0]:
            raise ValueError(f"op needs more than {self._scalars.shape[0]} random scalars")
        out = self._scalars[self._next:self._next + n]
        self._next += n
        return out

    def uniform(self, bounds) -> jax.Array:
        """One float32 uniform in (lo, hi); lo == hi gives a fixed value (paper presets)."""
        lo, hi = bounds
        return lo + (hi - lo) * self.uniforms(1)[0]

    def log_uniform(self, bounds) -> jax.Array:
        """One float32 log-uniform in (lo, hi): right for scale-like quantities (photons, exposure)."""
        lo, hi = bounds
        return jnp.exp(self.uniform((jnp.log(lo), jnp.log(hi))))

    def randint(self, lo: int, hi: int) -> jax.Array:
        """One int32 in [lo, hi] inclusive."""
        return jnp.minimum(lo + jnp.floor(self.uniforms(1)[0] * (hi - lo + 1)), hi).astype(jnp.int32)

    def normals(self, n: int) -> jax.Array:
        """n standard normals (inverse CDF of the next n uniforms)."""
        return to_normal(self.uniforms(n))

    def field(self, c: int) -> jax.Array:
        """Image-sized uniform channel c, [H, W]."""
        return self._fields[..., c]


def to_normal(u: jax.Array) -> jax.Array:
    """Standard normals from uniforms in [0, 1) by the inverse CDF (clipped away from 0 and 1)."""
    return jax.scipy.special.ndtri(jnp.clip(u, 1e-7, 1 - 1e-7))


def draw_all(key: jax.Array, n_ops: int, height: int, width: int, field_counts) -> list:
    """One RNG call -> per op a (scalars [S], fields [H, W, F_i]) pair; wrap each in a fresh `Draws`
    where the op is traced (its read counter is trace-time state)."""
    n_fields = sum(field_counts)
    n_scalars = n_ops * SCALARS_PER_OP
    flat = jax.random.uniform(key, (n_scalars + height * width * n_fields,))
    scalars = flat[:n_scalars].reshape(n_ops, SCALARS_PER_OP)
    fields = flat[n_scalars:].reshape(height, width, n_fields)
    draws, start = [], 0
    for i, count in enumerate(field_counts):
        draws.append((scalars[i], fields[..., start:start + count]))
        start += count
    return draws
