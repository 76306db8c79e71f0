"""Export a trained model to ONNX (fp32, or int8 by static quantization) and prove it predicts the same.

    report = imgclf.export("runs/cifar10-seed-cnn", int8=True)   # -> ExportReport; report.table()
    clf = imgclf.load("runs/cifar10-seed-cnn/best.int8.onnx")    # an OnnxClassifier: predict / evaluate

The ``.onnx`` file is self-contained: its input is the preprocessed image as ``uint8`` (N, C, H, W) on the
0..255 scale, the normalisation ``(x / 255 - mean) / std`` is the graph's first two nodes, and the
model's ``metadata_props`` hold the class names, input size, channels, mean/std, the preprocessing spec
(resize method) and the imgclf version, so the file alone is enough to predict (any runtime, any language).

Every export ends with a parity check on real test images (the run's own test split): top-1 agreement and
the largest logit difference against PyTorch; below ``min_agreement`` the export fails (:class:`ParityError`).
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import __version__
from .data.images import Preprocess
from .data.tensors import Normalizer, to_tensor
from .errors import ImgclfError
from .evaluate import load_run_data
from .predict import BaseClassifier, Classifier, load
from .utils import atomic_path

INPUT_NAME = "image"    # uint8 (N, C, H, W), 0..255, already resized by the imgclf image loader
OUTPUT_NAME = "logits"  # float32 (N, num_classes)
OPSET = 20              # the first with a Gelu op: one node instead of five (and one int8 round trip)
MIN_AGREEMENT = 0.995   # fp32 must agree with PyTorch on the top-1 class of at least this share of images
MAX_INT8_DROP = 0.005   # int8 may lose at most this much top-1 accuracy (0.5 points)
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
    """Open an ``.onnx`` file written by ``imgclf export``; classes and preprocessing come from its metadata.
    ORT's CPU provider is used (CUDA when asked for and installed). ``threads``: cores to use (0 = all).
    Batches of at least ``2 * MIN_SLICE`` images run as one slice per core on a single-threaded session,
    smaller ones on a session whose operators ORT splits over the cores.
    ``spin=False`` stops idle ORT threads from busy-waiting: slower for back-to-back batches, but a server
    leaves those cores to decoding and HTTP between requests."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise ImgclfError(f"{path}: file not found; pass an .onnx file written by `imgclf export`")
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
    try:
        meta = json.loads(props["imgclf"])
        classes, spec = list(meta["classes"]), Preprocess.from_dict(meta["preprocess"])
    except (KeyError, TypeError, ValueError) as e:
        raise ImgclfError(f"{path}: an ONNX model without imgclf metadata ({e}); only models written by "
                          "`imgclf export` carry their classes and preprocessing") from None
    names = [i.name for i in session.get_inputs()]
    if names != [INPUT_NAME]:
        raise ImgclfError(f"{path}: expected one input named {INPUT_NAME!r}, found {names}")
    return OnnxClassifier(session, classes, spec, meta=meta, path=path, slice_session=slice_session,
                          workers=workers)


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


# ---------------------------------------------------------------------------------------------- export
class _WithNormalization(nn.Module):
    """uint8 images in, logits out: the exported graph does the ``(x / 255 - mean) / std`` itself."""

    def __init__(self, model: nn.Module, preprocess: Preprocess):
        super().__init__()
        self.model = model
        norm = Normalizer(preprocess.mean, preprocess.std)
        self.register_buffer("scale", norm.scale)
        self.register_buffer("shift", norm.shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.float() * self.scale + self.shift)


def onnx_metadata(clf: Classifier, precision: str, extra: dict[str, Any] | None = None) -> dict[str, str]:
    """metadata_props of an exported model: flat keys for any runtime + the full imgclf metadata."""
    spec = clf.preprocess
    meta = {k: v for k, v in clf.meta.items() if k not in ("format", "format_version")}
    meta["onnx"] = {"precision": precision, "input": INPUT_NAME, "output": OUTPUT_NAME,
                    "source": str(clf.path) if clf.path else None, "imgclf_version": __version__, **(extra or {})}
    return {
        "imgclf": json.dumps(meta),
        "imgclf_version": __version__,
        "classes": json.dumps(clf.classes),
        "input_format": f"uint8 (N, {spec.channels}, {spec.image_size}, {spec.image_size}), 0..255, RGB/L; "
                        "resize: " + spec.resize + "; normalisation is inside the graph",
        "image_size": str(spec.image_size),
        "channels": str(spec.channels),
        "mean": json.dumps(list(spec.mean)),
        "std": json.dumps(list(spec.std)),
        "preprocess": json.dumps(spec.to_dict()),
        "precision": precision,
    }


def export_onnx(clf: Classifier, out: str | Path, opset: int = OPSET) -> Path:
    """Write ``clf`` as an fp32 ONNX model with a dynamic batch axis and imgclf metadata (atomically)."""
    import onnx

    spec = clf.preprocess
    wrapped = _WithNormalization(clf.model, spec).to("cpu").eval()
    dummy = torch.zeros(1, spec.channels, spec.image_size, spec.image_size, dtype=torch.uint8)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        # The TorchScript exporter (dynamo=False) is deprecated in favour of torch.export, which needs the
        # extra onnxscript package; the old one handles every registered model and needs nothing else.
        warnings.simplefilter("ignore")
        raw = Path(tmp) / "model.onnx"
        torch.onnx.export(wrapped, (dummy,), str(raw), dynamo=False, opset_version=opset,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                          do_constant_folding=True)
        model = onnx.load(str(raw))
    bn_before_maxpool(model)  # exact up to rounding; lets ORT fold the BatchNorm into the conv before it
    clf.model.to(clf.device)  # _WithNormalization moved it to the CPU for tracing
    return _save_with_metadata(model, out, onnx_metadata(clf, "fp32"))


def _save_with_metadata(model, out: str | Path, props: dict[str, str]) -> Path:
    import onnx

    del model.metadata_props[:]
    for k, v in props.items():
        model.metadata_props.add(key=k, value=v)
    model.producer_name, model.producer_version = "imgclf", __version__
    out = Path(out)
    with atomic_path(out) as tmp:
        onnx.save(model, str(tmp))
    return out


# ---------------------------------------------------------------------------------------------- int8
def cpu_has_vnni() -> bool | None:
    """True/False from /proc/cpuinfo's flags (AVX-VNNI, AVX512-VNNI or AMX); None where they cannot be read.
    ``IMGCLF_CPU_VNNI=0`` (or ``1``) overrides the answer, so that the path for CPUs without VNNI can be taken
    and tested on any machine (ONNX Runtime's int8 kernels ignore PyTorch's and oneDNN's ISA switches)."""
    forced = os.environ.get("IMGCLF_CPU_VNNI", "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return any(f in flags for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


def needs_reduce_range() -> bool:
    """x86 without VNNI multiplies u8 x s8 with 16-bit intermediate sums (vpmaddubsw) that can saturate;
    7-bit weights (reduce_range) avoid it where it happens (:func:`saturating_convs`). VNNI/AMX CPUs and ARM
    do not need it."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return False
    return cpu_has_vnni() is not True


SATURATION_IMAGES = 16      # calibration images whose activations are checked for 16-bit overflow
SATURATION_ROWS = 512       # output pixels sampled per convolution
SATURATION_SHARE = 1e-5     # a convolution whose pair sums overflow more often than this gets 7-bit weights


def saturating_convs(model, x_nhwc: np.ndarray, seed: int = 0) -> list[str]:
    """The names of the int8 convolutions in a QDQ ``model`` (quantized with full 8-bit weights) whose
    u8 x s8 products overflow 16 bits on calibration images ``x_nhwc`` on a CPU without VNNI.

    Such CPUs multiply uint8 activation codes by int8 weights in adjacent pairs and add each pair into a
    saturating int16 (AVX2's vpmaddubsw): |a0 w0 + a1 w1| > 32767 is clipped. Giving every layer 7-bit weights
    (ONNX Runtime's ``reduce_range``) rules that out but costs accuracy everywhere (FastNet-S, 1 epoch on a
    tenth of CIFAR-10: 1.3 points, top-1 agreement 92.6 %); in practice the overflow concentrates in the layers
    that read dense, large codes, above all the one that reads the image itself (its 7-bit weights alone:
    0.2 points, agreement 94.6 %). So the pair sums are computed here, exactly, for a sample of output pixels
    of each convolution, with both orders in which a runtime may lay out the patch (channels innermost, or
    kernel positions innermost), and a convolution gets 7-bit weights when they overflow more often than
    ``SATURATION_SHARE``. Depthwise and grouped convolutions are skipped: ORT widens them to 16 bits first."""
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    convs = []  # (activation codes, their zero point, int8 weight name, conv attributes, conv name)
    for n in g.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        if n.op_type != "Conv" or attrs.get("group", 1) != 1:
            continue
        dqx, dqw = producer.get(n.input[0]), producer.get(n.input[1])
        if (dqx is None or dqw is None or dqx.op_type != "DequantizeLinear" or dqw.op_type != "DequantizeLinear"
                or dqw.input[0] not in inits or inits[dqw.input[0]].dtype != np.int8
                or len(dqx.input) < 3 or dqx.input[2] not in inits or inits[dqx.input[2]].dtype != np.uint8):
            continue
        convs.append((dqx.input[0], int(inits[dqx.input[2]]), dqw.input[0], attrs, n.name))
    if not convs:
        return []
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    for name in dict.fromkeys(c[0] for c in convs):
        if name not in known:
            probe.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.UINT8, None))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep the QDQ tensors
    opts.log_severity_level = 3
    session = ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    x = np.ascontiguousarray(x_nhwc[:SATURATION_IMAGES].transpose(0, 3, 1, 2))
    wanted = list(dict.fromkeys(c[0] for c in convs))
    codes = dict(zip(wanted, session.run(wanted, {INPUT_NAME: x})))
    rng = np.random.default_rng(seed)
    out = []
    for act, zero, w_name, attrs, conv in convs:
        if _overflow_share(codes[act], zero, inits[w_name], attrs, rng) > SATURATION_SHARE:
            out.append(conv)
    return out


def _overflow_share(a: np.ndarray, zero: int, w: np.ndarray, attrs: dict, rng) -> float:
    """The share of u8 x s8 pair sums outside int16 for a sample of this convolution's output pixels."""
    cout, cin, kh, kw = w.shape
    pads = list(attrs.get("pads", [0, 0, 0, 0]))
    sh, sw = attrs.get("strides", [1, 1])
    dh, dw = attrs.get("dilations", [1, 1])
    a = np.pad(a, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])), constant_values=zero)
    n, _, h, wd = a.shape
    oh, ow = (h - dh * (kh - 1) - 1) // sh + 1, (wd - dw * (kw - 1) - 1) // sw + 1
    picks = rng.integers(0, [n, oh, ow], size=(SATURATION_ROWS, 3))
    ky, kx = np.meshgrid(np.arange(kh) * dh, np.arange(kw) * dw, indexing="ij")
    rows = a[picks[:, 0, None, None, None], np.arange(cin)[None, :, None, None],
             picks[:, 1, None, None, None] * sh + ky[None, None], picks[:, 2, None, None, None] * sw + kx[None, None]]
    rows = rows.astype(np.int32)                                     # (P, Cin, kh, kw)
    over = total = 0
    for order in ((0, 1, 2, 3), (0, 2, 3, 1)):                        # kernel positions innermost; channels innermost
        cols = rows.transpose(order).reshape(len(rows), -1)
        ws = w.astype(np.int32).transpose(order).reshape(cout, -1)
        if cols.shape[1] % 2:
            cols, ws = np.pad(cols, ((0, 0), (0, 1))), np.pad(ws, ((0, 0), (0, 1)))
        for i in range(0, len(cols), 64):
            c = cols[i:i + 64]
            pair = c[:, None, 0::2] * ws[None, :, 0::2] + c[:, None, 1::2] * ws[None, :, 1::2]
            over += int(np.count_nonzero((pair > 32767) | (pair < -32768)))
            total += pair.size
    return over / max(total, 1)


class _CalibrationReader:
    """Feeds preprocessed uint8 batches to onnxruntime's calibrator (a CalibrationDataReader)."""

    def __init__(self, x_nhwc: np.ndarray, batch_size: int = 32):
        self.batches = [np.ascontiguousarray(x_nhwc[i:i + batch_size].transpose(0, 3, 1, 2))
                        for i in range(0, len(x_nhwc), batch_size)]
        self.pos = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.pos >= len(self.batches):
            return None
        self.pos += 1
        return {INPUT_NAME: self.batches[self.pos - 1]}

    def rewind(self) -> None:
        self.pos = 0


def quantize_int8(fp32_path: str | Path, out: str | Path, calib_x: np.ndarray, reduce_range: bool | None = None,
                  extra_meta: dict[str, Any] | None = None, tune: bool = True) -> Path:
    """Static post-training int8 quantization (QDQ, per-channel weights) calibrated on ``calib_x``
    ((N, H, W, C) uint8 images through the model's preprocessing). Convolutions are never quantized
    dynamically: static activation ranges are what make int8 convolutions fast and accurate.
    ``reduce_range`` (default: on x86 CPUs without VNNI, :func:`needs_reduce_range`): 7-bit weights for the
    convolutions whose 8-bit products would overflow there (:func:`saturating_convs`).
    ``tune``: pick ONNX Runtime's faster int8 convolution kernel per layer on this CPU
    (:func:`conv_kernels_by_measurement`); ``False`` keeps every weight zero point at 0 (portable)."""
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if reduce_range is None:
        reduce_range = needs_reduce_range()
    ort.set_default_logger_severity(3)
    fp32 = onnx.load(str(fp32_path))
    props = {p.key: p.value for p in fp32.metadata_props}
    with tempfile.TemporaryDirectory() as tmp, _quiet():
        pre, q = Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        # Shape inference + graph optimisation first (folds BatchNorm into Conv, fuses ops), so the quantizer
        # sees the graph ORT will run: without it int8 gains little over fp32.
        quant_pre_process(str(fp32_path), str(pre))
        graph = onnx.load(str(pre))
        relu_before_maxpool(graph)
        onnx.save(graph, str(pre))

        def quantize(seven_bit: list[str]):
            weights = {n.name: n.input[1] for n in graph.graph.node if n.op_type == "Conv"}
            overrides = {weights[c]: [{"axis": 0, "reduce_range": True}] for c in seven_bit}
            quantize_static(str(pre), str(q), _CalibrationReader(calib_x), quant_format=QuantFormat.QDQ,
                            per_channel=True, reduce_range=False, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                            op_types_to_quantize=["Conv", "Gemm", "MatMul", "Relu", "Clip", "MaxPool",
                                                  "AveragePool", "GlobalAveragePool", "Add", "Flatten", "Reshape"],
                            # The classifier head stays fp32 (a few thousand weights): quantizing the layer that
                            # writes the logits cost ~1 point of top-1 agreement with PyTorch on CIFAR-10 runs
                            # (max logit error 1.3 -> 0.3) and no measurable speed.
                            nodes_to_exclude=output_layers(graph),
                            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True,
                                           "TensorQuantOverrides": overrides})
            return onnx.load(str(q))

        model = quantize([])
        seven_bit = saturating_convs(model, calib_x) if reduce_range else []
        if seven_bit:
            model = quantize(seven_bit)
    gelus = gelu_in_int8(model)
    gemm = conv_kernels_by_measurement(model, calib_x) if tune else []
    meta = json.loads(props["imgclf"])
    meta["onnx"].update(precision="int8", reduce_range=reduce_range, calibration_images=len(calib_x),
                        **({"gelu": f"x * sigmoid({GELU_SIGMOID_K} x) on uint8 ({gelus} layers)"} if gelus else {}),
                        # weights stored with zero point -1 so that ORT picks its GEMM kernels (see
                        # conv_kernels_by_measurement); other runtimes may want zero points of 0: --portable
                        weights="symmetric int8 (zero point 0)" + (f", except {len(gemm)} convolution(s) at zero "
                                                                   "point -1, tuned on this CPU" if gemm else "")
                        + (f"; 7-bit in {len(seven_bit)} convolution(s) whose 8-bit products overflow 16 bits "
                           "on CPUs without VNNI" if seven_bit else ""),
                        **(extra_meta or {}))
    props.update(imgclf=json.dumps(meta), precision="int8")
    return _save_with_metadata(model, out, props)


GELU_SIGMOID_K = 1.702  # GELU(x) ~ x * sigmoid(1.702 x) (Hendrycks & Gimpel 2016), within 0.021 everywhere


def gelu_in_int8(model) -> int:
    """Run each GELU between a DequantizeLinear and a QuantizeLinear on uint8 (in place; returns how many).

    ONNX Runtime has no quantized GELU, so a quantized net leaves uint8, computes GELU in float and comes back,
    three passes over the activations that took a quarter of FastNet's int8 time. GELU(x) is close to
    x * sigmoid(1.702 x), and ORT has both halves on uint8: QLinearSigmoid (a 256-entry lookup table; reading
    the same uint8 codes with 1.702x their scale makes its input 1.702 x) and QLinearMul, which writes the
    product with the calibrated output scale of the QuantizeLinear it replaces. The approximation is within
    0.021 of GELU (tests/test_export.py checks every input code); the accuracy gate of :func:`export` judges
    the whole model.
    FastNet at batch 256 on a 2-core Xeon: 1,666 -> 2,227 img/s."""
    from onnx import helper, numpy_helper

    g = model.graph
    consts = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    users: dict[str, list] = {}
    for n in g.node:
        for name in n.input:
            users.setdefault(name, []).append(n)
    replaced: dict[int, list] = {}  # id(QuantizeLinear) -> the nodes that take its place
    dropped: set[int] = set()
    for gelu in g.node:
        if gelu.op_type != "Gelu" or any(a.name == "approximate" and a.s == b"tanh" for a in gelu.attribute):
            continue
        dq, after = producer.get(gelu.input[0]), users.get(gelu.output[0], [])
        if dq is None or dq.op_type != "DequantizeLinear" or len(after) != 1 or after[0].op_type != "QuantizeLinear":
            continue
        q = after[0]
        if len(users[dq.output[0]]) != 1 or not all(n in consts for n in [*dq.input[1:], *q.input[1:]]):
            continue
        x, scale = dq.input[0], consts[dq.input[1]]
        if (scale.size != 1 or len(dq.input) < 3 or len(q.input) < 3  # per-tensor, explicit zero points
                or consts[dq.input[2]].dtype != np.uint8 or consts[q.input[2]].dtype != np.uint8):
            continue  # QLinearMul wants both inputs of one type, and the sigmoid here is uint8
        base = gelu.output[0]
        g.initializer.extend([
            numpy_helper.from_array((scale * GELU_SIGMOID_K).astype(np.float32), base + "/sig_x_scale"),
            numpy_helper.from_array(np.array(1 / 256, np.float32), base + "/sig_scale"),  # sigmoid in [0, 1)
            numpy_helper.from_array(np.array(0, np.uint8), base + "/sig_zero")])
        sig = base + "/sigmoid"
        replaced[id(q)] = [
            helper.make_node("QLinearSigmoid", [x, base + "/sig_x_scale", dq.input[2], base + "/sig_scale",
                                                base + "/sig_zero"], [sig], name=base + "/QLinearSigmoid",
                             domain="com.microsoft"),
            helper.make_node("QLinearMul", [x, dq.input[1], dq.input[2], sig, base + "/sig_scale",
                                            base + "/sig_zero", q.input[1], q.input[2]], [q.output[0]],
                             name=base + "/QLinearMul", domain="com.microsoft")]
        dropped.update((id(dq), id(gelu)))
    if replaced:
        nodes = []
        for n in g.node:
            nodes += replaced.get(id(n), [] if id(n) in dropped else [n])
        nodes = [type(n).FromString(n.SerializeToString()) for n in nodes]
        del g.node[:]
        g.node.extend(nodes)
        if not any(o.domain == "com.microsoft" for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return len(replaced)


def conv_kernels_by_measurement(model, x_nhwc: np.ndarray, rounds: int = 9, margin: float = 0.9) -> list[str]:
    """Per int8 convolution, let ONNX Runtime use whichever of its two kernels is faster on this CPU (in place;
    returns the names of the convolutions moved to the second one).

    ORT runs a QLinearConv whose weights all have zero point 0 with its direct convolution kernel (AVX512-VNNI
    dot products), and one with any other weight zero point through im2col and its int8 GEMM, which uses AMX
    tiles on CPUs that have them. Neither wins everywhere: on a 2-core Xeon with AMX, FastNet's two 256-channel
    convolutions at 7x7 took 9 ms instead of 18-21 per batch of 256 on the GEMM, its first 64-channel one
    25 ms instead of 12 (the direct kernel needs no im2col copy). Storing a layer's int8 weights as ``w - 1``
    with zero point -1 describes exactly the same real weights (the outputs match bit for bit) and selects
    the GEMM. Both versions of the model are profiled on ``x_nhwc`` (calibration images), on one thread as
    :class:`OnnxClassifier` runs big batches, their runs interleaved, and a convolution moves when its best
    kernel time (over ``rounds`` runs but the first) is below ``margin`` of the direct kernel's: a layer that
    is only as fast either way keeps the portable zero point 0, and so do weights that several convolutions
    share. Whole model, same CPU, batch 256: +14 % to +28 % images/s."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    g = model.graph
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    users: dict[str, list] = {}
    for n in g.node:
        for name in n.input:
            users.setdefault(name, []).append(n)
    candidates = {}  # conv name -> (weight, zero point) initializer names
    for dq in g.node:
        if dq.op_type != "DequantizeLinear" or len(dq.input) < 3 or not {dq.input[0], dq.input[2]} <= inits.keys():
            continue
        after, w, zp = users.get(dq.output[0], []), inits[dq.input[0]], inits[dq.input[2]]
        if (len(after) == 1 and after[0].op_type == "Conv" and after[0].name and w.dtype == np.int8
                and w.ndim == 4 and w.min() > -128 and not zp.any()):
            candidates[after[0].name] = (dq.input[0], dq.input[2])
    if not candidates:
        return []

    def shifted(convs) -> onnx.ModelProto:
        out = onnx.ModelProto()
        out.CopyFrom(model)
        for i in out.graph.initializer:
            for conv in convs:
                w_name, zp_name = candidates[conv]
                if i.name == w_name:
                    i.CopyFrom(numpy_helper.from_array((inits[w_name].astype(np.int16) - 1).astype(np.int8), w_name))
                elif i.name == zp_name:
                    i.CopyFrom(numpy_helper.from_array(np.full_like(inits[zp_name], -1), zp_name))
        return out

    x = np.ascontiguousarray(x_nhwc[:128].transpose(0, 3, 1, 2))  # a slice of a big batch
    times: list[dict[str, float]] = []  # per variant: conv -> its best kernel time of one run
    with tempfile.TemporaryDirectory() as tmp:
        sessions = []
        for i, variant in enumerate((model, shifted(candidates))):
            opts = _session_options(1)  # as OnnxClassifier runs big batches: one slice per core
            opts.enable_profiling = True
            opts.profile_file_prefix = os.path.join(tmp, f"variant{i}")
            sessions.append(ort.InferenceSession(variant.SerializeToString(), opts,
                                                 providers=["CPUExecutionProvider"]))
        for _ in range(rounds):
            for s in sessions:  # interleaved, so that a drift in the machine's speed hits both alike
                s.run(None, {INPUT_NAME: x})
        for s in sessions:
            runs: dict[str, list[float]] = {}
            for e in json.loads(Path(s.end_profiling()).read_text()):
                name = e.get("name", "")
                if e.get("cat") == "Node" and name.endswith("_kernel_time"):
                    node = name[:-len("_kernel_time")]
                    # ORT names a fused node after the Conv it replaced: "<conv name>_token_<n>"
                    conv = next((c for c in candidates if node == c or node.startswith(c + "_token")), None)
                    if conv:
                        runs.setdefault(conv, []).append(e["dur"])
            times.append({c: float(min(d[1:])) for c, d in runs.items() if len(d) > 1})  # d[0]: warm-up
    faster = [c for c in candidates if c in times[0] and c in times[1] and times[1][c] < margin * times[0][c]]
    if faster:
        model.CopyFrom(shifted(faster))
    return faster


def relu_before_maxpool(model) -> int:
    """Rewrite MaxPool -> Relu as Relu -> MaxPool in an ONNX graph (in place; returns how many).

    Max-pooling commutes with any non-decreasing function, so the result is identical. Models pool before
    the ReLU to save training time (seed-cnn), but int8 needs ReLU first: a quantized Conv+ReLU then feeds
    MaxPool with one scale, ORT runs the pool on uint8 in NHWC, and the float round trips and layout
    reorders around every pool disappear (seed-cnn: int8 went from ~0.5x to >1x the speed of fp32)."""
    return _pool_first_swapped(model, "Relu", lambda node, consts: True)


def bn_before_maxpool(model) -> int:
    """Rewrite MaxPool -> BatchNormalization as BatchNormalization -> MaxPool (in place; returns how many),
    where every channel's BatchNorm scale is positive: then BatchNorm is an increasing map per channel and
    commutes with max-pooling, so the result is the same up to float rounding. The BatchNorm then follows
    the convolution and ORT folds it into the conv's weights (FastNet pools between the two: its int8 model
    ran 680 -> 806 img/s, fp32 lost a separate BatchNorm pass too)."""
    def positive_scale(bn, consts) -> bool:
        return all(n in consts for n in bn.input[1:5]) and bool(np.all(consts[bn.input[1]] > 0))
    return _pool_first_swapped(model, "BatchNormalization", positive_scale)


def _constants(graph) -> dict[str, np.ndarray]:
    """Values known in the graph: initializers, Constant nodes, and Identity copies of those."""
    from onnx import numpy_helper

    consts = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for n in graph.node:
        if n.op_type == "Identity" and n.input[0] in consts:
            consts[n.output[0]] = consts[n.input[0]]
        elif n.op_type == "Constant" and len(n.attribute) == 1 and n.attribute[0].name == "value":
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    return consts


def _pool_first_swapped(model, op_type: str, allowed) -> int:
    """Move each ``op_type`` node that alone consumes a MaxPool's output in front of that MaxPool, where
    ``allowed(node, constants)`` says the two commute."""
    import onnx

    g = model.graph
    consts = _constants(g)
    nodes = [onnx.NodeProto.FromString(n.SerializeToString()) for n in g.node]
    users: dict[str, list] = {}
    for n in nodes:
        for name in n.input:
            users.setdefault(name, []).append(n)
    outputs = {o.name for o in g.output}
    moved: set[str] = set()
    for k, pool in enumerate(nodes):
        if pool.op_type != "MaxPool" or len(pool.output) != 1 or pool.output[0] in outputs:
            continue
        after = users.get(pool.output[0], [])
        if len(after) != 1 or after[0].op_type != op_type or not allowed(after[0], consts):
            continue
        op = after[0]
        x, mid, y = pool.input[0], pool.output[0], op.output[0]
        op.input[0], op.output[0], pool.input[0], pool.output[0] = x, mid, mid, y
        j = nodes.index(op)
        nodes[k], nodes[j] = op, pool  # keep the node list topologically sorted
        moved.add(mid)
    if moved:
        del g.node[:]
        g.node.extend(nodes)
        kept = [v for v in g.value_info if v.name not in moved]  # `mid` changed shape: drop its old one
        del g.value_info[:]
        g.value_info.extend(kept)
    return len(moved)


def output_layers(model) -> list[str]:
    """Names of the Gemm/MatMul/Conv nodes that write a graph output (the classifier head), directly or
    through elementwise arithmetic with constants (FastNet's head divides its logits by a scale)."""
    g = model.graph
    consts = _constants(g)
    producer = {o: n for n in g.node for o in n.output}
    found = []
    for out in g.output:
        node = producer.get(out.name)
        while node is not None and node.op_type in ("Div", "Mul", "Add", "Sub", "Identity"):
            inputs = [i for i in node.input if i not in consts]
            node = producer.get(inputs[0]) if len(inputs) == 1 else None
        if node is not None and node.op_type in ("Gemm", "MatMul", "Conv"):
            found.append(node.name)
    return found


@contextlib.contextmanager
def _quiet():
    """onnxruntime's quantization tools log through `logging` and warn freely; keep the CLI's table clean."""
    import logging

    saved = logging.root.level
    logging.root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.root.setLevel(saved)


# ---------------------------------------------------------------------------------------------- parity
@dataclass
class BackendResult:
    """One row of the parity table."""
    name: str                             # "pytorch fp32", "onnx fp32", "onnx int8"
    path: str
    size_bytes: int
    agreement: float | None               # top-1 agreement with PyTorch on the check images
    max_logit_diff: float | None          # max |logit - PyTorch logit|
    accuracy: float | None                # top-1 accuracy on the check images (their labels)
    images_per_s: float | None            # batch 256, this CPU


@dataclass
class ExportReport:
    out: Path                             # the model written (the int8 one with --int8)
    rows: list[BackendResult]
    n_images: int                         # images the parity check used
    data: str                             # where they came from
    min_agreement: float
    max_int8_drop: float = MAX_INT8_DROP
    reduce_range: bool | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def failures(self) -> list[str]:
        """Why the export fails, if it does. fp32 must reproduce PyTorch (any disagreement is a bug: wrong
        preprocessing, train-mode layers...). int8 flips a few borderline images both ways by design (99.2 %
        agreement at equal accuracy on CIFAR-10 seed CNNs), so what it must not do is lose accuracy."""
        out = []
        fp32 = next((r for r in self.rows if r.name == "onnx fp32"), None)
        for r in self.rows:
            if r.name.endswith("fp32") and r.agreement is not None and r.agreement < self.min_agreement:
                out.append(f"{r.name} agrees with PyTorch on {r.agreement:.2%} of top-1 classes, below "
                           f"{self.min_agreement:.1%}")
            if r.name.endswith("int8") and fp32 and fp32.accuracy is not None and r.accuracy is not None \
                    and fp32.accuracy - r.accuracy > self.max_int8_drop:
                out.append(f"{r.name} loses {100 * (fp32.accuracy - r.accuracy):.2f} accuracy points, more "
                           f"than {100 * self.max_int8_drop:.2f}")
        return out

    @property
    def ok(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        return {"out": str(self.out), "ok": self.ok, "failures": self.failures, "n_images": self.n_images,
                "data": self.data, "min_agreement": self.min_agreement, "max_int8_drop": self.max_int8_drop,
                "reduce_range": self.reduce_range, "warnings": self.warnings, "rows": [asdict(r) for r in self.rows]}

    def table(self) -> str:
        def f(v, fmt):
            width = int("".join(c for c in fmt.split(".")[0] if c.isdigit()))
            return f"{'-':>{width}}" if v is None else format(v, fmt)

        head = f"{'model':<13} {'top-1 agree':>11} {'max |dlogit|':>12} {'accuracy':>9} {'size':>10} {'img/s@256':>10}"
        gate = f"fp32 needs >= {self.min_agreement:.1%} top-1 agreement with PyTorch"
        if any(r.name.endswith("int8") for r in self.rows):
            gate += f", int8 <= {100 * self.max_int8_drop:.1f} points accuracy loss"
        lines = [f"parity on {self.n_images:,} test images of {self.data} ({gate})", head, "-" * len(head)]
        for r in self.rows:
            lines.append(f"{r.name:<13} {f(r.agreement, '>11.2%')} {f(r.max_logit_diff, '>12.2e')} "
                         f"{f(r.accuracy, '>9.2%')} {_size(r.size_bytes):>10} {f(r.images_per_s, '>10,.0f')}")
        speed = {r.name: r.images_per_s for r in self.rows if r.images_per_s}
        size = {r.name: r.size_bytes for r in self.rows}
        if "onnx int8" in speed and {"pytorch fp32", "onnx fp32"} <= speed.keys():
            lines.append(f"int8 at batch 256: {speed['onnx int8'] / speed['onnx fp32']:.1f}x ONNX Runtime fp32, "
                         f"{speed['onnx int8'] / speed['pytorch fp32']:.1f}x PyTorch eager fp32, "
                         f"{_size(size['onnx fp32'])} -> {_size(size['onnx int8'])}")
        lines += [f"warning: {w}" for w in self.warnings]
        lines += [f"failed: {f}" for f in self.failures]
        lines.append(f"{'ok' if self.ok else 'FAILED'}: {self.out}")
        return "\n".join(lines)


class ParityError(ImgclfError):
    """The exported model disagrees with PyTorch; ``.report`` holds the figures."""

    def __init__(self, message: str, report: ExportReport):
        super().__init__(message)
        self.report = report


def throughput(clf: BaseClassifier | list[BaseClassifier], x: torch.Tensor, batch_size: int = 256,
               seconds: float = 1.5, rounds: int = 3) -> float | list[float]:
    """Images/s of ``clf.logits`` at ``batch_size`` on this machine: one warm-up batch, then the best of
    ``rounds`` rounds of >= ``seconds`` each (with one round, two exports of the same model on a 2-core VM
    measured ORT fp32 at 413 and 590 img/s). Given a list of models, each round times them one after the
    other, so that a drift in the machine's speed (a third within an hour on the 2-core VM) reaches all of
    them alike instead of favouring whichever was timed in the fast minutes; returns a list then."""
    clfs = clf if isinstance(clf, list) else [clf]
    if len(x) < batch_size:
        x = x.repeat((batch_size + len(x) - 1) // len(x), 1, 1, 1)
    xb = x[:batch_size].contiguous(memory_format=torch.channels_last)
    best = [0.0] * len(clfs)
    for c in clfs:
        c.logits(xb, batch_size=batch_size)
    for _ in range(rounds):
        for i, c in enumerate(clfs):
            n, t0 = 0, time.perf_counter()
            while n < 3 * batch_size or time.perf_counter() - t0 < seconds:
                c.logits(xb, batch_size=batch_size)
                n += batch_size
            best[i] = max(best[i], n / (time.perf_counter() - t0))
    return best if isinstance(clf, list) else best[0]


def compare(reference: torch.Tensor, logits: torch.Tensor) -> tuple[float, float]:
    """(top-1 agreement, max |logit difference|) of ``logits`` against ``reference``."""
    agree = (reference.argmax(1) == logits.argmax(1)).float().mean().item()
    return agree, (reference - logits).abs().max().item()


def export(checkpoint: str | Path, format: str = "onnx", *, int8: bool = False, out: str | Path | None = None,
           data: str | None = None, calib_data: str | None = None, calib_images: int = 300,
           check_images: int = 2000, min_agreement: float = MIN_AGREEMENT, max_int8_drop: float = MAX_INT8_DROP,
           speed: bool = True, portable: bool = False, progress: bool = True) -> ExportReport:
    """Export a run folder / checkpoint to ONNX (``int8=True``: also a statically quantized int8 model),
    then check parity with PyTorch on ``check_images`` test images (0 = the whole test split).

    out: the file to write (default ``<checkpoint>.onnx``, or ``<checkpoint>.int8.onnx`` with ``int8``; the
        fp32 model is then kept beside it as ``<name>.onnx`` / ``<name>.fp32.onnx``).
    data: images for the parity check (default: the run's own test split); same classes as the model.
    calib_data: images to calibrate int8 on (default: the run's training split), ``calib_images`` of them.
    speed: also measure images/s at batch 256 for each backend.
    portable: int8 weights all at zero point 0, for runtimes that need it (TensorRT); by default each int8
        convolution is stored the way ONNX Runtime runs fastest on this CPU (:func:`conv_kernels_by_measurement`).
    Returns an :class:`ExportReport`; raises :class:`ParityError` (with ``.report``) when the fp32 model's
    top-1 agreement with PyTorch is below ``min_agreement``, or the int8 model loses more than
    ``max_int8_drop`` top-1 accuracy (0.005 = 0.5 points)."""
    if format != "onnx":
        raise ImgclfError(f"unknown export format {format!r}: this version writes onnx")
    clf = load(checkpoint, device="cpu")
    if not isinstance(clf, Classifier):
        raise ImgclfError(f"{checkpoint}: export needs a run folder or .safetensors checkpoint, not an ONNX file")
    src = Path(clf.path)
    out = Path(out) if out else src.with_suffix(".int8.onnx" if int8 else ".onnx")
    if out.suffix != ".onnx":
        raise ImgclfError(f"--out {out}: name the file *.onnx")
    fp32_out = out
    if int8:
        fp32_out = out.with_name(out.name[:-len(".int8.onnx")] + ".onnx") if out.name.endswith(".int8.onnx") \
            else out.with_suffix(".fp32.onnx")

    # the check images: the run's own test split (a seeded sample) unless other data is given
    ds = load_run_data(clf, data, progress=progress)
    part = ds.test if ds.test is not None else (ds.train if data is not None else None)
    if part is None or len(part.y) == 0:
        raise ImgclfError(f"{ds.source} has no test images for the parity check; pass --data with a test/ folder")
    from .evaluate import remap_labels

    idx = sample_indices(len(part.y), check_images, seed=0)
    x, y = to_tensor(part.x[idx]), torch.as_tensor(remap_labels(part.y[idx], ds.classes, clf.classes))

    ref = clf.logits(x)
    rows = [BackendResult("pytorch fp32", str(src), src.stat().st_size, None, None, _acc(ref, y), None)]
    export_onnx(clf, fp32_out)
    models: list[BaseClassifier] = [clf, load_onnx(fp32_out)]
    rows.append(_row("onnx fp32", models[1], ref, x, y))
    report = ExportReport(out=out, rows=rows, n_images=len(idx), data=ds.source, min_agreement=min_agreement,
                          max_int8_drop=max_int8_drop)
    if int8:
        if calib_data:
            cds = load_run_data(clf, calib_data, progress=progress)
            pool = cds.train
        else:
            pool = ds.train if data is None else load_run_data(clf, None, progress=progress).train
        if pool is None or len(pool.x) == 0:
            raise ImgclfError("no training images to calibrate int8 on; pass --calib-data FOLDER")
        calib = pool.x[sample_indices(len(pool.x), calib_images, seed=1)]
        report.reduce_range = needs_reduce_range()
        quantize_int8(fp32_out, out, calib, reduce_range=report.reduce_range, tune=not portable)
        models.append(load_onnx(out))
        rows.append(_row("onnx int8", models[2], ref, x, y))
    if speed:  # all backends in the same rounds (see `throughput`)
        for row, ips in zip(rows, throughput(models, x)):
            row.images_per_s = ips
        if int8 and rows[2].images_per_s <= rows[1].images_per_s:
            report.warnings.append(f"int8 is not faster than fp32 on this CPU ({rows[2].images_per_s:,.0f} vs "
                                   f"{rows[1].images_per_s:,.0f} images/s at batch 256); ship the fp32 model "
                                   "unless size matters")
    if not report.ok:
        raise ParityError(f"{out}: {'; '.join(report.failures)}: the exported model predicts differently "
                          "from PyTorch (the file is kept for inspection)", report)
    return report


def _row(name: str, clf: OnnxClassifier, ref: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> BackendResult:
    logits = clf.logits(x)
    agree, diff = compare(ref, logits)
    return BackendResult(name, str(clf.path), os.path.getsize(clf.path), agree, diff, _acc(logits, y), None)


def _acc(logits: torch.Tensor, y: torch.Tensor) -> float:
    return (logits.argmax(1) == y).float().mean().item()


def sample_indices(n: int, k: int, seed: int) -> np.ndarray:
    """A seeded sample of min(k, n) indices (all when k <= 0), in ascending order."""
    if k <= 0 or k >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, k, replace=False))


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
