"""evaluate.py: every number checked against hand-computed cases, then on a trained tiny run."""
import json
import shutil

import numpy as np
import pytest
import torch

import imgclf
from conftest import run_cli as _cli
from imgclf.errors import ImgclfError
from imgclf.evaluation.metrics import calibration_metrics, evaluation_from_logits, fit_temperature, most_confused
from imgclf.inference import TTA_SHIFT, tta_views

CLASSES = ["cat", "dog", "fox"]


def _logits_for(pred, n_classes=3, margin=2.0):
    logits = torch.zeros(len(pred), n_classes)
    logits[torch.arange(len(pred)), torch.tensor(pred)] = margin
    return logits


def test_confusion_matrix_and_report_hand_computed():
    y = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    pred = [0, 0, 1, 1, 2, 2, 2, 0, 2]
    # by hand: true cat -> cat 2, dog 1; true dog -> dog 1, fox 1; true fox -> cat 1, fox 3
    ev = evaluation_from_logits(_logits_for(pred), y, CLASSES, np.zeros((9, 4, 4, 3), np.uint8))
    m = ev.metrics
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [1, 0, 3]]
    assert m["confusion_matrix_normalized"][0] == pytest.approx([2 / 3, 1 / 3, 0], abs=1e-6)
    assert m["confusion_matrix_normalized"][2] == pytest.approx([1 / 4, 0, 3 / 4], abs=1e-6)
    rep = m["classification_report"]
    # precision = right / predicted as the class; recall = right / truly the class
    assert rep["cat"]["precision"] == pytest.approx(2 / 3) and rep["cat"]["recall"] == pytest.approx(2 / 3)
    assert rep["dog"]["precision"] == pytest.approx(1 / 2) and rep["dog"]["recall"] == pytest.approx(1 / 2)
    assert rep["fox"]["precision"] == pytest.approx(3 / 4) and rep["fox"]["recall"] == pytest.approx(3 / 4)
    assert rep["fox"]["f1-score"] == pytest.approx(3 / 4) and rep["fox"]["support"] == 4
    assert rep["accuracy"] == pytest.approx(6 / 9) == m["top1"]
    assert m["macro_f1"] == pytest.approx((2 / 3 + 1 / 2 + 3 / 4) / 3)
    assert m["per_class_accuracy"] == pytest.approx({"cat": 2 / 3, "dog": 1 / 2, "fox": 3 / 4})
    assert m["most_confused"] == [{"true": "cat", "predicted": "dog", "count": 1},
                                  {"true": "dog", "predicted": "fox", "count": 1},
                                  {"true": "fox", "predicted": "cat", "count": 1}]
    assert "macro avg" in m["classification_report_text"] and "fox" in m["classification_report_text"]
    json.dumps(m)  # everything is JSON-ready
    assert list(ev.pred) == pred and ev.losses.shape == (9,)


def test_most_confused_orders_by_count():
    cm = np.array([[5, 0, 3], [7, 2, 0], [1, 1, 9]])
    assert [(p["true"], p["predicted"], p["count"]) for p in most_confused(cm, CLASSES)] == [
        ("dog", "cat", 7), ("cat", "fox", 3), ("fox", "cat", 1), ("fox", "dog", 1)]


def test_ece_hand_computed():
    probs = np.array([[0.95, 0.03, 0.02],   # confident, right
                      [0.95, 0.03, 0.02],   # confident, wrong (truly dog)
                      [0.20, 0.65, 0.15],   # 65%, right
                      [0.15, 0.20, 0.65]])  # 65%, right
    y = np.array([0, 1, 1, 2])
    cal = calibration_metrics(probs, y, n_bins=15)
    # bin of 0.95: accuracy 1/2, confidence 0.95 -> gap 0.45; bin of 0.65: accuracy 1, confidence 0.65 -> 0.35
    assert cal["ece"] == pytest.approx(2 / 4 * 0.45 + 2 / 4 * 0.35)
    full = [b for b in cal["bins"] if b["count"]]
    assert [(b["count"], b["accuracy"]) for b in full] == [(2, 1.0), (2, 0.5)]
    assert full[1]["lo"] < 0.95 <= full[1]["hi"]
    ev = evaluation_from_logits(torch.log(torch.tensor(probs, dtype=torch.float32)), y, CLASSES,
                                np.zeros((4, 2, 2, 3), np.uint8))
    assert ev.metrics["calibration"]["ece"] == pytest.approx(0.4, abs=1e-6)
    perfect = calibration_metrics(np.array([[1.0, 0.0, 0.0]] * 3), np.zeros(3, int))
    assert perfect["ece"] == 0 and perfect["bins"][-1]["count"] == 3  # confidence 1.0 lands in the last bin


def test_fit_temperature_recovers_overconfidence():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(20_000, 10, generator=g) * 1.5
    y = torch.multinomial(torch.softmax(z, 1), 1, generator=g).squeeze(1)  # labels drawn from softmax(z)
    t = fit_temperature(z * 3.0, y)  # a model three times too confident
    assert t == pytest.approx(3.0, rel=0.07)
    before = calibration_metrics(torch.softmax(z * 3, 1).numpy(), y.numpy())["ece"]
    after = calibration_metrics(torch.softmax(z * 3 / t, 1).numpy(), y.numpy())["ece"]
    assert after < before / 3


def test_tta_views():
    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.uint8).view(2, 3, 5, 5)
    flip = tta_views(x, "flip")
    assert len(flip) == 2 and torch.equal(flip[1], x.flip(3))
    both = tta_views(x, "flip+translate")
    assert len(both) == 6 and all(v.shape == x.shape and v.dtype == torch.uint8 for v in both)
    d = TTA_SHIFT
    shifted = both[2]  # moved d px down-right, edge rows/columns repeated
    assert torch.equal(shifted[..., d:, d:], x[..., :-d, :-d]) and torch.equal(shifted[..., 0, 0], x[..., 0, 0])
    assert torch.equal(both[4][..., :-d, :-d], x[..., d:, d:])  # and up-left
    shifts = tta_views(x, "translate")  # no mirror images: the image and its two shifts
    assert len(shifts) == 3 and torch.equal(shifts[0], x)
    assert torch.equal(shifts[1], both[2]) and torch.equal(shifts[2], both[4])


def test_training_numbers_equal_evaluate_json(tiny_run, capsys):
    """evaluation.json (written at the end of training, from the training's logits) == `imgclf evaluate --json`."""
    saved = json.loads((tiny_run.run_dir / "evaluation.json").read_text())
    code, out, _ = _cli(capsys, "evaluate", str(tiny_run.run_dir), "--json", "--no-progress", "--no-save")
    assert code == 0
    fresh = json.loads(out)
    for key in ("n", "confusion_matrix", "most_confused", "split", "data", "checkpoint"):
        assert fresh[key] == saved[key], key
    for key in ("loss", "top1", "top5", "macro_f1"):
        assert fresh[key] == pytest.approx(saved[key], rel=1e-6, abs=1e-9), key
    assert fresh["calibration"]["ece"] == pytest.approx(saved["calibration"]["ece"], abs=1e-6)
    assert fresh["classification_report"]["macro avg"] == pytest.approx(saved["classification_report"]["macro avg"])
    run_json = json.loads((tiny_run.run_dir / "run.json").read_text())
    assert run_json["test_metrics"]["top1"] == pytest.approx(fresh["top1"])
    code, out, _ = _cli(capsys, "evaluate", str(tiny_run.run_dir), "--no-progress", "--no-save")
    assert "precision" in out and "confusion matrix" in out and "ECE" in out


def test_evaluate_reads_training_cache_entry(tiny_run, capsys):
    """The run's data is asked for as training asked for it (native size), so evaluate finds the arrays
    training decoded instead of decoding a second copy under another cache key."""
    from imgclf.data import cache

    entries = sorted(p.name for p in cache.cache_dir().iterdir())
    assert imgclf.load(tiny_run.run_dir).meta["data"]["image_size"] is None  # the folder's native 32 px
    code, _, _ = _cli(capsys, "evaluate", str(tiny_run.run_dir), "--json", "--no-progress", "--no-save")
    assert code == 0 and sorted(p.name for p in cache.cache_dir().iterdir()) == entries


def test_calibrate_and_tta_on_a_run(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run.run_dir, run)  # calibrating rewrites the checkpoint: not the shared run's
    with pytest.raises(ImgclfError, match="no validation split"):
        imgclf.evaluate(run, calibrate=True, progress=False)
    data = json.loads((run / "run.json").read_text())["data"]["source"]
    code, out, err = _cli(capsys, "evaluate", str(run), "--calibrate", "--calibration-data", data, "--tta", "flip",
                          "--json", "--no-progress")
    assert code == 0, err
    m = json.loads(out)
    cal = m["calibration"]
    assert cal["temperature"] > 0 and "ece_calibrated" in cal and "images of" in cal["fitted_on"]
    assert m["tta"]["mode"] == "flip" and m["tta"]["views"] == 2 and m["tta"]["top1_without"] == m["top1"]
    ckpt_meta = imgclf.checkpoint.load_checkpoint(run / "best.safetensors").meta
    assert ckpt_meta["temperature"] == cal["temperature"] and ckpt_meta["classes"] == ["blue", "green", "red"]
    clf = imgclf.load(run)
    x = np.full((1, 32, 32, 3), (200, 40, 40), np.uint8)
    raw = torch.softmax(clf.logits(torch.from_numpy(x).permute(0, 3, 1, 2)), 1).numpy()
    scaled = clf.predict_proba([x[0]])
    expected = torch.softmax(clf.logits(torch.from_numpy(x).permute(0, 3, 1, 2)) / clf.temperature, 1).numpy()
    assert np.allclose(scaled, expected, atol=1e-6) and scaled.argmax() == raw.argmax()
    with pytest.raises(ImgclfError, match="--tta"):
        imgclf.evaluate(run, tta="rotate", progress=False)
    assert json.loads((run / "evaluation.json").read_text())["calibration"]["temperature"] == cal["temperature"]
