"""Run an ``.onnx`` file written by ``imgclf export`` with ONNX Runtime, behind the same face as a PyTorch
:class:`~imgclf.classifier.Classifier`.

    clf = load_onnx("runs/x/best.int8.onnx")   # an OnnxClassifier: logits / predict / evaluate

The file carries its classes and preprocessing in its metadata, so the file alone is enough to predict.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._version import __version__
from .checkpoint_check import MAX_META_CHARS, Invalid, check_meta, parse_json
from .data.images import Preprocess
from .errors import ImgclfError
from .inference import BaseClassifier
from .utils import atomic_path

INPUT_NAME = "image"    # uint8 (N, C, H, W), 0..255, already resized by the imgclf image loader


OUTPUT_NAME = "logits"  # float32 (N, num_classes)


MIN_SLICE = 32          # images per core, at least, before a batch is cut into slices run side by side


# ---------------------------------------------------------------------------------------------- loading
class OnnxClassifier(BaseClassifier):
    """An exported ``.onnx`` model run by ONNX Runtime, with the same face as :class:`Classifier`."""

    def __init__(self, session, classes: list[str], preprocess: Preprocess, meta: dict[str, Any] | None = None,
                 path: Path | None = None, slice_session=None, workers: int = 1):
        self.session = session              # small batches: ORT splits each operator over the cores
        self.slice_session = slice_session  # big batches: one thread, one slice of the batch per core
        self.workers = workers
        self.classes = list(classes)
        self.preprocess = preprocess
        self.meta = meta or {}
        self.path = path
        self._pool: ThreadPoolExecutor | None = None

    def __repr__(self) -> str:
        arch = self.meta.get("arch", {}).get("name", "?")
        return (f"OnnxClassifier({arch} {self.meta.get('onnx', {}).get('precision', '')}, {len(self.classes)} "
                f"classes, {self.preprocess.image_size}px x{self.preprocess.channels}, {self.path})")

    def logits(self, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """Float32 CPU logits for a (N, C, H, W) uint8 tensor, like :meth:`Classifier.logits`."""
        if x.dtype != torch.uint8 or x.ndim != 4:
            raise ImgclfError(f"expected a (N, C, H, W) uint8 tensor, got {x.dtype} {tuple(x.shape)}")
        out = []
        for i in range(0, len(x), batch_size):
            out.append(self._run(np.ascontiguousarray(x[i:i + batch_size].cpu().numpy())))
        if not out:
            return torch.empty(0, len(self.classes))
        return torch.from_numpy(np.concatenate(out).astype(np.float32, copy=False))

    def _run(self, xb: np.ndarray) -> np.ndarray:
        """One batch. A big one is cut into a slice per core, run side by side on a single-threaded session
        (ORT releases the GIL): ORT's int8 convolutions split one image at a time across the threads, and
        hundreds of such small parallel sections per batch cost FastNet int8 ~15 % of its speed on 2 cores."""
        k = min(self.workers, len(xb) // MIN_SLICE) if self.slice_session is not None else 1
        if k < 2:
            return self.session.run([OUTPUT_NAME], {INPUT_NAME: xb})[0]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="imgclf-onnx")
        parts = self._pool.map(lambda part: self.slice_session.run([OUTPUT_NAME], {INPUT_NAME: part})[0],
                               np.array_split(xb, k))
        return np.concatenate(list(parts))


def load_onnx(path: str | Path, device: str = "auto", threads: int = 0, spin: bool = True) -> OnnxClassifier:
    """Open an ``.onnx`` (or ``.ort``) file written by ``imgclf export``; classes and preprocessing come from its
    metadata.
    ORT's CPU provider is used (CUDA when asked for and installed). ``threads``: cores to use (0 = all).
    Batches of at least ``2 * MIN_SLICE`` images run as one slice per core on a single-threaded session,
    smaller ones on a session whose operators ORT splits over the cores.
    ``spin=False`` stops idle ORT threads from busy-waiting: slower for back-to-back batches, but a server
    leaves those cores to decoding and HTTP between requests."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise ImgclfError(f"{path}: file not found; pass an .onnx or .ort file written by `imgclf export`")
    providers = ["CPUExecutionProvider"]
    if str(device).startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    workers = threads or os.cpu_count() or 1
    slice_session = None
    try:
        session = ort.InferenceSession(str(path), _session_options(threads, spin), providers=providers)
        if workers > 1 and session.get_providers()[0] == "CPUExecutionProvider":
            slice_session = ort.InferenceSession(str(path), _session_options(1, spin), providers=providers)
    except Exception as e:  # ORT raises its own Fail/InvalidProtobuf/... types
        raise ImgclfError(f"{path}: ONNX Runtime cannot open it ({str(e).splitlines()[0][:200]}); "
                          "re-export it with `imgclf export`") from None
    props = session.get_modelmeta().custom_metadata_map
    if "imgclf" not in props:
        raise ImgclfError(f"{path}: an ONNX model without imgclf metadata; only models written by "
                          "`imgclf export` carry their classes and preprocessing")
    try:  # the same checks as a checkpoint's metadata (the weights are ONNX Runtime's business)
        meta = parse_json(props["imgclf"], "its imgclf metadata", MAX_META_CHARS)
        check_meta(meta, required=("classes", "preprocess"))
    except Invalid as e:
        raise ImgclfError(f"{path}: its imgclf metadata is damaged ({e}); re-export it with `imgclf export`") from None
    classes, spec = list(meta["classes"]), Preprocess.from_dict(meta["preprocess"])
    names = [i.name for i in session.get_inputs()]
    if names != [INPUT_NAME]:
        raise ImgclfError(f"{path}: expected one input named {INPUT_NAME!r}, found {names}")
    return OnnxClassifier(session, classes, spec, meta=meta, path=path, slice_session=slice_session,
                          workers=workers)


ORT_SUFFIXES = (".onnx", ".ort")  # .ort: ONNX Runtime's own (flatbuffer) format, for its mobile/minimal builds


def is_onnx_runtime_file(path: str | Path) -> bool:
    return str(path).lower().endswith(ORT_SUFFIXES)


def save_ort(onnx_path: str | Path, out: str | Path) -> Path:
    """Write an ``.onnx`` file in ONNX Runtime's ``.ort`` format (atomically), its metadata kept. This is what
    ONNX Runtime's ``convert_onnx_models_to_ort`` tool does for one file (its "fixed" style): the graph is
    optimized on loading and saved, without the NCHWc layout rewrite, which only x86 CPUs run. The tool itself
    is not called because it names its outputs and writes an operator list beside them."""
    import onnxruntime as ort

    out = Path(out)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.save_model_format", "ORT")
    with atomic_path(out) as tmp:
        opts.optimized_model_filepath = str(tmp)
        try:
            ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"],
                                 disabled_optimizers=["NchwcTransformer"])
        except Exception as e:  # ORT raises its own Fail/NotImplemented/... types
            raise ImgclfError(f"{onnx_path}: ONNX Runtime cannot convert it to .ort "
                              f"({str(e).splitlines()[0][:200]})") from None
    return out


def _session_options(threads: int, spin: bool = True):
    """ONNX Runtime session options: all graph optimizations, ``threads`` intra-op threads (0 = ORT's default)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3  # errors only: ORT's shape-merge notes are not the user's business
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


def save_onnx(model, out: str | Path, props: dict[str, str]) -> Path:
    import onnx

    del model.metadata_props[:]
    for k, v in props.items():
        model.metadata_props.add(key=k, value=v)
    model.producer_name, model.producer_version = "imgclf", __version__
    out = Path(out)
    with atomic_path(out) as tmp:
        onnx.save(model, str(tmp))
    return out
