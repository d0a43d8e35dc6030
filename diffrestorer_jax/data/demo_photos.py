"""The demo's photos: scikit-image's bundled pictures, split into a training set and a held-out set.

The demo model (`make demo-train`) trains only on `TRAIN`; `make demo` evaluates on `HELD_OUT`
(coffee, rocket), which the model never saw; the demo's restore settings are chosen on `VALIDATION`,
which it never saw either. Every training path that reads the bundled photos
(`config.data.kind = "skimage"`, `launch/demo_train.sh`) must take them from here.

Grayscale pictures (brick, grass, gravel and the validation photos) are repeated to three channels; the stereo pair
(motorcycle_left / motorcycle_right) comes from `skimage.data.stereo_motorcycle()`.
"""
import os
from typing import Dict, Sequence

import numpy as np

from diffrestorer_jax.data.image_io import square, write_png

TRAIN = ("astronaut", "chelsea", "motorcycle_left", "motorcycle_right", "hubble_deep_field", "retina",
         "ihc", "brick", "grass", "gravel")
HELD_OUT = ("coffee", "rocket")
# Never trained on and never the demo's evaluation: the photos on which the demo's restore settings are
# chosen (the remaining natural photos that scikit-image bundles offline; all grayscale, so repeated to
# three channels like brick, grass and gravel).
VALIDATION = ("camera", "coins", "moon", "clock")

# name -> (skimage.data function, index into its tuple result or None)
_SOURCES: Dict[str, tuple] = {
    "astronaut": ("astronaut", None), "chelsea": ("chelsea", None),
    "motorcycle_left": ("stereo_motorcycle", 0), "motorcycle_right": ("stereo_motorcycle", 1),
    "hubble_deep_field": ("hubble_deep_field", None), "retina": ("retina", None),
    "ihc": ("immunohistochemistry", None), "brick": ("brick", None), "grass": ("grass", None),
    "gravel": ("gravel", None), "coffee": ("coffee", None), "rocket": ("rocket", None),
    "camera": ("camera", None), "coins": ("coins", None), "moon": ("moon", None), "clock": ("clock", None),
}


def load_photo(name: str) -> np.ndarray:
    """One photo as float32 [H, W, 3] in [0, 1] at its native size."""
    if name not in _SOURCES:
        raise KeyError(f"unknown demo photo {name!r}; known: {', '.join(_SOURCES)}")
    from skimage import data  # the test/demo extra
    fn, index = _SOURCES[name]
    image = getattr(data, fn)()
    if index is not None:
        image = image[index]
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    image = image[..., :3]
    scale = 65535.0 if image.dtype == np.uint16 else 255.0
    return (image.astype(np.float32) / scale).clip(0.0, 1.0)


def load_photos(names: Sequence[str], size: int) -> np.ndarray:
    """Photos centre-cropped square and resized to size x size: float32 [N, size, size, 3]."""
    return np.stack([square(load_photo(n), size) for n in names]).astype(np.float32)


def train_photos(size: int) -> np.ndarray:
    """The training set (never the held-out photos)."""
    assert not set(TRAIN) & (set(HELD_OUT) | set(VALIDATION)) and not set(HELD_OUT) & set(VALIDATION)
    return load_photos(TRAIN, size)


def write_training_folder(out_dir: str, size: int = 192, tiles: int = 2) -> int:
    """Write the training set as PNGs for `config.data.kind = "hq_folder"`: each photo centre-cropped
    square at `size`, plus its `tiles` x `tiles` grid of sub-squares (each at `size`), so the tiny
    model sees both whole-scene and close-up scales. Returns the number of files written."""
    os.makedirs(out_dir, exist_ok=True)
    count = 0
    for name in TRAIN:
        photo = load_photo(name)
        s = min(photo.shape[:2])
        top, left = (photo.shape[0] - s) // 2, (photo.shape[1] - s) // 2
        full = photo[top:top + s, left:left + s]
        write_png(os.path.join(out_dir, f"{name}.png"), square(full, size))
        count += 1
        step = s // tiles
        for i in range(tiles):
            for j in range(tiles):
                tile = full[i * step:(i + 1) * step, j * step:(j + 1) * step]
                write_png(os.path.join(out_dir, f"{name}_{i}{j}.png"), square(tile, size))
                count += 1
    return count

