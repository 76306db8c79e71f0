"""int8 export: the accuracy gate, VNNI and 7-bit weights where pair sums overflow, real CIFAR-10 accuracy."""
import json

import numpy as np
import onnx
import pytest

import imgclf
from imgclf.deploy import int8 as int8_mod
from imgclf.deploy.export import export
from imgclf.onnx_runtime import load_onnx

from support import CIFAR_JPEG
from support import run_cli as _cli


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
