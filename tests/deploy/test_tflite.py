"""LiteRT export: a tiny run to .tflite fp32 and int8, parity, metadata read back, .tflite in predict and
evaluate, the op a conversion fails on named, bad input refused in one line. The converter lives in a
venv of its own (deploy/litert_venv.py), built once into pytest's cache folder (~90 s), or
$IMGCLF_LITERT_PYTHON names one."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import imgclf
from imgclf.classifier import Classifier
from imgclf.data.images import Preprocess
from imgclf.deploy import tflite as tflite_mod
from imgclf.deploy.export import export
from imgclf.deploy.litert_convert import unsupported_op
from imgclf.deploy.litert_venv import converter_python
from imgclf.errors import ImgclfError
from imgclf.tflite_runtime import TfliteClassifier, read_metadata, write_metadata

from support import run_cli as _cli

pytest.importorskip("ai_edge_litert", reason='the LiteRT interpreter is not installed: pip install "imgclf[tflite]"')


@pytest.fixture(scope="session")
def litert(request, tmp_path_factory):
    """The converter's Python: built once per checkout (pytest's cache survives sessions), never in ~/.cache."""
    if not os.environ.get("IMGCLF_LITERT_PYTHON"):
        cache = getattr(request.config, "cache", None)  # None under -p no:cacheprovider: then once a session
        home = cache.mkdir("litert-venv") if cache else tmp_path_factory.mktemp("litert-venv")
        os.environ["IMGCLF_LITERT_VENV"] = str(home / "venv")
    try:
        return converter_python(progress=False)
    except ImgclfError as e:
        pytest.skip(f"the LiteRT converter could not be installed: {e}")


@pytest.fixture(scope="session")
def tiny_tflite(tiny_run, litert, tmp_path_factory):
    """The tiny run (seed CNN) exported once, fp32 and int8: (report, path of the .int8.tflite)."""
    out = tmp_path_factory.mktemp("tflite") / "tiny.int8.tflite"
    return export(tiny_run.run_dir, "tflite", int8=True, out=out, calib_images=24, speed=False, progress=False), out


def test_tflite_parity_and_metadata(tiny_run, tiny_tflite):
    report, out = tiny_tflite
    fp32_path = out.with_name("tiny.tflite")
    assert report.ok and report.out == out and fp32_path.is_file()
    pt, fp32, int8 = report.rows
    assert (pt.name, fp32.name, int8.name) == ("pytorch fp32", "tflite fp32", "tflite int8")
    assert fp32.agreement == 1.0 and fp32.max_logit_diff < 1e-4 and fp32.accuracy == pt.accuracy
    assert fp32.accuracy - int8.accuracy <= 0.01 and int8.size_bytes < fp32.size_bytes / 2
    assert report.n_images == 24 and "tflite int8" in report.table() and report.speed_batch == 1

    ckpt = imgclf.load(tiny_run.run_dir, device="cpu")
    for path, precision in ((fp32_path, "fp32"), (out, "int8")):
        props = read_metadata(path.read_bytes())
        assert json.loads(props["classes"]) == ckpt.classes
        assert Preprocess.from_dict(json.loads(props["preprocess"])) == ckpt.preprocess
        assert json.loads(props["imgclf"])["tflite"]["precision"] == precision
        clf = imgclf.load(path)  # the file alone: classes and preprocessing from its metadata
        assert isinstance(clf, TfliteClassifier) and clf.classes == ckpt.classes and clf.preprocess == ckpt.preprocess
        assert clf.single.get_input_details()[0]["shape"].tolist() == [1, 32, 32, 3]
    x = torch.randint(0, 256, (7, 3, 32, 32), dtype=torch.uint8)
    clf = imgclf.load(fp32_path)
    assert torch.allclose(clf.logits(x), ckpt.logits(x), atol=1e-4)
    assert not clf.resizable  # the seed CNN's flatten is a fixed reshape: image by image, same answers
    assert torch.allclose(clf.logits(x[:1]), ckpt.logits(x[:1]), atol=1e-4)


def test_tflite_in_predict_and_evaluate_cli(tiny_run, tiny_tflite, tmp_path, capsys):
    _, out = tiny_tflite
    img = np.zeros((50, 70, 3), np.uint8)
    img[..., 2] = 200
    Image.fromarray(img).save(tmp_path / "blue.jpg")
    tops = []
    for model in (str(tiny_run.run_dir), str(out.with_name("tiny.tflite")), str(out)):
        code, text, _ = _cli(capsys, "predict", model, str(tmp_path / "blue.jpg"), "--format", "json")
        assert code == 0
        tops.append(json.loads(text)[0]["top"])
    assert all(t[0]["class"] == "blue" for t in tops)
    assert all(abs(s["probability"] - t["probability"]) < 1e-4 for s, t in zip(tops[0], tops[1]))
    code, text, _ = _cli(capsys, "evaluate", str(out), "--json", "--no-progress")
    assert code == 0
    m = json.loads(text)
    assert m["n"] == 24 and m["top1"] == imgclf.evaluate(tiny_run.run_dir, progress=False, save=False)["top1"]


def test_conversion_failures_are_one_line(tmp_path, monkeypatch):
    """The converter's verdict reaches the user as one line naming the op (the message is litert-torch's own,
    for FastNet's adaptive_max_pool2d before imgclf rewrote it); a converter that dies says how. A stand-in
    converter keeps this fast: importing litert-torch alone takes ~18 s."""
    assert unsupported_op("Lowering not found: aten.adaptive_max_pool2d.default While executing %x") \
        == "aten.adaptive_max_pool2d"
    assert unsupported_op("RuntimeError: something else broke") is None
    spec = Preprocess(32, 3, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    model = imgclf.create_model("fastnet-xs", num_classes=3)
    clf = Classifier(model, ["a", "b", "c"], spec, meta={"arch": model.arch_args, "classes": ["a", "b", "c"],
                                                         "preprocess": spec.to_dict()})
    fake = tmp_path / "python"
    verdict = {"ok": False, "error": "RuntimeError: Lowering not found: aten.fancy_op.default", "op": "aten.fancy_op"}
    for body, message in ((f"echo 'converting...'; echo '{json.dumps(verdict)}'",
                           r"^LiteRT cannot convert fastnet-xs: litert-torch has no lowering for aten\.fancy_op$"),
                          ("echo 'Segmentation fault' >&2; exit 139", r"stopped with status 139: Segmentation fault$")):
        fake.write_text(f"#!/bin/sh\n{body}\n")
        fake.chmod(0o755)
        monkeypatch.setenv("IMGCLF_LITERT_PYTHON", str(fake))
        with pytest.raises(ImgclfError, match=message):
            tflite_mod.convert(clf, tmp_path / "x.tflite", progress=False)
    assert not (tmp_path / "x.tflite").exists()


def test_tflite_bad_input(tiny_run, tiny_tflite, tmp_path, capsys):
    _, out = tiny_tflite
    (tmp_path / "junk.tflite").write_bytes(b"not a model at all")
    with pytest.raises(ImgclfError, match="not a TFLite flatbuffer"):
        imgclf.load(tmp_path / "junk.tflite")
    with pytest.raises(ImgclfError, match="not found"):
        imgclf.load(tmp_path / "missing.tflite")
    damaged = write_metadata(out, {"imgclf": "{not json"}, out=tmp_path / "damaged.tflite")
    with pytest.raises(ImgclfError, match="metadata is damaged"):
        imgclf.load(damaged)
    props = read_metadata(damaged.read_bytes())
    assert json.loads(props["classes"]) == imgclf.load(out).classes  # the other entries are kept
    with pytest.raises(ImgclfError, match="not an exported model"):
        export(out, "tflite", progress=False)
    for args, message in ((["--out", str(tmp_path / "m.onnx")], "name the file *.tflite"),
                          (["--int8", "--portable"], "--portable is for ONNX int8")):
        code, _, err = _cli(capsys, "export", str(tiny_run.run_dir), "--format", "tflite", *args, "--no-progress")
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    code, _, err = _cli(capsys, "predict", str(out), str(tmp_path / "junk.tflite"), "--explain", str(tmp_path))
    assert code == 2 and "has no gradients" in err
