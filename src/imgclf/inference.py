"""The one forward path: logits of a model on uint8 images, autocast, test-time-augmentation views, and the
face every classifier backend shares (:class:`BaseClassifier`: decode, rank, report).

    logits = predict_logits(model, x_uint8, normalizer, autocast_dtype=torch.bfloat16)
    views = tta_views(x_uint8, "flip+translate")      # the copies whose softmax TTA averages

Training's validation, evaluation, predict, export and serve all score through here, so a number never
depends on which of them computed it.
"""
from __future__ import annotations

import contextlib
import os
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .data.images import Preprocess, preprocess_image
from .data.tensors import Normalizer, chunks, to_tensor
from .errors import ImgclfError


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    """bf16 autocast when asked for; a no-op context for fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def predict_logits(model: torch.nn.Module, x: torch.Tensor, normalizer: Normalizer, *, batch_size: int = 512,
                   autocast_dtype: torch.dtype | None = None, channels_last: bool = True) -> torch.Tensor:
    """Logits (float32, on the model's device) for a (N, C, H, W) uint8 tensor, or (N, H, W, C) uint8 images
    (an array or ImageRows, read a chunk at a time), in eval mode, batched."""
    if not isinstance(x, torch.Tensor):
        parts = [predict_logits(model, to_tensor(part), normalizer, batch_size=batch_size,
                                autocast_dtype=autocast_dtype, channels_last=channels_last)
                 for _, part in chunks(x, batch_size)]
        return torch.cat(parts) if parts else predict_logits(model, to_tensor(np.asarray(x)), normalizer)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    batch_size = eval_chunk(batch_size, x.shape[-2] * x.shape[-1], device)
    out = []
    try:
        for i in range(0, len(x), batch_size):
            xb = normalizer(x[i:i + batch_size].to(device, non_blocking=True))
            xb = xb.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
            with autocast_context(device, autocast_dtype):
                out.append(model(xb).float())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, getattr(model, "num_classes", 0), device=device)


# On a CPU, inference runs fastest on chunks of about a megapixel: larger ones spill the early layers'
# activations out of the caches (EfficientNet-Lite0 at 160 px on 2 AVX2 cores: 77 img/s at 64 images,
# 44 at 256). CIFAR-sized images keep whole batches; a GPU always does.
CPU_EVAL_PIXELS = 1 << 20


def eval_chunk(batch_size: int, pixels: int, device: torch.device) -> int:
    """Images per forward pass for inference of ``pixels``-pixel images on ``device``."""
    if device.type != "cpu":
        return batch_size
    return max(1, min(batch_size, CPU_EVAL_PIXELS // max(1, pixels)))


TTA_SHIFT = 1  # pixels a translated copy moves, as in airbench (2 px scores lower on FastNet CIFAR-10 runs)


def tta_views(x: torch.Tensor, mode: str) -> list[torch.Tensor]:
    """The copies of a (N, C, H, W) uint8 batch that ``mode`` averages over: the images and their mirror
    images ("flip"); for "flip+translate" also both shifted by TTA_SHIFT pixels down-right and up-left
    (edge pixels repeated, so no black borders appear); "translate" is the images and their two shifts,
    with no mirror images (for digits and letters, which a mirror changes)."""
    bases = [x] if mode == "translate" else [x, x.flip(3)]
    views = list(bases)
    if mode in ("flip+translate", "translate"):
        h, w = x.shape[2], x.shape[3]
        for d in (TTA_SHIFT, -TTA_SHIFT):
            rows = (torch.arange(h, device=x.device) - d).clamp(0, h - 1)
            cols = (torch.arange(w, device=x.device) - d).clamp(0, w - 1)
            views += [v.index_select(2, rows).index_select(3, cols) for v in bases]
    return views


@dataclass
class Prediction:
    source: str
    top: list[tuple[str, float]] = field(default_factory=list)  # (class name, probability), best first
    error: str | None = None                                     # set when the image could not be read

    @property
    def label(self) -> str | None:
        return self.top[0][0] if self.top else None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"source": self.source}
        if self.error:
            d["error"] = self.error
        else:
            d["top"] = [{"class": c, "probability": round(p, 6)} for c, p in self.top]
        return d


@dataclass
class FramePrediction:
    """Top-k of one sampled frame of a video (smoothed over the last frames when asked)."""
    index: int                                                   # the frame's position in the source, from 0
    time: float                                                  # seconds from the first frame
    top: list[tuple[str, float]] = field(default_factory=list)   # (class name, probability), best first
    frames: list = field(default_factory=list, repr=False)       # with keep_frames: this frame and the
                                                                 # unsampled ones after it (data.video.Frame)

    @property
    def label(self) -> str | None:
        return self.top[0][0] if self.top else None

    def to_dict(self) -> dict[str, Any]:
        return {"frame": self.index, "time": round(self.time, 3),
                "top": [{"class": c, "probability": round(p, 6)} for c, p in self.top]}


class BaseClassifier:
    """Classes + preprocessing + a ``logits`` backend -> predictions for any image. Subclasses (PyTorch:
    :class:`Classifier`; ONNX Runtime: :class:`imgclf.onnx_runtime.OnnxClassifier`) set ``classes``,
    ``preprocess``, ``meta`` and ``path`` and implement :meth:`logits`; everything else is shared, so
    every backend decodes, ranks and reports images the same way."""

    classes: list[str]
    preprocess: Preprocess
    meta: dict[str, Any]
    path: Path | None

    @property
    def temperature(self) -> float:
        """Divides the logits before the softmax of :meth:`predict_proba`: fitted by ``imgclf evaluate
        --calibrate`` so probabilities match observed accuracy; 1.0 (no change) until then."""
        return float(self.meta.get("temperature") or 1.0)

    def logits(self, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """Float32 CPU logits (N, num_classes) for a (N, C, H, W) uint8 tensor of preprocessed images."""
        raise NotImplementedError

    def logits_of(self, images, batch_size: int = 512) -> torch.Tensor:
        """:meth:`logits` for (N, H, W, C) uint8 images (an array or ImageRows), read a chunk at a time."""
        parts = [self.logits(to_tensor(part), batch_size=batch_size) for _, part in chunks(images, batch_size)]
        return torch.cat(parts) if parts else self.logits(to_tensor(np.asarray(images)), batch_size=batch_size)

    def predict_proba(self, images: list[Any] | Any, batch_size: int = 256) -> np.ndarray:
        """Class probabilities (N, num_classes) for paths, bytes, PIL images or (H, W, C) uint8 arrays.
        An unreadable image raises :class:`ImgclfError` naming it."""
        images = images if isinstance(images, (list, tuple)) else [images]
        if not images:
            return np.zeros((0, len(self.classes)), np.float32)
        x = to_tensor(np.stack([self._to_array(img) for img in images]))
        return torch.softmax(self.logits(x, batch_size=batch_size) / self.temperature, dim=1).numpy()

    def predict(self, images: list[Any] | Any, top_k: int = 3, errors: str = "raise") -> list[Prediction]:
        """Top-k classes per image. ``errors="report"`` returns a Prediction with ``error`` set for an
        unreadable image and still predicts the rest; ``"raise"`` (default) stops at the first."""
        if errors not in ("raise", "report"):
            raise ValueError("errors must be 'raise' or 'report'")
        if top_k < 1:
            raise ImgclfError(f"top_k must be at least 1, got {top_k}")
        images = images if isinstance(images, (list, tuple)) else [images]
        k = min(top_k, len(self.classes))  # asking for more than there are returns them all
        results: list[Prediction] = []
        good: list[tuple[int, np.ndarray]] = []
        for img in images:
            pred = Prediction(source=_describe(img))
            try:
                good.append((len(results), self._to_array(img)))
            except ImgclfError as e:
                if errors == "raise":
                    raise
                pred.error = str(e)
            results.append(pred)
        if good:
            probs = self.predict_proba([a for _, a in good])
            for (i, _), top in zip(good, self.rank(probs, k)):
                results[i].top = top
        return results

    def predict_video(self, source, top_k: int = 3, every: int = 1, smooth: int = 1, batch_size: int | None = None,
                      timeout: float | None = None, keep_frames: bool = False) -> Iterator[FramePrediction]:
        """Top-k per frame of a video file, camera index (0), stream URL or open ``VideoSource``, in order,
        as the frames arrive: every ``every``-th frame is classified, with the same preprocessing as a photo;
        ``smooth`` > 1 averages the probabilities of the last ``smooth`` classified frames. Frames go to the
        model up to ``batch_size`` (32) at a time: from a file always that many; from a camera or endless
        stream those waiting, so a model that keeps up labels each frame as it comes and one that falls behind
        batches more. A video that breaks off raises :class:`~imgclf.data.video.VideoError` after the frames
        before it."""
        from .data.video import VideoError, VideoSource

        if every < 1 or smooth < 1:
            raise ImgclfError(f"every and smooth must be at least 1, got {every} and {smooth}")
        if top_k < 1:
            raise ImgclfError(f"top_k must be at least 1, got {top_k}")
        video = source if isinstance(source, VideoSource) else VideoSource(source, timeout)
        batch = batch_size or 32

        def due() -> bool:
            return len(pending) >= batch or (video.live and video.waiting() == 0)
        recent: deque[np.ndarray] = deque(maxlen=smooth)
        pending: list[FramePrediction] = []
        arrays: list[np.ndarray] = []

        def flush() -> Iterator[FramePrediction]:
            for rec, p in zip(pending, self.predict_proba(arrays, batch_size=len(arrays)) if arrays else []):
                recent.append(p)
                rec.top = self.rank(np.mean(recent, axis=0)[None], top_k)[0]
                yield rec
            pending.clear()
            arrays.clear()

        try:
            for frame in video.frames(every, prepare=self._to_array, min_side=self.preprocess.image_size):
                if frame.sampled:
                    if pending and due():  # the last group is whole: its unsampled frames are in
                        yield from flush()
                    pending.append(FramePrediction(frame.index, frame.time, frames=[frame] if keep_frames else []))
                    arrays.append(frame.prepared)
                    if not keep_frames and due():
                        yield from flush()
                elif keep_frames and pending:
                    pending[-1].frames.append(frame)
        except VideoError:
            yield from flush()
            raise
        else:
            yield from flush()
        finally:
            if video is not source:
                video.close()

    def explain(self, images: list[Any] | Any, target: Any = None, batch_size: int = 32) -> list:
        """Heat maps need the model's gradients, which only a PyTorch model has
        (:meth:`imgclf.classifier.Classifier.explain`); another backend refuses."""
        raise ImgclfError(f"{self.path or 'this model'} cannot explain its answers: an exported model (.onnx, "
                          ".tflite) has no gradients; pass the run folder or its .safetensors checkpoint instead")

    def rank(self, probs: np.ndarray, top_k: int) -> list[list[tuple[str, float]]]:
        """(N, num_classes) probabilities -> per image the top-k (class name, probability), best first."""
        k = min(top_k, len(self.classes))
        return [[(self.classes[j], float(p[j])) for j in np.argsort(-p, kind="stable")[:k]] for p in probs]

    def _to_array(self, img: Any) -> np.ndarray:
        if isinstance(img, np.ndarray):  # already decoded: must already match the model's input
            want = (self.preprocess.image_size, self.preprocess.image_size, self.preprocess.channels)
            if img.dtype != np.uint8 or img.shape != want:
                raise ImgclfError(f"array input must be uint8 of shape {want}, got {img.dtype} {img.shape}")
            return img
        return preprocess_image(img, self.preprocess)


def _describe(img: Any) -> str:
    if isinstance(img, (str, os.PathLike)):
        return str(img)
    return f"<{type(img).__name__}>"
