"""Image embeddings for looking at a dataset (``imgclf doctor``): the pooled features of EfficientNet-Lite0's
ImageNet backbone, computed once, without training anything.

    feats = embed([train_x, test_x])      # (N, 1280) float32 of (n, S, S, 3) uint8 images (arrays or ImageRows)

The backbone sees the images as the photo recipe's model would (the weights' own (x - 127) / 128
normalisation), in eval mode under torch.inference_mode, a CPU-sized chunk at a time. At 192 px, doctor's
regression on them ranked 92.0 % of the weather photos' flipped labels into the top k, at 160 and 224 px
90.7 % (benchmarks/README.md, doctor.py).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from tqdm import tqdm

from ..data.tensors import Normalizer, chunks, to_tensor
from ..inference import eval_chunk
from ..models import create_model

BACKBONE = "efficientnet-lite0"
DEFAULT_SIZE = 192


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
