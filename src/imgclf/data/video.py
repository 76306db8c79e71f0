"""Frames of a video file, a camera or a network stream, and video files written back.

    with VideoSource("clip.mp4") as video:            # or "0" (camera 0), "rtsp://...", "http://..."
        for frame in video.frames(every=2, prepare=fn):  # Frame(index, time, image, prepared, sampled)
            ...
    with VideoWriter("out.mp4", fps=30) as out:
        out.write(pil_image)

PyAV (FFmpeg's libraries in a wheel, no system FFmpeg needed) reads every container and codec FFmpeg
knows, webcams (V4L2 on Linux, AVFoundation on macOS, DirectShow on Windows) and RTSP/HTTP/RTMP/UDP
streams, with a timeout on every read, which is why it is used instead of OpenCV's reader (no timeout on a
stalled stream, and no way to tell a truncated file from its end).

Frames are decoded on a thread of their own, ahead of the caller, so decoding overlaps the model; FFmpeg
releases the GIL while it decodes. A file is read whole, frame by frame; a live source (a camera, a stream
with no end) drops its oldest waiting frames when the caller falls behind, so labels stay live, not late.
"""
from __future__ import annotations

import glob
import queue
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from ..errors import ImgclfError

OPEN_TIMEOUT_S = 10.0  # a camera or stream that gives no first frame in this time is an error
READ_TIMEOUT_S = 10.0  # ... and one that stalls this long afterwards
STREAM_SCHEMES = ("rtsp", "rtsps", "rtmp", "rtmps", "http", "https", "udp", "tcp", "srt", "rtp")
CAMERA_INPUTS = {"linux": ("v4l2", "/dev/video{}"), "darwin": ("avfoundation", "{}"),
                 "win32": ("dshow", "video={}")}
SOURCE_HELP = "a video file, a camera index (0) or a stream URL (rtsp://, http://)"
LIVE_QUEUE_S = 0.5  # seconds of frames a live source holds for a caller that is behind, then drops the oldest


class VideoError(ImgclfError):
    """A video that stops early or cannot be read; ``frames`` were decoded (and handed out) before it."""

    def __init__(self, message: str, frames: int = 0):
        super().__init__(message)
        self.frames = frames


@dataclass
class Frame:
    index: int                # position in the source, from 0; every decoded frame counts, sampled or not
    time: float               # seconds from the first frame
    sampled: bool             # chosen by ``every``: ``prepared`` is set
    prepared: Any = None      # prepare(image) for a sampled frame
    _frame: Any = field(default=None, repr=False)   # PyAV's frame (YUV), converted to RGB only when asked
    _image: Image.Image | None = field(default=None, repr=False)

    @property
    def image(self) -> Image.Image:
        """The frame as an RGB PIL image, at full size (converted on first use)."""
        if self._image is None:
            # through an array: PyAV's own to_image is ~5x slower at 720p (61 against 298 frames/s here)
            self._image = Image.fromarray(self._frame.to_ndarray(format="rgb24"))
        return self._image

    def drafted(self, min_side: int | None) -> Image.Image:
        """The frame as an RGB PIL image at 1/2, 1/4 or 1/8 scale where both sides stay at least ``min_side``
        (pixels averaged by area), as a large JPEG photo is decoded (``images.draft``); full size otherwise.
        Converting only what the model needs is what keeps 720p video well above 100 frames/s on 2 cores."""
        w, h = self._frame.width, self._frame.height
        scale = 1
        while min_side and scale < 8 and min(w, h) // (2 * scale) >= min_side:
            scale *= 2
        if scale == 1:
            return self.image
        # averaged in the frame's own YUV, then converted: 1.3 ms a 720p frame here, against 2.7 ms when
        # FFmpeg scales and converts to RGB in one step, and 18 ms for the full-size image through Pillow
        small = self._frame.reformat(width=w // scale, height=h // scale, interpolation="AREA")
        return Image.fromarray(small.to_ndarray(format="rgb24"))


def _av():
    try:
        import av
    except ImportError as e:  # a dependency; only a broken install lacks it
        raise ImgclfError(f"video needs PyAV ({e}); install it with: pip install av") from None
    av.logging.set_level(av.logging.PANIC)  # FFmpeg's own warnings are not the user's business; errors are ours
    return av


def camera_index(source: str | int) -> int | None:
    """0, "0", "/dev/video0" -> 0; anything else -> None."""
    if isinstance(source, int):
        return source
    m = re.fullmatch(r"(?:/dev/video)?(\d+)", str(source).strip())
    return int(m.group(1)) if m else None


def is_stream(source: str) -> bool:
    return str(source).split("://", 1)[0].lower() in STREAM_SCHEMES and "://" in str(source)


class VideoSource:
    """An open video: ``frames()`` yields its frames in order; ``live`` for cameras and streams."""

    def __init__(self, source: str | int | Path, timeout: float | None = None):
        av = _av()
        self.source = str(source)
        camera = camera_index(source)
        timeout = timeout or max(OPEN_TIMEOUT_S, READ_TIMEOUT_S)
        self.timeout = timeout
        try:
            if camera is not None:
                self.container = self._open_camera(av, camera, timeout)
            elif is_stream(self.source):
                self.container = av.open(self.source, timeout=(timeout, timeout))
            else:
                path = Path(self.source)
                if not path.is_file():
                    raise ImgclfError(f"{self.source}: no such file; --source takes {SOURCE_HELP}")
                self.container = av.open(str(path))
        except av.error.ExitError:
            raise ImgclfError(f"{self.source}: no answer in {timeout:g} s; check the address and that the "
                              "stream is running") from None
        except av.FFmpegError as e:
            raise ImgclfError(f"{self.source}: cannot be opened as a video ({_reason(e)}); --source takes "
                              f"{SOURCE_HELP}") from None
        if not self.container.streams.video:
            kinds = sorted({s.type for s in self.container.streams}) or ["nothing"]
            self.container.close()
            raise ImgclfError(f"{self.source}: has no video stream (it holds {', '.join(kinds)}); give a video")
        self.stream = self.container.streams.video[0]
        # a camera, or a stream with no end (no stated duration): frames come at their own pace and are
        # dropped when the caller falls behind; a file, even over HTTP, is read whole
        self.live = camera is not None or (is_stream(self.source) and not self.container.duration)
        self.stream.thread_type = "AUTO"  # frame- and slice-threaded decoding
        rate = self.stream.average_rate or self.stream.guessed_rate
        self.fps = float(rate) if rate else None
        self.size = (self.stream.codec_context.width, self.stream.codec_context.height)
        self.read = 0     # frames handed to the caller
        self.dropped = 0  # live frames dropped because the caller was behind
        self._stop = threading.Event()
        self._reader: threading.Thread | None = None
        self._queue: queue.Queue | None = None

    @staticmethod
    def _open_camera(av, index: int, timeout: float):
        fmt, pattern = CAMERA_INPUTS.get(sys.platform, CAMERA_INPUTS["linux"])
        name = pattern.format(index)
        if fmt == "v4l2" and not Path(name).exists():
            found = sorted(glob.glob("/dev/video*")) or ["none"]
            raise ImgclfError(f"camera {index} not found: {name} does not exist (cameras here: "
                              f"{', '.join(found)}); give another index, a file or a stream URL")
        try:
            return av.open(name, format=fmt, timeout=(timeout, timeout))
        except av.FFmpegError as e:
            raise ImgclfError(f"camera {index} ({name}) cannot be opened ({_reason(e)}); is another program "
                              "using it?") from None

    def waiting(self) -> int:
        """Frames decoded and not yet taken: a live caller that sees none waiting is keeping up."""
        return self._queue.qsize() if self._queue is not None else 0

    def __enter__(self) -> VideoSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        if self._reader is not None and self._reader.is_alive():
            # still inside FFmpeg, waiting on a live source: closing under it would free what it reads; the
            # daemon thread ends at its read timeout or with the process
            return
        self.container.close()

    def frames(self, every: int = 1, prepare: Callable[[Image.Image], Any] | None = None,
               min_side: int | None = None) -> Iterator[Frame]:
        """Every decoded frame in order; every ``every``-th is ``sampled`` and gets ``prepare(image)`` on the
        decoding thread, the image drafted to ``min_side`` (:meth:`Frame.drafted`). A file that breaks off
        (damaged or truncated) raises :class:`VideoError` after its last good frame; a stalled stream after
        ``timeout`` seconds without a frame."""
        if every < 1:
            raise ImgclfError(f"every must be at least 1, got {every}")
        q: queue.Queue = queue.Queue(maxsize=max(4, round(LIVE_QUEUE_S * (self.fps or 30))) if self.live else 64)
        self._queue = q
        reader = threading.Thread(target=self._read, args=(q, every, prepare, min_side), daemon=True,
                                  name="imgclf-video")
        reader.start()
        try:
            while True:
                try:
                    item = q.get(timeout=self.timeout + 5)  # FFmpeg's own timeout should fire first
                except queue.Empty:
                    raise VideoError(f"{self.source}: no frame for {self.timeout + 5:g} s; the source "
                                     f"stalled after {self.read} frames", self.read) from None
                if isinstance(item, BaseException):
                    if isinstance(item, VideoError):
                        item.frames = self.read
                    raise item
                if item is None:
                    return
                self.read += 1
                yield item
        finally:
            self._stop.set()
            deadline = time.monotonic() + 2.0
            while reader.is_alive() and time.monotonic() < deadline:  # unblock a reader waiting for room
                try:
                    q.get_nowait()
                except queue.Empty:
                    reader.join(0.05)
            self._reader = reader

    def _read(self, q: queue.Queue, every: int, prepare, min_side: int | None) -> None:
        av = sys.modules["av"]
        index, bad, last, t0 = 0, 0, None, None
        try:
            for packet in self.container.demux(self.stream):
                if self._stop.is_set():
                    return
                try:
                    decoded = packet.decode()
                except av.error.ExitError:
                    raise
                except (av.FFmpegError, ValueError):  # a damaged packet: players skip it, so does this
                    bad += 1
                    continue
                for vf in decoded:
                    t = vf.time if vf.time is not None else (index / self.fps if self.fps else time.monotonic())
                    t0 = t if t0 is None else t0
                    frame = Frame(index, round(t - t0, 6), index % every == 0, _frame=vf)
                    if frame.sampled and prepare is not None:
                        frame.prepared = prepare(frame.drafted(min_side))
                    self._put(q, frame)
                    if self._stop.is_set():
                        return
                    index, last = index + 1, t - t0
            self._put(q, self._ending(index, bad, last), final=True)
        except av.error.ExitError:
            self._put(q, VideoError(f"{self.source}: the stream stalled (no data for {self.timeout:g} s) after "
                                    f"{index} frames; the frames read are kept"), final=True)
        except av.FFmpegError as e:
            self._put(q, VideoError(f"{self.source}: reading stopped after {index} frames ({_reason(e)}); the "
                                    "frames read are kept"), final=True)
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread, which raises it
            self._put(q, e, final=True)

    def _ending(self, frames: int, bad: int, last: float | None) -> VideoError | None:
        """None for a clean end; a VideoError for a file that is damaged or ends before its stated length."""
        if frames == 0:
            return VideoError(f"{self.source}: no frame could be decoded (damaged or truncated?)")
        stated = self.container.duration / 1e6 if self.container.duration and not self.live else None
        step = 1.0 / self.fps if self.fps else 0.0
        if stated and last is not None and last + step < stated - max(0.5, 3 * step):
            return VideoError(f"{self.source}: ends at {last + step:.2f} s of its {stated:.2f} s (truncated?); "
                              f"the {frames} frames decoded are kept")
        if bad:
            return VideoError(f"{self.source}: {bad} damaged packet(s) skipped; the {frames} frames decoded are "
                              "kept")
        return None

    def _put(self, q: queue.Queue, item, final: bool = False) -> None:
        """Hand ``item`` over: a file waits for room; a live source drops its oldest waiting frame instead."""
        drop = self.live and not final
        while not self._stop.is_set():
            try:
                q.put(item, timeout=None if drop else 0.1, block=not drop)
                return
            except queue.Full:
                if drop:
                    try:
                        q.get_nowait()
                        self.dropped += 1
                    except queue.Empty:
                        pass


def _reason(e: BaseException) -> str:
    return getattr(e, "strerror", None) or str(e) or type(e).__name__


VIDEO_CODECS = {".mp4": "libx264", ".mov": "libx264", ".mkv": "libx264", ".webm": "libvpx-vp9",
                ".avi": "mpeg4"}


class VideoWriter:
    """Frames (PIL images) -> a video file; the codec follows the suffix (H.264 for .mp4/.mov/.mkv, VP9 for
    .webm, MPEG-4 for .avi). Written to ``<name>.part`` and renamed when closed, so a file at the name is
    always whole; frames of odd size are cropped to even (4:2:0 needs it)."""

    def __init__(self, path: str | Path, fps: float | None):
        av = _av()
        self.path = Path(path)
        codec = VIDEO_CODECS.get(self.path.suffix.lower())
        if codec is None:
            raise ImgclfError(f"{self.path}: cannot write this kind of video; use {', '.join(VIDEO_CODECS)}")
        if not self.path.parent.is_dir():
            raise ImgclfError(f"{self.path.parent}: no such folder for --save")
        from fractions import Fraction

        self.part = self.path.with_name(self.path.name + ".part")
        self.container = av.open(str(self.part), "w", format=self.path.suffix.lower().lstrip(".")
                                 .replace("mkv", "matroska"))
        self.stream = self.container.add_stream(codec, rate=Fraction(fps or 30).limit_denominator(1001))
        self.stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            # superfast: 15 ms a 720p frame on an AVX2 core against veryfast's 25, for a file ~2x larger
            self.stream.options = {"preset": "superfast", "crf": "23"}
        self.size: tuple[int, int] | None = None
        self.frames = 0

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def write(self, image: Image.Image) -> None:
        av = sys.modules["av"]
        if self.size is None:
            self.size = (image.width // 2 * 2, image.height // 2 * 2)
            self.stream.width, self.stream.height = self.size
        if image.size != self.size:
            image = image.crop((0, 0, *self.size)) if image.width >= self.size[0] and image.height >= \
                self.size[1] else image.resize(self.size)
        for packet in self.stream.encode(av.VideoFrame.from_image(image.convert("RGB"))):
            self.container.mux(packet)
        self.frames += 1

    def close(self) -> None:
        """Flush the encoder and move the file into place (nothing is written for a video of no frames)."""
        if self.container is None:
            return
        try:
            if self.frames:
                for packet in self.stream.encode():
                    self.container.mux(packet)
        finally:
            self.container.close()
            self.container = None
        if self.frames:
            self.part.replace(self.path)
        else:
            self.part.unlink(missing_ok=True)
