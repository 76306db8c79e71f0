"""Batch augmentation: pure functions on (N, C, H, W) float batches, on whatever device the batch is on.

    augment = build_augment("standard", image_size=32)
    x = augment(x, generator)          # generator: a torch.Generator on x.device

All randomness comes from the ``generator`` argument, never from the global RNG, so a run
reproduces exactly and a resumed run (generator state saved in the checkpoint) continues the same
stream. Each op draws a fixed number of random values per batch, whatever the data.
The ops expect normalised images: the zeros that ``cutout`` writes are the dataset mean.
"""
from __future__ import annotations

import difflib
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..errors import ImgclfError

Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def _reflect(index: torch.Tensor, size: int) -> torch.Tensor:
    """Map indices in [-(size-1), 2*size-2] into [0, size) by reflection without repeating the edge
    (``F.pad(mode="reflect")``'s rule: -1 -> 1, size -> size-2)."""
    index = index.abs()
    return torch.where(index >= size, 2 * (size - 1) - index, index)


def random_translate(x: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Random crop of the reflect-padded batch: each image shifted by its own (dy, dx) in [-pad, pad].

    Done as one gather over the flattened pixels with reflected indices: the padded batch is never
    materialised and no Python loop runs over images or shifts (5 ms for 512x3x32x32 on one core).
    """
    if pad == 0:
        return x
    n, c, h, w = x.shape
    if pad >= min(h, w):
        raise ValueError(f"random_translate: pad {pad} must be smaller than the image ({h}x{w})")
    shifts = torch.randint(-pad, pad + 1, (n, 2), generator=generator, device=x.device)
    rows = _reflect(shifts[:, :1] + torch.arange(h, device=x.device), h)  # (N, H) source rows
    cols = _reflect(shifts[:, 1:] + torch.arange(w, device=x.device), w)  # (N, W) source columns
    index = (rows[:, :, None] * w + cols[:, None, :]).view(n, 1, h * w).expand(n, c, h * w)
    return torch.gather(x.reshape(n, c, h * w), 2, index).view(n, c, h, w)


def random_hflip(x: torch.Tensor, generator: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Mirror each image left-right with probability ``p``."""
    flip = torch.rand(len(x), generator=generator, device=x.device) < p
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)


def alternating_flip(x: torch.Tensor, flip_bits: torch.Tensor, epoch: int) -> torch.Tensor:
    """Mirror the images whose bit (drawn once per training image) differs from the epoch's parity:
    every image is seen mirrored every other epoch instead of at random, so two consecutive epochs
    always show both views (Jordan 2024, arXiv 2404.00498, section 3.6). ``flip_bits``: the batch's bits."""
    flip = flip_bits.to(x.device) ^ bool(epoch % 2)
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)


def cutout(x: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """Zero one ``size`` x ``size`` square per image (all channels) at a uniformly random centre,
    clipped at the borders (DeVries & Taylor 2017). On normalised images zero is the dataset mean,
    so the square carries no signal rather than a black patch."""
    if size == 0:
        return x
    n, _, h, w = x.shape
    centres = torch.rand(n, 2, generator=generator, device=x.device)
    top = (centres[:, 0] * h).long() - size // 2
    left = (centres[:, 1] * w).long() - size // 2
    rows = torch.arange(h, device=x.device) - top[:, None]  # (N, H): offset into the square
    cols = torch.arange(w, device=x.device) - left[:, None]
    inside = ((rows >= 0) & (rows < size))[:, :, None] & ((cols >= 0) & (cols < size))[:, None, :]
    return x.masked_fill(inside[:, None], 0)


def random_rotate_zoom(x: torch.Tensor, generator: torch.Generator, degrees: float = 10.0,
                       zoom: float = 0.1) -> torch.Tensor:
    """Rotate each image by an angle in [-degrees, degrees] and zoom by a factor in [1-zoom, 1+zoom]
    about its centre, bilinear, reflecting at the borders (Keras RandomRotation/RandomZoom's default
    fill_mode="reflect", which repeats the edge pixel just as grid_sample's "reflection" does).
    A factor above 1 zooms out (the image shrinks), as in Keras."""
    n, _, h, w = x.shape
    draws = torch.rand(n, 2, generator=generator, device=x.device, dtype=torch.float32) * 2 - 1
    angle = draws[:, 0] * math.radians(degrees)
    scale = 1 + draws[:, 1] * zoom
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    # affine_grid works in [-1, 1] coordinates per axis; the h/w factors keep the rotation rigid
    # in pixels on non-square images. theta maps output coordinates to where they sample the input.
    theta = torch.stack([torch.stack([cos, -sin * h / w, torch.zeros_like(cos)], 1),
                         torch.stack([sin * w / h, cos, torch.zeros_like(cos)], 1)], 1)
    # Sample in float32 at least: grid coordinates in bf16 would be off by up to a pixel at 32px.
    work = x if x.dtype == torch.float64 else x.float()
    grid = F.affine_grid(theta.to(work.dtype), list(work.shape), align_corners=False)
    out = F.grid_sample(work, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    return out.to(x.dtype)


def random_resized_crop(x: torch.Tensor, generator: torch.Generator, scale: tuple[float, float] = (0.35, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3), size: int | None = None) -> torch.Tensor:
    """Inception-style crop: each image shows a random box covering ``scale`` of its area with aspect
    ratio in ``ratio`` (log-uniform), resized (bilinear) to ``size`` (default: the input's size). The box
    always fits: its sides are clipped to the image, then its centre is drawn where it stays inside. One
    affine_grid + grid_sample for the whole batch; the stored images were already resized (shorter side) and
    centre-cropped once, a little larger than ``size`` for photos (see setup.py), so this is the
    photo-style augmentation on top of that."""
    n = x.shape[0]
    draws = torch.rand(n, 4, generator=generator, device=x.device, dtype=torch.float32)
    area = scale[0] + draws[:, 0] * (scale[1] - scale[0])
    log_r = math.log(ratio[0]) + draws[:, 1] * (math.log(ratio[1]) - math.log(ratio[0]))
    aspect = torch.exp(log_r)
    # box sides as fractions of the image side: w*h = area, w/h = aspect
    bw = torch.sqrt(area * aspect).clamp(max=1.0)
    bh = torch.sqrt(area / aspect).clamp(max=1.0)
    cx = (draws[:, 2] * 2 - 1) * (1 - bw)  # centre in [-1, 1] coordinates, box kept inside
    cy = (draws[:, 3] * 2 - 1) * (1 - bh)
    zero = torch.zeros_like(bw)
    theta = torch.stack([torch.stack([bw, zero, cx], 1), torch.stack([zero, bh, cy], 1)], 1)
    work = x if x.dtype == torch.float64 else x.float()
    shape = list(work.shape[:2]) + [size or work.shape[-2], size or work.shape[-1]]
    grid = F.affine_grid(theta.to(work.dtype), shape, align_corners=False)
    return F.grid_sample(work, grid, mode="bilinear", padding_mode="border", align_corners=False).to(x.dtype)


def _compose(*ops: Augment) -> Augment:
    def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        for op in ops:
            x = op(x, generator)
        return x
    return augment


def _presets(image_size: int) -> dict[str, Augment]:
    # Sizes are set for 32px (CIFAR's pad-4 crop, cutout 8) and scale with the image, so 28px MNIST
    # gets pad 3 and cutout 7 rather than recipes tuned for another resolution.
    pad, hole = image_size // 8, image_size // 4

    def translate(x, g):
        return random_translate(x, pad, g)

    def seed004_rotate_zoom(x, g):
        # Keras RandomRotation(0.1)'s factor is a fraction of a full turn: +-36 degrees, not 10.
        return random_rotate_zoom(x, g, degrees=36.0, zoom=0.1)

    def small_translate(x, g):
        # A small shift (image_size // 16: 2px at 32) for the seed's slight translations.
        return random_translate(x, image_size // 16, g)

    return {
        "none": _compose(),
        "flip": _compose(random_hflip),
        "standard": _compose(translate, random_hflip),
        "strong": _compose(translate, random_hflip, lambda x, g: cutout(x, hole, g)),
        # Seed 004: Keras RandomFlip("horizontal"), RandomRotation(0.1), RandomZoom(0.1), then a small shift.
        "seed004": _compose(random_hflip, seed004_rotate_zoom, small_translate),
        # The fast recipe: a small shift (2px at 32), plus a mirror image every other epoch, which the
        # trainer applies (alternating_flip needs to know the epoch and which images are in the batch).
        "fast": _compose(small_translate),
        # The fast recipe's shifts without the flips, for images a mirror changes the meaning of (digits,
        # letters): what the fast recipe uses for greyscale characters such as MNIST.
        "shift": _compose(small_translate),
        # Photos (transfer learning): random-resized crop + flip, as ImageNet-style training does.
        # The crop comes out at the model's size, also from images stored larger (PHOTO_MARGIN in setup.py).
        "photo": _compose(lambda x, g: random_resized_crop(x, g, size=image_size), random_hflip),
    }


ALTERNATING_FLIP = {"fast"}  # presets whose flips the trainer applies with alternating_flip


def list_presets() -> list[str]:
    """Names accepted by :func:`build_augment`."""
    return list(_presets(32))


def build_augment(name: str, image_size: int) -> Augment:
    """The preset ``name`` as one function ``(x, generator) -> x`` with sizes scaled to ``image_size``."""
    presets = _presets(image_size)
    if name not in presets:
        close = difflib.get_close_matches(str(name), presets, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ImgclfError(f"unknown augmentation {name!r}.{hint} Valid presets: {', '.join(presets)}")
    return presets[name]
