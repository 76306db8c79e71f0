"""The one synthetic-image factory: every test that needs image files on disk builds them here.

A class's images share a colour (red/green/blue by name, otherwise one derived from the class's index),
so a tiny CNN separates them in a few epochs and training tests can assert learning; ``noise`` adds
seeded per-pixel noise so the images are not all identical."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = {"red": (200, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 200)}


def class_colour(name: str, index: int) -> tuple[int, int, int]:
    return COLOURS.get(name, (index * 37 % 256, index * 91 % 256, 200 - index * 23 % 200))


def pixels(colour, size=(8, 8), noise: float = 0.0, rng: np.random.Generator | None = None) -> np.ndarray:
    """(height, width, 3) uint8 of ``colour``, plus normal noise of std ``noise`` when given."""
    w, h = (size, size) if isinstance(size, int) else size
    if not noise:
        return np.full((h, w, 3), colour, np.uint8)
    return np.clip(np.asarray(colour, np.float64) + rng.normal(0, noise, (h, w, 3)), 0, 255).astype(np.uint8)


def write_image(path: Path, size=(8, 8), mode: str = "RGB", value: int = 0, fmt: str | None = None,
                colour=None, noise: float = 0.0, rng: np.random.Generator | None = None, **save) -> Path:
    """One image file in any Pillow mode and format, coloured ``colour`` or by class index ``value``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = pixels(colour if colour is not None else class_colour("", value), size, noise, rng)
    Image.fromarray(rgb).convert(mode).save(path, format=fmt, **save)
    return path


def png_bytes(colour=(200, 40, 40), size=(40, 30), seed: int = 0) -> bytes:
    """A noisy ``colour`` PNG file's bytes, as an upload carries them."""
    buf = io.BytesIO()
    Image.fromarray(pixels(colour, size, noise=20, rng=np.random.default_rng(seed))).save(buf, "PNG")
    return buf.getvalue()


def truncated_image(path: Path, fmt: str) -> Path:
    """The first half of a 64x64 noise image's file in ``fmt`` ("JPEG", "PNG"): a download cut short."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, fmt)
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return path


def image_folder(root: Path, spec: dict[str, int], size=(8, 8), mode: str = "RGB", ext: str = ".png",
                 noise: float = 0.0, seed: int = 0) -> Path:
    """``spec`` maps folders to image counts, e.g. {"train/cat": 3, "test/cat": 1} or {"cat": 4}; each
    folder's last part is its class. Returns ``root``."""
    rng = np.random.default_rng(seed)
    classes = sorted({folder.rsplit("/", 1)[-1] for folder in spec})
    for folder, n in spec.items():
        cls = folder.rsplit("/", 1)[-1]
        colour = class_colour(cls, classes.index(cls))
        for i in range(n):
            write_image(root / folder / f"{i}{ext}", size, mode, colour=colour, noise=noise, rng=rng)
    return root


def colour_folder(root: Path, n_train: int = 24, n_test: int = 8, size: int = 32, seed: int = 0,
                  classes=tuple(COLOURS), mode: str = "RGB") -> Path:
    """train/<class>/*.png and test/<class>/*.png of noisy colour patches: the training tests' dataset."""
    spec = {f"{split}/{cls}": n for split, n in (("train", n_train), ("test", n_test)) for cls in classes}
    return image_folder(root, spec, size=size, mode=mode, noise=40.0, seed=seed)


def scene(colour, size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size, 3) uint8: a noisy ``colour`` background with a rectangle of a random colour at a random place,
    so every image of a class looks like the class and yet is a picture of its own (doctor's duplicate tests)."""
    img = pixels(colour, size, noise=8.0, rng=rng)
    x0, y0 = rng.integers(0, size * 2 // 3, 2)
    w, h = rng.integers(size // 6, size // 3, 2)
    img[y0:y0 + h, x0:x0 + w] = rng.integers(0, 256, 3)
    return img


def scene_folder(root: Path, spec: dict[str, int], size: int = 64, seed: int = 0) -> Path:
    """Like :func:`image_folder` (``spec``: {"train/red": 20, ...}), of :func:`scene` JPEGs. Returns ``root``."""
    rng = np.random.default_rng(seed)
    classes = sorted({folder.rsplit("/", 1)[-1] for folder in spec})
    for folder, n in spec.items():
        cls = folder.rsplit("/", 1)[-1]
        for i in range(n):
            (root / folder).mkdir(parents=True, exist_ok=True)
            Image.fromarray(scene(class_colour(cls, classes.index(cls)), size, rng)).save(
                root / folder / f"{i}.jpg", quality=90)
    return root


def video_clip(path: Path, colours, seconds: float = 1.0, fps: int = 10, size=(96, 64), noise: float = 20.0,
               seed: int = 0, fmt: str | None = None, codec: str = "libx264", **options) -> Path:
    """A video of noisy colour segments, ``seconds`` each at ``fps``: e.g. colours=("red", "blue") gives a
    red second, then a blue one. ``options`` go to the muxer (e.g. movflags="faststart")."""
    import av

    rng = np.random.default_rng(seed)
    with av.open(str(path), "w", format=fmt, options={k: str(v) for k, v in options.items()}) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for colour in colours:
            rgb = COLOURS.get(colour, colour)
            for _ in range(round(seconds * fps)):
                frame = av.VideoFrame.from_ndarray(pixels(rgb, size, noise, rng), format="rgb24")
                out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return path
