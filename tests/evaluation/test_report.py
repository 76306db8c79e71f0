"""The run report: plots and metrics written by training, re-rendered by ``imgclf report``, seen in a browser."""
import json
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image

import imgclf
from imgclf.evaluation.plots import PLOT_SIZES
from imgclf.evaluation.report import RUN_PLOTS

from support import CHROMIUM, chromium
from support import run_cli as _cli
from synthetic import colour_folder


def assert_plot(path: Path):
    assert path.is_file() and path.stat().st_size > 2000, path
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == PLOT_SIZES[path.name], (path, img.size)


def test_training_writes_plots_report_and_metrics(tiny_run):
    run = tiny_run.run_dir
    for name in RUN_PLOTS:
        assert_plot(run / name)
    for name in ("evaluation.json", "classification_report.json", "classification_report.txt", "report.html"):
        assert (run / name).stat().st_size > 100, name
    page = (run / "report.html").read_text()
    assert "<img" in page and "src='data:image/png;base64," in page
    assert not re.search(r"""(src|href)=['"](?!data:)""", page)  # self-contained: no outside file or URL
    m = json.loads((run / "evaluation.json").read_text())
    assert f"{m['top1']:.1%}" in page and f"{m['macro_f1']:.3f}" in page  # the same numbers as evaluate
    assert "imgclf train --config" in page and "green" in page


def test_report_rerenders_and_failure_only_warns(tiny_run, tmp_path, capsys, monkeypatch):
    run = shutil.copytree(tiny_run.run_dir, tmp_path / "tiny")  # the shared run stays as trained
    code, out, err = _cli(capsys, "report", str(run), "--tta", "flip", "--no-progress")
    assert code == 0, err
    assert out.strip().endswith("report.html")
    assert "Test-time augmentation" in (run / "report.html").read_text()
    code, _, err = _cli(capsys, "report", str(tmp_path))
    assert code == 2 and "not a run folder" in err

    def broken(*a, **k):
        raise RuntimeError("disk on fire")

    from imgclf.evaluation import report as report_module

    monkeypatch.setattr(report_module, "write_report", broken)
    data = colour_folder(tmp_path / "data", n_train=8, n_test=4)
    result = imgclf.train(data=str(data), epochs=1, batch_size=8, project=str(tmp_path / "runs"), progress=False)
    out = capsys.readouterr().out
    assert "could not write the report (RuntimeError: disk on fire)" in out and "imgclf report" in out
    assert result.status == "finished" and (result.run_dir / "best.safetensors").is_file()
    assert json.loads((result.run_dir / "run.json").read_text())["status"] == "finished"


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's Chromium at /usr/bin/chromium "
                    "(apt-get install -y chromium) for the browser test")
def test_report_in_a_real_browser(tiny_run, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright package (pip install "
                                   "-e '.[test]')")
    page_path = tiny_run.run_dir / "report.html"
    outside = []
    with sync_api.sync_playwright() as p:
        browser = chromium(p)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("request", lambda r: outside.append(r.url) if not r.url.startswith(("file:", "data:")) else None)
            page.goto(page_path.as_uri(), wait_until="load")
            images = page.eval_on_selector_all("img", "els => els.map(e => [e.complete, e.naturalWidth, e.alt])")
            headings = page.eval_on_selector_all("h1, h2", "els => els.map(e => e.textContent)")
            text = page.inner_text("body")
            page.screenshot(path=str(tmp_path / "report-screenshot.png"), full_page=True)
        finally:
            browser.close()
    assert len(images) == len(RUN_PLOTS)
    assert all(complete and width > 0 for complete, width, _ in images), images
    for heading in ("Training curves", "Classification report", "Confusion matrix", "Per-class accuracy",
                    "Calibration", "Misclassified test images", "Correctly classified test images", "Dataset",
                    "Configuration", "Reproduce"):
        assert heading in headings, (heading, headings)
    assert "green" in text and "test accuracy" in text
    assert outside == []
    assert (tmp_path / "report-screenshot.png").stat().st_size > 10_000


def test_report_galleries_get_heat_maps_of_the_images_shown(tiny_run, tmp_path):
    """The cam galleries are drawn for a PyTorch run, inline in report.html; each overlay is the heat map of
    the very image the plain gallery shows, for the class predicted (for a misclassified one: the wrong one)."""
    import base64
    import dataclasses

    import numpy as np

    from imgclf.evaluation.evaluate import compute_evaluation
    from imgclf.evaluation.plots import gallery_indices
    from imgclf.evaluation.report import CAM_PLOTS, gallery_heat_maps

    run = shutil.copytree(tiny_run.run_dir, tmp_path / "tiny")  # the shared run stays as trained
    for name in CAM_PLOTS:
        (run / name).unlink()
    imgclf.report(run, progress=False)
    page = (run / "report.html").read_text()
    for name in CAM_PLOTS:
        assert_plot(run / name)
        assert base64.b64encode((run / name).read_bytes()).decode("ascii") in page, name
    assert "LayerCAM" in page and "<b>predicted</b>" in page

    clf = imgclf.load(run)
    ev = compute_evaluation(clf, progress=False)
    # the tiny run gets every test image right: make some "wrong" by rolling its probabilities one class on
    probs = ev.probs.copy()
    probs[::2] = np.roll(probs[::2], 1, axis=1)
    ev = dataclasses.replace(ev, probs=probs)
    wrong, right = gallery_indices(ev)
    assert len(wrong) and len(right)
    heat = gallery_heat_maps(ev, clf, [wrong, right])
    assert [len(h) for h in heat] == [len(wrong), len(right)]
    for group, overlays in zip((wrong, right), heat):
        for i, overlay in zip(group[:3], overlays[:3]):
            one = clf.explain(np.asarray(ev.images[i]), target=int(ev.pred[i]))[0]
            assert one.label == ev.classes[ev.pred[i]]
            want = np.asarray(one.overlay(size=overlay.shape[0]), np.int16)
            assert overlay.shape == (32, 32, 3) and np.abs(overlay.astype(np.int16) - want).max() <= 2


@pytest.mark.parametrize("backend", ["onnx", "no-cam-layer"])
def test_report_of_a_model_that_cannot_explain_keeps_plain_galleries(tiny_run, tiny_onnx, tmp_path, backend):
    from imgclf.evaluation.evaluate import compute_evaluation
    from imgclf.evaluation.report import CAM_PLOTS, write_report

    run = shutil.copytree(tiny_run.run_dir, tmp_path / "tiny")  # its report has heat maps, from training
    assert all((run / name).is_file() for name in CAM_PLOTS)
    clf = imgclf.load(tiny_onnx[1] if backend == "onnx" else run)
    if backend == "no-cam-layer":
        clf.model.cam_layer = lambda: None
    ev = compute_evaluation(imgclf.load(run), progress=False)
    write_report(run, ev, clf)
    page = (run / "report.html").read_text()
    assert not any((run / name).exists() for name in CAM_PLOTS)  # the old heat maps go with the model
    assert page.count("<img") == len(RUN_PLOTS) - len(CAM_PLOTS) and "LayerCAM" not in page
    for name in ("gallery_misclassified.png", "gallery_correct.png"):
        assert_plot(run / name)
