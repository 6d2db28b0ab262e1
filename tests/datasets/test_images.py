"""load_rgb: every Pillow mode becomes upright 8-bit RGB with the documented values."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from datasets.images import ImageLoadError, load_rgb


def _pixels(path) -> np.ndarray:
    image = load_rgb(path)
    assert image.mode == "RGB"
    return np.asarray(image).astype(int)


def test_rgb_png_is_returned_unchanged(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, (6, 9, 3), dtype=np.uint8)
    Image.fromarray(data).save(tmp_path / "a.png")
    np.testing.assert_array_equal(_pixels(tmp_path / "a.png"), data)


def test_exif_orientation_6_rotates_clockwise(tmp_path):
    # Stored 40 wide x 20 high: left half red, right half blue. Orientation 6 = "rotate 90 CW to view".
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :20] = (255, 0, 0)
    stored[:, 20:] = (0, 0, 255)
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(tmp_path / "rot.png", exif=exif)
    loaded = load_rgb(tmp_path / "rot.png")
    assert loaded.size == (20, 40)  # (W, H): width and height swapped
    pixels = np.asarray(loaded)
    np.testing.assert_array_equal(pixels[5, 10], (255, 0, 0))  # stored left -> displayed top
    np.testing.assert_array_equal(pixels[35, 10], (0, 0, 255))  # stored right -> displayed bottom


def test_rgba_composites_over_white(tmp_path):
    data = np.array([[[0, 0, 0, 0], [255, 0, 0, 255], [255, 0, 0, 128]]], np.uint8)
    Image.fromarray(data, "RGBA").save(tmp_path / "a.png")
    pixels = _pixels(tmp_path / "a.png")
    np.testing.assert_array_equal(pixels[0, 0], (255, 255, 255))  # transparent black -> white
    np.testing.assert_array_equal(pixels[0, 1], (255, 0, 0))
    # 50% red over white: G and B = 255 * (1 - 128/255) = 127
    np.testing.assert_allclose(pixels[0, 2], (255, 127, 127), atol=1)


def test_la_composites_over_white(tmp_path):
    Image.fromarray(np.array([[[10, 0], [10, 255]]], np.uint8), "LA").save(tmp_path / "a.png")
    pixels = _pixels(tmp_path / "a.png")
    np.testing.assert_array_equal(pixels[0], [(255, 255, 255), (10, 10, 10)])


def test_palette_with_transparent_index_becomes_white(tmp_path):
    image = Image.new("P", (2, 1))
    image.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    image.putdata([0, 1])
    image.save(tmp_path / "a.png", transparency=0)
    np.testing.assert_array_equal(_pixels(tmp_path / "a.png")[0], [(255, 255, 255), (0, 200, 0)])


def test_palette_without_transparency_uses_palette_colours(tmp_path):
    image = Image.new("P", (2, 1))
    image.putpalette([12, 34, 56, 200, 0, 100] + [0] * 762)
    image.putdata([0, 1])
    image.save(tmp_path / "a.png")
    np.testing.assert_array_equal(_pixels(tmp_path / "a.png")[0], [(12, 34, 56), (200, 0, 100)])


def test_greyscale_is_replicated(tmp_path):
    Image.fromarray(np.array([[0, 100, 255]], np.uint8)).save(tmp_path / "a.png")
    np.testing.assert_array_equal(_pixels(tmp_path / "a.png")[0], [(0,) * 3, (100,) * 3, (255,) * 3])


def test_one_bit(tmp_path):
    Image.fromarray(np.array([[True, False, True]])).convert("1").save(tmp_path / "a.png")
    np.testing.assert_array_equal(_pixels(tmp_path / "a.png")[0], [(255,) * 3, (0,) * 3, (255,) * 3])


def test_cmyk(tmp_path):
    data = np.array([[[0, 0, 0, 0], [0, 255, 255, 0], [0, 0, 0, 255]]], np.uint8)
    Image.fromarray(data, "CMYK").save(tmp_path / "a.tif")
    np.testing.assert_array_equal(_pixels(tmp_path / "a.tif")[0], [(255, 255, 255), (255, 0, 0), (0, 0, 0)])


def test_16bit_gradient_is_stretched_not_clipped(tmp_path):
    # A 12-bit-style ramp 1000..5000: convert("RGB") would clip every pixel to 255.
    ramp = np.linspace(1000, 5000, 64).round().astype(np.uint16)[None, :].repeat(3, axis=0)
    Image.fromarray(ramp).save(tmp_path / "a.png")
    with Image.open(tmp_path / "a.png") as raw:
        assert raw.mode == "I;16"
        assert np.asarray(raw.convert("RGB")).min() == 255  # the failure mode we avoid
    grey = _pixels(tmp_path / "a.png")[..., 0]
    row = grey[1]
    assert row[0] == 0 and row[-1] == 255
    assert (np.diff(row) >= 0).all() and len(np.unique(row)) > 50  # ordering kept, levels kept
    # linear: the middle of the ramp lands in the middle of 0..255
    assert abs(row[32] - 255 * (int(ramp[0, 32]) - 1000) / 4000) <= 1


def test_32bit_int_and_float_are_stretched(tmp_path):
    ints = np.array([[-70000, 0, 70000]], np.int32)
    Image.fromarray(ints).save(tmp_path / "i.tif")
    np.testing.assert_array_equal(_pixels(tmp_path / "i.tif")[0, :, 0], [0, 128, 255])
    floats = np.array([[0.25, 0.5, 0.75]], np.float32)
    Image.fromarray(floats).save(tmp_path / "f.tif")
    np.testing.assert_array_equal(_pixels(tmp_path / "f.tif")[0, :, 0], [0, 128, 255])


def test_constant_16bit_image_becomes_black(tmp_path):
    Image.fromarray(np.full((2, 2), 4000, np.uint16)).save(tmp_path / "a.png")
    assert _pixels(tmp_path / "a.png").max() == 0


def test_missing_file_raises_naming_it(tmp_path):
    with pytest.raises(ImageLoadError, match="nope.jpg.*does not exist"):
        load_rgb(tmp_path / "nope.jpg")


def test_not_an_image_raises(tmp_path):
    (tmp_path / "notes.jpg").write_text("hello")
    with pytest.raises(ValueError, match="notes.jpg"):
        load_rgb(tmp_path / "notes.jpg")


def test_truncated_jpeg_raises(tmp_path):
    data = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(data).save(tmp_path / "full.jpg", quality=90)
    content = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(content[: len(content) // 2])
    with pytest.raises(ImageLoadError, match="cut.jpg") as info:
        load_rgb(tmp_path / "cut.jpg")
    assert info.value.path == tmp_path / "cut.jpg"
    assert "truncated" in info.value.reason


def test_image_facts_read_header_size_after_exif_and_cache_by_stat(tmp_path, monkeypatch):
    from datasets.images import image_facts

    monkeypatch.setenv("SOIR_CACHE_DIR", str(tmp_path / "cache"))
    upright, turned, junk = tmp_path / "a.png", tmp_path / "b.jpg", tmp_path / "c.jpg"
    Image.new("RGB", (30, 20)).save(upright)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 30 x 20, shown 20 x 30
    Image.new("RGB", (30, 20)).save(turned, exif=exif)
    junk.write_bytes(b"not an image")
    a, b, c = image_facts([upright, turned, junk])
    assert (a.width, a.height, a.exif_orientation, a.error) == (30, 20, 1, None)
    assert (b.width, b.height, b.exif_orientation) == (20, 30, 6)
    assert (b.width, b.height) == load_rgb(turned).size
    assert c.error and "UnidentifiedImageError" in c.error
    import hashlib

    assert a.sha256 == hashlib.sha256(upright.read_bytes()).hexdigest()
    Image.new("RGB", (8, 9)).save(upright)  # edited in place: read again
    assert image_facts([upright])[0].width == 8
    assert (tmp_path / "cache" / "file_facts.sqlite").is_file()


def test_min_side_decodes_a_jpeg_at_a_reduced_scale_and_keeps_it_upright(tmp_path):
    stored = np.zeros((480, 640, 3), np.uint8)
    stored[:, :320] = (255, 0, 0)
    stored[:, 320:] = (0, 0, 255)
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    assert load_rgb(tmp_path / "rot.jpg").size == (480, 640)
    small = load_rgb(tmp_path / "rot.jpg", min_side=100)
    assert small.size == (120, 160) and small.mode == "RGB"  # 1/4: the smallest scale with sides >= 100
    pixels = np.asarray(small).astype(int)
    assert np.abs(pixels[20, 60] - (255, 0, 0)).max() < 20  # stored left -> displayed top
    assert np.abs(pixels[140, 60] - (0, 0, 255)).max() < 20
    assert load_rgb(tmp_path / "rot.jpg", min_side=200).size == (240, 320)  # 1/2
    assert load_rgb(tmp_path / "rot.jpg", min_side=300).size == (480, 640)  # 240 < 300: full size
    image.save(tmp_path / "a.png")
    assert load_rgb(tmp_path / "a.png", min_side=100).size == (640, 480)  # not a JPEG: full size
