"""Shape buckets: a few padded image sizes, so batches of mixed-size images compile once per bucket.

A side of n pixels goes to `bucket_side(n, m)`: n rounded up to a multiple m of `size_multiple(nets)`,
then up to the next "round" number of such units, s = 1, 2, 3, 4, then 4..7 x 2^k (5, 6, 7, 8, 10,
12, 14, 16, 20, ...). Padding therefore costs at most 25% per side beyond the multiple, while a
folder of photos of all sizes lands in a handful of buckets. A bucket depends only on the image's
own size, so the padded input - and with it the output - never depends on the other images.

Images are padded *inside* the bucket by reflection (bottom and right), restored, and cropped back.
Every batch of a bucket has the same number of rows: the last is filled with copies (discarded).
"""
from typing import List, Tuple

import numpy as np

Bucket = Tuple[int, int]


def round_units(units: int) -> int:
    """The smallest round unit count >= units: 1, 2, 3, 4, then mantissa 4..7 times a power of 2."""
    if units <= 4:
        return max(1, int(units))
    shift = int(units).bit_length() - 3  # keep the top 3 bits
    top = -(-int(units) // (1 << shift))  # ceil
    return top << shift


def bucket_side(n: int, multiple: int) -> int:
    """Padded length of a side of n pixels (a multiple of `multiple`)."""
    if n < 1:
        raise ValueError(f"image side must be positive, got {n}")
    return round_units(-(-int(n) // multiple)) * multiple


def bucket_for(height: int, width: int, multiple: int) -> Bucket:
    return bucket_side(height, multiple), bucket_side(width, multiple)


def pad_to(image: np.ndarray, bucket: Bucket) -> np.ndarray:
    """[H, W, C] -> [bh, bw, C], reflected at the bottom and right edges (symmetric when a pad is
    larger than the image can reflect, repeating as numpy does)."""
    h, w = image.shape[:2]
    bh, bw = bucket
    if h > bh or w > bw:
        raise ValueError(f"image {h}x{w} does not fit bucket {bh}x{bw}")
    pads = ((0, bh - h), (0, bw - w), (0, 0))
    mode = "reflect" if h > 1 and w > 1 else "symmetric"
    return np.pad(image, pads, mode=mode)


def crop_to(image: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    return image[: size[0], : size[1]]


def round_batch(batch_size: int, num_devices: int) -> int:
    """The batch size actually used: rounded up to a multiple of the device count (>= 1 per device)."""
    batch_size = max(1, int(batch_size))
    return -(-batch_size // num_devices) * num_devices


def fill_batch(arrays: List[np.ndarray], batch_size: int) -> Tuple[np.ndarray, int]:
    """Stack arrays and pad the batch to batch_size rows with copies of the first; returns
    (batch, number of real rows)."""
    n = len(arrays)
    if not 0 < n <= batch_size:
        raise ValueError(f"batch of {n} images for batch size {batch_size}")
    return np.stack(list(arrays) + [arrays[0]] * (batch_size - n)), n
