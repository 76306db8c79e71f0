"""The ``imgclf`` command: predict, evaluate and train from the shell, one clear line for bad input, Ctrl-C."""
import json
import shutil

import pytest

import imgclf

from support import run_cli as _cli
from synthetic import colour_folder


def test_cli_predict_formats_and_per_file_errors(tiny_run, photos, capsys):
    run = str(tiny_run.run_dir)
    code, out, err = _cli(capsys, "predict", run, str(photos), "--top-k", "5")
    assert code == 0 and out.count("red") >= 5 and "error" not in out and len(out.splitlines()) == 5
    code, out, err = _cli(capsys, "predict", run, str(photos / "big_red.jpg"), str(photos.parent / "truncated.jpg"),
                          str(photos.parent / "notes.jpg"), "--format", "json")
    rows = json.loads(out)
    assert code == 1 and "2 of 3" in err
    assert rows[0]["top"][0]["class"] == "red"
    assert "truncated.jpg" in rows[1]["error"] and "notes.jpg" in rows[2]["error"]
    code, out, _ = _cli(capsys, "predict", run, str(photos / "*.png"), "--format", "csv")
    assert code == 0 and out.splitlines()[0] == "source,rank,class,probability,error"
    assert len(out.splitlines()) == 1 + 2 * 3  # two PNGs, top-3 each


def test_cli_evaluate_matches_training(tiny_run, tmp_path, capsys):
    run = shutil.copytree(tiny_run.run_dir, tmp_path / "tiny")  # evaluating a run rewrites its evaluation.json
    (run / "evaluation.json").unlink()
    code, out, _ = _cli(capsys, "evaluate", str(run), "--json", "--no-progress")
    m = json.loads(out)
    assert code == 0 and m["n"] == 24
    assert m["top1"] == pytest.approx(tiny_run.test_metrics["top1"])
    assert m["loss"] == pytest.approx(tiny_run.test_metrics["loss"], rel=1e-4)
    assert set(m["per_class_accuracy"]) == {"blue", "green", "red"}
    assert json.loads((run / "evaluation.json").read_text())["top1"] == m["top1"]  # saved beside the run
    code, out, _ = _cli(capsys, "evaluate", str(run / "best.safetensors"), "--no-progress")
    assert code == 0 and "top-1" in out and "top-5" in out


def test_evaluate_on_other_data_maps_classes_by_name(tiny_run, tmp_path):
    other = colour_folder(tmp_path / "other", classes=("red", "blue"), n_train=2, n_test=6, seed=5)
    m = imgclf.evaluate(tiny_run.run_dir, data=str(other), progress=False)
    assert m["n"] == 12 and m["top1"] >= 0.9
    assert m["per_class_accuracy"]["green"] is None


def test_cli_train_smoke_and_models(tiny_folder, tmp_path, capsys):
    code, out, _ = _cli(capsys, "train", "--data", str(tiny_folder), "--epochs", "1", "--batch-size", "16",
                        "--project", str(tmp_path / "runs"), "--no-progress", "--augment", "standard")
    assert code == 0 and out.strip().splitlines()[-1] == str(tmp_path / "runs" / "tiny-fastnet")  # the default
    code, out, _ = _cli(capsys, "models")
    assert code == 0 and "160,202" in out and "resnet18" in out


@pytest.mark.parametrize("args, match", [
    (["train", "--data", "/no/such/place"], "/no/such/place"),
    (["train", "--data", "cifar10", "--optimizer", "rmsprop"], "optimizer must be one of"),
    (["train", "--model", "resnet-18", "--data", "x"], "resnet18"),
    (["predict", "/no/run", "x.jpg"], "not found"),
    (["evaluate", "/no/run"], "not found"),
])
def test_cli_bad_input_is_one_clear_line(args, match, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = _cli(capsys, *args)
    assert code == 2
    assert err.startswith("error: ") and match in err and "Traceback" not in err


def test_pickle_renamed_to_checkpoint_is_refused(tmp_path, capsys):
    import torch
    torch.save({"w": torch.zeros(1)}, tmp_path / "best.safetensors")
    code, _, err = _cli(capsys, "predict", str(tmp_path / "best.safetensors"), "x.jpg")
    assert code == 2 and "refused" in err


def test_python_m_imgclf(tmp_path):
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "imgclf", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "train" in out.stdout and "predict" in out.stdout
    assert shutil.which("imgclf") is not None  # the console script, installed by pip


def test_ctrl_c_in_the_cli_saves_last_and_resumes(tiny_folder, tmp_path):
    """A real SIGINT to `imgclf train`: exit 130 without a traceback, `last` saved, `--resume` finishes."""
    import signal
    import subprocess
    import sys
    import time

    run = tmp_path / "runs" / "ctrlc"
    cmd = [sys.executable, "-m", "imgclf", "train", "--data", str(tiny_folder), "--epochs", "100000",
           "--batch-size", "16", "--project", str(tmp_path / "runs"), "--name", "ctrlc", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (run / "metrics.csv").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "imgclf train --resume" in out
    from imgclf.checkpoint import load_checkpoint
    done = load_checkpoint(run / "last.safetensors").train_state["epoch"]
    assert done >= 1
    result = imgclf.train(resume=run, epochs=done + 1, progress=False)
    assert result.status == "finished" and result.epochs_done == done + 1
