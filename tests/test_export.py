"""ONNX / int8 export, its parity check, and .onnx models in predict and evaluate."""
import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

import imgclf
from conftest import CIFAR_JPEG
from conftest import run_cli as _cli
from imgclf import onnx_runtime
from imgclf.deploy import export as export_mod
from imgclf.deploy import graph_rewrites
from imgclf.deploy import int8 as int8_mod
from imgclf.deploy.export import ParityError, export
from imgclf.errors import ImgclfError
from imgclf.onnx_runtime import load_onnx


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory):
    """The tiny run exported once: (report, path of the .onnx)."""
    out = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    report = export(tiny_run.run_dir, out=out, speed=False, progress=False)
    return report, out


def test_export_parity_and_metadata(tiny_run, exported):
    report, out = exported
    assert report.ok and report.out == out and out.is_file()
    pt, ort = report.rows
    assert pt.name == "pytorch fp32" and ort.name == "onnx fp32"
    assert ort.agreement == 1.0 and ort.max_logit_diff < 1e-4 and ort.accuracy == pt.accuracy
    assert report.n_images == 24  # the tiny run's whole test split
    assert "top-1 agree" in report.table() and json.loads(json.dumps(report.to_dict()))["ok"] is True

    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    ckpt = imgclf.load(tiny_run.run_dir, device="cpu")  # the same function, not TF32 convolutions on a GPU
    assert json.loads(props["classes"]) == ckpt.classes
    assert int(props["image_size"]) == 32 and int(props["channels"]) == 3
    assert tuple(json.loads(props["mean"])) == ckpt.preprocess.mean
    assert props["imgclf_version"] == imgclf.__version__ and props["precision"] == "fp32"

    clf = imgclf.load(out)  # the file alone: classes and preprocessing from its metadata
    assert isinstance(clf, imgclf.OnnxClassifier)
    assert clf.classes == ckpt.classes and clf.preprocess == ckpt.preprocess
    x = torch.randint(0, 256, (7, 3, 32, 32), dtype=torch.uint8)
    for n in (1, 7):  # dynamic batch axis
        assert torch.allclose(clf.logits(x[:n]), ckpt.logits(x[:n]), atol=1e-4)


def test_big_batches_run_as_one_slice_per_core(exported):
    """A batch of >= 2 x MIN_SLICE images is cut into a slice per core, run side by side on the single-threaded
    session, with the logits of the whole batch in one piece; smaller batches and threads=1 stay whole."""
    _, out = exported
    clf = load_onnx(out, threads=2)
    assert clf.workers == 2 and clf.slice_session is not None
    sizes = []
    run = clf.slice_session.run
    clf.slice_session.run = lambda names, feed: sizes.append(len(feed["image"])) or run(names, feed)
    x = torch.randint(0, 256, (2 * onnx_runtime.MIN_SLICE + 1, 3, 32, 32), dtype=torch.uint8)
    whole = clf.session.run(None, {"image": x.numpy()})[0]
    np.testing.assert_allclose(clf.logits(x).numpy(), whole, atol=1e-5)
    assert sorted(sizes) == [onnx_runtime.MIN_SLICE, onnx_runtime.MIN_SLICE + 1]
    clf.logits(x[:2 * onnx_runtime.MIN_SLICE - 1])
    assert len(sizes) == 2  # too small to cut
    assert load_onnx(out, threads=1).slice_session is None


def test_onnx_in_predict_and_evaluate_cli(tiny_run, exported, tmp_path, capsys):
    _, out = exported
    img = np.zeros((50, 70, 3), np.uint8)
    img[..., 2] = 200
    Image.fromarray(img).save(tmp_path / "blue.jpg")
    outs = []
    for model in (str(tiny_run.run_dir), str(out)):
        code, text, _ = _cli(capsys, "predict", model, str(tmp_path / "blue.jpg"), "--format", "json")
        assert code == 0
        outs.append(json.loads(text))
    (a,), (b,) = outs
    assert [t["class"] for t in a["top"]] == [t["class"] for t in b["top"]] and b["top"][0]["class"] == "blue"
    assert all(abs(s["probability"] - t["probability"]) < 1e-4 for s, t in zip(a["top"], b["top"]))

    code, text, _ = _cli(capsys, "evaluate", str(out), "--json", "--no-progress")
    assert code == 0
    m = json.loads(text)
    assert m["n"] == 24 and m["top1"] == imgclf.evaluate(tiny_run.run_dir, progress=False)["top1"]


def test_export_int8_cli(tiny_run, tmp_path, capsys):
    out = tmp_path / "tiny.int8.onnx"
    code, text, err = _cli(capsys, "export", str(tiny_run.run_dir), "--int8", "--out", str(out), "--json",
                           "--calib-images", "40", "--no-speed", "--no-progress")
    assert code == 0, err
    rep = json.loads(text)
    assert rep["ok"] and [r["name"] for r in rep["rows"]] == ["pytorch fp32", "onnx fp32", "onnx int8"]
    assert (tmp_path / "tiny.onnx").is_file() and out.is_file()  # fp32 kept beside the int8 model
    int8 = rep["rows"][2]
    assert int8["size_bytes"] < rep["rows"][1]["size_bytes"] / 2
    assert int8["accuracy"] >= rep["rows"][1]["accuracy"] - 0.05
    clf = load_onnx(out)
    assert clf.meta["onnx"]["precision"] == "int8" and clf.meta["onnx"]["calibration_images"] == 40
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(str(out)).graph.node)
    portable = tmp_path / "portable.int8.onnx"
    code, _, err = _cli(capsys, "export", str(tiny_run.run_dir), "--int8", "--portable", "--out", str(portable),
                        "--calib-images", "40", "--no-speed", "--no-progress")
    assert code == 0, err
    weights = load_onnx(portable).meta["onnx"]["weights"]
    assert weights.startswith("symmetric int8 (zero point 0)") and "zero point -1" not in weights
    zero_points = [onnx.numpy_helper.to_array(i) for i in onnx.load(str(portable)).graph.initializer
                   if i.name.endswith("zero_point") and i.data_type == onnx.TensorProto.INT8]
    assert zero_points and not any(z.any() for z in zero_points)


def test_parity_failure_exits_nonzero(tiny_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(export_mod, "compare", lambda ref, logits: (0.9, 3.0))
    with pytest.raises(ParityError, match="below 99.5%") as e:
        export(tiny_run.run_dir, out=tmp_path / "a.onnx", speed=False, progress=False)
    assert not e.value.report.ok
    code, text, err = _cli(capsys, "export", str(tiny_run.run_dir), "--out", str(tmp_path / "b.onnx"),
                           "--no-speed", "--no-progress")
    assert code == 1 and "FAILED" in text and "agrees with PyTorch on 90.00%" in err


def test_int8_gate_is_accuracy_not_agreement():
    from imgclf.deploy.export import BackendResult, ExportReport

    def report(int8_agreement, int8_acc):
        rows = [BackendResult("pytorch fp32", "a", 1, None, None, 0.80, None),
                BackendResult("onnx fp32", "b", 1, 1.0, 1e-6, 0.80, None),
                BackendResult("onnx int8", "c", 1, int8_agreement, 0.3, int8_acc, None)]
        return ExportReport(out="c", rows=rows, n_images=2000, data="d", min_agreement=0.995)

    assert report(0.99, 0.799).ok                      # borderline flips, accuracy kept: fine
    timed = report(0.99, 0.799)
    for r, ips, size in zip(timed.rows, (500, 1000, 2000), (8e6, 8e6, 2e6), strict=True):
        r.images_per_s, r.size_bytes = ips, int(size)
    assert "int8 at batch 256: 2.0x ONNX Runtime fp32, 4.0x PyTorch eager fp32" in timed.table()
    bad = report(0.99, 0.79)
    assert not bad.ok and "loses 1.00 accuracy points" in bad.failures[0] and "failed:" in bad.table()


def test_export_errors(tiny_run, exported, tmp_path):
    _, out = exported
    with pytest.raises(ImgclfError, match="format"):
        export(tiny_run.run_dir, "tflite", progress=False)
    with pytest.raises(ImgclfError, match="not an ONNX file"):
        export(out, progress=False)
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(ImgclfError, match="junk.onnx"):
        imgclf.load(tmp_path / "junk.onnx")
    plain = onnx.load(str(out))
    del plain.metadata_props[:]
    onnx.save(plain, str(tmp_path / "plain.onnx"))
    with pytest.raises(ImgclfError, match="without imgclf metadata"):
        imgclf.load(tmp_path / "plain.onnx")
    with pytest.raises(ImgclfError, match="not found"):
        imgclf.load(tmp_path / "missing.onnx")


def test_relu_before_maxpool_is_exact(tiny_run, exported, tmp_path):
    """The graph rewrite int8 relies on changes no output (max-pool commutes with ReLU)."""
    _, out = exported
    model = onnx.load(str(out))
    assert graph_rewrites.relu_before_maxpool(model) == 3  # seed-cnn pools before each of its three ReLUs
    onnx.save(model, str(tmp_path / "swapped.onnx"))
    shutil.copy(out, tmp_path / "orig.onnx")
    a, b = load_onnx(tmp_path / "orig.onnx"), load_onnx(tmp_path / "swapped.onnx")
    x = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    assert torch.allclose(a.logits(x), b.logits(x), atol=1e-5)


def _fastnet_onnx(path, negate_first_scale=False):
    """A FastNet (random weights, non-trivial BatchNorm statistics) exported the way export_onnx does."""
    import warnings

    torch.manual_seed(0)
    model = imgclf.create_model("fastnet-s", num_classes=4).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.2, 2), m.bias.data.uniform_(-0.5, 0.5)
    if negate_first_scale:
        model.blocks[1][2].weight.data[0] = -1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, 3, 32, 32),), str(path), dynamo=False,
                          opset_version=export_mod.OPSET, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
    return onnx.load(str(path))


def test_bn_before_maxpool_is_exact(tmp_path):
    """FastNet pools between conv and BatchNorm; moving the BatchNorm (positive scales) in front of the
    pool lets ORT fold it into the conv and changes no output beyond float rounding."""
    import onnxruntime as ort

    model = _fastnet_onnx(tmp_path / "a.onnx")
    assert graph_rewrites.bn_before_maxpool(model) == 3
    ops = [n.op_type for n in model.graph.node]
    assert all(ops[i + 1] == "MaxPool" for i, op in enumerate(ops) if op == "BatchNormalization")
    assert "Gelu" in ops  # opset 20: GELU is one node, which int8 keeps as one float round trip
    onnx.save(model, str(tmp_path / "b.onnx"))
    x = np.random.default_rng(0).standard_normal((6, 3, 32, 32)).astype(np.float32)
    a, b = (ort.InferenceSession(str(tmp_path / f), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
            for f in ("a.onnx", "b.onnx"))
    assert np.abs(a).max() > 0.01 and np.allclose(a, b, atol=1e-4)
    # a negative scale flips the order of the pooled values: that BatchNorm must stay where it is
    assert graph_rewrites.bn_before_maxpool(_fastnet_onnx(tmp_path / "c.onnx", negate_first_scale=True)) == 2


def _gelu_qdq(x_scale, x_zero, y_scale, y_zero):
    """uint8 -> DequantizeLinear -> Gelu -> QuantizeLinear -> uint8: how a quantizer leaves a GELU."""
    from onnx import TensorProto, helper, numpy_helper

    consts = [numpy_helper.from_array(np.array(v, dt), n) for v, dt, n in
              [(x_scale, np.float32, "xs"), (x_zero, np.uint8, "xz"), (y_scale, np.float32, "ys"),
               (y_zero, np.uint8, "yz")]]
    nodes = [helper.make_node("DequantizeLinear", ["x", "xs", "xz"], ["xf"]),
             helper.make_node("Gelu", ["xf"], ["g"]),
             helper.make_node("QuantizeLinear", ["g", "ys", "yz"], ["y"])]
    graph = helper.make_graph(nodes, "gelu", [helper.make_tensor_value_info("x", TensorProto.UINT8, [256])],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, [256])], consts)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 9
    return model


@pytest.mark.parametrize("x_scale,x_zero,y_scale,y_zero", [(0.03, 128, 0.025, 10), (0.05, 60, 0.05, 5),
                                                           (0.01, 200, 0.004, 40)])
def test_gelu_in_int8_matches_gelu_on_every_code(x_scale, x_zero, y_scale, y_zero):
    """QLinearSigmoid + QLinearMul give, for each of the 256 uint8 inputs, GELU's code within one step
    (x * sigmoid(1.702 x) is within 0.021 of GELU), and the float round trip is gone from the graph."""
    import onnxruntime as ort

    model = _gelu_qdq(x_scale, x_zero, y_scale, y_zero)
    codes = np.arange(256, dtype=np.uint8)

    def run(m):
        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(
            None, {"x": codes})[0].astype(int)

    exact = run(model)
    assert int8_mod.gelu_in_int8(model) == 1
    assert [n.op_type for n in model.graph.node] == ["QLinearSigmoid", "QLinearMul"]
    fast = run(model)
    assert len(set(exact)) > 20  # the test covers a real range of outputs
    assert np.abs(fast - exact).max() <= max(1, round(0.021 / y_scale + 0.5))


def test_gelu_in_int8_leaves_other_gelus_alone():
    """A GELU whose output is not re-quantized (or the tanh form) stays as it is."""
    model = _gelu_qdq(0.03, 128, 0.025, 10)
    model.graph.node[1].attribute.extend([onnx.helper.make_attribute("approximate", "tanh")])
    assert int8_mod.gelu_in_int8(model) == 0 and len(model.graph.node) == 3
    signed = _gelu_qdq(0.03, 0, 0.025, 0)  # int8 activations: the uint8 sigmoid cannot be multiplied in
    for init in signed.graph.initializer:
        if init.name in ("xz", "yz"):
            init.CopyFrom(onnx.numpy_helper.from_array(np.array(0, np.int8), init.name))
    assert int8_mod.gelu_in_int8(signed) == 0


@pytest.mark.realdata
@pytest.mark.skipif(not CIFAR_JPEG.exists(), reason="needs ../shared/datasets/cifar10-jpeg.tar.gz")
def test_int8_fastnet_on_cifar(tmp_path, monkeypatch):
    """The default model in int8, GELUs on uint8: accuracy kept (FastNet-S, 1 epoch on 10% of CIFAR-10), and
    PyTorch's top-1 kept about as often as with the exact GELU in float between the int8 layers."""
    run = imgclf.train(data=str(CIFAR_JPEG), model="fastnet-s", epochs=1, fraction=0.1, tta="none",
                       project=str(tmp_path), name="fast", progress=False)
    report = export(run.run_dir / "best", int8=True, out=tmp_path / "m.int8.onnx", check_images=1000,
                    speed=False, progress=False)  # raises ParityError if int8 loses > 0.5 points
    pt, fp32, int8 = report.rows
    assert fp32.agreement == 1.0 and fp32.accuracy - int8.accuracy <= 0.005, report.table()
    monkeypatch.setattr(int8_mod, "gelu_in_int8", lambda model: 0)
    exact = export(run.run_dir / "best", int8=True, out=tmp_path / "exact.int8.onnx", check_images=1000,
                   speed=False, progress=False).rows[2]
    assert int8.agreement >= exact.agreement - 0.01, (int8, exact)
    model = onnx.load(str(tmp_path / "m.int8.onnx"))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QLinearSigmoid") == 6 and ops.count("Gelu") == 1  # the last one feeds the fp32 head
    head = next(n for n in model.graph.node if n.op_type == "MatMul")  # its logits are then divided by a scale
    assert head.input[1] in {i.name for i in model.graph.initializer}  # float weights, no DequantizeLinear
    assert "uint8" in load_onnx(tmp_path / "m.int8.onnx").meta["onnx"]["gelu"]
    # the path for CPUs without VNNI, taken on any machine: 7-bit weights where 8-bit products overflow 16 bits
    monkeypatch.setenv("IMGCLF_CPU_VNNI", "0")
    no_vnni = export(run.run_dir / "best", int8=True, out=tmp_path / "nv.int8.onnx", check_images=1000,
                     speed=False, progress=False)
    assert no_vnni.reduce_range and no_vnni.rows[1].accuracy - no_vnni.rows[2].accuracy <= 0.005, no_vnni.table()
    assert "7-bit in 1 convolution" in load_onnx(tmp_path / "nv.int8.onnx").meta["onnx"]["weights"]


def test_vnni_detection_can_be_overridden(monkeypatch):
    monkeypatch.setenv("IMGCLF_CPU_VNNI", "0")
    assert int8_mod.cpu_has_vnni() is False
    monkeypatch.setenv("IMGCLF_CPU_VNNI", "1")
    assert int8_mod.cpu_has_vnni() is True and not int8_mod.needs_reduce_range()


def test_overflow_share_counts_int16_saturation_of_pair_sums():
    """u8 x s8 products are added in pairs into int16 on CPUs without VNNI: 255*127*2 overflows, 100*127*2 not."""
    rng = np.random.default_rng(0)
    w = np.full((4, 6, 3, 3), 127, np.int8)
    attrs = {"pads": [1, 1, 1, 1]}
    bright = np.full((2, 6, 5, 5), 255, np.uint8)
    assert int8_mod._overflow_share(bright, 255, w, attrs, rng) == 1.0  # padding takes the zero point's code
    assert int8_mod._overflow_share(np.full_like(bright, 100), 100, w, attrs, rng) == 0.0
    half = np.full_like(bright, 255)
    half[:, 1::2] = 0  # every other channel dark: pairs (c, c+1) stay in range, pairs across kernel taps do not
    share = int8_mod._overflow_share(half, 0, w, attrs, rng)
    assert 0.0 < share < 1.0


@pytest.mark.realdata
@pytest.mark.skipif(not CIFAR_JPEG.exists(), reason="needs ../shared/datasets/cifar10-jpeg.tar.gz")
def test_int8_accuracy_on_cifar(cifar_seed_run, tmp_path):
    """Static int8 of a small real-data model keeps its accuracy (seed-cnn, 1 epoch on 20% of CIFAR-10)."""
    report = export(cifar_seed_run.run_dir, int8=True, out=tmp_path / "m.int8.onnx", check_images=1000,
                    speed=False, progress=False)  # raises ParityError if int8 loses > 0.5 points
    pt, fp32, int8 = report.rows
    assert fp32.agreement == 1.0 and fp32.max_logit_diff < 1e-3
    assert int8.agreement >= 0.97 and fp32.accuracy - int8.accuracy <= 0.005, report.table()
    assert int8.size_bytes < fp32.size_bytes / 3


@pytest.mark.parametrize("name", imgclf.list_models())
def test_every_registered_model_exports(name, tmp_path):
    """Export works for the whole registry (untrained weights): same logits as PyTorch, any batch size."""
    from imgclf.classifier import Classifier
    from imgclf.data.images import Preprocess
    from imgclf.deploy.export import export_onnx

    spec = Preprocess(32, 3, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    classes = [str(i) for i in range(10)]
    clf = Classifier(imgclf.create_model(name, num_classes=10), classes, spec,
                     meta={"arch": {"name": name}, "classes": classes, "preprocess": spec.to_dict()})
    onnx_clf = load_onnx(export_onnx(clf, tmp_path / f"{name}.onnx"))
    x = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    ref = clf.logits(x)
    assert torch.allclose(onnx_clf.logits(x), ref, atol=1e-4, rtol=1e-3)
    assert torch.allclose(onnx_clf.logits(x[:1]), ref[:1], atol=1e-4, rtol=1e-3)


def test_conv_kernels_by_measurement_keeps_the_same_model(tmp_path):
    """Moving an int8 conv to ORT's GEMM kernel (weights w - 1 at zero point -1) changes no output; margin 0
    moves nothing and leaves the file as it was; the metadata says which kind of file was written."""
    import onnxruntime as ort

    from imgclf.classifier import Classifier
    from imgclf.data.images import Preprocess
    from imgclf.deploy.export import export_onnx
    from imgclf.deploy.int8 import quantize_int8

    torch.manual_seed(0)
    spec = Preprocess(32, 3, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    classes = [str(i) for i in range(10)]
    net = imgclf.create_model("fastnet-s", num_classes=10).eval()
    with torch.no_grad():  # fresh convs can be identical, and then share one initializer in the file
        for p in net.parameters():
            p.add_(0.01 * torch.randn_like(p))
    clf = Classifier(net, classes, spec,
                     meta={"arch": {"name": "fastnet-s"}, "classes": classes, "preprocess": spec.to_dict()})
    fp32 = export_onnx(clf, tmp_path / "m.onnx")
    calib = np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    path = quantize_int8(fp32, tmp_path / "m.int8.onnx", calib, tune=False)
    assert "except" not in load_onnx(path).meta["onnx"]["weights"]
    model = onnx.load(str(path))
    before = model.SerializeToString()
    assert int8_mod.conv_kernels_by_measurement(model, calib, rounds=2, margin=0.0) == []
    assert model.SerializeToString() == before
    moved = int8_mod.conv_kernels_by_measurement(model, calib, rounds=2, margin=float("inf"))
    convs = [n.name for n in model.graph.node if n.op_type == "Conv"]
    assert sorted(moved) == sorted(convs) and len(convs) == 7
    zero_points = [onnx.numpy_helper.to_array(i) for i in model.graph.initializer
                   if i.name.endswith("weight_zero_point") and i.data_type == onnx.TensorProto.INT8]
    assert zero_points and all((z == -1).all() for z in zero_points)
    x = np.random.default_rng(1).integers(0, 256, (16, 3, 32, 32), dtype=np.uint8)

    def run(blob):
        return ort.InferenceSession(blob, providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]

    np.testing.assert_allclose(run(model.SerializeToString()), run(before), atol=1e-5)
