"""evaluate(): a run's own numbers, the training cache reused, calibration and test-time augmentation."""
import json
import shutil

import numpy as np
import pytest
import torch

import imgclf
from imgclf.errors import ImgclfError

from support import run_cli as _cli


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
