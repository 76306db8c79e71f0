"""ONNX export: parity with PyTorch, metadata, errors, every registered model, .onnx in predict/evaluate."""
import json

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

import imgclf
from imgclf.deploy import export as export_mod
from imgclf.deploy import int8 as int8_mod
from imgclf.deploy.export import ParityError, export
from imgclf.errors import ImgclfError
from imgclf.onnx_runtime import load_onnx

from support import run_cli as _cli


def test_export_parity_and_metadata(tiny_run, tiny_onnx):
    report, out = tiny_onnx
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


def test_onnx_in_predict_and_evaluate_cli(tiny_run, tiny_onnx, tmp_path, capsys):
    _, out = tiny_onnx
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
    assert m["n"] == 24 and m["top1"] == imgclf.evaluate(tiny_run.run_dir, progress=False, save=False)["top1"]


def test_parity_failure_exits_nonzero(tiny_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(export_mod, "compare", lambda ref, logits: (0.9, 3.0))
    with pytest.raises(ParityError, match="below 99.5%") as e:
        export(tiny_run.run_dir, out=tmp_path / "a.onnx", speed=False, progress=False)
    assert not e.value.report.ok
    code, text, err = _cli(capsys, "export", str(tiny_run.run_dir), "--out", str(tmp_path / "b.onnx"),
                           "--no-speed", "--no-progress")
    assert code == 1 and "FAILED" in text and "agrees with PyTorch on 90.00%" in err


def test_export_errors(tiny_run, tiny_onnx, tmp_path):
    _, out = tiny_onnx
    with pytest.raises(ImgclfError, match="format"):
        export(tiny_run.run_dir, "coreml", progress=False)
    with pytest.raises(ImgclfError, match="not an exported model"):
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


def test_ort_format_export_with_int8(tiny_run, tmp_path, capsys):
    """--format ort: ONNX Runtime's own format, fp32 and int8, checked like ONNX; the file alone predicts."""
    out = tmp_path / "tiny.int8.ort"
    code, text, _ = _cli(capsys, "export", str(tiny_run.run_dir), "--format", "ort", "--int8", "--out", str(out),
                         "--no-speed", "--no-progress", "--json")
    assert code == 0, text
    report = json.loads(text)
    assert [r["name"] for r in report["rows"]] == ["pytorch fp32", "ort fp32", "ort int8"]
    assert report["rows"][1]["agreement"] == 1.0 and report["out"] == str(out)
    assert out.is_file() and (tmp_path / "tiny.ort").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.int8.ort", "tiny.ort"]  # no .onnx left behind
    assert out.read_bytes()[4:8] == b"ORTM"  # the flatbuffer's identifier, not an ONNX protobuf
    clf = imgclf.load(tmp_path / "tiny.ort")
    ckpt = imgclf.load(tiny_run.run_dir, device="cpu")
    assert isinstance(clf, imgclf.OnnxClassifier) and clf.classes == ckpt.classes
    x = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    assert torch.allclose(clf.logits(x), ckpt.logits(x), atol=1e-4)
    code, text, _ = _cli(capsys, "evaluate", str(out), "--json", "--no-progress")
    assert code == 0 and json.loads(text)["n"] == 24
    with pytest.raises(ImgclfError, match=r"name the file \*\.ort"):
        export(tiny_run.run_dir, "ort", out=tmp_path / "x.onnx", progress=False)


@pytest.mark.parametrize("name", imgclf.list_models())
def test_every_registered_model_exports(name, tmp_path):
    """Export works for the whole registry (untrained weights): same logits as PyTorch, any batch size."""
    from imgclf.classifier import Classifier
    from imgclf.data.images import Preprocess
    from imgclf.deploy.export import export_onnx

    spec = Preprocess(32, 3, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    classes = [str(i) for i in range(10)]
    model = imgclf.create_model(name, num_classes=10)
    clf = Classifier(model, classes, spec, meta={"arch": model.arch_args, "classes": classes,
                                                 "preprocess": spec.to_dict()})
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
                     meta={"arch": net.arch_args, "classes": classes, "preprocess": spec.to_dict()})
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
