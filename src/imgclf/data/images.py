"""The one image loader and the preprocessing spec, shared by training-data decoding and prediction.

    from imgclf.data import Preprocess, preprocess_image
    x = preprocess_image("cat.jpg", Preprocess(image_size=32, channels=3, mean=(0.5,) * 3, std=(0.25,) * 3))
    # -> (32, 32, 3) uint8; normalisation with mean/std happens later, on tensors

Both the dataset decoder and ``predict`` go through :func:`preprocess_image`, so an image seen at predict
time is turned into exactly the pixels the model was trained on.
"""
from __future__ import annotations

import contextlib
import io
import os
import stat
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from ..errors import ImgclfError

# Modes that carry no colour. A dataset whose images are all in these modes is loaded with 1 channel.
GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})

# Antialiased bilinear: Pillow widens the filter support by the downscale factor, so shrinking a photo
# averages over every source pixel instead of sampling a few (no aliasing), the same choice as
# torchvision's default Resize(antialias=True). Bicubic would sharpen slightly; at 32-64 px that only
# adds ringing.
RESAMPLE = Image.Resampling.BILINEAR

# The formats imgclf reads. Pillow knows ~50, some of them hand the bytes to outside programs (EPS goes to
# Ghostscript) or parse rarely used layouts; a file is only ever offered to these decoders. MPO is the
# JPEG variant many phone cameras write, opened by the JPEG plugin.
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
FORMATS_HELP = "JPEG, PNG, WebP, GIF, BMP or TIFF"

# Bytes one decoded image may take, read from its header (width x height x bytes per pixel of its mode,
# after any reduced-scale JPEG decode) before a pixel is decoded. The conversions that follow take at
# most ~2.5x that again (RGBA onto white), so 256 MiB keeps a worst case under 1 GB: a 85-megapixel RGB
# PNG or a 16-bit 11k x 11k scan still loads. The same budget holds for predict, folders and the server;
# IMGCLF_MAX_IMAGE_MB raises it. Pillow's own warning past 89 megapixels says less than this budget's error
# (and would add lines to it), so it is silenced; its hard limit (179 megapixels) still holds.
MAX_IMAGE_BYTES = 256 * 1024 ** 2
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
_BITS_PER_PIXEL = {"1": 1, "L": 8, "P": 8, "LA": 16, "La": 16, "PA": 16, "I;16": 16, "I;16L": 16, "I;16B": 16,
                   "I;16N": 16, "RGB": 24, "YCbCr": 24, "LAB": 24, "HSV": 24}  # others: 32 (RGBA, CMYK, I, F)


class UnsupportedFormat(ImgclfError):
    """The file is no image in one of :data:`FORMATS` (the server answers 415)."""


class ImageTooLarge(ImgclfError):
    """The image would take more than the decode budget (the server answers 413)."""


@dataclass(frozen=True)
class Preprocess:
    """Everything needed to turn any image into the model's input; stored in every checkpoint."""
    image_size: int                      # square side of the model's input
    channels: int                        # 1 -> "L", 3 -> "RGB"
    mean: tuple[float, ...]              # per channel, on the 0..1 scale
    std: tuple[float, ...]
    resize: str = "shorter-center-crop"  # resize the shorter side to image_size, then centre-crop

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Preprocess:
        d = dict(d)
        d["mean"], d["std"] = tuple(d["mean"]), tuple(d["std"])
        return cls(**d)


def load_image(source, channels: int = 3, *, name: str | None = None, min_side: int | None = None) -> Image.Image:
    """Open a path, bytes or PIL image; apply EXIF orientation; convert to "RGB" (channels=3) or "L" (1).

    Transparent pixels are composited onto white, 16-bit and float images are scaled (not clipped) to
    8 bit. A missing, non-image, truncated or corrupt file raises ImgclfError naming ``name`` (default:
    the path). ``min_side``: see :func:`open_image`. -> PIL.Image, fully decoded.
    """
    img = open_image(source, name=name, min_side=min_side)
    try:
        return to_channels(img, channels)
    except ImgclfError as e:
        raise ImgclfError(f"{name or _describe(source)}: {e}") from None


def preprocess_image(source, spec: Preprocess) -> np.ndarray:
    """open_image + to_pixels per spec -> (H, W, C) uint8. Normalisation happens later, on tensors.

    ``source``: path, bytes, PIL image, or an (H, W[, C]) uint8 array. The resize is ``spec.resize``
    ("shorter-center-crop"): the centred square whose side is the image's shorter side, resized to
    ``spec.image_size`` (the same as resizing the shorter side, then centre-cropping).
    """
    if spec.resize != "shorter-center-crop":
        raise ImgclfError(f"unknown resize method {spec.resize!r}: this version knows 'shorter-center-crop'")
    if isinstance(source, np.ndarray):
        source = Image.fromarray(source[..., 0] if source.ndim == 3 and source.shape[2] == 1 else source)
    img = open_image(source, min_side=spec.image_size)
    try:
        return to_pixels(img, spec.channels, spec.image_size)
    except ImgclfError as e:
        raise ImgclfError(f"{_describe(source)}: {e}") from None


def to_pixels(img: Image.Image, channels: int, size: int) -> np.ndarray:
    """An opened image -> (size, size, channels) uint8: :func:`to_channels`, then :func:`resize_center_crop`.
    A grey image wanted in colour is resized first and copied into three channels after: the same pixels
    (a channel copy commutes with the resize), without a full-size RGB copy of a large scan."""
    try:
        if channels == 3 and img.mode in GREY_MODES:
            return to_array(resize_center_crop(to_channels(img, 1), size).convert("RGB"))
        return to_array(resize_center_crop(to_channels(img, channels), size))
    except MemoryError:  # this image's own conversion: the next image may well fit
        raise ImgclfError(f"out of memory converting this {img.size[0]}x{img.size[1]} image; shrink it, or "
                          "free memory") from None


def open_image(source, *, name: str | None = None, min_side: int | None = None) -> Image.Image:
    """Open and fully decode ``source`` (path, bytes or PIL image), EXIF orientation applied, mode kept.

    ``min_side``: the image is only needed with both sides at least this long (it will be shrunk to it).
    A JPEG much larger than that is then decoded at 1/2, 1/4 or 1/8 scale by the JPEG decoder itself,
    never below ``min_side``: a 12-megapixel phone photo for a 160 px model decodes ~9x faster, and
    the resize that follows still averages over every pixel. Its size as stored (:func:`stored_size`)
    is kept in ``img.info``."""
    label = name or _describe(source)
    if isinstance(source, Image.Image):
        img = source
        _decode(img, label)
        # Not in place: the caller's image is theirs; this returns a (possibly rotated) copy.
        return _exif_transpose(img, label, in_place=False)
    if isinstance(source, (bytes, bytearray, memoryview)):
        fp = io.BytesIO(source)
    elif isinstance(source, (str, os.PathLike)):
        fp = _regular_file(Path(source), label)
    else:
        raise ImgclfError(f"cannot read an image from a {type(source).__name__}: pass a path, bytes or PIL image")
    with _open_errors(label):
        img = _open_with_hint(fp, label)
        stored = img.size
        draft(img, min_side)
    check_budget(img, label)
    _decode(img, label)
    decoded = img.size
    img = _exif_transpose(img, label, in_place=True)
    if decoded != stored:  # drafted smaller; a rotation by EXIF swaps the stored sides too
        img.info[_STORED_SIZE] = stored if img.size == decoded else stored[::-1]
    return img


def image_header(source: str | os.PathLike | bytes, *, name: str | None = None) -> tuple[bool, int, int]:
    """(greyscale?, width, height) from the file's header alone, without decoding a pixel (sizes as stored,
    before any EXIF rotation); ImgclfError as :func:`open_image` raises it for a file that is not an image."""
    label = name or _describe(source)
    fp = (io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else
          _regular_file(Path(source), label))
    with _open_errors(label), _open_with_hint(fp, label) as img:
        return img.mode in GREY_MODES, *img.size


def draft(img: Image.Image, min_side: int | None) -> None:
    """Set an opened, not yet decoded JPEG to decode at 1/2, 1/4 or 1/8 scale where both sides stay at least
    ``min_side`` (see :func:`open_image`); other images are left as they are."""
    if min_side and img.format in ("JPEG", "MPO") and min(img.size) >= 2 * min_side:
        img.draft(img.mode, (min_side, min_side))


def image_bytes(img: Image.Image) -> int:
    """Bytes ``img`` takes decoded, from its size and mode (header only)."""
    w, h = img.size
    return (w * h * _BITS_PER_PIXEL.get(img.mode, 32) + 7) // 8


def max_image_bytes() -> int:
    """:data:`MAX_IMAGE_BYTES`, or ``IMGCLF_MAX_IMAGE_MB`` megabytes where set."""
    given = os.environ.get("IMGCLF_MAX_IMAGE_MB", "").strip()
    try:
        return int(float(given) * 1024 ** 2) if given else MAX_IMAGE_BYTES
    except ValueError:
        raise ImgclfError(f"IMGCLF_MAX_IMAGE_MB={given!r} is not a number of megabytes") from None


def check_budget(img: Image.Image, label: str) -> None:
    """ImgclfError unless ``img`` (opened, not yet decoded) fits the decode budget."""
    limit, need = max_image_bytes(), image_bytes(img)
    if need > limit:
        w, h = img.size
        raise ImageTooLarge(f"{label}: {w}x{h} {img.mode} image would take {need / 1024 ** 2:,.0f} MB decoded, over "
                            f"the {limit / 1024 ** 2:,.0f} MB limit for one image (a decompression bomb?); "
                            "shrink it, or set IMGCLF_MAX_IMAGE_MB higher")


def stored_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) of an image from :func:`open_image` as stored in its file (after EXIF rotation),
    also when it was decoded at a reduced scale."""
    return img.info.get(_STORED_SIZE, img.size)


def to_channels(img: Image.Image, channels: int) -> Image.Image:
    """Any mode -> "L" (channels=1) or "RGB" (channels=3); alpha onto white, high bit depths scaled."""
    if channels not in (1, 3):
        raise ImgclfError(f"channels must be 1 (greyscale) or 3 (RGB), not {channels!r}")
    # Grey images reach RGB through "L" (a plain channel copy), so one grey image decodes to the same
    # pixel values whether its dataset turned out to be greyscale or colour.
    if img.mode in GREY_MODES:
        grey = _grey_to_l(img)
        return grey if channels == 1 else grey.convert("RGB")
    rgb = _colour_to_rgb(img)
    return rgb if channels == 3 else rgb.convert("L")  # ITU-R 601-2 luma


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Centre square (side = shorter side) resized to size x size; a no-op when already that size."""
    if size < 1:
        raise ImgclfError(f"image size must be a positive number of pixels, not {size}")
    w, h = img.size
    if w == h == size:
        return img
    s = min(w, h)
    # Resampling the centred square straight to size x size is "resize the shorter side, then centre-crop"
    # without rounding the intermediate size or the crop offset to whole pixels, and without resampling
    # the pixels that would be cropped away.
    box = ((w - s) / 2, (h - s) / 2, (w + s) / 2, (h + s) / 2)
    return img.resize((size, size), RESAMPLE, box=box)


def to_array(img: Image.Image) -> np.ndarray:
    """"L"/"RGB" PIL image -> (H, W, C) uint8."""
    if img.mode not in ("L", "RGB"):
        raise ImgclfError(f"expected an L or RGB image, got mode {img.mode!r}")
    # The same bytes as np.asarray, without building the array interface dict; bytearray keeps the
    # result writable (torch.from_numpy warns about read-only arrays).
    w, h = img.size
    return np.frombuffer(bytearray(img.tobytes()), dtype=np.uint8).reshape(h, w, len(img.mode))


# --- helpers ---------------------------------------------------------------------------------------

def _describe(source) -> str:
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    return "<image bytes>" if isinstance(source, (bytes, bytearray, memoryview)) else "<image>"


# Pillow otherwise asks each of its ~50 format plugins in turn; naming the likely one first makes
# opening a small JPEG ~20% cheaper. A file whose extension lies is still opened by the full search.
_FORMAT_BY_SUFFIX = {".jpg": "JPEG", ".jpeg": "JPEG", ".jpe": "JPEG", ".jfif": "JPEG", ".png": "PNG",
                     ".bmp": "BMP", ".gif": "GIF", ".webp": "WEBP", ".tif": "TIFF", ".tiff": "TIFF"}


def _open_with_hint(fp, label: str) -> Image.Image:
    hint = _FORMAT_BY_SUFFIX.get(os.path.splitext(label)[1].lower())
    if hint is not None:
        try:
            return Image.open(fp, formats=(hint,))
        except UnidentifiedImageError:
            if isinstance(fp, io.BytesIO):
                fp.seek(0)
    return Image.open(fp, formats=FORMATS)


def _regular_file(path: Path, label: str) -> Path:
    """``path`` if it is a regular file (or missing: opening says so); a FIFO, device or socket would block or
    stream forever when read, so it is refused."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return path
    if not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
        raise ImgclfError(f"{label}: not a regular file (a FIFO, device or socket); pass an image file")
    return path


@contextlib.contextmanager
def _open_errors(label: str):
    """Pillow's errors on opening a file -> ImgclfError naming it and saying what to do."""
    try:
        yield
    except FileNotFoundError:
        raise ImgclfError(f"{label}: file not found; check the path") from None
    except UnidentifiedImageError:
        raise UnsupportedFormat(f"{label}: not an image in a format imgclf reads ({FORMATS_HELP}); convert "
                                "it or delete it") from None
    except IsADirectoryError:
        raise ImgclfError(f"{label}: is a folder, not an image file") from None
    except MemoryError:
        raise ImgclfError(f"{label}: out of memory reading the image header; re-save or delete it") from None
    except ImgclfError:
        raise
    except Exception as e:  # the plugin's own errors on this file's bytes: see the note above _reason
        raise ImgclfError(f"{label}: cannot open image ({_reason(e)}); re-save or delete it") from None


# Pillow's plugins parse the file's bytes, and on bytes they cannot parse some raise more than OSError and
# ValueError (struct.error, IndexError, KeyError, ZeroDivisionError from crafted headers): whatever they raise
# while opening or decoding one file is that file's error, so every Exception there becomes one.


def _reason(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else ""
    if isinstance(e, (OSError, SyntaxError, ValueError)) and text:
        return text
    return f"{type(e).__name__}: {text}".rstrip(": ")


@contextlib.contextmanager
def _strict_truncation():
    # Pillow's global LOAD_TRUNCATED_IMAGES (which some libraries switch on) would pad a truncated file
    # with grey and say nothing; a half-grey training image is worse than a clear error.
    saved = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = saved


def _decode(img: Image.Image, label: str) -> None:
    # Image.open only reads the header; load() decodes every pixel, which is where truncation shows.
    try:
        with _strict_truncation():
            img.load()
    except MemoryError:  # this image's own decode: the next image may well fit
        w, h = img.size
        raise ImgclfError(f"{label}: out of memory decoding this {w}x{h} image; shrink it, or free memory") from None
    except Exception as e:  # the decoder's errors on this file's bytes: see the note above _reason
        raise ImgclfError(f"{label}: truncated or corrupt image ({_reason(e)}); re-save or delete it") from None


_STORED_SIZE = "imgclf_stored_size"

# Formats whose orientation can only come from EXIF or XMP data that Pillow puts in img.info when
# loading; without those keys there is nothing to rotate and exif_transpose's parsing can be skipped.
_INFO_ORIENTED = frozenset({"JPEG", "PNG", "WEBP", "GIF", "BMP"})


def _exif_transpose(img: Image.Image, label: str, *, in_place: bool) -> Image.Image:
    if img.format in _INFO_ORIENTED and not any(k in img.info for k in ("exif", "xmp", "XML:com.adobe.xmp")):
        return img if in_place else img.copy()
    try:
        out = ImageOps.exif_transpose(img, in_place=in_place)
    except Exception as e:  # EXIF parsing of this file's bytes: see the note above _reason
        raise ImgclfError(f"{label}: unreadable EXIF data ({_reason(e)}); re-save the image") from None
    return img if in_place else out


def _grey_to_l(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "L":
        return img
    if mode in ("LA", "La"):
        la = img.convert("LA") if mode == "La" else img
        white = Image.new("L", img.size, 255)
        white.paste(la.getchannel("L"), mask=la.getchannel("A"))
        return white
    if mode == "1":
        return img.convert("L")
    # High bit depths: Pillow's own convert("L") clips I/I;16 values above 255 to white, so scale here, a
    # block of rows at a time: a 7k x 7k 16-bit scan as one float64 array (and its temporaries) took 1.6 GB.
    arr = np.asarray(img)
    if mode.startswith("I;16"):
        def scale(block):
            return _scale(block.astype(np.float64), 65535.0)
    elif mode == "I":
        scale = _range_scaler(arr.min(initial=0), arr.max(initial=0))
    else:  # "F"
        lo = min((np.nan_to_num(b.astype(np.float64)).min(initial=0) for b in _row_blocks(arr)), default=0)
        hi = max((np.nan_to_num(b.astype(np.float64)).max(initial=0) for b in _row_blocks(arr)), default=0)
        by_range = _range_scaler(lo, hi) if not (lo >= 0 and hi <= 1) else (lambda b: _scale(b, 1.0))

        def scale(block):
            return by_range(np.nan_to_num(block.astype(np.float64)))
    out = np.empty(arr.shape, np.uint8)
    start = 0
    for block in _row_blocks(arr):
        out[start:start + len(block)] = scale(block)
        start += len(block)
    return Image.fromarray(out, "L")


BLOCK_PIXELS = 1 << 20  # pixels converted at a time from a high bit depth: 8 MB of float64


def _row_blocks(arr: np.ndarray):
    rows = max(1, BLOCK_PIXELS // max(1, arr.shape[1] if arr.ndim > 1 else 1))
    for start in range(0, len(arr), rows):
        yield arr[start:start + rows]


def _scale(arr: np.ndarray, full: float) -> np.ndarray:
    """0..full -> 0..255 with rounding, so 16-bit white stays white and mid-grey stays mid-grey."""
    return np.clip(np.rint(arr * (255.0 / full)), 0, 255).astype(np.uint8)


def _range_scaler(lo: float, hi: float):
    """32-bit int / float images have no fixed white: 8-bit data is kept, 16-bit data scaled as such,
    anything else stretched from its own min..max (``lo``, ``hi``: the whole image's, with 0 included)."""
    def scale(block: np.ndarray) -> np.ndarray:
        if lo >= 0 and hi <= 255:
            return np.rint(block).astype(np.uint8)
        if lo >= 0 and hi <= 65535:
            return _scale(block.astype(np.float64), 65535.0)
        return _scale(block.astype(np.float64) - lo, max(hi - lo, 1e-12))
    return scale


def _colour_to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if (mode == "P" and "transparency" in img.info) or mode in ("PA", "RGBa"):
        img, mode = img.convert("RGBA"), "RGBA"
    if mode == "RGBA":
        white = Image.new("RGB", img.size, (255, 255, 255))
        white.paste(img.convert("RGB"), mask=img.getchannel("A"))
        return white
    try:  # P without transparency, CMYK, YCbCr, HSV, LAB, RGBX ...
        return img.convert("RGB")
    except (ValueError, OSError) as e:
        raise ImgclfError(f"image mode {mode!r} cannot be converted to RGB ({_reason(e)}); "
                          "re-save the image as RGB") from None
