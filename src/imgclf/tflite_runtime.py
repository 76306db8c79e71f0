"""Run a ``.tflite`` file written by ``imgclf export --format tflite`` with the LiteRT interpreter
(``ai-edge-litert``: ``pip install "imgclf[tflite]"``), behind the same face as a PyTorch
:class:`~imgclf.classifier.Classifier`.

    clf = load_tflite("runs/x/best.int8.tflite")   # a TfliteClassifier: logits / predict / evaluate
    read_metadata(Path("runs/x/best.tflite").read_bytes())["classes"]

The file carries its classes and preprocessing as a metadata entry of the flatbuffer (``imgclf``: JSON, the
checkpoint's metadata plus a ``tflite`` section), so the file alone is enough to predict. Its input is uint8
(1, H, W, C) pixels, 0..255 after imgclf's resize; its output the logits: float32, or int8 with the tensor's
scale and zero point in an int8 file.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint_check import MAX_META_CHARS, Invalid, check_meta, parse_json
from .data.images import Preprocess
from .errors import ImgclfError
from .inference import BaseClassifier, eval_chunk
from .utils import atomic_path

META_KEY = "imgclf"       # the flatbuffer metadata entry holding the JSON
INSTALL = 'pip install "imgclf[tflite]"'


_first = True            # LiteRT's C++ logs an INFO line to file descriptor 2 with the process's first delegate


def _interpreter(content: bytes, threads: int, batch: int = 1):
    """A LiteRT interpreter of the model, its input resized to ``batch`` images, tensors allocated."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        raise ImgclfError(f"running a .tflite model needs the LiteRT interpreter: {INSTALL}") from None
    global _first
    with _silenced_fd2(_first or batch != 1):  # a failed resize logs its reason there too; imgclf falls back
        _first = False
        interpreter = Interpreter(model_content=content, num_threads=threads)
        if batch != 1:
            shape = interpreter.get_input_details()[0]["shape"]
            interpreter.resize_tensor_input(interpreter.get_input_details()[0]["index"], [batch, *shape[1:]])
        interpreter.allocate_tensors()
    return interpreter


@contextlib.contextmanager
def _silenced_fd2(silence: bool):
    """Send file descriptor 2 to /dev/null for the block ("INFO: Created TensorFlow Lite XNNPACK delegate for
    CPU." is no news to a user); exceptions still reach Python."""
    if not silence:
        yield
        return
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


class TfliteClassifier(BaseClassifier):
    """An exported ``.tflite`` model run by the LiteRT interpreter, with the same face as :class:`Classifier`.
    The file is batch 1, as a phone runs it; a batch of images runs as one invocation of a second
    interpreter resized to it where the model allows that (most do; a fixed reshape such as the seed CNN's
    flatten does not), else image by image."""

    def __init__(self, content: bytes, classes: list[str], preprocess: Preprocess, meta: dict[str, Any] | None = None,
                 path: Path | None = None, threads: int = 0):
        self.content = content
        self.threads = threads or os.cpu_count() or 1
        self.classes = list(classes)
        self.preprocess = preprocess
        self.meta = meta or {}
        self.path = path
        self.single = _interpreter(content, self.threads)
        self._in, self._out = self.single.get_input_details()[0], self.single.get_output_details()[0]
        self.resizable = True          # until a resize fails
        self._batched, self._batch = None, 0
        self._lock = threading.Lock()  # interpreters hold their tensors: one batch at a time

    def __repr__(self) -> str:
        arch = self.meta.get("arch", {}).get("name", "?")
        return (f"TfliteClassifier({arch} {self.meta.get('tflite', {}).get('precision', '')}, {len(self.classes)} "
                f"classes, {self.preprocess.image_size}px x{self.preprocess.channels}, {self.path})")

    def logits(self, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """Float32 CPU logits for a (N, C, H, W) uint8 tensor, like :meth:`Classifier.logits`."""
        if x.dtype != torch.uint8 or x.ndim != 4:
            raise ImgclfError(f"expected a (N, C, H, W) uint8 tensor, got {x.dtype} {tuple(x.shape)}")
        nhwc = np.ascontiguousarray(x.cpu().permute(0, 2, 3, 1).numpy())
        step = eval_chunk(batch_size, nhwc.shape[1] * nhwc.shape[2], torch.device("cpu"))
        with self._lock:
            out = [self._run(nhwc[i:i + step]) for i in range(0, len(nhwc), step)]
        if not out:
            return torch.empty(0, len(self.classes))
        return torch.from_numpy(np.concatenate(out))

    def _run(self, xb: np.ndarray) -> np.ndarray:
        if len(xb) > 1 and self.resizable and len(xb) != self._batch:
            try:
                self._batched, self._batch = _interpreter(self.content, self.threads, len(xb)), len(xb)
            except (RuntimeError, ValueError):
                self.resizable, self._batched, self._batch = False, None, 0
        if len(xb) == 1 or len(xb) != self._batch:
            return np.concatenate([self._invoke(self.single, xb[i:i + 1]) for i in range(len(xb))])
        return self._invoke(self._batched, xb)

    def _invoke(self, interpreter, xb: np.ndarray) -> np.ndarray:
        interpreter.set_tensor(self._in["index"], xb)
        interpreter.invoke()
        y = interpreter.get_tensor(self._out["index"])
        scale, zero = self._out["quantization"]
        if scale:  # an int8 model's logits: real = scale * (q - zero point)
            return (y.astype(np.float32) - zero) * np.float32(scale)
        return y.astype(np.float32, copy=True)


def load_tflite(path: str | Path, device: str = "auto", threads: int = 0) -> TfliteClassifier:
    """Open a ``.tflite`` file written by ``imgclf export --format tflite``; classes and preprocessing come from
    its metadata. LiteRT runs on the CPU whatever ``device`` says. ``threads``: cores to use (0 = all)."""
    path = Path(path)
    if not path.is_file():
        raise ImgclfError(f"{path}: file not found; pass a .tflite file written by `imgclf export --format tflite`")
    content = path.read_bytes()
    props = read_metadata(content, path)
    if META_KEY not in props:
        raise ImgclfError(f"{path}: a TFLite model without imgclf metadata; only models written by "
                          "`imgclf export --format tflite` carry their classes and preprocessing")
    try:  # the same checks as a checkpoint's metadata (the weights are LiteRT's business)
        meta = parse_json(props[META_KEY], "its imgclf metadata", MAX_META_CHARS)
        check_meta(meta, required=("classes", "preprocess"))
    except Invalid as e:
        raise ImgclfError(f"{path}: its imgclf metadata is damaged ({e}); re-export it with `imgclf export`") from None
    classes, spec = list(meta["classes"]), Preprocess.from_dict(meta["preprocess"])
    try:
        clf = TfliteClassifier(content, classes, spec, meta=meta, path=path, threads=threads)
    except (RuntimeError, ValueError) as e:
        raise ImgclfError(f"{path}: LiteRT cannot run it ({str(e).splitlines()[0][:200]}); re-export it with "
                          "`imgclf export --format tflite`") from None
    want = [1, spec.image_size, spec.image_size, spec.channels]
    got = clf._in["shape"].tolist(), np.dtype(clf._in["dtype"]).name, clf._out["shape"].tolist()
    if got != (want, "uint8", [1, len(classes)]):
        raise ImgclfError(f"{path}: expected uint8 {want} in and [1, {len(classes)}] logits out, found "
                          f"{got[1]} {got[0]} -> {got[2]}")
    return clf


# ---------------------------------------------------------------------------------------------- metadata
def read_metadata(content: bytes, path: Path | str = "model") -> dict[str, str]:
    """The flatbuffer's metadata entries (name -> text), read without the interpreter: LiteRT's schema
    module only (it ships in ai-edge-litert)."""
    if content[4:8] != b"TFL3":
        raise ImgclfError(f"{path}: not a TFLite flatbuffer (no TFL3 identifier); pass a .tflite file written by "
                          "`imgclf export --format tflite`")
    try:
        from ai_edge_litert.schema_py_generated import Model
    except ImportError:
        raise ImgclfError(f"reading a .tflite model needs LiteRT: {INSTALL}") from None
    try:
        model = Model.GetRootAs(content, 0)
        out = {}
        for i in range(model.MetadataLength()):
            entry = model.Metadata(i)
            buf = model.Buffers(entry.Buffer())
            data = content[buf.Offset():buf.Offset() + buf.Size()] if buf.Offset() > 1 else buf.DataAsNumpy()
            out[entry.Name().decode()] = bytes(data).decode("utf-8", "replace")
        return out
    except Exception as e:  # a damaged flatbuffer fails anywhere in the generated reader
        raise ImgclfError(f"{path}: its flatbuffer is damaged ({type(e).__name__}); re-export it") from None


def write_metadata(path: str | Path, entries: dict[str, str], out: str | Path | None = None) -> Path:
    """Add (or replace) metadata entries of the ``.tflite`` file at ``path``; written to ``out`` (default: in
    place), atomically."""
    try:
        from ai_edge_litert import schema_py_generated as schema
        from ai_edge_litert.tools import flatbuffer_utils
    except ImportError:
        raise ImgclfError(f"writing a .tflite model needs LiteRT: {INSTALL}") from None
    path = Path(path)
    model = flatbuffer_utils.read_model_from_bytearray(bytearray(path.read_bytes()))
    model.metadata = [m for m in (model.metadata or []) if m.name.decode() not in entries]
    for name, text in entries.items():
        buf = schema.BufferT()
        buf.data = np.frombuffer(text.encode(), np.uint8)
        model.buffers.append(buf)
        entry = schema.MetadataT()
        entry.name, entry.buffer = name.encode(), len(model.buffers) - 1
        model.metadata.append(entry)
    model.description = f"imgclf {entries.get('imgclf_version', '')}".strip().encode()
    out = Path(out or path)
    with atomic_path(out) as tmp:
        Path(tmp).write_bytes(bytes(flatbuffer_utils.convert_object_to_bytearray(model)))
    return out
