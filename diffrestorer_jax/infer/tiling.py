"""Tiling math for images larger than the model's native size (tiled latent sampling, tiled VAE).

Tile positions are static numpy arrays, decided from static shapes, so every tile has the same shape
and all tiles run as one batched computation (`extract_tiles` is a gather, `blend_tiles` a
scatter-add) that compiles once per image size. Overlapping tiles are blended with Gaussian weights
(heavier at a tile's centre, where the model saw the most context) and normalised by the summed
weight per pixel, so a constant or identical-per-tile result is reproduced exactly; accumulation is
float32 whatever the tiles' dtype, because bfloat16 sums of many tiles lose visible precision.
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


def tile_positions(height: int, width: int, tile: TileSize, overlap: int) -> np.ndarray:
    """(y, x) top-left corners, shape [T, 2], of tiles covering the image, every tile inside it.

    Where the image is no larger than the tile along an axis there is a single tile along that axis
    (use `tile_shape` for its size). `overlap` must be smaller than the tile.
    """
    th, tw = tile_shape(height, width, tile)
    if overlap < 0 or (overlap >= th and height > th) or (overlap >= tw and width > tw):
        raise ValueError(f"overlap {overlap} must be >= 0 and smaller than the tile {tile}")
    ys, xs = _axis_starts(height, th, overlap), _axis_starts(width, tw, overlap)
    return np.stack(np.meshgrid(ys, xs, indexing="ij"), -1).reshape(-1, 2)


def gaussian_tile_weights(tile: TileSize, sigma_frac: float = 0.3) -> jnp.ndarray:
    """Separable Gaussian blending weights [th, tw], peak 1, sigma = sigma_frac * tile side.

    Floored at 1e-6 so no pixel ever has zero total weight, even for a tiny sigma_frac (an image
    corner is covered by a single tile's corner).
    """
    th, tw = _pair(tile)

    def axis(n):
        d = (np.arange(n) - (n - 1) / 2) / (sigma_frac * n)
        return np.exp(-0.5 * d * d)

    w = np.maximum(np.outer(axis(th), axis(tw)), 1e-6)
    return jnp.asarray(w, jnp.float32)


def extract_tiles(x, positions: np.ndarray, tile: TileSize):
    """Tiles of x [N, H, W, C] at static `positions` -> [T, N, th, tw, C] (one gather)."""
    th, tw = _pair(tile)
    rows = np.asarray(positions)[:, 0, None] + np.arange(th)  # [T, th]
    cols = np.asarray(positions)[:, 1, None] + np.arange(tw)  # [T, tw]
    tiles = x[:, rows[:, :, None], cols[:, None, :], :]  # [N, T, th, tw, C]
    return jnp.moveaxis(tiles, 1, 0)


def blend_tiles(tiles, positions: np.ndarray, weights, out_shape: Sequence[int]):
    """Weighted average of overlapping tiles [T, N, th, tw, C] into an [N, H, W, C] float32 image."""
    n, h, w, c = out_shape
    _, _, th, tw, _ = tiles.shape
    rows = np.asarray(positions)[:, 0, None] + np.arange(th)
    cols = np.asarray(positions)[:, 1, None] + np.arange(tw)
    idx = (rows[:, :, None], cols[:, None, :])
    weights = jnp.asarray(weights, jnp.float32)
    weighted = jnp.moveaxis(tiles.astype(jnp.float32) * weights[None, None, :, :, None], 1, 3)
    acc = jnp.zeros((h, w, n, c), jnp.float32).at[idx].add(weighted)  # [H, W, N, C]
    norm = jnp.zeros((h, w), jnp.float32).at[idx].add(jnp.broadcast_to(weights, (len(rows), th, tw)))
    return jnp.moveaxis(acc / norm[:, :, None, None], 2, 0)


def _scaled(value: int, scale: Fraction, what: str) -> int:
    out = value * scale
    if out.denominator != 1:
        raise ValueError(f"{what} {value} times scale {scale} is not a whole number of pixels")
    return int(out)


def tiled_apply(fn: Callable, x, tile: int, overlap: int, scale: Union[int, float, Fraction] = 1, *,
                sigma_frac: float = 0.3, tiles_per_call: int = 1):
    """Apply a spatially local `fn` ([B, t, t, C] -> [B, t*scale, t*scale, C']) to x [N, H, W, C] tile
    by tile and blend the outputs into [N, H*scale, W*scale, C'] (float32).

    `scale` is the output/input size ratio (8 for a VAE decoder on latents, 1/8 for an encoder; a
    float such as 0.125 is read as the nearest simple fraction). Tiles are processed
    `tiles_per_call` at a time with `lax.map`, because the point of tiling a VAE is bounding memory.
    """
    scale = Fraction(scale).limit_denominator(64)
    n, h, w, _ = x.shape
    th, tw = tile_shape(h, w, tile)
    positions = tile_positions(h, w, (th, tw), overlap)
    out_pos = np.array([[_scaled(int(p), scale, "tile position") for p in pos] for pos in positions])
    oth, otw = _scaled(th, scale, "tile"), _scaled(tw, scale, "tile")
    oh, ow = _scaled(h, scale, "image size"), _scaled(w, scale, "image size")

    tiles = extract_tiles(x, positions, (th, tw))
    outs = jax.lax.map(fn, tiles, batch_size=tiles_per_call)  # [T, N, oth, otw, C']
    if outs.shape[2:4] != (oth, otw):
        raise ValueError(f"fn maps a {(th, tw)} tile to {outs.shape[2:4]}, expected {(oth, otw)} "
                         f"for scale {scale}")
    weights = gaussian_tile_weights((oth, otw), sigma_frac)
    return blend_tiles(outs, out_pos, weights, (n, oh, ow, outs.shape[-1]))
