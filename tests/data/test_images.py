"""images.py: the one image loader (modes, EXIF, bad files) and the shorter-side + centre-crop resize."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFile

from imgclf.data import Preprocess, load_image, preprocess_image
from imgclf.errors import ImgclfError

from synthetic import truncated_image


def spec(size: int, channels: int = 3) -> Preprocess:
    return Preprocess(image_size=size, channels=channels, mean=(0.5,) * channels, std=(0.25,) * channels)


def test_rgba_composited_onto_white():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 255          # red ...
    rgba[:2, :, 3] = 255        # ... opaque in the top half, fully transparent below
    rgba[2:, :, 3] = 0
    out = np.asarray(load_image(Image.fromarray(rgba, "RGBA"), 3))
    assert out.shape == (4, 4, 3)
    assert (out[0, 0] == (255, 0, 0)).all()
    assert (out[3, 3] == (255, 255, 255)).all()


def test_half_transparent_blends_with_white():
    img = Image.new("LA", (2, 2), (0, 128))  # black at ~50% alpha
    value = np.asarray(load_image(img, 1))[0, 0]
    assert 125 <= value <= 129


def test_palette_with_transparency_and_cmyk():
    p = Image.new("P", (4, 4), 1)
    p.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    p.info["transparency"] = 1  # index 1 is transparent -> white
    assert (np.asarray(load_image(p, 3)) == 255).all()
    p.info.pop("transparency")
    assert (np.asarray(load_image(p, 3))[0, 0] == (10, 20, 30)).all()
    cmyk = Image.new("CMYK", (3, 3), (0, 255, 255, 0))  # pure red in CMYK
    assert (np.asarray(load_image(cmyk, 3))[0, 0] == (255, 0, 0)).all()


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    arr = np.array([[0, 257 * 128, 65535]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(arr).save(path)
    assert Image.open(path).mode.startswith("I")
    out = np.asarray(load_image(path, 1))
    assert out.tolist() == [[0, 128, 255]]
    rgb = np.asarray(load_image(path, 3))
    assert rgb.shape == (1, 3, 3) and (rgb[0, 1] == 128).all()


def test_float_and_bilevel_images():
    f = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), "F")
    assert np.asarray(load_image(f, 1)).tolist() == [[0, 128, 255]]
    bilevel = Image.new("1", (2, 2), 1)
    assert (np.asarray(load_image(bilevel, 1)) == 255).all()


def test_grey_to_rgb_copies_the_channel():
    grey = Image.fromarray(np.array([[10, 200]], np.uint8), "L")
    out = np.asarray(load_image(grey, 3))
    assert out.tolist() == [[[10, 10, 10], [200, 200, 200]]]


def test_exif_orientation_applied(tmp_path):
    # 20 wide x 10 high, left half black, right half white; orientation 6 = "rotate 90 degrees clockwise"
    arr = np.zeros((10, 20, 3), np.uint8)
    arr[:, 10:] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    Image.fromarray(arr).save(path, exif=exif.tobytes(), quality=95)
    out = np.asarray(load_image(path, 3))
    assert out.shape == (20, 10, 3)             # portrait now
    assert out[2, 5].mean() < 60 and out[17, 5].mean() > 200  # the left half went to the top


def test_large_jpeg_decodes_at_reduced_scale_with_the_same_pixels_and_stored_size(tmp_path):
    from imgclf.data.decode import decode_chunk
    from imgclf.data.images import open_image, resize_center_crop, stored_size

    # a 1200 x 900 photo-like JPEG (smooth gradients + a bright square off centre), stored rotated by EXIF
    yy, xx = np.mgrid[0:900, 0:1200]
    arr = np.stack([xx * 255 // 1199, yy * 255 // 899, (xx + yy) * 255 // 2098], -1).astype(np.uint8)
    arr[300:500, 500:800] = 250
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "phone.jpg"
    Image.fromarray(arr).save(path, exif=exif.tobytes(), quality=92)
    drafted = open_image(path, min_side=160)
    assert max(drafted.size) <= 600 and min(drafted.size) >= 160   # decoded at a quarter: 225 x 300
    assert stored_size(drafted) == (900, 1200)                     # portrait, as stored after rotation
    full = open_image(path)
    assert full.size == stored_size(full) == (900, 1200)
    reference = np.asarray(resize_center_crop(full.convert("RGB"), 160), np.float32)
    fast = preprocess_image(path, spec(160)).astype(np.float32)
    assert fast.shape == reference.shape and np.abs(fast - reference).mean() < 1.5
    [d] = decode_chunk([("phone.jpg", str(path))], 160, 3)
    assert (d.width, d.height) == (900, 1200) and (d.pixels == fast).all()  # datasets: the same pixels


def test_preprocess_resizes_shorter_side_and_centre_crops():
    img = Image.new("RGB", (500, 375), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 62, 375))      # a red band that the centre crop removes
    out = preprocess_image(img, spec(32))
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert out[:, 0, 0].max() < 30               # no red left at the left edge
    grey = preprocess_image(Image.new("L", (40, 30), 77), spec(16, channels=1))
    assert grey.shape == (16, 16, 1) and (grey == 77).all()


def test_preprocess_accepts_bytes_paths_and_arrays(tmp_path):
    path = tmp_path / "a.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(path)
    from_path = preprocess_image(path, spec(8))
    assert (from_path == preprocess_image(path.read_bytes(), spec(8))).all()
    assert (from_path == preprocess_image(str(path), spec(8))).all()
    assert (from_path == preprocess_image(from_path, spec(8))).all()
    assert from_path.flags.writeable


def test_truncated_jpeg_raises_naming_the_file(tmp_path):
    path = truncated_image(tmp_path / "cut.jpg", "JPEG")
    with pytest.raises(ImgclfError, match="cut.jpg.*truncated"):
        load_image(path)


def test_truncated_image_still_raises_when_pillow_is_told_to_allow_them(tmp_path, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    path = truncated_image(tmp_path / "cut.png", "PNG")
    with pytest.raises(ImgclfError, match="cut.png"):
        load_image(path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the global is restored


def test_non_image_and_missing_files(tmp_path):
    text = tmp_path / "notes.jpg"
    text.write_text("not a picture")
    with pytest.raises(ImgclfError, match="notes.jpg.*not an image"):
        load_image(text)
    with pytest.raises(ImgclfError, match="nothere.png.*not found"):
        load_image(tmp_path / "nothere.png")


def test_extension_that_lies_still_opens(tmp_path):
    path = tmp_path / "really_a_png.jpg"
    Image.new("RGB", (4, 4), (9, 8, 7)).save(path, format="PNG")
    assert np.asarray(load_image(path))[0, 0].tolist() == [9, 8, 7]


def test_caller_image_is_not_modified():
    img = Image.new("RGBA", (4, 2), (0, 0, 0, 0))
    load_image(img, 3)
    assert img.mode == "RGBA" and img.size == (4, 2)


@pytest.mark.timeout(20)
def test_fifo_is_refused_not_read(tmp_path):
    import os

    from imgclf.data.images import image_header

    fifo = tmp_path / "photo.jpg"
    os.mkfifo(fifo)  # opening it for reading would wait for a writer forever
    for read in (lambda: load_image(fifo), lambda: image_header(fifo)):
        with pytest.raises(ImgclfError, match="photo.jpg: not a regular file"):
            read()


@pytest.mark.parametrize("mode", ["I;16", "I", "I-wide", "F", "F-wide", "F-nan"])
def test_high_bit_depths_convert_a_block_of_rows_at_a_time_to_the_same_pixels(mode, monkeypatch):
    """Scaled in blocks of rows (memory: a block, not a float64 copy of the scan), with the whole image's
    range: the pixels equal a conversion of the whole array at once."""
    from imgclf.data import images

    rng = np.random.default_rng(3)
    arr = {"I;16": lambda: rng.integers(0, 65536, (90, 77)).astype(np.uint16),
           "I": lambda: rng.integers(0, 250, (90, 77)).astype(np.int32),
           "I-wide": lambda: rng.integers(-70000, 90000, (90, 77)).astype(np.int32),
           "F": lambda: rng.random((90, 77)).astype(np.float32),
           "F-wide": lambda: (rng.random((90, 77)) * 500 - 100).astype(np.float32),
           "F-nan": lambda: np.where(rng.random((90, 77)) < 0.01, np.nan, rng.random((90, 77))).astype(np.float32),
           }[mode]()
    whole = np.asarray(images._grey_to_l(Image.fromarray(arr)))
    monkeypatch.setattr(images, "BLOCK_PIXELS", 200)  # 2 rows a block
    assert (np.asarray(images._grey_to_l(Image.fromarray(arr))) == whole).all()
    if mode == "I;16":  # scaled, not clipped: 16-bit white is white
        assert whole.max() == 255 and whole.min() == 0


def test_grey_image_in_colour_is_resized_before_its_channels_are_copied():
    from imgclf.data.images import resize_center_crop, to_pixels

    grey = Image.fromarray(np.random.default_rng(4).integers(0, 256, (91, 37), dtype=np.uint8), "L")
    expect = np.asarray(resize_center_crop(grey.convert("RGB"), 24))  # the old order: colour, then resize
    assert (to_pixels(grey, 3, 24) == expect).all() and to_pixels(grey, 1, 24).shape == (24, 24, 1)
