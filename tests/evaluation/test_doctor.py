"""`imgclf doctor`: flipped labels ranked first, a near-duplicate across splits found, the CSV fed back to
`train --exclude/--relabel` (and found again by evaluate), bad input refused in one line."""
from __future__ import annotations

import csv
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

import imgclf
from imgclf.checkpoint import load_checkpoint
from imgclf.errors import ImgclfError
from imgclf.evaluation.doctor import doctor, format_doctor
from imgclf.evaluation.issues import check_folds, neighbours, outliers

from support import SHARED_DATASETS, StopAt, train_run
from support import run_cli as _cli
from synthetic import image_folder, scene_folder

FLIPS = {"train/red/0.jpg": "train/blue/f0.jpg", "train/green/1.jpg": "train/red/f1.jpg",
         "train/blue/2.jpg": "train/green/f2.jpg"}  # original place -> where the wrong label put it
COPY, ORIGINAL = "test/red/copy.jpg", "train/red/5.jpg"


@pytest.fixture(scope="module")
def found(tmp_path_factory):
    """doctor once on 76 synthetic photos: 3 labels flipped, one train image copied smaller into test."""
    root = tmp_path_factory.mktemp("doctor")
    data = scene_folder(root / "scenes", {"train/red": 20, "train/green": 20, "train/blue": 20, "test/red": 5,
                                          "test/green": 5, "test/blue": 5}, size=96)
    for src, dst in FLIPS.items():
        (data / src).rename(data / dst)
    Image.open(data / ORIGINAL).resize((72, 72)).save(data / COPY, quality=60)
    return doctor(str(data), out=root / "out", image_size=96, progress=False), data, root


def test_flipped_labels_are_the_most_suspicious(found):
    r, _, _ = found
    worst = [r.paths[i] for i in np.argsort(r.quality)[:3]]
    assert set(worst) == set(FLIPS.values())
    assert len(r.issues) >= 1 and {r.paths[i] for i in r.issues} <= set(FLIPS.values())
    for src, dst in FLIPS.items():  # what each looks like: the class it was taken from
        assert r.classes[r.suggested[r.paths.index(dst)]] == src.split("/")[1]
    assert 0.85 < r.accuracy < 1 and np.allclose(r.probs.sum(1), 1)


def test_near_duplicate_across_splits_and_the_files(found):
    r, data, root = found
    pairs = {(r.paths[i], r.paths[j]) for i, j, _, _ in r.duplicates}
    assert (ORIGINAL, COPY) in pairs and len(pairs) <= 3  # the copy, not every image of the same colour
    rows = list(csv.DictReader((root / "out" / "doctor.csv").open()))
    assert list(rows[0]) == ["path", "split", "given", "suggested", "confidence", "issue", "detail", "action"]
    copy_row = next(row for row in rows if row["path"] == COPY)  # the copy is the member in the later split
    assert "duplicate" in copy_row["issue"] and ORIGINAL in copy_row["detail"] and copy_row["action"] == "keep"
    assert [row["path"] for row in rows[:len(r.issues)]] == [r.paths[i] for i in r.issues]  # worst first
    page = (root / "out" / "doctor.html").read_text()
    assert "data:image/jpeg;base64," in page and COPY in page and "--exclude" in page and "<script" not in page
    summary = format_doctor(r)
    assert f"near-duplicates  {len(r.duplicates)} pair(s)" in summary and str(data) in summary


def test_doctor_csv_round_trip_through_train_and_evaluate(found, tmp_path, capsys):
    r, data, root = found
    rows = list(csv.DictReader((root / "out" / "doctor.csv").open()))
    for row in rows:  # what a person would write: drop the copy, move what looks mislabelled
        row["action"] = "exclude" if row["path"] == COPY else "relabel" if "label" in row["issue"] else "keep"
    edited = tmp_path / "edited.csv"
    with edited.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    relabelled = {row["path"]: row["suggested"] for row in rows if row["action"] == "relabel"}
    code, out, err = _cli(capsys, "train", "--data", str(data), "--exclude", str(edited), "--relabel", str(edited),
                          "--recipe", "seed", "--model", "seed-cnn", "--epochs", "1", "--batch-size", "16",
                          "--image-size", "32", "--project", str(tmp_path / "runs"), "--name", "fixed", "--no-progress")
    assert code == 0, err
    run = tmp_path / "runs" / "fixed"
    info = json.loads((run / "run.json").read_text())
    moved = sum(row["suggested"] != row["given"] for row in rows if row["action"] == "relabel")
    assert info["data"]["excluded"] == 1 and info["data"]["relabelled"] == moved >= 1
    assert info["data"]["test"] == 15  # the copy is gone from test
    assert f'exclude = "{edited}"' in (run / "config.toml").read_text()
    rec = load_checkpoint(run / "best.safetensors").meta["data"]
    assert rec["exclude"] == [COPY] and rec.get("relabel", {}) == relabelled
    edited.write_text("path,action\n")  # an edited list later changes nothing of the recorded run
    assert imgclf.evaluate(run, progress=False)["n"] == 15


def test_resume_keeps_the_lists_the_run_started_with(tiny_folder, tmp_path):
    listed = tmp_path / "drop.csv"
    listed.write_text("path\ntrain/red/0.png\ntrain/red/1.png\n")
    mid = train_run(tiny_folder, tmp_path, name="mid", epochs=1, recipe="seed", exclude=str(listed),
                    callbacks=[StopAt(0, 1)])
    assert mid.status == "interrupted"
    listed.write_text("path\ntrain/blue/0.png\n")  # edited in between: the resumed run must not follow it
    imgclf.train(resume=mid.run_dir, progress=False)
    info = json.loads((mid.run_dir / "run.json").read_text())
    assert info["status"] == "finished" and info["data"]["excluded"] == 2
    assert load_checkpoint(mid.run_dir / "last.safetensors").meta["data"]["exclude"] == ["train/red/0.png",
                                                                                         "train/red/1.png"]


def test_exclude_list_without_action_column_and_unknown_paths(found, tmp_path, capsys):
    _, data, _ = found
    listed = tmp_path / "drop.csv"
    listed.write_text(f"path\n{COPY}\nno/such.jpg\nnor/this.jpg\n")
    code, _, err = _cli(capsys, "train", "--data", str(data), "--exclude", str(listed), "--dry-run",
                        "--no-progress")
    assert code == 2 and err.startswith("error: 2 image(s) listed are not in") and "no/such.jpg" in err
    listed.write_text(f"path,suggested,action\n{COPY},purple,relabel\n")
    code, _, err = _cli(capsys, "train", "--data", str(data), "--relabel", str(listed), "--dry-run",
                        "--no-progress")
    assert code == 2 and "cannot relabel to 'purple'" in err


def test_cli_doctor_on_an_archive(tmp_path, capsys):
    folder = scene_folder(tmp_path / "small", {"cat": 6, "dog": 6}, size=64, seed=1)
    with tarfile.open(tmp_path / "small.tar.gz", "w:gz") as tf:
        tf.add(folder, arcname="small")
    code, out, err = _cli(capsys, "doctor", str(tmp_path / "small.tar.gz"), "--folds", "3", "--image-size", "64",
                          "--out", str(tmp_path / "out"), "--no-progress")
    assert code == 0, err
    assert "12 images (12 all), 2 classes" in out and "took " in out
    paths = {row["path"] for row in csv.DictReader((tmp_path / "out" / "doctor.csv").open())}
    assert paths and all(p.startswith("small/cat/") or p.startswith("small/dog/") for p in paths)  # member names


@pytest.mark.parametrize("spec, args, match", [
    ({"only": 6}, [], "only one class folder"),
    ({"cat": 6, "dog": 3}, [], "needs at least 5 images in every class; class 'dog' has 3: add images or pass "
                               "--folds 3"),
    ({"cat": 6, "dog": 6}, ["--folds", "1"], "--folds must be a whole number of at least 2"),
])
def test_cli_doctor_bad_input_is_one_line(spec, args, match, tmp_path, capsys):
    data = image_folder(tmp_path / "d", spec)
    code, out, err = _cli(capsys, "doctor", str(data), "--out", str(tmp_path / "out"), "--no-progress", *args)
    assert code == 2 and err.startswith("error: ") and match in err and err.count("\n") == 1


def test_check_folds_needs_two_images_a_class():
    with pytest.raises(ImgclfError, match="class 'b' has 1: add images to it"):
        check_folds(np.array([0, 0, 0, 1]), ["a", "b"], 2)


def test_neighbours_and_outliers_on_known_points():
    rng = np.random.default_rng(0)
    feats = np.abs(rng.normal(1, 0.05, (50, 8))).astype(np.float32)
    feats[7] = np.abs(rng.normal(0, 1, 8)) + [5, 0, 0, 0, 0, 0, 0, 0]  # one point off on its own
    idx, sims = neighbours(feats, 4, block=16)  # blocks smaller than the data: rows split across blocks
    x = feats - feats.mean(0)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    brute = x @ x.T
    np.fill_diagonal(brute, -np.inf)
    assert (idx == np.argsort(-brute, axis=1)[:, :4]).all()
    assert np.allclose(sims, np.sort(brute, axis=1)[:, ::-1][:, :4], atol=1e-5)
    isolated, scores = outliers(feats)
    assert isolated[0] == 7 and len(isolated) == 10 and scores.shape == (50,)


@pytest.mark.realdata
@pytest.mark.skipif(not (SHARED_DATASETS / "weather-photos.tar.gz").is_file(), reason="no weather photos")
def test_weather_photos_flipped_labels_found(tmp_path):
    """40 real photos a class, 8 of the 160 (5 %) moved to a wrong class: most are the 8 most suspicious."""
    rng = np.random.default_rng(0)
    with tarfile.open(SHARED_DATASETS / "weather-photos.tar.gz") as tf:
        members = [m for m in tf.getmembers() if m.isfile()]
        classes = sorted({m.name.split("/")[0] for m in members})
        chosen = [m for c in classes for m in [m for m in members if m.name.startswith(c + "/")][:40]]
        tf.extractall(tmp_path / "wx", members=chosen, filter="data")
    flipped = set()
    for k in rng.choice(len(chosen), 8, replace=False):
        name = chosen[k].name
        wrong = classes[(classes.index(name.split("/")[0]) + 1 + k % 3) % 4]
        (tmp_path / "wx" / name).rename(tmp_path / "wx" / wrong / f"f-{name.split('/')[1]}")
        flipped.add(f"{wrong}/f-{name.split('/')[1]}")
    r = doctor(str(tmp_path / "wx"), out=tmp_path / "out", progress=False)
    worst = {r.paths[i] for i in np.argsort(r.quality)[:8]}
    assert len(worst & flipped) >= 5  # >= 60 %


def test_embeddings_are_kept_by_the_images_content(tmp_path, monkeypatch):
    """A second doctor on the same images skips the backbone; one changed pixel or a damaged entry does not."""
    from imgclf.evaluation import embeddings as E

    monkeypatch.setenv("IMGCLF_HOME", str(tmp_path / "home"))
    calls = []

    def fake_embed(sets, progress=True):
        calls.append(1)
        return np.full((sum(len(s) for s in sets), 4), len(calls), np.float32)

    monkeypatch.setattr(E, "embed", fake_embed)
    a, b = np.zeros((3, 8, 8, 3), np.uint8), np.ones((2, 8, 8, 3), np.uint8)
    first = E.embed_cached([a, b])
    assert len(calls) == 1 and (E.embed_cached([a, b]) == first).all() and len(calls) == 1
    changed = b.copy()
    changed[1, 7, 7, 2] = 9
    assert (E.embed_cached([a, changed]) == 2).all() and len(calls) == 2
    assert E.embed_cached([b, a]).shape == (5, 4) and len(calls) == 3  # another order: other rows
    for entry in (tmp_path / "home" / "embeddings").glob("*.npy"):
        entry.write_bytes(b"damaged")
    assert (E.embed_cached([a, b]) == 4).all() and len(calls) == 4  # recomputed and replaced
    assert (E.embed_cached([a, b]) == 4).all() and len(calls) == 4
    entry = tmp_path / "home" / "embeddings" / f"{E._content_key([a, b])}.npy"
    entry.write_bytes(entry.read_bytes()[:-8])  # truncated
    assert (E.embed_cached([a, b]) == 5).all() and len(calls) == 5
