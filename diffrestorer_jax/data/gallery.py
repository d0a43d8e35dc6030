"""Degrade photos with every type, and a picture of it: photos x (clean, eight types, mixed).

Looking at the picture is the quickest check that each synthetic degradation resembles its
real-world counterpart (`diffrestorer-degradation-gallery`); the demo degrades its photos with the
same `degrade_each_type`.
"""
from typing import List, Optional, Sequence, Tuple

import jax
import numpy as np

from diffrestorer_jax.data import degradations, demo_photos
from diffrestorer_jax.data.image_io import read_image, square

SAMPLE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")
TYPE_ROWS = list(degradations.DEGRADATION_TYPES) + ["mixed"]


def sample_photos(size: int, names: Sequence[str] = SAMPLE_PHOTOS) -> np.ndarray:
    """scikit-image's bundled photos, centre-cropped square and resized: [N, size, size, 3] in [0, 1]."""
    return demo_photos.load_photos(names, size)


def degrade_each_type(photos: np.ndarray, seed: int = 0, preset: str = "default"
                      ) -> Tuple[np.ndarray, List[str]]:
    """Every photo [P, S, S, 3] degraded with each of the eight types and one mixed composition, in
    one batch keyed by `seed`: (lq [P, 9, S, S, 3], the nine type names)."""
    ids = list(range(degradations.NUM_TYPES)) + [degradations.MIXED]
    batch = np.repeat(photos, len(ids), 0)
    type_ids = np.tile(np.array(ids, np.int32), len(photos))
    fn = degradations.make_degrade_fn(degradations.default_degradation_config(preset))
    lq, _ = fn(jax.random.key(seed), batch, type_ids)
    return np.asarray(lq, np.float32).reshape((len(photos), len(ids)) + photos.shape[1:]), list(TYPE_ROWS)


def make_gallery(paths: Optional[Sequence[str]], size: int = 256, seed: int = 0,
                 preset: str = "default") -> np.ndarray:
    """Grid image [rows * size, 10 * size, 3]: each row a photo, columns clean / types / mixed."""
    photos = sample_photos(size) if not paths else np.stack([square(read_image(p), size) for p in paths])
    lq, _ = degrade_each_type(photos, seed, preset)
    n, k = lq.shape[:2]
    tiles = np.concatenate([photos[:, None], lq], 1)
    return tiles.transpose(0, 2, 1, 3, 4).reshape(n * size, (k + 1) * size, 3)
