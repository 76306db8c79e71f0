"""``imgclf predict MODEL --source ...``: label every frame of a video file, camera or stream, print the labels
as they come (a table, or JSON/CSV lines), and optionally write the video back with the labels drawn on it.

    summary = label_video(clf, "clip.mp4", save="labelled.mp4", fmt="json")

The frames and their predictions come from ``BaseClassifier.predict_video``; this module only prints,
draws and times them.
"""
from __future__ import annotations

import csv
import json
import sys
import time
from dataclasses import dataclass
from typing import TextIO

import torch
from PIL import Image, ImageDraw, ImageFont

from ..classifier import Classifier
from ..data.video import VideoError, VideoSource, VideoWriter
from ..data.video_process import ForkedVideo
from ..errors import ImgclfError
from ..inference import BaseClassifier, FramePrediction


@dataclass
class VideoSummary:
    source: str
    frames: int = 0        # frames read from the source
    classified: int = 0    # frames that got a prediction (every --every-th)
    dropped: int = 0       # live frames dropped while the model was behind
    seconds: float = 0.0   # from opening the source to its end
    saved: str | None = None
    stopped: str = "end"   # "end", "interrupted" (Ctrl-C) or "error"

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        parts = [f"{self.source}: {self.frames} frames in {self.seconds:.1f} s ({self.fps:.1f} frames/s), "
                 f"{self.classified} classified"]
        if self.dropped:
            parts.append(f"{self.dropped} dropped while the model was behind")
        if self.saved:
            parts.append(f"saved {self.saved}")
        if self.stopped == "interrupted":
            parts.append("stopped by Ctrl-C")
        return "; ".join(parts)


def label_video(clf: BaseClassifier, source: str | VideoSource, *, top_k: int = 3, every: int = 1, smooth: int = 1,
                batch_size: int | None = None, save: str | None = None, fmt: str = "table",
                timeout: float | None = None, out: TextIO | None = None) -> VideoSummary:
    """Print one row per classified frame to ``out`` (with the frames/s so far) and return the summary.
    Ctrl-C stops cleanly (``stopped="interrupted"``); a video that breaks off raises VideoError after its
    frames are printed and saved, with ``summary`` attached."""
    out = out or sys.stdout
    for flag, value in (("--every", every), ("--smooth", smooth), ("--top-k", top_k), ("--batch-size", batch_size)):
        if value is not None and value < 1:
            raise ImgclfError(f"{flag} must be at least 1, got {value}")
    video = source if isinstance(source, VideoSource) else VideoSource(source, timeout)
    summary = VideoSummary(source=video.source)
    try:
        writer = VideoWriter(save, video.fps) if save else None
    except BaseException:
        video.close()
        raise
    rows = _Rows(out, fmt)
    start = time.monotonic()
    threads = torch.get_num_threads()
    forked = isinstance(video, ForkedVideo)  # decoded ahead, while torch loaded: the model may take every core
    if isinstance(clf, Classifier) and clf.device.type == "cpu" and threads > 1 and not forked:
        # one core is the decoder's: PyTorch's threads, left on every core, wait for it and it for them
        # (fastnet on 2 AVX2 cores, 720p: 150-168 frames/s with one thread against 137-154 with two)
        torch.set_num_threads(threads - 1)
    try:
        for rec in clf.predict_video(video, top_k=top_k, every=every, smooth=smooth, batch_size=batch_size,
                                     keep_frames=writer is not None):
            for frame in rec.frames:  # kept only when saving; written before the row says the frame is done
                writer.write(draw_label(frame.image, rec, copy=False))
            summary.classified += 1
            summary.frames, summary.seconds = video.read, time.monotonic() - start
            rows.write(rec, summary.fps)
    except KeyboardInterrupt:
        summary.stopped = "interrupted"
    except VideoError as e:
        summary.stopped = "error"
        e.summary = summary
        raise
    finally:
        torch.set_num_threads(threads)
        summary.frames, summary.seconds = video.read, time.monotonic() - start
        summary.dropped = video.dropped
        video.close()
        if writer is not None:
            writer.close()
            summary.saved = str(writer.path) if writer.frames else None
        out.flush()
    return summary


class _Rows:
    """One output row per classified frame: a table line, a JSON line or CSV rows (one per rank)."""

    def __init__(self, out: TextIO, fmt: str):
        self.out, self.fmt = out, fmt
        if fmt == "csv":
            self.csv = csv.writer(out, lineterminator="\n")
            self.csv.writerow(["frame", "time", "rank", "class", "probability", "fps"])
        elif fmt == "table":
            out.write(f"{'frame':>7}  {'time':>8}  {'frames/s':>8}  top classes\n")

    def write(self, rec: FramePrediction, fps: float) -> None:
        if self.fmt == "json":
            self.out.write(json.dumps({**rec.to_dict(), "fps": round(fps, 1)}) + "\n")
        elif self.fmt == "csv":
            for rank, (c, p) in enumerate(rec.top, 1):
                self.csv.writerow([rec.index, f"{rec.time:.3f}", rank, c, f"{p:.6f}", f"{fps:.1f}"])
        else:
            top = "  ".join(f"{c} {p:.1%}" for c, p in rec.top)
            self.out.write(f"{rec.index:>7}  {rec.time:>7.2f}s  {fps:>8.1f}  {top}\n")
        if self.out.isatty():
            self.out.flush()


def draw_label(image: Image.Image, rec: FramePrediction, copy: bool = True) -> Image.Image:
    """The frame with its top classes written in its top-left corner, white on a dark box, sized to the frame
    (on a copy, unless ``copy`` is False)."""
    image = image.copy() if copy else image
    size = max(12, image.height // 22)
    font = _font(size)
    lines = [f"{c} {p:.0%}" for c, p in rec.top[:3]]
    draw = ImageDraw.Draw(image, "RGBA")
    pad = size // 3
    width = max(draw.textlength(t, font=font) for t in lines) if lines else 0
    draw.rectangle((0, 0, width + 2 * pad, len(lines) * (size + pad) + pad), fill=(0, 0, 0, 160))
    for i, text in enumerate(lines):
        draw.text((pad, pad + i * (size + pad)), text, font=font, fill=(255, 255, 255) if i == 0 else (200, 200, 200))
    return image


_FONTS: dict[int, ImageFont.ImageFont] = {}


def _font(size: int):
    if size not in _FONTS:
        _FONTS[size] = ImageFont.load_default(size=size)  # Pillow's bundled font: no system fonts needed
    return _FONTS[size]
