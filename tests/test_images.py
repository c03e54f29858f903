"""Robust decoding (Reliability item 8): every odd file is built on the fly in tmp_path."""

from __future__ import annotations

import io
import pickle
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from swav.images import (BadImageTracker, ImageDecodeError, TooManyBadImagesError,
                         default_max_pixels, load_image)

def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def noise_rgb(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8))


def png_with_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height (valid CRCs) but holds almost no data."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + tag + data
                + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF", "GIF", "WEBP"])
def test_lossless_formats_round_trip_exactly(fmt):
    img = noise_rgb(7, 5)
    if fmt == "GIF":  # GIF is palette-based: compare with what a palette allows
        img = img.convert("P", palette=Image.Palette.ADAPTIVE, colors=8).convert("RGB")
    kwargs = {"lossless": True} if fmt == "WEBP" else {}
    out = load_image(encode(img, fmt, **kwargs))
    assert out.mode == "RGB" and out.size == (7, 5)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(img))


def test_jpeg_path_and_bytes_agree_and_grey_uses_luma(tmp_path):
    path = tmp_path / "photo.jpg"
    noise_rgb(16, 12).save(path, quality=95)
    from_path, from_bytes = load_image(path), load_image(path.read_bytes())
    np.testing.assert_array_equal(np.asarray(from_path), np.asarray(from_bytes))
    grey = load_image(path, channels=1)
    assert grey.mode == "L"
    np.testing.assert_array_equal(np.asarray(grey), np.asarray(from_path.convert("L")))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP"])
def test_one_by_one_pixel(fmt):
    out = load_image(encode(Image.new("RGB", (1, 1), (200, 100, 50)), fmt))
    assert out.size == (1, 1) and out.mode == "RGB"
    if fmt in ("PNG", "BMP", "TIFF"):
        assert out.getpixel((0, 0)) == (200, 100, 50)


def test_gif_first_frame_is_used():
    frames = [Image.new("RGB", (4, 4), c) for c in [(255, 0, 0), (0, 0, 255)]]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    assert load_image(data).getpixel((2, 2)) == (255, 0, 0)


def test_exif_orientation_is_applied_exactly():
    img = noise_rgb(6, 4)
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    out = load_image(encode(img, "PNG", exif=exif.tobytes()))
    assert out.size == (4, 6)  # transposed
    np.testing.assert_array_equal(np.asarray(out), np.rot90(np.asarray(img), k=-1))


def test_exif_rotated_jpeg_photo_is_transposed():
    photo = noise_rgb(50, 30)
    exif = photo.getexif()
    exif[0x0112] = 8  # rotate 90 counter-clockwise
    out = load_image(encode(photo, "JPEG", exif=exif.tobytes()))
    assert out.size == (30, 50)
    assert load_image(encode(photo, "JPEG")).size == (50, 30)  # no tag: unchanged


def test_cmyk_jpeg_becomes_rgb():
    out = load_image(encode(Image.new("CMYK", (8, 8), (255, 0, 0, 0)), "JPEG"))  # pure cyan
    assert out.mode == "RGB"
    r, g, b = out.getpixel((4, 4))
    assert r < 10 and g > 245 and b > 245


def test_rgba_is_composited_on_white():
    arr = np.zeros((1, 3, 4), np.uint8)
    arr[0, 0] = (0, 0, 0, 0)        # transparent black -> white
    arr[0, 1] = (0, 0, 0, 128)      # half black -> mid grey
    arr[0, 2] = (10, 20, 30, 255)   # opaque stays
    out = load_image(encode(Image.fromarray(arr), "PNG"))
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert all(abs(v - 127) <= 1 for v in out.getpixel((1, 0)))
    assert out.getpixel((2, 0)) == (10, 20, 30)


def test_la_and_palette_transparency_on_white():
    la = Image.fromarray(np.array([[[0, 0], [50, 255]]], np.uint8))
    out = load_image(encode(la, "PNG"), channels=1)
    assert out.mode == "L" and np.asarray(out).ravel().tolist() == [255, 50]
    pal = Image.new("P", (2, 1), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.putpixel((1, 0), 1)
    for fmt in ("PNG", "GIF"):
        out = load_image(encode(pal, fmt, transparency=0))
        assert [out.getpixel((0, 0)), out.getpixel((1, 0))] == [(255, 255, 255), (255, 0, 0)]
    out = load_image(encode(pal, "PNG"))  # no transparency: index 0 is black
    assert out.getpixel((0, 0)) == (0, 0, 0)


def test_sixteen_bit_png_is_scaled_not_clipped():
    values = np.array([[0, 257, 1000, 32768, 65535]], np.uint16)
    rng = np.random.default_rng(0)
    values = np.concatenate([values, rng.integers(0, 65536, (1, 5)).astype(np.uint16)])
    data = encode(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(data)).mode in ("I;16", "I")
    out = load_image(data, channels=1)
    expected = np.floor(values / 257.0 + 0.5).astype(np.uint8)  # naive rounding of v / 257
    np.testing.assert_array_equal(np.asarray(out), expected)
    assert out.getpixel((4, 0)) == 255 and out.getpixel((3, 0)) == 128
    assert out.getpixel((2, 0)) == 4  # clipping would give 255
    rgb = np.asarray(load_image(data))
    assert rgb.shape == (2, 5, 3) and (rgb == expected[..., None]).all()


def test_32bit_and_float_tiff_are_stretched():
    wide = np.array([[0, 100000, 200000]], np.int32)
    out = load_image(encode(Image.fromarray(wide, "I"), "TIFF"), channels=1)
    assert np.asarray(out).ravel().tolist() == [0, 128, 255]
    unit = np.array([[0.0, 0.5, 1.0]], np.float32)
    out = load_image(encode(Image.fromarray(unit, "F"), "TIFF"), channels=1)
    assert np.asarray(out).ravel().tolist() == [0, 128, 255]


@pytest.mark.parametrize("fmt", ["ICO", "PCX", "EPS"])
def test_other_formats_are_refused(fmt):
    image = Image.new("RGB", (16, 16), (5, 6, 7))
    with pytest.raises(ImageDecodeError) as info:
        load_image(encode(image, fmt), name="disguised.jpg")
    assert info.value.kind == "not_an_image" and "disguised.jpg" in str(info.value)


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(ImageDecodeError) as info:
        load_image(path)
    assert info.value.kind == "empty" and str(path) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_text_named_jpg(tmp_path):
    path = tmp_path / "page.jpg"
    path.write_text("<html><body>404 Not Found</body></html>")
    with pytest.raises(ImageDecodeError, match="page.jpg") as info:
        load_image(path)
    assert info.value.kind == "not_an_image" and info.value.path == str(path)


@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_truncated_jpeg_and_png(tmp_path, keep):
    for fmt in ("JPEG", "PNG"):
        data = encode(noise_rgb(64, 48), fmt)
        path = tmp_path / f"cut.{fmt.lower()}"
        path.write_bytes(data[: int(len(data) * keep)])
        with pytest.raises(ImageDecodeError) as info:
            load_image(path)
        assert info.value.kind in ("truncated", "corrupt") and str(path) in str(info.value)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # never switched on globally


def test_truncated_real_photo_is_truncated_kind(tmp_path):
    data = encode(noise_rgb(200, 150), "JPEG", quality=90)
    with pytest.raises(ImageDecodeError) as info:
        load_image(data[: len(data) // 2])
    assert info.value.kind == "truncated"


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ImageDecodeError) as info:
        load_image(tmp_path / "nope.png")
    assert info.value.kind == "unreadable"
    with pytest.raises(ImageDecodeError):
        load_image(tmp_path)


def test_decompression_bomb_header_is_refused():
    with pytest.raises(ImageDecodeError) as info:
        load_image(png_with_header(100_000, 100_000))  # 1e10 pixels, Pillow refuses on open
    assert info.value.kind == "too_large"
    with pytest.raises(ImageDecodeError) as info:  # between our limit and Pillow's
        load_image(png_with_header(20_000, 4_000), max_pixels=50_000_000)
    assert info.value.kind == "too_large" and "50000000" in info.value.reason


def test_lowered_pixel_limit():
    data = encode(Image.new("RGB", (10, 10)), "PNG")
    assert load_image(data, max_pixels=100).size == (10, 10)
    with pytest.raises(ImageDecodeError, match="exceeds the limit of 99"):
        load_image(data, max_pixels=99)
    assert default_max_pixels() == 2 * Image.MAX_IMAGE_PIXELS


def test_bad_arguments():
    with pytest.raises(ValueError, match="channels"):
        load_image(b"x", channels=4)
    with pytest.raises(ValueError, match="max_pixels"):
        load_image(b"x", max_pixels=-1)
    with pytest.raises(TypeError):
        load_image(123)


def test_decode_error_survives_pickling():
    err = pickle.loads(pickle.dumps(ImageDecodeError("a/b.jpg", "file is empty", "empty")))
    assert (err.path, err.reason, err.kind) == ("a/b.jpg", "file is empty", "empty")


def test_tracker_needs_min_count_before_aborting():
    tracker = BadImageTracker(max_bad_fraction=0.01, min_bad_count=3)
    tracker.record_ok()
    tracker.record_bad("a", "x")
    tracker.record_bad("b", "x")  # 2 of 3 bad, but below the count threshold
    tracker.record_bad("b", "x")  # the same file again: still 2 distinct
    assert len(tracker.bad) == 2 and tracker.attempted == 4
    with pytest.raises(TooManyBadImagesError, match="3 unreadable images out of 5"):
        tracker.record_bad("c", "x")


def test_tracker_fraction_rule():
    tracker = BadImageTracker(max_bad_fraction=0.25, min_bad_count=2)
    for _ in range(6):
        tracker.record_ok()
    tracker.record_bad("a", "x")
    tracker.record_bad("b", "x")  # 2 / 8 = 0.25, not above
    with pytest.raises(TooManyBadImagesError):
        tracker.record_bad("c", "x")  # 3 / 9 > 0.25
    with pytest.raises(ValueError, match="max_bad_fraction"):
        BadImageTracker(max_bad_fraction=1.5)


def test_tracker_list_file_merges_processes(tmp_path):
    path = tmp_path / "logs" / "bad.txt"
    one = BadImageTracker(max_bad_fraction=1.0, bad_list_path=path)
    two = BadImageTracker(max_bad_fraction=1.0, bad_list_path=path)  # e.g. another worker
    one.record_bad("x/é 1.jpg", "empty")
    two.record_bad("y.png", "truncated")
    two.record_bad("x/é 1.jpg", "empty")
    assert path.read_text(encoding="utf-8").splitlines() == ["x/é 1.jpg", "y.png", "x/é 1.jpg"]
    assert BadImageTracker(bad_list_path=path).bad_files == ["x/é 1.jpg", "y.png"]
    assert one.bad_files == ["x/é 1.jpg", "y.png"]


def test_large_images_below_the_limit_load_without_pillows_warning(tmp_path):
    """90 M pixels: above Pillow's warning threshold (89.5 M) and below the limit (2x): loads, and Pillow's
    DecompressionBombWarning does not leak onto the user's terminal (the limit has its own message)."""
    import warnings

    from PIL import Image

    Image.new("L", (9500, 9500)).save(tmp_path / "large.png")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        image = load_image(tmp_path / "large.png", channels=1)
    assert image.size == (9500, 9500)
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]


def test_twelve_bit_data_in_sixteen_bit_files_is_warned_about_once(caplog, monkeypatch):
    import swav.images as images
    monkeypatch.setattr(images, "_low_bit_depth_warned", False)
    twelve = encode(Image.fromarray(np.array([[0, 1000, 4095]], np.uint16)), "PNG")
    full = encode(Image.fromarray(np.array([[0, 1000, 65535]], np.uint16)), "PNG")
    with caplog.at_level("WARNING", logger="swav.images"):
        load_image(full, channels=1)
        assert "12-bit" not in caplog.text
        assert np.asarray(load_image(twelve, channels=1)).max() == 16  # what the warning is about
        load_image(twelve, channels=1)
    assert caplog.text.count("holds values up to 4095 only") == 1


def test_bit_depth_scales_12_bit_data_in_16_bit_files(caplog, monkeypatch):
    import swav.images as images
    monkeypatch.setattr(images, "_clipped_warned", False)
    twelve = encode(Image.fromarray(np.array([[0, 1, 2048, 4095]], np.uint16)), "PNG")
    out = np.asarray(load_image(twelve, channels=1, bit_depth=12))
    np.testing.assert_array_equal(out, np.floor(np.array([[0, 1, 2048, 4095]]) * 255 / 4095 + 0.5).astype(np.uint8))
    assert out[0, -1] == 255 and out[0, 2] == 128
    assert np.asarray(load_image(twelve, channels=1, bit_depth=16)).max() == 16  # 16 = full 16-bit, as None
    over = encode(Image.fromarray(np.array([[0, 4095, 9000]], np.uint16)), "PNG")
    with caplog.at_level("WARNING", logger="swav.images"):
        clipped = np.asarray(load_image(over, channels=1, bit_depth=12))
        load_image(over, channels=1, bit_depth=12)
    assert clipped.tolist() == [[0, 255, 255]] and caplog.text.count("above the 4095 of data.bit_depth=12") == 1
    eight = encode(Image.fromarray(np.array([[7, 200]], np.uint8)), "PNG")  # 8-bit files are not affected
    assert np.asarray(load_image(eight, channels=1, bit_depth=12)).tolist() == [[7, 200]]
    for bad in (7, 17, True, 12.0):
        with pytest.raises(ValueError, match="data.bit_depth"):
            load_image(twelve, bit_depth=bad)
