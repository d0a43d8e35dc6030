"""Procedural dead-leaves images: an unlimited source of clean training images for the demo model.

Achddou et al., "Synthetic images as a regularity prior for image restoration neural networks" (2021)
show that restoration networks trained on dead-leaves images (random occluding shapes whose sizes
follow a power law, so the image is scale-invariant like natural ones) come close to networks trained
on natural photos. Here, for a demo trained on ten photos:

  * shapes (disks, ellipses, rotated rectangles) fall front to back: each paints only the pixels no
    earlier shape covered, until the canvas is covered or `max_shapes` have fallen (then a smooth
    background fills the rest);
  * radii r ~ p(r) proportional to r^-3 on [r_min, r_max] (the scale-invariant exponent), r_min
    drawn per image in [2, 8] px so that some images are busy and some have large flat areas;
  * colours are, half the time, pixels drawn from a palette (the demo takes the training photos'
    pixels: natural colour statistics), else random HSV colours; some images are grey;
  * each shape gets a texture with some probability: a shading gradient, a sinusoidal grating or
    smoothed noise, so the images hold edges, flat areas, gradients and fine texture;
  * drawn at 2x and downsampled by 2x2 averaging, for anti-aliased edges.

Everything is drawn from `numpy.random.default_rng([seed, index])`: image i of a seed is always the
same picture, whatever else is generated.
"""
import os
from typing import Iterator, Optional

import numpy as np


def _texture(rng, h: int, w: int, scale: float) -> np.ndarray:
    """A zero-mean texture [h, w] with amplitude ~1 (gradient, grating or smoothed noise)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    kind = rng.integers(0, 3)
    theta = rng.uniform(0, np.pi)
    u = xx * np.cos(theta) + yy * np.sin(theta)
    if kind == 0:  # shading across the shape
        return (u - u.mean()) / max(float(np.ptp(u)), 1.0)
    if kind == 1:  # grating, period 2..16 px at the 2x canvas
        period = rng.uniform(2.0, 16.0)
        return 0.5 * np.sin(2 * np.pi * u / period + rng.uniform(0, 2 * np.pi)).astype(np.float32)
    # smoothed noise: white noise on a coarse grid, upsampled bilinearly
    cell = max(1, int(rng.uniform(1.0, max(2.0, scale / 2))))
    gh, gw = h // cell + 2, w // cell + 2
    grid = rng.standard_normal((gh, gw)).astype(np.float32) * 0.35
    ys, xs = np.arange(h) / cell, np.arange(w) / cell
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    g = grid
    return (g[y0][:, x0] * (1 - fy) * (1 - fx) + g[y0 + 1][:, x0] * fy * (1 - fx)
            + g[y0][:, x0 + 1] * (1 - fy) * fx + g[y0 + 1][:, x0 + 1] * fy * fx)


def _colour(rng, palette: np.ndarray, grey: bool) -> np.ndarray:
    """Half the time a palette pixel (natural colour statistics), else a random HSV colour."""
    if rng.random() < 0.5:
        c = palette[rng.integers(0, len(palette))].astype(np.float32)
    else:
        import colorsys
        c = np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(0, 0.9), rng.uniform(0.05, 1.0)), np.float32)
    return np.full(3, c.mean(), np.float32) if grey else c


def dead_leaves(rng: np.random.Generator, size: int, palette: np.ndarray, r_min: Optional[float] = None,
                r_max: Optional[float] = None, max_shapes: int = 3000, texture_prob: float = 0.6,
                grey_prob: float = 0.2) -> np.ndarray:
    """One image [size, size, 3] float32 in [0, 1]; `palette` [K, 3] colours in [0, 1].
    r_min / r_max in px of the output (default: r_min drawn in [2, 8] per image, r_max = size)."""
    s = 2 * size  # drawn at 2x, averaged down
    r_min = rng.uniform(2.0, 8.0) if r_min is None else r_min
    r_min, r_max = 2 * r_min, 2 * (r_max if r_max is not None else size)
    canvas = np.zeros((s, s, 3), np.float32)
    free = np.ones((s, s), bool)
    grey = rng.random() < grey_prob
    # inverse CDF of p(r) ~ r^-3 on [r_min, r_max]
    a, b = r_min ** -2, r_max ** -2
    for _ in range(max_shapes):
        r = (a - rng.random() * (a - b)) ** -0.5
        cy, cx = rng.uniform(-r, s + r, 2)
        y0, y1 = int(max(0, np.floor(cy - 1.5 * r))), int(min(s, np.ceil(cy + 1.5 * r)))
        x0, x1 = int(max(0, np.floor(cx - 1.5 * r))), int(min(s, np.ceil(cx + 1.5 * r)))
        if y1 <= y0 or x1 <= x0:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        dy, dx = yy - cy, xx - cx
        kind = rng.integers(0, 3)
        if kind == 0:
            mask = dy ** 2 + dx ** 2 <= r * r
        else:
            theta = rng.uniform(0, np.pi)
            u = dx * np.cos(theta) + dy * np.sin(theta)
            v = -dx * np.sin(theta) + dy * np.cos(theta)
            aspect = rng.uniform(0.3, 1.0)
            if kind == 1:
                mask = (u / r) ** 2 + (v / (r * aspect)) ** 2 <= 1
            else:
                mask = (np.abs(u) <= r) & (np.abs(v) <= r * aspect)
        mask &= free[y0:y1, x0:x1]
        if not mask.any():
            continue
        colour = _colour(rng, palette, grey)
        patch = np.broadcast_to(colour, mask.shape + (3,)).copy()
        if rng.random() < texture_prob and r > 3:
            amp = rng.uniform(0.05, 0.35)
            tex = _texture(rng, y1 - y0, x1 - x0, r)[..., None]
            tint = np.ones(3, np.float32) if grey else 1 + 0.3 * rng.uniform(-1, 1, 3).astype(np.float32)
            patch = patch + amp * tex * tint
        canvas[y0:y1, x0:x1][mask] = patch[mask]
        free[y0:y1, x0:x1] &= ~mask
        if not free.any():
            break
    if free.any():  # what no shape covered: a smooth background
        colour = _colour(rng, palette, grey)
        bg = colour + 0.2 * _texture(rng, s, s, s / 4)[..., None]
        canvas[free] = bg[free]
    canvas = canvas.reshape(size, 2, size, 2, 3).mean(axis=(1, 3))
    return np.clip(canvas, 0.0, 1.0)


def photo_palette(photos: np.ndarray, count: int = 4096, seed: int = 0) -> np.ndarray:
    """`count` pixels drawn from photos [N, H, W, 3]: natural colours for the shapes."""
    pixels = photos.reshape(-1, 3)
    return pixels[np.random.default_rng(seed).integers(0, len(pixels), count)]


def images(count: int, size: int, seed: int = 0, palette: Optional[np.ndarray] = None) -> Iterator[np.ndarray]:
    """Images 0..count-1 of `seed`, one at a time ([size, size, 3] float32 in [0, 1]). Default palette:
    the demo's training photos (never the held-out or validation ones)."""
    if palette is None:
        from diffrestorer_jax.data import demo_photos
        palette = photo_palette(demo_photos.train_photos(64), seed=seed)
    for i in range(count):
        yield dead_leaves(np.random.default_rng([seed, i]), size, palette)


def write_folder(out_dir: str, count: int, size: int = 192, seed: int = 0, palette: Optional[np.ndarray] = None,
                 prefix: str = "dead_leaves") -> int:
    """Write `images(count, size, seed, palette)` as `<prefix>_<i>.png`, for
    `config.data.kind = "hq_folder"`."""
    from diffrestorer_jax.data.image_io import write_png
    os.makedirs(out_dir, exist_ok=True)
    for i, image in enumerate(images(count, size, seed, palette)):
        write_png(os.path.join(out_dir, f"{prefix}_{i:05d}.png"), image)
    return count

