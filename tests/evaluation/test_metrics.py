"""Metrics against hand-computed values: confusion matrix, report, most-confused pairs, ECE, temperature."""
import json

import numpy as np
import pytest
import torch

from imgclf.evaluation.metrics import calibration_metrics, evaluation_from_logits, fit_temperature, most_confused

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
