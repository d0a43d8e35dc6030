"""read_image / write_png on every odd kind of file we promise to handle (each made here with Pillow)."""
import os

import numpy as np
import pytest
from PIL import Image

from diffrestorer_jax.data.image_io import ImageReadError, decode_image, encode_png, read_image, write_png


def _gradient(h=12, w=16):
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // (w - 1), y * 255 // (h - 1), np.full_like(x, 100)], -1).astype(np.uint8)


def _check_rgb(arr, shape):
    assert arr.dtype == np.float32 and arr.shape == shape + (3,)
    assert arr.min() >= 0 and arr.max() <= 1


def test_rgb_png_round_trip(tmp_path):
    path = tmp_path / "a.png"
    write_png(path, _gradient() / 255.0)
    arr = read_image(path)
    _check_rgb(arr, (12, 16))
    np.testing.assert_array_equal(np.round(arr * 255).astype(np.uint8), _gradient())
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp_")], "temp file left behind"


def test_write_png_is_atomic_on_failure(tmp_path):
    path = tmp_path / "b.png"
    write_png(path, np.zeros((4, 4, 3)))
    with pytest.raises(Exception):
        write_png(path, np.zeros((4, 4, 7)))  # PIL cannot encode 7 channels
    assert read_image(path).shape == (4, 4, 3), "the old file must survive a failed write"
    assert os.listdir(tmp_path) == ["b.png"]


def test_exif_orientation_applied(tmp_path):
    path = tmp_path / "rot.jpg"
    img = Image.fromarray(_gradient())  # 12 x 16 (h x w)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    img.save(path, quality=95, exif=exif)
    arr = read_image(path)
    _check_rgb(arr, (16, 12))
    # After a 90-degree clockwise turn, the original left column (red = 0) becomes the top row.
    assert arr[0, :, 0].mean() < arr[-1, :, 0].mean()


@pytest.mark.parametrize("mode", ["L", "1", "P", "CMYK", "YCbCr"])
def test_modes_converted_to_rgb(tmp_path, mode):
    ext = {"CMYK": "jpg", "YCbCr": "jpg"}.get(mode, "png")
    path = tmp_path / f"m.{ext}"
    Image.fromarray(_gradient()).convert(mode).save(path)
    arr = read_image(path)
    _check_rgb(arr, (12, 16))
    if mode in ("L", "1"):
        np.testing.assert_array_equal(arr[..., 0], arr[..., 2])


def test_rgba_and_la_composited_on_white(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 3] = 0            # fully transparent black ...
    rgba[0, 0] = (255, 0, 0, 255)  # ... except one opaque red pixel
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    arr = read_image(tmp_path / "a.png")
    np.testing.assert_allclose(arr[1, 1], 1.0)
    np.testing.assert_allclose(arr[0, 0], (1.0, 0.0, 0.0))
    la = Image.fromarray(np.stack([np.zeros((4, 4)), np.full((4, 4), 128)], -1).astype(np.uint8), "LA")
    la.save(tmp_path / "la.png")
    np.testing.assert_allclose(read_image(tmp_path / "la.png"), 127 / 255, atol=1e-2)


def test_palette_with_transparency(tmp_path):
    img = Image.new("P", (4, 4), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.putpixel((0, 0), 1)
    img.save(tmp_path / "p.png", transparency=0)
    arr = read_image(tmp_path / "p.png")
    np.testing.assert_allclose(arr[3, 3], 1.0)  # transparent index -> white
    np.testing.assert_allclose(arr[0, 0], (1.0, 0.0, 0.0))


def test_16bit_png_scaled_not_clipped(tmp_path):
    data = np.array([[0, 32768, 65535]], np.uint16)
    Image.fromarray(data).save(tmp_path / "g16.png")
    arr = read_image(tmp_path / "g16.png")
    np.testing.assert_allclose(arr[0, :, 0], [0.0, 32768 / 65535, 1.0], atol=1e-4)


def test_16bit_dark_images_stay_dark(tmp_path):
    """A 16-bit frame whose values all sit below 256 (a dark exposure) is read on the 16-bit scale
    in every format, PGM included, which Pillow opens as 32-bit integers."""
    data = np.array([[0, 189, 255]], np.uint16)
    for ext in ("png", "tif", "pgm"):
        Image.fromarray(data).save(tmp_path / f"dark.{ext}")
        arr = read_image(tmp_path / f"dark.{ext}")
        np.testing.assert_allclose(arr[0, :, 0], data[0] / 65535, atol=1e-6, err_msg=ext)


def test_decompression_bomb_refused(tmp_path, monkeypatch):
    Image.fromarray(_gradient()).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ImageReadError, match="big.png.*decompression bomb"):
        read_image(tmp_path / "big.png")


def _claimed_size_png(tmp_path, width, height):
    """A valid small PNG whose header (IHDR) claims another size: only the header can be trusted."""
    import struct
    import zlib
    png = encode_png(np.zeros((4, 4, 3)))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    path = tmp_path / f"claims_{width}x{height}.png"
    path.write_bytes(png[:8] + chunk + png[8 + 25:])
    return path


def test_max_pixels_refuses_from_the_header_and_replaces_pillows_guard(tmp_path):
    """max_pixels is checked on the header's size before decoding, with its own message, in place of
    Pillow's guard in both directions: below it (a 9000^2 claim, which Pillow would let through) and
    above it (a 10000^2 claim, 100 MP, which Pillow would refuse as a bomb but a larger max_pixels
    admits; decoding then fails on the missing data, as it should)."""
    small = _claimed_size_png(tmp_path, 9000, 9000)
    with pytest.raises(ImageReadError, match="9000x9000 = 81000000 pixels exceeds the limit of 5000$"):
        read_image(small, max_pixels=5000)
    big = _claimed_size_png(tmp_path, 10000, 10000)
    with pytest.raises(ImageReadError, match="decompression bomb"):
        read_image(big)
    with pytest.raises(ImageReadError, match="corrupt or unreadable|truncated"):
        read_image(big, max_pixels=200_000_000)
    assert Image.MAX_IMAGE_PIXELS == 89478485  # Pillow's global is left as it was


@pytest.mark.parametrize("kind,reason", [("zero", "empty"), ("text", "not an image"),
                                         ("truncated", "truncated"), ("corrupt", "corrupt"),
                                         ("missing", "no such file")])
def test_bad_files_raise_one_error_naming_file_and_reason(tmp_path, kind, reason):
    path = tmp_path / f"{kind}.png"
    png = encode_png(np.random.default_rng(0).random((64, 64, 3)))
    if kind == "zero":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("hello, I am not a picture\n")
    elif kind == "truncated":
        path.write_bytes(png[: len(png) // 2])
    elif kind == "corrupt":
        path.write_bytes(png[:60] + bytes(200) + png[260:])
    with pytest.raises(ImageReadError) as err:
        read_image(path)
    assert str(path) in str(err.value) and reason in err.value.reason


def test_decode_bytes_names_the_record():
    with pytest.raises(ImageReadError, match="record 7"):
        decode_image(b"nope", name="record 7")
    np.testing.assert_allclose(decode_image(encode_png(np.ones((2, 2, 3)))), 1.0)
