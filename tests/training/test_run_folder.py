"""What a run folder holds, and that run folders are never reused."""
import csv
import json

from imgclf.checkpoint import load_checkpoint

from support import train_run


def test_run_folder_contents(tiny_run, capsys):
    run = tiny_run.run_dir
    names = sorted(p.name for p in run.iterdir() if p.suffix != ".png")  # the plots: tests/evaluation/test_report.py
    assert names == ["best.safetensors", "classification_report.json", "classification_report.txt", "config.toml",
                     "evaluation.json", "last.safetensors", "metrics.csv", "report.html", "run.json"]
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert set(rows[0]) == {"epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"}
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "finished" and info["data"]["classes"] == ["blue", "green", "red"]
    best = load_checkpoint(run / "best.safetensors")
    assert best.meta["arch"]["name"] == "seed-cnn"
    assert best.meta["preprocess"]["image_size"] == 32 and best.meta["preprocess"]["channels"] == 3
    assert best.meta["test_metrics"]["top1"] == tiny_run.test_metrics["top1"]
    assert best.train_state is None and load_checkpoint(run / "last.safetensors").train_state is not None
    # no pickle anywhere in a run folder: every file is text or safetensors (JSON header first)
    for p in run.iterdir():
        head = p.read_bytes()[:2] if p.suffix != ".safetensors" else p.read_bytes()[8:9]  # after its length
        assert head[:1] != b"\x80" and head != b"PK", p.name
        assert p.suffix != ".safetensors" or head == b"{"


def test_run_folders_are_never_reused(tiny_folder, tmp_path):
    a = train_run(tiny_folder, tmp_path, epochs=1, name="same")
    b = train_run(tiny_folder, tmp_path, epochs=1, name="same")
    assert a.run_dir.name == "same" and b.run_dir.name == "same-2"
