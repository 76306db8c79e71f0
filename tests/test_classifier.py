"""The Python API: a Classifier predicts any photo, and errors are clear."""
import pytest

import imgclf
from imgclf.errors import ImgclfError


def test_api_predict_any_photo(tiny_run, photos):
    clf = imgclf.load(tiny_run.run_dir)
    preds = clf.predict(sorted(photos.iterdir()), top_k=2)
    colour = [p for p in preds if not p.source.endswith("grey.png")]  # a grey photo has no colour to see
    assert len(colour) == 4 and all(p.label == "red" for p in colour), [(p.source, p.top) for p in preds]
    assert all(len(p.top) == 2 and p.top[0][1] >= p.top[1][1] for p in preds)
    assert clf.predict(photos / "grey.png", top_k=99)[0].top.__len__() == 3  # more than classes -> all
    probs = clf.predict_proba([photos / "big_red.jpg"])
    assert probs.shape == (1, 3) and abs(probs.sum() - 1) < 1e-5


def test_api_errors(tiny_run, tmp_path):
    clf = imgclf.load(tiny_run.run_dir)
    (tmp_path / "bad.jpg").write_text("nope")
    with pytest.raises(ImgclfError, match="bad.jpg"):
        clf.predict(tmp_path / "bad.jpg")
    out = clf.predict([tmp_path / "bad.jpg"], errors="report")
    assert out[0].error and not out[0].top
