"""Read any reasonable image file as float32 RGB in [0, 1]; refuse the rest with one clear error.

Documented behaviour for odd inputs (each has a test in tests/unit/test_image_io.py):
  - EXIF orientation is applied, so the array is upright as a viewer shows it;
  - grayscale (1, L, I, I;16, F) is replicated to RGB; 16-bit data is scaled by 65535, not clipped;
  - alpha (RGBA, LA, PA, palette with transparency) is composited on white: transparent pixels of
    scans and logos are "paper", and black would invent dark structure that is not there;
  - palette, CMYK, YCbCr, LAB, HSV are converted to RGB by Pillow;
  - more pixels than `max_pixels` (default: Pillow's `Image.MAX_IMAGE_PIXELS`, a decompression
    bomb guard) is refused from the file's header, before anything is decoded;
  - missing, zero-byte, non-image, truncated or corrupt files raise `ImageReadError`, which names
    the file and the reason; no other exception type escapes;
  - special files (a FIFO or device named like an image) are refused before they are opened;
  - what a file holds beyond 8-bit RGB (animation frames, 16-bit or float samples) is named by
    `precision_notes`: outputs are 8-bit RGB PNGs.
Writes are atomic (a temporary file renamed into place) and get the user's umask permissions;
temporary files of a killed writer are removed by `remove_stale_temporaries`.
"""
import io
import os
import socket
import stat
import tempfile
import time
import warnings
from typing import List, Optional, Union

import numpy as np
from PIL import Image, ImageOps

from diffrestorer_jax.atomic import process_alive

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
    """Refuse from the header (Pillow has read only the size so far)."""
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    if limit and im.width * im.height > limit:
        why = " (possible decompression bomb)" if max_pixels is None else ""
        raise ImageReadError(name, f"{im.width}x{im.height} = {im.width * im.height} pixels exceeds the "
                                   f"limit of {limit}{why}")


# Formats whose 32-bit integer ("I") images Pillow scales to 0..65535 (PGM/PPM with a maxval above
# 255): a dark one must not be read as 8-bit.
_SIXTEEN_BIT_AS_I = ("PPM",)


def _to_float_rgb(im: Image.Image, fmt: Optional[str] = None) -> np.ndarray:
    """Decoded PIL image of any mode -> float32 [H, W, 3] in [0, 1]. `fmt`: the file's format
    (Pillow's `im.format`, which a transposed copy no longer carries)."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(im, dtype=np.float64)
        sixteen = im.mode.startswith("I;16") or fmt in _SIXTEEN_BIT_AS_I
        peak = 65535.0 if sixteen or arr.max() > 255 else 255.0
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
    pillow_limit = Image.MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            if max_pixels:  # our header check replaces Pillow's guard, whose message would be less clear
                Image.MAX_IMAGE_PIXELS = None
            with Image.open(source) as im:
                _check_size(im, name, max_pixels)
                im.load()
                fmt = im.format
                im = ImageOps.exif_transpose(im)
                return _to_float_rgb(im, fmt)
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
    finally:
        Image.MAX_IMAGE_PIXELS = pillow_limit


def read_image(path: PathLike, max_pixels: Optional[int] = None) -> np.ndarray:
    """Read an image file -> float32 [H, W, 3] in [0, 1] (see the module docstring for odd files)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ImageReadError(path, "no such file") from None
    except OSError as e:
        raise ImageReadError(path, e.strerror or str(e)) from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageReadError(path, "is a directory")
    if not stat.S_ISREG(st.st_mode):
        raise ImageReadError(path, "not a regular file (a FIFO, socket or device): not read")
    if st.st_size == 0:
        raise ImageReadError(path, "empty (zero-byte) file")
    return _decode(os.fspath(path), str(path), max_pixels)


def precision_notes(path: PathLike) -> List[str]:
    """What of the file is not carried into an 8-bit RGB output (read from the header only)."""
    notes = []
    try:
        with Image.open(path) as im:
            frames = int(getattr(im, "n_frames", 1) or 1)
            if frames > 1:
                notes.append(f"animated ({frames} frames): only the first frame is restored")
            if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
                notes.append("16-bit samples: the output PNG has 8 bits per channel")
            elif im.mode == "F":
                notes.append("floating-point samples (clipped to [0, 1]): the output PNG has 8 bits per channel")
            elif im.format == "PNG":
                with open(path, "rb") as f:
                    head = f.read(26)
                if len(head) == 26 and head[12:16] == b"IHDR" and head[24] == 16:
                    notes.append("16 bits per channel, read at 8 (Pillow decodes 48/64-bit PNG at 8 bits)")
    except Exception:  # noqa: BLE001  unreadable files are reported by read_image, not here
        pass
    return notes


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


TEMP_PREFIX = ".tmp-diffrestorer-"


def _file_mode() -> int:
    """0o666 less the process umask: what `open` would give a new file (mkstemp gives 0o600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def write_atomic(path: PathLike, data: bytes) -> None:
    """Write bytes to `path` atomically: a temporary file in the same folder (named after this host
    and process, see `remove_stale_temporaries`) renamed over `path`, with umask permissions; readers
    never see a half-written file, and a failed write leaves no temporary behind."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f"{TEMP_PREFIX}{socket.gethostname()}-{os.getpid()}-",
                               suffix=os.path.splitext(path)[1])
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_png(path: PathLike, image: np.ndarray) -> None:
    """Write image as an 8-bit RGB PNG, atomically (`write_atomic`)."""
    write_atomic(path, encode_png(image))


def remove_stale_temporaries(folder: PathLike, max_age_s: float = 86400.0) -> int:
    """Remove temporary files that killed writers left under `folder`: this host's whose process is
    gone, and any older than `max_age_s` (another host's). Returns how many were removed."""
    host, removed = socket.gethostname(), 0
    for root, _, names in os.walk(folder):
        for name in names:
            if not name.startswith(TEMP_PREFIX):
                continue
            path = os.path.join(root, name)
            rest = name[len(TEMP_PREFIX):]
            pid_text = rest[len(host) + 1:].split("-", 1)[0] if rest.startswith(host + "-") else ""
            try:
                stale = (pid_text.isdigit() and not process_alive(int(pid_text))) or \
                    time.time() - os.path.getmtime(path) > max_age_s
                if stale:
                    os.remove(path)
                    removed += 1
            except OSError:
                pass
    return removed


def square(image: np.ndarray, size: int) -> np.ndarray:
    """Centre-crop to a square and resize (antialiased bicubic, via 8 bits) to size x size."""
    h, w = image.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    crop = np.round(np.clip(image[top:top + s, left:left + s, :3], 0, 1) * 255).astype(np.uint8)
    return np.asarray(Image.fromarray(crop).resize((size, size), Image.BICUBIC), np.float32) / 255.0
