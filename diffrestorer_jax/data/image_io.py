"""Read any reasonable image file as float32 RGB in [0, 1]; refuse the rest with one clear error.

Documented behaviour for odd inputs (each has a test in tests/unit/test_image_io.py):
  - EXIF orientation is applied, so the array is upright as a viewer shows it;
  - grayscale (1, L, I, I;16, F) is replicated to RGB; 16-bit data is scaled by 65535, not clipped;
  - alpha (RGBA, LA, PA, palette with transparency) is composited on white: transparent pixels of
    scans and logos are "paper", and black would invent dark structure that is not there;
  - palette, CMYK, YCbCr, LAB, HSV are converted to RGB by Pillow;
  - more pixels than Pillow's `Image.MAX_IMAGE_PIXELS` (a decompression bomb guard) is refused;
  - missing, zero-byte, non-image, truncated or corrupt files raise `ImageReadError`, which names
    the file and the reason; no other exception type escapes.
"""
import io
import os
import tempfile
import warnings
from typing import Optional, Union

import numpy as np
from PIL import Image, ImageOps

PathLike = Union[str, os.PathLike]

# File name endings taken for images wherever folders are scanned (restore, datasets, training).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".gif")


def is_image_name(path: str) -> bool:
    return str(path).lower().endswith(IMAGE_EXTENSIONS)


class ImageReadError(ValueError):
    """An image could not be used; `path` and `reason` say which and why."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot read image {self.path}: {reason}")


def _check_size(im: Image.Image, name: str, max_pixels: Optional[int]) -> None:
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    if limit and im.width * im.height > limit:
        raise ImageReadError(name, f"{im.width}x{im.height} = {im.width * im.height} pixels exceeds the "
                                   f"limit of {limit} (possible decompression bomb)")


def _to_float_rgb(im: Image.Image) -> np.ndarray:
    """Decoded PIL image of any mode -> float32 [H, W, 3] in [0, 1]."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(im, dtype=np.float64)
        peak = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
        gray = np.clip(arr / peak, 0, 1)
        return np.repeat(gray[..., None], 3, -1).astype(np.float32)
    if im.mode == "F":
        gray = np.clip(np.asarray(im, dtype=np.float32), 0, 1)
        return np.repeat(gray[..., None], 3, -1)
    has_alpha = im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info
    if has_alpha:
        rgba = np.asarray(im.convert("RGBA"), dtype=np.float32) / 255.0
        alpha = rgba[..., 3:]
        return rgba[..., :3] * alpha + (1.0 - alpha)
    return np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0


def _decode(source, name: str, max_pixels: Optional[int]) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as im:
                _check_size(im, name, max_pixels)
                im.load()
                im = ImageOps.exif_transpose(im)
                return _to_float_rgb(im)
    except ImageReadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageReadError(name, f"decompression bomb refused ({e})") from None
    except FileNotFoundError:
        raise ImageReadError(name, "no such file") from None
    except IsADirectoryError:
        raise ImageReadError(name, "is a directory") from None
    except Image.UnidentifiedImageError:
        raise ImageReadError(name, "not an image file (or an unsupported format)") from None
    except Exception as e:  # noqa: BLE001  Pillow raises OSError, SyntaxError, struct.error, ... on bad data
        reason = str(e) or type(e).__name__
        if "truncated" in reason:
            reason = f"truncated file ({reason})"
        raise ImageReadError(name, f"corrupt or unreadable image data: {reason}") from None


def read_image(path: PathLike, max_pixels: Optional[int] = None) -> np.ndarray:
    """Read an image file -> float32 [H, W, 3] in [0, 1] (see the module docstring for odd files)."""
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise ImageReadError(path, "empty (zero-byte) file")
    return _decode(os.fspath(path), str(path), max_pixels)


def decode_image(data: bytes, name: str = "<bytes>", max_pixels: Optional[int] = None) -> np.ndarray:
    """Like `read_image` for encoded bytes (e.g. a dataset record); `name` goes into errors."""
    if not data:
        raise ImageReadError(name, "empty (zero-byte) data")
    return _decode(io.BytesIO(data), name, max_pixels)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """float [..., 3] in [0, 1] (or uint8) -> uint8, rounded: the one quantisation rule we use."""
    image = np.asarray(image)
    if image.dtype == np.uint8:
        return image
    return np.round(np.clip(image.astype(np.float32), 0, 1) * 255).astype(np.uint8)


def encode_png(image: np.ndarray) -> bytes:
    """float in [0, 1] or uint8 [H, W, 3] -> PNG bytes (lossless, so stored datasets add no artefacts)."""
    buf = io.BytesIO()
    Image.fromarray(to_uint8(image)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def write_png(path: PathLike, image: np.ndarray) -> None:
    """Write image as PNG atomically: a temp file in the same folder renamed over `path`, so readers
    never see a half-written file even if the writer is killed."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp_", suffix=".png")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(encode_png(image))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def square(image: np.ndarray, size: int) -> np.ndarray:
    """Centre-crop to a square and resize (antialiased bicubic, via 8 bits) to size x size."""
    h, w = image.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    crop = np.round(np.clip(image[top:top + s, left:left + s, :3], 0, 1) * 255).astype(np.uint8)
    return np.asarray(Image.fromarray(crop).resize((size, size), Image.BICUBIC), np.float32) / 255.0
