"""Experiment tracking (``--log tensorboard``, ``--log mlflow``): callbacks that send a run's figures to
TensorBoard and MLflow as it trains, on the main process only.

    imgclf train --data cifar10 --log tensorboard --log mlflow

Both log the epoch's row of metrics.csv under the same names (train_loss, train_acc, val_loss, val_acc, lr,
seconds) plus img_s, with the epoch as the step; validation skipped on an epoch leaves a gap, not a NaN. At
the end they log the test metrics (test_loss, test_top1, test_top5, test_top1_tta) at the last epoch's step.

- TensorBoard: event files in RUN/tensorboard/, and at the end the report's confusion matrix and galleries
  as images. A resumed run drops what the earlier process logged from the last saved epoch on and logs it
  again, so no epoch shows twice.
- MLflow, at ``MLFLOW_TRACKING_URI`` (else MLflow's own default: ./mlflow.db and ./mlruns/ with MLflow 3,
  ./mlruns/ with MLflow 2): one run per run folder, named after it, in the experiment
  ``MLFLOW_EXPERIMENT_NAME`` (else the dataset's name, so runs on the same data sit in one table); the
  resolved config as params; at the end the run folder's files as artifacts, with the model (best.safetensors
  and any exported .onnx) under ``model/``. RUN/mlflow.json remembers the MLflow run, which a resumed run
  continues. The MLflow run ends FINISHED, KILLED (interrupted) or FAILED.

A tracker that cannot start fails the run at once, before the data is read, in one line; one that breaks
later (the server went away) warns once and stops, because the run folder holds every figure anyway.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from typing import Any

import numpy as np

from ..config import TRACKERS
from ..errors import ImgclfError
from ..utils import atomic_write_text
from .callbacks import Callback

# The report's images worth seeing next to the curves (training/final.py writes them before on_run_end).
REPORT_IMAGES = ("confusion_matrix.png", "gallery_misclassified.png", "gallery_correct.png",
                 "gallery_misclassified_cam.png", "gallery_correct_cam.png")
PROBE_SECONDS = 5  # how long MLflow's server may take to answer the first request


def trackers(names: tuple[str, ...]) -> list[Callback]:
    """The callbacks for ``--log``, each one ready (its package there, MLflow's server answering). TensorBoard
    comes first whatever the order given, so that its finished event files are among MLflow's artifacts."""
    return [TensorBoard() if name == "tensorboard" else MLflow() for name in TRACKERS if name in names]


def epoch_figures(trainer, row: dict[str, float]) -> dict[str, float]:
    """metrics.csv's row (less the epoch) and the epoch's images per second, NaN left out."""
    figures = {k: float(v) for k, v in row.items() if k != "epoch"}
    figures["img_s"] = len(trainer.batches) / row["seconds"] if row["seconds"] > 0 else math.nan
    return {k: v for k, v in figures.items() if math.isfinite(v)}


def final_figures(test_metrics: dict[str, Any] | None) -> dict[str, float]:
    m = test_metrics or {}
    figures = {f"test_{k}": float(m[k]) for k in ("loss", "top1", "top5") if k in m}
    if "tta" in m:
        figures["test_top1_tta"] = float(m["tta"]["top1"])
    return figures


class TensorBoard(Callback):
    """Scalars per epoch, the config as text, the test metrics and the report's images, in RUN/tensorboard/."""

    def __init__(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ImgclfError('--log tensorboard needs the tensorboard package: pip install "imgclf[tensorboard]"'
                              ) from None
        self.SummaryWriter = SummaryWriter
        self.writer = None

    def on_train_start(self, trainer):
        history, folder = trainer.state.history, trainer.run_dir / "tensorboard"
        # resumed: TensorBoard discards the earlier events from this step on, and the last saved epoch is
        # logged again (the process may have stopped between saving it and logging it)
        self.writer = self.SummaryWriter(str(folder), purge_step=len(history) if history else None)
        if history:
            self.on_epoch_end(trainer, history[-1])
        else:
            # indented: TensorBoard renders text as Markdown, and the TOML reads best as a code block
            self.writer.add_text("config", "\n".join("    " + line for line in trainer.cfg.to_toml().splitlines()))
        trainer.log(f"track  tensorboard --logdir {folder}")

    def on_epoch_end(self, trainer, row):
        for name, value in epoch_figures(trainer, row).items():
            self.writer.add_scalar(name, value, row["epoch"])
        self.writer.flush()  # a TensorBoard watching the folder shows each epoch as it ends

    def on_run_end(self, trainer, status, test_metrics):
        if self.writer is None:
            return
        from PIL import Image

        step = trainer.state.epoch
        for name, value in final_figures(test_metrics).items():
            self.writer.add_scalar(name, value, step)
        for name in REPORT_IMAGES if status in ("finished", "early-stopped") else ():
            path = trainer.run_dir / name
            if path.is_file():  # a report that failed to draw leaves some out
                with Image.open(path) as im:
                    image = np.asarray(im.convert("RGB"))
                self.writer.add_image(path.stem, image, step, dataformats="HWC")
        self.writer.close()
        self.writer = None


class MLflow(Callback):
    """Params, metrics per epoch, the run folder and the model, in an MLflow run named after the run folder."""

    STATUS = {"finished": "FINISHED", "early-stopped": "FINISHED", "interrupted": "KILLED", "aborted": "KILLED"}

    def __init__(self):
        try:
            import mlflow
        except ImportError:
            raise ImgclfError('--log mlflow needs the mlflow package: pip install "imgclf[mlflow]"') from None
        self.uri = mlflow.get_tracking_uri()
        self.client = mlflow.MlflowClient(self.uri)
        self.run_id: str | None = None
        # MLflow's HTTP client retries a request for minutes by default: ask once, briefly, now
        try:
            with _env(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT=str(PROBE_SECONDS)):
                self.client.search_experiments(max_results=1)
        except Exception as e:  # noqa: BLE001 -- whatever stops it, the run must not start
            where = (f"the MLflow tracking server {self.uri} did not answer" if self.uri.startswith("http")
                     else f"cannot open the MLflow store {self.uri}")
            raise ImgclfError(f"{where} ({_reason(e)}); start it, set MLFLOW_TRACKING_URI to one that works, "
                              "or train without --log mlflow") from None

    def on_train_start(self, trainer):
        saved = _read_json(trainer.run_dir / "mlflow.json")
        try:
            if saved.get("tracking_uri") == self.uri and self._reopen(saved.get("run_id")):
                self.run_id, experiment, experiment_id = saved["run_id"], saved["experiment"], saved["experiment_id"]
                logged = [m.step for m in self.client.get_metric_history(self.run_id, "train_loss")]
                rows = [r for r in trainer.state.history if r["epoch"] > max(logged, default=0)]
            else:
                experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or trainer.setup.ds.name
                experiment_id = self._experiment(experiment)
                self.run_id = self.client.create_run(experiment_id, run_name=trainer.run_dir.name, tags={
                    "imgclf.run_dir": str(trainer.run_dir.resolve()), "imgclf.data": trainer.setup.ds.source,
                }).info.run_id
                self._params(trainer.cfg)
                atomic_write_text(trainer.run_dir / "mlflow.json", json.dumps(
                    {"tracking_uri": self.uri, "experiment": experiment, "experiment_id": experiment_id,
                     "run_id": self.run_id}) + "\n")
                rows = trainer.state.history  # resumed, its MLflow run gone: every epoch so far
        except ImgclfError:
            raise
        except Exception as e:  # noqa: BLE001 -- no run yet: the training must not start untracked
            raise ImgclfError(f"MLflow at {self.uri} could not start the run ({_reason(e)}); see the server's log, "
                              "or train without --log mlflow") from None
        for row in rows:
            self.on_epoch_end(trainer, row)
        where = (f"{self.uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{self.run_id}"
                 if self.uri.startswith("http") else f"{self.uri} (mlflow ui --backend-store-uri {self.uri})")
        trainer.log(f"track  mlflow experiment {experiment!r}, run {trainer.run_dir.name!r}: {where}")

    def on_epoch_end(self, trainer, row):
        self._guarded(trainer, "log the epoch", lambda: self._metrics(epoch_figures(trainer, row), row["epoch"]))

    def on_run_end(self, trainer, status, test_metrics):
        if self.run_id is None:
            return
        if status in ("finished", "early-stopped", "interrupted"):  # not on an error or an abort: end at once
            def upload():
                self._metrics(final_figures(test_metrics), trainer.state.epoch)
                self._artifacts(trainer.run_dir)
            self._guarded(trainer, "upload the run folder", upload)
        mlflow_status = self.STATUS.get(status, "FAILED")
        with _env(MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT="true"):  # the run's link was given at its start
            self._guarded(trainer, "end the run", lambda: self.client.set_terminated(self.run_id, mlflow_status))
        self.run_id = None

    def _experiment(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is None:
            return self.client.create_experiment(name)
        if found.lifecycle_stage == "deleted":
            raise ImgclfError(f"the MLflow experiment {name!r} is deleted; restore it (mlflow experiments "
                              "restore) or set MLFLOW_EXPERIMENT_NAME to another name")
        return found.experiment_id

    def _reopen(self, run_id: str | None) -> bool:
        """A resumed run's MLflow run, marked running again; False when it is gone."""
        if not run_id:
            return False
        try:
            if self.client.get_run(run_id).info.lifecycle_stage == "deleted":
                return False
        except Exception:  # noqa: BLE001 -- not in this store: a new MLflow run it is
            return False
        self.client.update_run(run_id, status="RUNNING")
        return True

    def _params(self, cfg) -> None:
        from mlflow.entities import Param

        values = {**cfg.to_dict(), "lr": cfg.resolved_lr()}  # lr: the optimizer's default when none was given
        params = [Param(k, ",".join(v) if isinstance(v, tuple) else str(v))
                  for k, v in values.items() if v is not None]
        self.client.log_batch(self.run_id, params=params)

    def _metrics(self, figures: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        if figures:
            now = int(time.time() * 1000)
            self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in figures.items()])

    def _artifacts(self, run_dir) -> None:
        """The run folder's files at the top, the model under model/; ``last`` (the optimizer's state, only
        good for resuming, which needs the local folder) and the lock stay out."""
        for path in sorted(run_dir.iterdir()):
            if path.name == ".lock" or path.suffix == ".safetensors" or path.suffix == ".onnx":
                continue
            if path.is_dir():
                self.client.log_artifacts(self.run_id, str(path), path.name)
            else:
                self.client.log_artifact(self.run_id, str(path))
        model = run_dir / "best.safetensors"
        for path in [model if model.is_file() else run_dir / "last.safetensors", *sorted(run_dir.glob("*.onnx"))]:
            if path.is_file():
                self.client.log_artifact(self.run_id, str(path), "model")

    def _guarded(self, trainer, what: str, fn) -> None:
        """``fn()``; if MLflow fails, one warning and no more MLflow for this run."""
        if self.run_id is None:
            return
        try:
            fn()
        except Exception as e:  # noqa: BLE001 -- the training and its folder matter more than the tracking
            trainer.log(f"warning: MLflow: could not {what} ({_reason(e)}); no more MLflow logging for this run, "
                        f"its folder {trainer.run_dir} has every figure")
            self.run_id = None


@contextlib.contextmanager
def _env(**values: str):
    """These environment variables set for the duration, then restored."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _reason(error: BaseException) -> str:
    """The root cause in a few words: the socket's error when there is one (connection refused, name not
    known), else the first line of the message, shortened."""
    cause = error
    while cause.__cause__ or cause.__context__:
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return text if len(text) <= 160 else text[:157] + "..."


def _read_json(path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
