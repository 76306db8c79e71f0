"""Experiment tracking, for real: TensorBoard's event files read back with TensorBoard's own reader, and a real
MLflow tracking server (SQLite, 127.0.0.1) queried with MlflowClient."""
from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import imgclf
from imgclf.config import read_config_file
from imgclf.errors import ImgclfError
from imgclf.training.callbacks import Callback
from imgclf.training.run_folder import METRIC_COLUMNS

from support import StopAt, free_port, run_cli, train_run
from synthetic import colour_folder

pytest.importorskip("mlflow")
pytest.importorskip("tensorboard")

from mlflow import MlflowClient  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


class Server:
    """``mlflow server`` in a process group of its own; ``url`` waits until it answers /health."""

    def __init__(self, root: Path):
        self.port, self.log = free_port(), root / "server.log"
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job runner processes
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                 "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1",
                 "--port", str(self.port), "--workers", "1"],
                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.ready = False

    @property
    def url(self) -> str:
        url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 180
        while not self.ready:
            assert self.proc.poll() is None, f"mlflow server exited:\n{self.log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"mlflow server did not start:\n{self.log.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    self.ready = r.status == 200
            except OSError:
                time.sleep(0.2)
        return url

    def stop(self) -> None:
        with_group = os.getpgid(self.proc.pid)  # the server's uvicorn worker is in its group
        os.killpg(with_group, signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(with_group, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture(scope="module", autouse=True)
def mlflow_server(tmp_path_factory):
    """One server for the module, started as the module begins: its start-up (imports and the SQLite schema,
    10-30 s on 2 cores) then overlaps the tests that do not need it yet."""
    server = Server(tmp_path_factory.mktemp("mlflow"))
    yield server
    server.stop()


@pytest.fixture
def tracking_env(mlflow_server, monkeypatch) -> str:
    url = mlflow_server.url
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    return url


def metrics_csv(run_dir: Path) -> list[dict[str, float]]:
    with open(run_dir / "metrics.csv") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def expected_series(run_dir: Path) -> dict[str, dict[int, float]]:
    """metrics.csv as name -> {epoch: value}, NaN (validation skipped) left out, + the epoch's images/s."""
    rows = metrics_csv(run_dir)
    series = {name: {int(r["epoch"]): r[name] for r in rows if not math.isnan(r[name])}
              for name in METRIC_COLUMNS if name != "epoch"}
    return series


def test_unknown_log_value_is_a_one_line_error(capsys, tmp_path):
    code, out, err = run_cli(capsys, "train", "--data", str(tmp_path), "--log", "tensorboard", "--log", "wandb")
    assert code == 2 and err == "error: log must be one of tensorboard, mlflow; got 'wandb'\n"


@pytest.mark.parametrize("package,extra", [("mlflow", "mlflow"), ("torch.utils.tensorboard", "tensorboard")])
def test_a_missing_package_says_what_to_install(monkeypatch, package, extra):
    from imgclf.training.tracking import trackers

    monkeypatch.setitem(sys.modules, package, None)  # import now raises ImportError
    with pytest.raises(ImgclfError, match=rf'pip install "imgclf\[{extra}\]"'):
        trackers((extra,))


def test_an_unreachable_mlflow_server_fails_before_the_data_is_read(capsys, tmp_path, monkeypatch):
    data = colour_folder(tmp_path / "data")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    code, out, err = run_cli(capsys, "train", "--data", str(data), "--model", "seed-cnn", "--epochs", "1",
                             "--project", str(tmp_path / "runs"), "--no-progress", "--log", "mlflow")
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: the MLflow tracking server http://127.0.0.1:")
    assert "did not answer (Connection refused)" in err and "MLFLOW_TRACKING_URI" in err
    assert "epoch" not in out and "data " not in out  # before the data was decoded
    assert not (tmp_path / "runs").exists()


def test_a_run_logged_to_both_shows_its_curves_in_both(capsys, tmp_path, tracking_env):
    """One command with --log tensorboard --log mlflow: TensorBoard's reader and the MLflow server both give
    back metrics.csv epoch by epoch, the test metrics, the report's images, the config, the run folder and
    the model."""
    data = colour_folder(tmp_path / "tiny")
    code, out, err = run_cli(capsys, "train", "--data", str(data), "--model", "seed-cnn", "--epochs", "3",
                             "--batch-size", "16", "--val-every", "2", "--project", str(tmp_path / "runs"),
                             "--no-progress", "--log", "tensorboard", "--log", "mlflow")
    assert code == 0, err
    run_dir = Path(out.strip().splitlines()[-1])  # the run folder is still the last line printed
    expected = expected_series(run_dir)
    assert len(expected["val_loss"]) == 2  # epoch 1 skipped validation: no point, rather than a NaN
    test = json.loads((run_dir / "run.json").read_text())["test_metrics"]
    finals = {"test_loss": test["loss"], "test_top1": test["top1"], "test_top5": test["top5"],
              "test_top1_tta": test["tta"]["top1"]}
    config = read_config_file(run_dir / "config.toml")
    assert config["log"] == ["tensorboard", "mlflow"]

    # TensorBoard, through its own reader
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0}).Reload()
    for name, by_epoch in expected.items():
        assert {e.step: pytest.approx(e.value, rel=1e-5) for e in events.Scalars(name)} == by_epoch, name
    assert [e.step for e in events.Scalars("img_s")] == [1, 2, 3]
    for name, value in finals.items():
        assert [(e.step, e.value) for e in events.Scalars(name)] == [(3, pytest.approx(value, rel=1e-6))]
    assert {"confusion_matrix", "gallery_misclassified", "gallery_correct"} <= set(events.Tags()["images"])
    cm = events.Images("confusion_matrix")[0]
    assert cm.encoded_image_string[:8] == b"\x89PNG\r\n\x1a\n" and cm.width > 100
    assert "config/text_summary" in events.Tags()["tensors"]

    # MLflow, through its server
    client = MlflowClient(tracking_env)
    saved = json.loads((run_dir / "mlflow.json").read_text())
    run = client.get_run(saved["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == run_dir.name
    assert client.get_experiment(run.info.experiment_id).name == "tiny"  # the dataset's name
    assert f"/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}" in out
    params = run.data.params
    assert all(params[k] == (",".join(v) if isinstance(v, list) else str(v)) for k, v in config.items() if k != "lr")
    for name, by_epoch in expected.items():
        history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, name)}
        assert history == {k: pytest.approx(v, rel=1e-5) for k, v in by_epoch.items()}, name
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "img_s")) == [1, 2, 3]
    assert {k: run.data.metrics[k] for k in finals} == pytest.approx(finals)
    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.toml", "run.json", "metrics.csv", "report.html", "confusion_matrix.png", "mlflow.json",
            "tensorboard", "model"} <= top and not any(p.endswith(".safetensors") for p in top)
    assert [a.path for a in client.list_artifacts(run.info.run_id, "model")] == ["model/best.safetensors"]
    model = client.download_artifacts(run.info.run_id, "model/best.safetensors", str(tmp_path))
    assert _sha(Path(model)) == _sha(run_dir / "best.safetensors")


class Boom(Callback):
    def on_epoch_end(self, trainer, row):
        raise RuntimeError("boom")


def test_mlflow_run_status_follows_the_run_and_a_resume_continues_it(tmp_path, tracking_env):
    """Interrupted: KILLED; resumed: the same MLflow run, each epoch once in MLflow and in TensorBoard, then
    FINISHED. A run that raised ends FAILED."""
    data = colour_folder(tmp_path / "tiny")
    client = MlflowClient(tracking_env)
    stopped = train_run(data, tmp_path, epochs=3, tta="none", log=("tensorboard", "mlflow"), callbacks=[StopAt(1, 1)])
    run_id = json.loads((stopped.run_dir / "mlflow.json").read_text())["run_id"]
    assert stopped.status == "interrupted" and client.get_run(run_id).info.status == "KILLED"

    done = imgclf.train(resume=stopped.run_dir, progress=False)
    assert done.status == "finished" and json.loads((done.run_dir / "mlflow.json").read_text())["run_id"] == run_id
    assert client.get_run(run_id).info.status == "FINISHED"
    train_loss = expected_series(done.run_dir)["train_loss"]
    assert sorted(m.step for m in client.get_metric_history(run_id, "train_loss")) == [1, 2, 3]
    events = EventAccumulator(str(done.run_dir / "tensorboard")).Reload()
    assert {e.step: pytest.approx(e.value, rel=1e-5) for e in events.Scalars("train_loss")} == train_loss

    with pytest.raises(RuntimeError, match="boom"):
        train_run(data, tmp_path, epochs=1, tta="none", log=("mlflow",), callbacks=[Boom()], name="boom")
    failed = json.loads((tmp_path / "runs" / "boom" / "mlflow.json").read_text())["run_id"]
    assert client.get_run(failed).info.status == "FAILED"


class ServerGone(Callback):
    """From the second epoch on, every MLflow request to log fails, as when the server went away."""

    def __init__(self, monkeypatch):
        self.monkeypatch = monkeypatch

    def on_epoch_start(self, trainer, epoch):
        if epoch == 1:
            def refuse(*args, **kwargs):
                raise ConnectionError("Connection refused")
            self.monkeypatch.setattr(MlflowClient, "log_batch", refuse)


def test_mlflow_failing_mid_run_warns_once_and_the_run_goes_on(tmp_path, tracking_env, capsys, monkeypatch):
    data = colour_folder(tmp_path / "tiny")
    result = train_run(data, tmp_path, epochs=3, tta="none", log=("mlflow",), callbacks=[ServerGone(monkeypatch)])
    out = capsys.readouterr().out
    assert result.status == "finished" and (result.run_dir / "report.html").is_file()
    assert out.count("warning: MLflow") == 1 and "could not log the epoch (Connection refused)" in out
    run_id = json.loads((result.run_dir / "mlflow.json").read_text())["run_id"]
    assert [m.step for m in MlflowClient(tracking_env).get_metric_history(run_id, "train_loss")] == [1]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
