"""Static int8 quantization of an exported ONNX model with ONNX Runtime, and the CPU-specific choices it
makes: 7-bit weights where 8-bit products would overflow (CPUs without VNNI), GELU on uint8, and each
convolution's faster ORT kernel found by profiling.

    quantize_int8("m.onnx", "m.int8.onnx", calib_x)   # calib_x: (N, H, W, C) uint8 training images
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ..onnx_runtime import INPUT_NAME, _session_options, save_onnx
from .graph_rewrites import output_layers, relu_before_maxpool


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
    return save_onnx(model, out, props)


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
