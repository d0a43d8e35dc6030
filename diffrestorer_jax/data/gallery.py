"""A picture of what the degradation generator does: photos x (clean, eight types, mixed).

Looking at it is the quickest check that each synthetic degradation resembles its real-world
counterpart; `launch/degradation_gallery.py` is the command-line entry point.
"""
from typing import Optional, Sequence

import jax
import numpy as np

from diffrestorer_jax.data import degradations
from diffrestorer_jax.data.image_io import read_image, write_png  # noqa: F401  (re-exported for launch)

SAMPLE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")


def sample_photos(size: int, names: Sequence[str] = SAMPLE_PHOTOS) -> np.ndarray:
    """scikit-image's bundled photos, centre-cropped square and resized: [N, size, size, 3] in [0, 1]."""
    from skimage import data  # test/demo extra only
    return np.stack([square(getattr(data, n)() / 255.0, size) for n in names]).astype(np.float32)


def square(image: np.ndarray, size: int) -> np.ndarray:
    """Centre-crop to a square and resize (antialiased) to size x size."""
    from PIL import Image
    h, w = image.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    crop = np.round(np.clip(image[top:top + s, left:left + s, :3], 0, 1) * 255).astype(np.uint8)
    return np.asarray(Image.fromarray(crop).resize((size, size), Image.BICUBIC), np.float32) / 255.0


def make_gallery(paths: Optional[Sequence[str]], size: int = 256, seed: int = 0,
                 preset: str = "default") -> np.ndarray:
    """Grid image [rows * size, 10 * size, 3]: each row a photo, columns clean / types / mixed."""
    photos = sample_photos(size) if not paths else np.stack([square(read_image(p), size) for p in paths])
    ids = list(range(degradations.NUM_TYPES)) + [degradations.MIXED]
    n, k = len(photos), len(ids)
    batch = np.repeat(photos, k, 0)
    type_ids = np.tile(np.array(ids, np.int32), n)
    fn = degradations.make_degrade_fn(degradations.default_degradation_config(preset))
    lq, _ = fn(jax.random.key(seed), batch, type_ids)
    tiles = np.concatenate([photos[:, None], np.asarray(lq).reshape(n, k, size, size, 3)], 1)
    return tiles.transpose(0, 2, 1, 3, 4).reshape(n * size, (k + 1) * size, 3)
