"""Train a classifier and leave a run folder with its evidence.

    result = imgclf.train(data="../shared/datasets/cifar10-jpeg.tar.gz", model="seed-cnn", epochs=10)
    result = imgclf.train(resume="runs/cifar10-seed-cnn")          # continue exactly where it stopped

A run is four steps, each in a module of its own: :func:`~imgclf.training.setup.prepare` (recipe, data,
model, batch source: a frozen :class:`Setup`), a :class:`~imgclf.training.state.TrainState` (optimizer,
schedule, generators, the record so far), :func:`~imgclf.training.loop.fit` (the loop, with the callbacks'
hooks), and :func:`~imgclf.training.final.finish` (the final test, the report). Everything random draws
from explicit generators whose states are saved in ``last``, so a resumed run ends with the same weights as
an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from ..config import TrainConfig, progressive_sizes
from ..data.dataset import split_size
from ..errors import ImgclfError
from ..utils import atomic_write_text
from . import distributed
from .callbacks import Callback, Checkpointing, EarlyStopping, FrozenBatchNorm, StopOnSigint, TimeBudget
from .eta import Eta, duration, where
from .final import TrainResult, finish
from .loop import fit
from .run_folder import RunLock, checkpoint_meta, new_run_dir, write_metrics_csv, write_run_json
from .setup import Setup, prepare
from .state import TrainState
from .tracking import trackers

# Settings a resumed run may change; everything else must match the run's config to resume exactly.
RESUMABLE_OVERRIDES = {"epochs", "device", "eval_batch_size", "patience", "data_in_memory"}
# run.json records that the command which started a run added (run_info), kept when it resumes
CARRIED_RUN_INFO = ("pruning",)

__all__ = ["train", "Trainer", "TrainResult", "Callback"]


def train(config: str | Path | None = None, *, resume: str | Path | None = None, callbacks: list[Callback] = (),
          progress: bool = True, started: float | None = None, dry_run: bool = False,
          run_dir: str | Path | None = None, run_info: dict[str, Any] | None = None,
          **overrides: Any) -> TrainResult:
    """Train from a config file and/or keyword settings (the fields of :class:`TrainConfig`), or resume.
    ``dry_run``: print the plan (data, model, settings) and the expected duration from a few timed steps, then
    stop: no run folder is written, and the result's status is ``"dry-run"``.

    With ``resume=RUN_FOLDER`` the run's own ``config.toml`` is used; only ``epochs`` (to train longer),
    ``device``, ``eval_batch_size``, ``patience`` and ``data_in_memory`` may be changed. ``time_budget`` counts
    from ``started`` (a ``time.monotonic()`` value; default: this call; the ``imgclf`` command passes its
    process start). ``run_dir``: an empty folder made for this run (by ``new_run_dir``; ``imgclf prune`` puts the
    pruned weights there first) instead of a new ``project/name``; ``run_info``: more keys for run.json."""
    if resume is not None:
        run_dir = Path(resume)
        if not (run_dir / "config.toml").is_file():
            raise ImgclfError(f"cannot resume {run_dir}: it has no config.toml (pass a run folder written by "
                              "`imgclf train`)")
        given = {k for k, v in overrides.items() if v is not None}
        if config is not None or given - RESUMABLE_OVERRIDES:
            bad = sorted(given - RESUMABLE_OVERRIDES) + (["config"] if config is not None else [])
            raise ImgclfError(f"--resume continues the run as configured; cannot change {', '.join(bad)} "
                              f"(only {', '.join(sorted(RESUMABLE_OVERRIDES))} may change)")
        cfg = TrainConfig.from_sources(run_dir / "config.toml", overrides)
        with distributed.process_group(cfg.device):  # several processes when torchrun started them
            return Trainer(cfg, callbacks=callbacks, progress=progress, resume_dir=run_dir, started=started,
                           dry_run=dry_run, run_info=_carried_run_info(run_dir)).run()
    cfg = TrainConfig.from_sources(config, overrides)
    with distributed.process_group(cfg.device):  # several processes when torchrun started them
        return Trainer(cfg, callbacks=callbacks, progress=progress, started=started, dry_run=dry_run,
                       run_dir=Path(run_dir) if run_dir is not None else None, run_info=run_info).run()


class Trainer:
    """One run: its setup, its state, its callbacks and its folder. Build with a config, call :meth:`run` once;
    callbacks receive it (``trainer.model``, ``trainer.state``, ``trainer.request_stop()``)."""

    setup: Setup
    state: TrainState
    run_dir: Path

    def __init__(self, cfg: TrainConfig, callbacks: list[Callback] = (), progress: bool = True,
                 resume_dir: Path | None = None, started: float | None = None, dry_run: bool = False,
                 run_dir: Path | None = None, run_info: dict[str, Any] | None = None):
        self.user_cfg = cfg
        self.given_run_dir, self.run_info = run_dir, dict(run_info or {})
        self.dry_run = dry_run
        self.user_callbacks = list(callbacks)
        self.world = distributed.current()  # rank 0 of 1 unless torchrun started several processes
        self.progress = progress and self.world.is_main
        self.resume_dir = resume_dir
        self.started = time.monotonic() if started is None else started  # the time budget's clock
        self.stop_requested = False        # Ctrl-C or a callback: end after the current step
        self.early_stop: str | None = None  # set by EarlyStopping: why the run ends after this epoch
        self.end_epoch_now = False         # set by TimeBudget: end this epoch after the current step
        self.scored_test: tuple[int, Any] | None = None  # (epoch, its test logits) when validating on test
        self.notes: list[str] = []
        self.callbacks: list[Callback] = []
        self._unended: list[Callback] = []  # the callbacks whose on_run_end is still to come
        self._locks = contextlib.ExitStack()  # the run folder's lock, held by the writing process until run() ends

    # what callbacks and tests reach for
    cfg = property(lambda self: self.setup.cfg)
    model = property(lambda self: self.setup.model)
    batches = property(lambda self: self.setup.batches)

    def request_stop(self) -> None:
        self.stop_requested = True

    def log(self, msg: str) -> None:
        if self.world.is_main:  # one voice for the whole job
            tqdm.write(msg, file=sys.stdout)

    def run(self) -> TrainResult:
        with self._locks:
            try:
                return self._run()
            except BaseException as e:
                self._mark_failed(e)
                with contextlib.suppress(Exception):  # the error that ended the run is the one to report
                    self.end_callbacks("aborted" if isinstance(e, KeyboardInterrupt) else "failed", None)
                raise

    def _run(self) -> TrainResult:
        if self.resume_dir is not None and self.world.is_main:  # before `last` is read: another resume may write it
            self._locks.enter_context(RunLock(self.resume_dir))
        # --log: each tracker checks its package and its server now, so that a bad one fails before the data is
        # read; the main process alone logs
        tracking = trackers(self.user_cfg.log) if self.world.is_main and not self.dry_run else []
        resume = _load_last(self.resume_dir, self.log) if self.resume_dir else None
        self.setup = s = prepare(self.user_cfg, self.world, resume=resume, started=self.started,
                                 progress=self.progress)
        cfg = s.cfg
        self.state = TrainState.start(cfg, s.model, s.device, s.batches.steps_per_epoch, s.fine_tuning,
                                      self.world.size)
        self.notes = [*s.notes, *self.world.notes(s.model, cfg.batch_size, cfg.sync_bn, s.device)]
        if self.dry_run:
            return self._dry_run()
        # rank 0 picks (and creates) the run folder; the other processes are told its name
        self.run_dir = self.resume_dir or self.given_run_dir or self.world.from_main(
            lambda: new_run_dir(Path(cfg.project), cfg.name or f"{s.ds.name}-{cfg.model}"))
        if self.resume_dir is None and self.world.is_main:
            self._locks.enter_context(RunLock(self.run_dir))
        self._log_plan()
        if self.resume_dir is None and self.world.is_main:
            atomic_write_text(self.run_dir / "config.toml", cfg.to_toml(), durable=True)  # the resolved config
        self.write_run_json("running")
        if resume is not None:
            self.state.restore(resume, s.model, s.device, cfg.seed, self.log, self.run_dir)
        self.callbacks = [
            Checkpointing(), EarlyStopping(cfg.patience, cfg.monitor),
            *([TimeBudget(cfg.time_budget, s.budget_end_seconds, self.started)]
              if s.budget_end_seconds is not None else []),
            Eta(), *([FrozenBatchNorm()] if s.fine_tuning and cfg.freeze_bn is not False else []), *tracking,
            StopOnSigint(), *self.user_callbacks]
        self._unended = list(self.callbacks)
        return finish(self, fit(self))

    def end_callbacks(self, status: str, test_metrics: dict[str, Any] | None) -> None:
        """Each callback's ``on_run_end``, once a run."""
        callbacks, self._unended = self._unended, []
        for cb in callbacks:
            cb.on_run_end(self, status, test_metrics)

    def _mark_failed(self, error: BaseException) -> None:
        """run.json says ``failed`` and why (``interrupted`` for a Ctrl-C that aborted at once), whatever went
        wrong after the run folder existed; a disk too full to say so leaves the first error to be reported."""
        if getattr(self, "run_dir", None) is None:  # failed before the run folder existed: nothing to mark
            return
        status = "interrupted" if isinstance(error, KeyboardInterrupt) else "failed"
        why = str(error).splitlines()[0] if str(error) else ""
        if not isinstance(error, ImgclfError):
            why = f"{type(error).__name__}: {why}".rstrip(": ")
        with contextlib.suppress(Exception):
            self.write_run_json(status, error=why, epochs_done=self.state.epoch, best_epoch=self.state.best_epoch)

    def _dry_run(self) -> TrainResult:
        """The plan, then training steps until the ETA has been measured; nothing is written."""
        self.run_dir = None
        self._log_plan()
        eta = Eta()
        self.callbacks = [eta, _StopOnceSaid(eta)]
        fit(self)
        self.log("dry run: nothing was written; run the same command without --dry-run to train")
        s = self.state
        return TrainResult(run_dir=None, status="dry-run", epochs_done=0, best_epoch=None, history=s.history,
                           notes=self.notes)

    def _log_plan(self) -> None:
        s, cfg, ds = self.setup, self.setup.cfg, self.setup.ds
        total = sum(p.numel() for p in s.model.parameters())
        trained = sum(p.numel() for p in s.model.parameters() if p.requires_grad)
        params = f"{total:,} parameters" + (f" ({trained:,} trained)" if trained != total else "")
        prec = "bf16 autocast" if s.autocast_dtype else "fp32"
        self.log(f"data   {ds.source}: {len(ds.train.y):,} train, {split_size(ds.val):,} val, "
                 f"{split_size(ds.test):,} test; "
                 f"{len(ds.classes)} classes; {ds.image_size}x{ds.image_size} "
                 f"{'RGB' if ds.channels == 3 else 'greyscale'}")
        freeze = f", first {cfg.freeze_epochs} head-only" if cfg.freeze_epochs else ""
        self.log(f"model  {cfg.model} ({s.start}): {params}; {cfg.optimizer} lr {cfg.resolved_lr():g}"
                 f" ({cfg.schedule}), batch {cfg.batch_size}, {cfg.epochs} epochs{freeze}, augment {cfg.augment}"
                 f"{_progressive_note(cfg, ds.image_size)}; {s.device} {prec}")
        if s.plan is not None:
            total = s.plan.started_at - self.started + s.plan.seconds
            self.log(f"plan   {s.plan.describe(ds.image_size)}: about {duration(total)} in all {where(s)}")
        self.log(f"valid  {s.val_name}")
        for note in self.notes:
            self.log(f"note   {note}")

    # the run folder, written by one process
    def save_last(self) -> None:
        if self.world.is_main:
            meta = checkpoint_meta(self.setup, self.state, "last")
            save_checkpoint(self.run_dir / "last.safetensors", self.model, meta,
                            self.state.to_checkpoint(self.setup.device))

    def save_best(self, row: dict[str, float]) -> None:
        meta = checkpoint_meta(self.setup, self.state, "best", row)
        save_checkpoint(self.run_dir / "best.safetensors", self.model, meta)

    def write_metrics(self) -> None:
        write_metrics_csv(self.run_dir / "metrics.csv", self.state.history)

    def write_run_json(self, status: str, **extra: Any) -> None:
        if self.world.is_main:
            write_run_json(self.run_dir / "run.json", self.setup, status, self.world.size, self.notes,
                           **{**self.run_info, **extra})


def _load_last(run_dir: Path, log) -> Checkpoint | None:
    """``last.safetensors`` of a run being resumed; damaged, it says so and points at ``best``. None when the run
    stopped before its first checkpoint: it starts again from the beginning, in the same folder."""
    if not (run_dir / "last.safetensors").exists():
        log(f"resume {run_dir}: it stopped before its first checkpoint; starting it again from the beginning")
        return None
    try:
        return load_checkpoint(run_dir / "last.safetensors")
    except ImgclfError as e:
        best = run_dir / "best.safetensors"
        offer = (f"; its best weights are intact: start a new run from them with `imgclf train --config "
                 f"{run_dir / 'config.toml'} --init-from {best}`" if _readable(best) else "; start the run again")
        raise ImgclfError(f"cannot resume {run_dir}: {e}{offer}") from None


def _carried_run_info(run_dir: Path) -> dict[str, Any]:
    try:
        info = json.loads((run_dir / "run.json").read_text())
    except (OSError, ValueError):  # no run.json yet, or a damaged one: nothing to carry
        return {}
    return {k: info[k] for k in CARRIED_RUN_INFO if isinstance(info, dict) and k in info}


def _readable(path: Path) -> bool:
    try:
        load_checkpoint(path)
        return True
    except ImgclfError:
        return False


class _StopOnceSaid(Callback):
    def __init__(self, eta: Eta):
        self.eta = eta

    def on_step_end(self, trainer, epoch, step, loss):
        if self.eta.said_first:
            trainer.request_stop()

    def on_epoch_end(self, trainer, row):
        trainer.request_stop()  # an epoch ended first: the ETA said its piece after it


def _progressive_note(cfg: TrainConfig, image_size: int) -> str:
    sizes = progressive_sizes(cfg.progressive, image_size, cfg.epochs)
    steps = [f"{size}px x{sum(1 for s in sizes if s == size)}" for size in dict.fromkeys(sizes)]
    return f", progressive {' -> '.join(steps)}" if len(steps) > 1 else ""

