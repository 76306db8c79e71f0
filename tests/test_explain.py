"""Heat maps (LayerCAM, Grad-CAM): every registered model explains, the heat lies on the evidence, and the
command writes overlays."""
import numpy as np
import pytest
import torch
from PIL import Image

import imgclf
from imgclf.classifier import Classifier
from imgclf.data.images import Preprocess
from imgclf.errors import ImgclfError

from support import run_cli
from synthetic import COLOURS, write_image


def _untrained(name: str) -> Classifier:
    size = 64 if name.startswith("efficientnet") else 32  # EfficientNet's five stride-2 stages leave 2x2 at 64
    torch.manual_seed(0)
    model = imgclf.create_model(name, num_classes=3, image_size=size)
    spec = Preprocess(size, 3, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    return Classifier(model, ["a", "b", "c"], spec, meta={"arch": {"name": name}, "preprocess": spec.to_dict()})


@pytest.mark.parametrize("name", imgclf.list_models())
def test_every_model_explains(name):
    clf = _untrained(name)
    size, model = clf.preprocess.image_size, clf.model
    maps = []
    hook = model.cam_layer().register_forward_hook(lambda _m, _i, out: maps.append(out.shape))
    model(torch.zeros(1, 3, size, size))
    hook.remove()
    assert len(maps) == 1 and len(maps[0]) == 4 and maps[0][1] > 1 and min(maps[0][2:]) >= 1  # a spatial map
    next(model.parameters()).requires_grad_(False)  # a frozen stem, as --freeze-blocks leaves it
    flags = [p.requires_grad for p in model.parameters()]
    model.train()
    images = [np.random.default_rng(i).integers(0, 256, (size, size, 3), dtype=np.uint8) for i in range(3)]
    out = clf.explain(images, batch_size=2)
    assert [e.heat.shape for e in out] == [(size, size)] * 3 and all(e.heat.dtype == np.float32 for e in out)
    assert all(np.isfinite(e.heat).all() and e.heat.min() >= 0 and e.heat.max() <= 1 for e in out)
    assert all(e.heat.max() in (0, 1) for e in out)  # scaled to [0, 1], or all zero
    assert model.training and [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("method", ["layercam", "gradcam"])
def test_heat_lies_on_the_evidence(tiny_run, method):
    """A red square on grey, in each quadrant: explained as "red", the square is hotter than the rest."""
    clf = imgclf.load(tiny_run.run_dir)
    images, masks = [], []
    for row in (0, 16):
        for col in (0, 16):
            img = np.full((32, 32, 3), 128, np.uint8)
            img[row:row + 16, col:col + 16] = COLOURS["red"]
            mask = np.zeros((32, 32), bool)
            mask[row:row + 16, col:col + 16] = True
            images.append(img)
            masks.append(mask)
    out = clf.explain(images, target="red", method=method)
    assert [e.label for e in out] == ["red"] * 4
    for e, mask in zip(out, masks):
        assert e.heat[mask].mean() > 1.5 * e.heat[~mask].mean(), (e.heat[mask].mean(), e.heat[~mask].mean())


def test_explain_targets_probability_and_overlay(tiny_run, tmp_path):
    clf = imgclf.load(tiny_run.run_dir)
    path = write_image(tmp_path / "green.png", size=(50, 40), colour=COLOURS["green"])
    top = clf.explain(path)[0]
    probs = clf.predict_proba([path])[0]
    assert top.source == str(path) and top.label == "green" == clf.predict(path)[0].label
    assert top.probability == pytest.approx(float(probs.max()), abs=1e-4)
    red, first = clf.explain([path, path], target=["red", 0])
    assert (red.label, first.label) == ("red", clf.classes[0])
    assert red.probability == pytest.approx(float(probs[clf.classes.index("red")]), abs=1e-4)
    assert top.image.shape == (32, 32, 3)  # the centre crop the model saw
    image = top.overlay()
    assert image.mode == "RGB" and image.size == (224, 224) and top.overlay(size=64).size == (64, 64)
    with pytest.raises(ImgclfError, match="unknown class 'cat'"):
        clf.explain(path, target="cat")
    with pytest.raises(ImgclfError, match="index below 3"):
        clf.explain(path, target=3)
    with pytest.raises(ImgclfError, match="unknown heat-map method 'rise'; choose layercam or gradcam"):
        clf.explain(path, method="rise")
    assert clf.explain([]) == []


def test_predict_explain_writes_overlays(tiny_run, tmp_path, capsys):
    for folder, colour in (("a", "red"), ("b", "blue")):  # two images named x: two overlays
        write_image(tmp_path / folder / "x.png", size=(40, 40), colour=COLOURS[colour])
    out = tmp_path / "why" / "deep"
    code, stdout, err = run_cli(capsys, "predict", str(tiny_run.run_dir), str(tmp_path / "a"),
                                str(tmp_path / "b" / "x.png"), "--explain", str(out))
    assert code == 0, err
    assert stdout.count("x.png: ") == 2 and err.strip() == f"explained 2 images -> {out}"
    assert sorted(p.name for p in out.iterdir()) == ["x-2.png", "x.png"]
    for name in ("x.png", "x-2.png"):
        with Image.open(out / name) as im:
            assert (im.format, im.mode, im.size) == ("PNG", "RGB", (224, 224))

    (tmp_path / "bad.jpg").write_text("not an image")
    code, stdout, err = run_cli(capsys, "predict", str(tiny_run.run_dir), str(tmp_path / "a" / "x.png"),
                                str(tmp_path / "bad.jpg"), "--explain", str(tmp_path / "why2"))
    assert code == 1 and "bad.jpg: error:" in stdout and f"explained 1 images -> {tmp_path / 'why2'}" in err
    assert [p.name for p in (tmp_path / "why2").iterdir()] == ["x.png"]


def test_onnx_and_video_refuse_to_explain(tiny_run, tiny_onnx, tmp_path, capsys):
    _, onnx_path = tiny_onnx
    path = write_image(tmp_path / "red.png", size=(32, 32), colour=COLOURS["red"])
    with pytest.raises(ImgclfError, match="pass the run folder"):
        imgclf.load(onnx_path).explain(path)
    code, stdout, err = run_cli(capsys, "predict", str(onnx_path), str(path), "--explain", str(tmp_path / "why"))
    assert code == 2 and stdout == "" and not (tmp_path / "why").exists()
    assert err.count("\n") == 1 and err.startswith("error: ") and "no gradients" in err
    code, stdout, err = run_cli(capsys, "predict", str(tiny_run.run_dir), "--source", "clip.mp4", "--explain",
                                str(tmp_path / "why"))
    assert code == 2 and stdout == "" and err.count("\n") == 1 and "--explain" in err
