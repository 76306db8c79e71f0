"""A video file decoded in a process of its own, started before torch is imported.

    video = start_decoding("runs/NAME", "clip.mp4", every=1)   # None where it does not apply
    import torch ...; clf = load("runs/NAME")                  # meanwhile, the child decodes on the other core
    clf.predict_video(video.checked(clf) or "clip.mp4")        # the same frames as VideoSource gives

``imgclf predict RUN --source FILE`` spends about 2 s of a 16 s clip's 5 s importing torch and loading the
model. A decoding thread started before that gains little, since importing holds the GIL (77-78 frames/s
launch to exit against 57-72 without it, benchmarks/README.md); a child process forked before torch is
imported decodes and prepares frames meanwhile, so the model finds most of a short clip waiting. The child
runs :class:`~imgclf.data.video.VideoSource` itself, with the checkpoint's preprocessing read from its JSON
header or an .onnx file's metadata (no torch): the same frames, the same preprocessing function, the same
errors (sent back and raised here). Only files take this path: a camera or stream runs at its own pace anyway,
and ``--save`` needs the full frames, which stay in the parent's VideoSource.
"""
from __future__ import annotations

import json
import multiprocessing
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..errors import ImgclfError
from .images import Preprocess, preprocess_image
from .video import Frame, VideoError, VideoSource, camera_index, is_stream

QUEUE_BYTES = 256 * 1024 ** 2  # prepared frames the child may hold ahead of the model (256 MB) ...
QUEUE_FRAMES = 8192            # ... and at most this many, so a long file's memory stays bounded
MAX_SIDE = 4096                # a spec beyond this is left to the full checkpoint checks of the normal path


def start_decoding(model: str | Path, source: str, every: int = 1, timeout: float | None = None
                   ) -> ForkedVideo | None:
    """A :class:`ForkedVideo` of ``source`` prepared as ``model`` (a run folder, .safetensors checkpoint or
    exported .onnx file) prepares images, or None where this does not apply: not Linux, torch already imported
    (forking a process with threads is unsafe), a camera or stream, a .ort or .tflite model, or metadata that
    does not read (the normal path then says why, in full)."""
    if not sys.platform.startswith("linux") or "torch" in sys.modules:
        return None
    if camera_index(source) is not None or is_stream(source) or every < 1:
        return None
    spec = _preprocess_of(model)
    return ForkedVideo(source, spec, every, timeout) if spec is not None else None


def _preprocess_of(model: str | Path) -> Preprocess | None:
    # checkpoint.resolve_checkpoint_path's rules (run folder -> best, else last; runs/NAME/best), not that
    # function: its module loads torch, which is what this process must not wait for
    path = Path(model)
    if path.is_dir():
        path = next((p for p in (path / "best.safetensors", path / "last.safetensors") if p.is_file()), path)
    elif not path.exists() and not path.suffix:
        path = path.with_suffix(".safetensors")
    if path.suffix not in (".safetensors", ".onnx") or not path.is_file():
        return None
    try:
        if path.suffix == ".onnx":  # as `imgclf export` writes it: the spec in the model's metadata_props
            import onnx

            props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
            spec = Preprocess.from_dict(json.loads(props["preprocess"]))
        else:
            from safetensors import safe_open

            with safe_open(str(path), framework="numpy") as f:
                spec = Preprocess.from_dict(json.loads((f.metadata() or {})["imgclf"])["preprocess"])
    except Exception:  # noqa: BLE001 - any doubt: the normal path loads and checks the model in full
        return None
    ok = isinstance(spec.image_size, int) and 0 < spec.image_size <= MAX_SIDE and spec.channels in (1, 3)
    return spec if ok else None


class ForkedVideo(VideoSource):
    """A video file decoded and prepared by a child process; ``frames()`` as :class:`VideoSource` gives them
    (``prepared`` set, no full image). It has VideoSource's face, not its container: that is the child's."""

    def __init__(self, source: str, spec: Preprocess, every: int, timeout: float | None = None):
        self.source, self.spec, self.every = str(source), spec, every
        self.timeout = timeout or 10.0
        self.live, self.fps, self.size = False, None, None
        self.read, self.dropped = 0, 0
        ctx = multiprocessing.get_context("fork")
        frame_bytes = spec.image_size ** 2 * spec.channels
        self._queue = ctx.Queue(maxsize=max(64, min(QUEUE_FRAMES, QUEUE_BYTES // frame_bytes)))
        self._child = ctx.Process(target=_decode, args=(self.source, spec, every, timeout, self._queue),
                                  daemon=True, name="imgclf-video-decoder")
        self._child.start()

    def checked(self, clf: Any) -> ForkedVideo | None:
        """This video once the child has opened it (a file that cannot be opened raises here, before any output,
        as VideoSource does), if ``clf`` prepares images as the child does (always, for the model read); else
        None, the child stopped, and the caller opens the source itself."""
        if getattr(clf, "preprocess", None) != self.spec:
            self.close()
            return None
        if self.fps is None and self.size is None:
            kind, *rest = self._next()  # the child's first message: "open", or why it could not open
            if kind != "open":
                self._raise(kind, rest)
            self.fps, self.size = rest
        return self

    def waiting(self) -> int:
        return 0  # a file: the model takes frames in whole batches, never "those waiting"

    def frames(self, every: int = 1, prepare: Callable | None = None, min_side: int | None = None) -> Iterator[Frame]:
        """The child's frames in order; ``prepare`` and ``min_side`` were applied there (see :meth:`checked`)."""
        if every != self.every:
            raise ImgclfError(f"this video is decoded for every={self.every}, not {every}")
        while True:
            kind, *rest = self._next()
            if kind == "frame":
                self.read += 1
                yield Frame(*rest[:3], prepared=rest[3])
            elif kind == "open":
                self.fps, self.size = rest
            elif kind == "end":
                return
            else:
                self._raise(kind, rest)

    def _next(self) -> tuple:
        import queue

        try:
            return self._queue.get(timeout=self.timeout + 5)
        except queue.Empty:
            ended = "" if self._child.is_alive() else " (the decoding process ended)"
            raise VideoError(f"{self.source}: no frame for {self.timeout + 5:g} s after {self.read} frames{ended}",
                             self.read) from None

    def _raise(self, kind: str, rest: list) -> None:
        """The child's exception ("error", its kind, its message), raised here as the parent's VideoSource would."""
        error, message = (rest + ["", ""])[:2] if kind == "error" else (kind, str(rest))
        if error == "VideoError":
            raise VideoError(message, self.read)
        if error == "ImgclfError":
            raise ImgclfError(message)
        raise RuntimeError(f"video decoding failed: {error}: {message}")

    def close(self) -> None:
        if self._child.is_alive():
            self._child.terminate()
        self._child.join(2)
        self._queue.cancel_join_thread()  # frames still in the pipe are not waited for
        self._queue.close()


def _decode(source: str, spec: Preprocess, every: int, timeout: float | None, out) -> None:
    """The child: VideoSource's frames, prepared, into ``out``; then ("end",) or ("error", type, message)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it stops this process
    try:
        with VideoSource(source, timeout) as video:
            out.put(("open", video.fps, video.size))
            for f in video.frames(every, prepare=lambda image: preprocess_image(image, spec),
                                  min_side=spec.image_size):
                out.put(("frame", f.index, f.time, f.sampled, f.prepared))
        out.put(("end",))
    except BaseException as e:  # noqa: BLE001 - every failure goes to the parent, which raises it
        kind = "VideoError" if isinstance(e, VideoError) else "ImgclfError" if isinstance(e, ImgclfError) else \
            type(e).__name__
        out.put(("error", kind, str(e)))
    finally:
        out.close()
        out.join_thread()  # everything put reaches the pipe before this process ends
