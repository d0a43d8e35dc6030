"""Tiling for images larger than the model's native size (tiled latent sampling, tiled VAE).

Tile positions are static numpy arrays decided from static shapes, so every tile has the same shape
and the program compiles once per image size. `map_tiles` runs a network over the tiles in fixed-size
chunks (a `lax.scan` over chunks of `chunk` tiles): each step slices its tiles out of the inputs,
runs the network on them as one batch, and adds the outputs, weighted, into one float32 accumulator.
The memory a tiled call needs is therefore the accumulator and the inputs (the size of the image)
plus one chunk's activations, whatever the number of tiles. Overlapping tiles are blended with
separable raised-cosine (Hann) weights, sin^2 across the tile: heaviest at a tile's centre, where
the model saw the most context, and falling to ~0 at its edges, so that where one tile ends its
share of the blend has already faded out; at 50% overlap the windows sum to one. (A Gaussian keeps a
sizeable weight at a tile's edge, so where tiles restore differently the blend steps there and the
tile grid shows.) The blend is normalised by the summed weight per pixel, so a constant or
identical-per-tile result is reproduced exactly; accumulation is float32 whatever the tiles' dtype,
because bfloat16 sums of many tiles lose visible precision.
"""
from fractions import Fraction
from typing import Callable, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

TileSize = Union[int, Tuple[int, int]]


def _pair(tile: TileSize) -> Tuple[int, int]:
    return (int(tile), int(tile)) if np.ndim(tile) == 0 else (int(tile[0]), int(tile[1]))


def tile_shape(height: int, width: int, tile: TileSize) -> Tuple[int, int]:
    """The tile actually used: `tile`, shrunk to the image on any side where the image is smaller."""
    th, tw = _pair(tile)
    return min(th, height), min(tw, width)


def _axis_starts(size: int, tile: int, overlap: int) -> np.ndarray:
    """Starts along one axis: regular stride `tile - overlap`, the last tile flush with the edge."""
    if size <= tile:
        return np.zeros(1, np.int64)
    stride = tile - overlap
    n = -(-(size - tile) // stride) + 1  # ceil division: enough tiles to reach the far edge
    starts = np.minimum(np.arange(n) * stride, size - tile)
    return np.unique(starts)


def _axis_grid(height: int, width: int, tile: TileSize, overlap: int):
    th, tw = tile_shape(height, width, tile)
    if overlap < 0 or (overlap >= th and height > th) or (overlap >= tw and width > tw):
        raise ValueError(f"overlap {overlap} must be >= 0 and smaller than the tile {tile}")
    return _axis_starts(height, th, overlap), _axis_starts(width, tw, overlap)


def tile_positions(height: int, width: int, tile: TileSize, overlap: int) -> np.ndarray:
    """(y, x) top-left corners, shape [T, 2], of tiles covering the image, every tile inside it.

    Where the image is no larger than the tile along an axis there is a single tile along that axis
    (use `tile_shape` for its size). `overlap` must be smaller than the tile.
    """
    ys, xs = _axis_grid(height, width, tile, overlap)
    return np.stack(np.meshgrid(ys, xs, indexing="ij"), -1).reshape(-1, 2)


def _axis_weights(n: int) -> np.ndarray:
    """One axis of the blending weights: sin^2(pi (i + 1/2) / n), peak ~1 at the centre, ~0 at both
    ends, floored at 1e-3 (so the 2-D weight, a product of two, is >= 1e-6 and no pixel ever has
    zero total weight)."""
    return np.maximum(np.sin(np.pi * (np.arange(n) + 0.5) / n) ** 2, 1e-3)


def tile_weights(tile: TileSize) -> jnp.ndarray:
    """Separable raised-cosine blending weights [th, tw]: heaviest at the centre, ~0 at the edges."""
    th, tw = _pair(tile)
    return jnp.asarray(np.outer(_axis_weights(th), _axis_weights(tw)), jnp.float32)


def _axis_norm(size: int, starts: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Summed weight per pixel along one axis. The tiles form a grid and the weights are a product of
    per-axis factors, so the 2-D normaliser is the outer product of the two axes' sums."""
    norm = np.zeros(size)
    for s in starts:
        norm[s:s + len(weights)] += weights
    return norm


def map_tiles(fn: Callable, inputs: Sequence[jax.Array], scales: Sequence[int], grid_hw: Tuple[int, int],
              tile: TileSize, overlap: int, out_scale: int = 1, *, chunk: int = 1) -> jax.Array:
    """Run `fn` over the tiles of an image and blend its outputs into one float32 image.

    Tiles are laid on a grid of `grid_hw` pixels (`tile`, `overlap` in grid pixels). `inputs[k]`
    [N, H * scales[k], W * scales[k], C_k] is read at `scales[k]` times the grid (a latent and its
    image: scales 1 and 8). `fn(*tiles)` gets `chunk` tiles of every row as one batch of chunk * N
    ([chunk, N] flattened: row j * N + n is tile j of row n) and returns [chunk * N, th * out_scale,
    tw * out_scale, C']. The result is [N, H * out_scale, W * out_scale, C'] float32.
    """
    h, w = grid_hw
    th, tw = tile_shape(h, w, tile)
    ys, xs = _axis_grid(h, w, (th, tw), overlap)
    pos = np.stack(np.meshgrid(ys, xs, indexing="ij"), -1).reshape(-1, 2)
    n_tiles, chunk = len(pos), max(1, min(int(chunk), len(pos)))
    n_chunks = -(-n_tiles // chunk)
    pad = n_chunks * chunk - n_tiles  # the last chunk is filled with weightless copies of tile 0
    pos_all = np.concatenate([pos, np.repeat(pos[:1], pad, 0)]).reshape(n_chunks, chunk, 2)
    live = np.concatenate([np.ones(n_tiles), np.zeros(pad)]).astype(np.float32).reshape(n_chunks, chunk)
    n_rows = inputs[0].shape[0]
    oth, otw = th * out_scale, tw * out_scale
    wy, wx = _axis_weights(oth), _axis_weights(otw)
    weights = jnp.asarray(np.outer(wy, wx), jnp.float32)[None, :, :, None]

    def tiles_at(p):  # p [chunk, 2] -> each input's tiles, [chunk * N, ...]
        out = []
        for x, s in zip(inputs, scales):
            cut = [jax.lax.dynamic_slice(x, (0, p[j, 0] * s, p[j, 1] * s, 0),
                                         (n_rows, th * s, tw * s, x.shape[-1])) for j in range(chunk)]
            out.append(jnp.concatenate(cut, axis=0))
        return out

    example = jax.eval_shape(lambda p: fn(*tiles_at(p)), jnp.zeros((chunk, 2), jnp.int32))
    if example.shape[:3] != (chunk * n_rows, oth, otw):
        raise ValueError(f"map_tiles: fn maps {chunk * n_rows} tiles of {th}x{tw} grid pixels to "
                         f"{example.shape}, expected [{chunk * n_rows}, {oth}, {otw}, C] for out_scale {out_scale}")
    acc = jnp.zeros((n_rows, h * out_scale, w * out_scale, example.shape[-1]), jnp.float32)

    def body(acc, step):
        p, alive = step
        out = fn(*tiles_at(p)).astype(jnp.float32).reshape((chunk, n_rows) + example.shape[1:])
        for j in range(chunk):
            at = (0, p[j, 0] * out_scale, p[j, 1] * out_scale, 0)
            cur = jax.lax.dynamic_slice(acc, at, (n_rows, oth, otw, acc.shape[-1]))
            acc = jax.lax.dynamic_update_slice(acc, cur + alive[j] * weights * out[j], at)
        return acc, None

    acc, _ = jax.lax.scan(body, acc, (jnp.asarray(pos_all, jnp.int32), jnp.asarray(live)))
    norm_y = _axis_norm(h * out_scale, ys * out_scale, wy)
    norm_x = _axis_norm(w * out_scale, xs * out_scale, wx)
    return acc / jnp.asarray(np.outer(norm_y, norm_x), jnp.float32)[None, :, :, None]


def _scaled(value: int, scale: Fraction, what: str) -> int:
    out = value * scale
    if out.denominator != 1:
        raise ValueError(f"{what} {value} times scale {scale} is not a whole number of pixels")
    return int(out)


def tiled_apply(fn: Callable, x, tile: int, overlap: int, scale: Union[int, float, Fraction] = 1, *,
                tiles_per_call: int = 1):
    """Apply a spatially local `fn` ([B, t, t, C] -> [B, t*scale, t*scale, C']) to x [N, H, W, C] tile
    by tile and blend the outputs into [N, H*scale, W*scale, C'] (float32): `map_tiles` for one input.

    `scale` is the output/input size ratio (8 for a VAE decoder on latents, 1/8 for an encoder; a
    float such as 0.125 is read as the nearest simple fraction); `tile` and `overlap` are in input
    pixels. Tiles go through `fn` `tiles_per_call` at a time.
    """
    scale = Fraction(scale).limit_denominator(64)
    _, h, w, _ = x.shape
    if scale.denominator == 1:  # the grid is the input's pixels
        return map_tiles(fn, [x], [1], (h, w), tile, overlap, int(scale), chunk=tiles_per_call)
    if scale.numerator != 1:
        raise ValueError(f"scale {scale}: only whole numbers and their inverses are supported")
    down = scale.denominator  # the grid is the output's pixels, the input is read at `down` times it
    grid = (_scaled(h, scale, "image size"), _scaled(w, scale, "image size"))
    return map_tiles(fn, [x], [down], grid, _scaled(tile, scale, "tile"), _scaled(overlap, scale, "overlap"),
                     1, chunk=tiles_per_call)
