"""Train a classifier and leave a run folder with its evidence.

    result = imgclf.train(data="../shared/datasets/cifar10-jpeg.tar.gz", model="seed-cnn", epochs=10)
    result = imgclf.train(resume="runs/cifar10-seed-cnn")          # continue exactly where it stopped

The loop in :func:`_fit` reads top to bottom: for each epoch, shuffle with a seeded generator, normalise
and augment whole batches on the device, step, validate, save ``last`` (and ``best`` when the monitored
score improves), stop early when asked. Everything random draws from explicit generators whose states are
saved in ``last``, so a resumed run ends with the same weights as an uninterrupted one.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import platform
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import __version__
from .augment import build_augment
from .checkpoint import load_checkpoint, save_checkpoint
from .config import TrainConfig
from .data import BUILTINS, Dataset, Preprocess, Split, load_dataset
from .data.split import stratified_split
from .data.tensors import Normalizer, channel_stats, to_tensor
from .errors import ImgclfError
from .evaluate import autocast_context, evaluation_from_logits, metrics_from_logits, predict_logits
from .models import create_model, model_info
from .recipes import resolve
from .utils import atomic_write_text, resolve_device

METRIC_COLUMNS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"]
# Settings a resumed run may change; everything else must match the run's config to resume exactly.
RESUMABLE_OVERRIDES = {"epochs", "device", "eval_batch_size", "patience"}


class Callback:
    """Hooks into the loop; override what you need. ``trainer.request_stop()`` ends the run cleanly
    (``last`` is saved and the run can be resumed)."""

    def on_step_end(self, trainer: Trainer, epoch: int, step: int, loss: float) -> None: ...

    def on_epoch_end(self, trainer: Trainer, row: dict[str, float]) -> None: ...


@dataclass
class TrainResult:
    run_dir: Path
    status: str                      # finished | early-stopped | interrupted
    epochs_done: int
    best_epoch: int | None
    history: list[dict[str, float]]
    test_metrics: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    def __repr__(self) -> str:
        acc = self.test_metrics["top1"] if self.test_metrics else None
        return (f"TrainResult(run_dir='{self.run_dir}', status={self.status!r}, epochs={self.epochs_done}, "
                f"best_epoch={self.best_epoch}, test_top1={acc if acc is None else round(acc, 4)})")


def train(config: str | Path | None = None, *, resume: str | Path | None = None, callbacks: list[Callback] = (),
          progress: bool = True, **overrides: Any) -> TrainResult:
    """Train from a config file and/or keyword settings (the fields of :class:`TrainConfig`), or resume.

    With ``resume=RUN_FOLDER`` the run's own ``config.toml`` is used; only ``epochs`` (to train longer),
    ``device``, ``eval_batch_size`` and ``patience`` may be changed."""
    if resume is not None:
        run_dir = Path(resume)
        if not (run_dir / "config.toml").is_file() or not (run_dir / "last.safetensors").is_file():
            raise ImgclfError(f"cannot resume {run_dir}: it needs config.toml and last.safetensors "
                              "(a run folder written by `imgclf train`)")
        given = {k for k, v in overrides.items() if v is not None}
        if config is not None or given - RESUMABLE_OVERRIDES:
            bad = sorted(given - RESUMABLE_OVERRIDES) + (["config"] if config is not None else [])
            raise ImgclfError(f"--resume continues the run as configured; cannot change {', '.join(bad)} "
                              f"(only {', '.join(sorted(RESUMABLE_OVERRIDES))} may change)")
        cfg = TrainConfig.from_sources(run_dir / "config.toml", overrides)
        return Trainer(cfg, callbacks=callbacks, progress=progress, resume_dir=run_dir).run()
    cfg = TrainConfig.from_sources(config, overrides)
    return Trainer(cfg, callbacks=callbacks, progress=progress).run()


class Trainer:
    """Holds the state of one run. Build with a config, call :meth:`run` once."""

    def __init__(self, cfg: TrainConfig, callbacks: list[Callback] = (), progress: bool = True,
                 resume_dir: Path | None = None):
        self.cfg = cfg
        self.callbacks = list(callbacks)
        self.progress = progress
        self.resume_dir = resume_dir
        self.stop_requested = False
        self.notes: list[str] = []

    def request_stop(self) -> None:
        self.stop_requested = True

    def log(self, msg: str) -> None:
        tqdm.write(msg, file=sys.stdout)

    # ------------------------------------------------------------------ setup
    def run(self) -> TrainResult:
        resume_ckpt = load_checkpoint(self.resume_dir / "last.safetensors") if self.resume_dir else None
        if resume_ckpt is not None and resume_ckpt.train_state is None:
            raise ImgclfError(f"{resume_ckpt.path} holds no training state; cannot resume from it")
        # --init-from matters only at the start: a resumed run takes everything from `last`
        init = load_checkpoint(self.cfg.init_from) if self.cfg.init_from and resume_ckpt is None else None
        if init is not None:
            self._check_init_from(init)
        # every setting the user left to the recipe is filled here, once; the resolved config is what
        # config.toml records, so a resume (or --config) repeats exactly this run
        self.cfg, why = resolve(self.cfg)
        self.notes += why
        cfg = self.cfg
        self.device = resolve_device(cfg.device)
        self.autocast_dtype = _autocast_dtype(cfg.precision, self.device)

        # Fail fast on a misspelt model or preset, before minutes of decoding.
        model_info(cfg.model)
        build_augment(cfg.augment, cfg.image_size or 32)
        image_size, channels = cfg.image_size, None
        fixed = resume_ckpt or init
        if fixed is not None:  # the checkpoint fixes what its first layers expect
            image_size = image_size or fixed.meta["preprocess"]["image_size"]
            channels = fixed.meta["preprocess"]["channels"]
        ds = load_dataset(cfg.data, image_size=image_size, channels=channels, val_split=cfg.val_split,
                          test_split=cfg.test_split, seed=cfg.seed, skip_bad_images=cfg.skip_bad_images,
                          progress=self.progress)
        if cfg.fraction < 1.0:
            _, keep = stratified_split(ds.train.y, cfg.fraction, np.random.default_rng(cfg.seed))
            ds.train = Split(ds.train.x[keep], ds.train.y[keep])
            self.notes.append(f"training on {cfg.fraction:.0%} of the training images ({len(keep):,}), "
                              "stratified by class")
        self.ds = ds
        self._note_imbalance(ds.train.y, ds.classes)
        if ds.skipped:
            self.notes.append(f"skipped {len(ds.skipped)} unreadable image(s); listed in run.json")
        val, val_name = self._choose_validation(ds)

        if resume_ckpt is not None and list(resume_ckpt.meta["classes"]) != ds.classes:
            raise ImgclfError(f"cannot resume: the data's classes changed since the run started ({ds.source})")

        torch.manual_seed(cfg.seed)  # model init and dropout draw from the global generator
        model = self._build_model(ds, init, resume_ckpt)
        self.preprocess = self._choose_preprocess(ds, model, init, resume_ckpt)
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.model = model.to(self.device, memory_format=self.memory_format)
        self.normalizer = Normalizer(self.preprocess.mean, self.preprocess.std, self.device)
        self.augment = build_augment(cfg.augment, ds.image_size)
        self.x_train = to_tensor(ds.train.x, self.device)
        self.y_train = torch.from_numpy(ds.train.y).to(self.device)
        self.val = None if val is None else (to_tensor(val.x, self.device), torch.from_numpy(val.y))
        self.steps_per_epoch = _steps_per_epoch(len(self.y_train), cfg.batch_size)
        counts = torch.bincount(self.y_train, minlength=len(ds.classes)).float()
        # inverse-frequency weights, normalised so a balanced dataset gets all ones
        inv = torch.where(counts > 0, len(self.y_train) / (len(ds.classes) * counts.clamp(min=1)), 0.0)
        self.loss_weight = inv.to(self.device) if cfg.class_weights == "auto" else None
        self.sample_weight = inv[self.y_train].cpu() if cfg.balanced_sampling else None
        self.fine_tuning = bool(cfg.init_from or (cfg.pretrained and cfg.pretrained != "none"))
        self.features = None  # cached backbone features for head-only epochs
        self.optimizer = _build_optimizer(cfg, self.model, cfg.backbone_lr_mult if self.fine_tuning else 1.0)
        self.scheduler = _build_scheduler(cfg, self.optimizer, self.steps_per_epoch)

        self.run_dir = self.resume_dir or _new_run_dir(Path(cfg.project), cfg.name or f"{ds.name}-{cfg.model}")
        params = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        prec = "bf16 autocast" if self.autocast_dtype else "fp32"
        self.log(f"data   {ds.source}: {len(ds.train.y):,} train, {_n(ds.val):,} val, {_n(ds.test):,} test; "
                 f"{len(ds.classes)} classes; {ds.image_size}x{ds.image_size} "
                 f"{'RGB' if ds.channels == 3 else 'greyscale'}")
        start = ("ImageNet-pretrained" if cfg.pretrained and cfg.pretrained != "none" else
                 f"initialised from {cfg.init_from}" if init is not None else "from scratch")
        freeze = f", first {cfg.freeze_epochs} head-only" if cfg.freeze_epochs else ""
        self.log(f"model  {cfg.model} ({start}): {params:,} parameters; {cfg.optimizer} lr {cfg.resolved_lr():g}"
                 f" ({cfg.schedule}), batch {cfg.batch_size}, {cfg.epochs} epochs{freeze}, augment {cfg.augment}; "
                 f"{self.device} {prec}")
        self.log(f"valid  {val_name}")
        for note in self.notes:
            self.log(f"note   {note}")
        if self.resume_dir is None:
            atomic_write_text(self.run_dir / "config.toml", cfg.to_toml())  # the resolved config
        self._write_run_json("running")

        state = self._initial_state(resume_ckpt)
        status = self._fit(state)
        return self._finish(state, status)

    def _check_init_from(self, init) -> None:
        arch = init.meta["arch"]["name"]
        if self.cfg.model is not None and self.cfg.model != arch:
            raise ImgclfError(f"--init-from {self.cfg.init_from} holds a {arch}, not a {self.cfg.model}; "
                              "drop --model or pick a checkpoint of that model")
        self.cfg = dataclasses.replace(self.cfg, model=arch, recipe="seed" if self.cfg.recipe == "auto"
                                       else self.cfg.recipe)

    def _build_model(self, ds: Dataset, init, resume_ckpt) -> torch.nn.Module:
        """A new model, or the pretrained/initialised one for fine-tuning (its head replaced when the
        classes differ). A resumed run rebuilds the checkpoint's own architecture; its weights come from
        `last`, so nothing is downloaded or loaded twice."""
        cfg, k = self.cfg, len(ds.classes)
        if resume_ckpt is not None:
            return create_model(**resume_ckpt.meta["arch"])
        if init is not None:
            model = create_model(**init.meta["arch"])
            model.load_state_dict(init.state_dict)
            if list(init.meta["classes"]) != ds.classes:
                model.reset_classifier(k)
                self.notes.append(f"initialised from {cfg.init_from}: backbone kept, new {k}-class head "
                                  f"(its classes {', '.join(init.meta['classes'][:5])}... differ from the data's)")
            return model
        pretrained = cfg.pretrained if cfg.pretrained not in (None, "none") else None
        model = create_model(cfg.model, num_classes=k, in_channels=ds.channels, image_size=ds.image_size,
                             pretrained=pretrained)
        self.notes += getattr(model, "pretrained_notes", [])
        return model

    def _choose_preprocess(self, ds: Dataset, model, init, resume_ckpt) -> Preprocess:
        """The normalisation the model will always see: a resumed run's own (never re-derived), the one
        pretrained weights were trained with, an initialising checkpoint's, or this data's statistics."""
        if resume_ckpt is not None:
            return Preprocess.from_dict(resume_ckpt.meta["preprocess"])
        if getattr(model, "input_mean", None) is not None:
            mean, std = model.input_mean[:ds.channels], model.input_std[:ds.channels]
        elif init is not None:
            mean, std = init.meta["preprocess"]["mean"], init.meta["preprocess"]["std"]
        else:
            mean, std = channel_stats(ds.train.x)
        return Preprocess(image_size=ds.image_size, channels=ds.channels, mean=tuple(mean), std=tuple(std))

    def _note_imbalance(self, y: np.ndarray, classes: list[str]) -> None:
        counts = np.bincount(y, minlength=len(classes))
        if len(counts) > 1 and counts.min() * 3 < counts.max():
            few, many = int(counts.argmin()), int(counts.argmax())
            hint = "" if (self.cfg.class_weights == "auto" or self.cfg.balanced_sampling) else \
                "; consider --class-weights auto or --balanced-sampling"
            self.notes.append(f"class imbalance: {classes[many]!r} has {counts[many]:,} training images, "
                              f"{classes[few]!r} only {counts[few]:,}{hint}")

    def _choose_validation(self, ds: Dataset):
        if ds.val is not None:
            share = len(ds.val.y) / (len(ds.val.y) + len(ds.train.y))
            how = "val/ folder" if ds.val_origin == "val-folder" else f"{share:.0%} of train, stratified"
            return ds.val, f"validation set: {len(ds.val.y):,} images ({how})"
        if ds.test is not None:
            self.notes.append("no validation set (no val/ folder, --val-split 0): validating on the TEST set, "
                              "as the seeds do; the best epoch is then chosen on test data, so for an "
                              "unbiased test score pass --val-split 0.1")
            return ds.test, f"TEST set used for validation: {len(ds.test.y):,} images"
        self.notes.append("no validation or test data: the best epoch is the one with the lowest train loss")
        return None, "none (best epoch by train loss)"

    def _initial_state(self, ckpt) -> dict[str, Any]:
        cfg = self.cfg
        self.g_shuffle = torch.Generator(device="cpu").manual_seed(cfg.seed)
        self.g_augment = torch.Generator(device=self.device).manual_seed(cfg.seed + 1)
        state = {"epoch": 0, "step": 0, "sums": [0.0, 0, 0], "best_score": None, "best_epoch": None,
                 "bad_epochs": 0, "history": [], "shuffle_state": self.g_shuffle.get_state()}
        if ckpt is None:
            return state
        ts = ckpt.train_state
        self.model.load_state_dict({k: v.to(self.device) for k, v in ckpt.state_dict.items()})
        self.optimizer.load_state_dict(ts["optimizer"])
        _match_state_layout(self.optimizer)
        if self.scheduler is not None and ts.get("scheduler") is not None:
            self.scheduler.load_state_dict(ts["scheduler"])
        torch.set_rng_state(ts["rng"]["torch"])
        if ts["rng"].get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ts["rng"]["cuda"])
        self.g_augment.set_state(ts["rng"]["augment"])  # generator states are CPU byte tensors
        state.update({k: ts[k] for k in ("epoch", "step", "sums", "best_score", "best_epoch", "bad_epochs",
                                         "history")})
        state["shuffle_state"] = ts["rng"]["shuffle"]
        done = f"epoch {state['epoch']}" + (f" + {state['step']} steps" if state["step"] else "")
        self.log(f"resume {self.run_dir}: continuing after {done} (best epoch so far: {state['best_epoch']})")
        return state

    # ------------------------------------------------------------------ the loop
    def _fit(self, state: dict[str, Any]) -> str:
        cfg, model, opt = self.cfg, self.model, self.optimizer
        n, bs = len(self.y_train), cfg.batch_size
        with _stop_on_sigint(self):
            while state["epoch"] < cfg.epochs:
                epoch = state["epoch"]
                # 1. the epoch's order: the generator state at the epoch's start is saved, so a resumed
                #    run mid-epoch redraws the same permutation
                self.g_shuffle.set_state(state["shuffle_state"])
                if self.sample_weight is not None:  # every class equally often, drawn with replacement
                    perm = torch.multinomial(self.sample_weight, n, replacement=True, generator=self.g_shuffle)
                else:
                    perm = torch.randperm(n, generator=self.g_shuffle)
                perm = perm.to(self.device)
                frozen = epoch < (cfg.freeze_epochs or 0)
                if frozen and self.features is None:
                    self.features = self._backbone_features()
                elif not frozen:
                    self.features = None  # the whole model trains from here on
                t0 = time.perf_counter()
                model.train()
                desc = f"epoch {epoch + 1}/{cfg.epochs}" + (" head" if frozen else "")
                bar = tqdm(total=self.steps_per_epoch, initial=state["step"], desc=desc, unit="step",
                           disable=not self.progress, leave=False, dynamic_ncols=True, file=sys.stderr)
                loss_sum, correct, seen = state["sums"]
                seen_at_start = seen
                for step in range(state["step"], self.steps_per_epoch):
                    idx = perm[step * bs:(step + 1) * bs]
                    yb = self.y_train[idx]
                    # 2. normalise and augment the whole batch on the device (head-only epochs read the
                    #    cached features of the un-augmented images instead: the backbone is frozen)
                    with autocast_context(self.device, self.autocast_dtype):
                        if frozen:
                            logits = model.forward_head(self.features[idx])
                        else:
                            xb = self.normalizer(self.x_train[idx]).contiguous(memory_format=self.memory_format)
                            logits = model(self.augment(xb, self.g_augment))
                        # 3. one optimisation step
                        loss = F.cross_entropy(logits.float(), yb, weight=self.loss_weight,
                                               label_smoothing=cfg.label_smoothing)
                    if not torch.isfinite(loss):
                        raise ImgclfError(f"the loss became {loss.item()} at epoch {epoch + 1}, step {step + 1}; "
                                          "lower the learning rate (--lr) or check the data")
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    if self.scheduler is not None and cfg.schedule != "plateau":
                        self.scheduler.step()
                    # 4. running figures for the bar (one .item() per step is cheap next to the step)
                    loss_sum += loss.item() * len(yb)
                    correct += int((logits.argmax(1) == yb).sum())
                    seen += len(yb)
                    state["step"], state["sums"] = step + 1, [loss_sum, correct, seen]
                    bar.update(1)
                    if step % 10 == 0 or step + 1 == self.steps_per_epoch:
                        ips = (seen - seen_at_start) / max(time.perf_counter() - t0, 1e-9)
                        bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}",
                                        img_s=f"{ips:.0f}", refresh=False)
                    for cb in self.callbacks:
                        cb.on_step_end(self, epoch, step, loss.item())
                    if self.stop_requested and step + 1 < self.steps_per_epoch:
                        bar.close()
                        self._save_last(state)
                        return "interrupted"
                bar.close()
                seconds = time.perf_counter() - t0

                # 5. validate, record, checkpoint
                row = self._end_epoch(state, epoch, loss_sum / seen, correct / seen, seconds)
                for cb in self.callbacks:
                    cb.on_epoch_end(self, row)
                if cfg.patience and state["bad_epochs"] >= cfg.patience:
                    self.log(f"early stopping: {cfg.monitor} has not improved for {cfg.patience} epochs "
                             f"(best epoch {state['best_epoch']})")
                    return "early-stopped"
                if self.stop_requested:
                    return "interrupted"
        return "finished"

    @torch.no_grad()
    def _backbone_features(self) -> torch.Tensor:
        """forward_features of every training image, computed once for the head-only epochs, in eval mode
        (BatchNorm on its running statistics, as the frozen backbone will be used at validation)."""
        t0, bs, out = time.perf_counter(), self.cfg.eval_batch_size, []
        was_training = self.model.training
        self.model.eval()
        for i in range(0, len(self.x_train), bs):
            xb = self.normalizer(self.x_train[i:i + bs]).contiguous(memory_format=self.memory_format)
            with autocast_context(self.device, self.autocast_dtype):
                out.append(self.model.forward_features(xb).float())
        self.model.train(was_training)
        self.log(f"cache  backbone features of {len(self.x_train):,} images for the head-only epochs "
                 f"({time.perf_counter() - t0:.1f}s; augmentation starts with the full fine-tuning)")
        return torch.cat(out)

    def _end_epoch(self, state, epoch: int, train_loss: float, train_acc: float, seconds: float) -> dict:
        cfg = self.cfg
        if self.val is not None:
            logits = predict_logits(self.model, self.val[0], self.normalizer, batch_size=cfg.eval_batch_size,
                                    autocast_dtype=self.autocast_dtype, channels_last=cfg.channels_last)
            m = metrics_from_logits(logits, self.val[1], self.ds.classes)
            val_loss, val_acc = m["loss"], m["top1"]
        else:
            val_loss, val_acc = float("nan"), float("nan")
        lr = self.optimizer.param_groups[-1]["lr"]  # the head's: the backbone's is lower when fine-tuning
        row = {"epoch": epoch + 1, "train_loss": train_loss, "train_acc": train_acc, "val_loss": val_loss,
               "val_acc": val_acc, "lr": lr, "seconds": seconds}
        score = {"val_loss": val_loss, "val_acc": val_acc}[cfg.monitor] if self.val is not None else train_loss
        lower_is_better = cfg.monitor == "val_loss" or self.val is None
        if self.scheduler is not None and cfg.schedule == "plateau":
            self.scheduler.step(score)
        improved = state["best_score"] is None or (score < state["best_score"] if lower_is_better
                                                   else score > state["best_score"])
        if improved:
            state["best_score"], state["best_epoch"], state["bad_epochs"] = score, epoch + 1, 0
        else:
            state["bad_epochs"] += 1
        state["history"].append(row)
        state["epoch"], state["step"], state["sums"] = epoch + 1, 0, [0.0, 0, 0]
        state["shuffle_state"] = self.g_shuffle.get_state()
        # `last` first: if we crash between the two writes, resume still finds a consistent state.
        self._save_last(state)
        if improved:
            save_checkpoint(self.run_dir / "best.safetensors", self.model, self._meta("best", state, row))
        _write_metrics_csv(self.run_dir / "metrics.csv", state["history"])
        mark = " *" if improved else ""
        val_txt = f"val loss {val_loss:.4f} acc {val_acc:.2%}" if self.val is not None else "no val"
        self.log(f"epoch {epoch + 1:>3}/{cfg.epochs}  train loss {train_loss:.4f} acc {train_acc:.2%}  {val_txt}  "
                 f"lr {lr:.3g}  {seconds:.1f}s  {len(self.y_train) / seconds:.0f} img/s{mark}")
        return row

    # ------------------------------------------------------------------ saving
    def _meta(self, kind: str, state: dict, row: dict | None = None, extra: dict | None = None) -> dict:
        cfg, ds = self.cfg, self.ds
        return {
            "kind": kind,
            "imgclf_version": __version__,
            "torch_version": torch.__version__,
            "arch": self.model.arch_args,
            "classes": ds.classes,
            "preprocess": self.preprocess.to_dict(),
            "channels_last": cfg.channels_last,
            "data": {"source": ds.source, "name": ds.name, "builtin": cfg.data if cfg.data in BUILTINS else None,
                     "val_split": cfg.val_split,
                     "test_split": cfg.test_split, "seed": cfg.seed, "skip_bad_images": cfg.skip_bad_images},
            "epoch": state["epoch"],
            "metrics": dict(row or (state["history"][-1] if state["history"] else {})),
            "best": {"epoch": state["best_epoch"], "monitor": cfg.monitor, "score": state["best_score"]},
            **(extra or {}),
        }

    def _save_last(self, state: dict[str, Any]) -> None:
        rng = {"torch": torch.get_rng_state(), "shuffle": state["shuffle_state"], "augment": self.g_augment.get_state(),
               "cuda": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None}
        train_state = {
            "epoch": state["epoch"], "step": state["step"], "sums": state["sums"],
            "best_score": state["best_score"], "best_epoch": state["best_epoch"], "bad_epochs": state["bad_epochs"],
            "history": state["history"], "rng": rng, "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
        }
        save_checkpoint(self.run_dir / "last.safetensors", self.model, self._meta("last", state), train_state)

    def _write_run_json(self, status: str, **extra: Any) -> None:
        ds = self.ds
        info = {
            "status": status,
            "imgclf_version": __version__, "torch_version": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "device": str(self.device), "precision": "bf16" if self.autocast_dtype else "fp32",
            "lr": self.cfg.resolved_lr(), "command": " ".join(sys.argv) if sys.argv and sys.argv[0] else None,
            "data": {"source": ds.source, "name": ds.name, "classes": ds.classes, "channels": ds.channels,
                     "image_size": ds.image_size, "train": len(ds.train.y), "val": _n(ds.val), "test": _n(ds.test),
                     "val_origin": ds.val_origin, "skipped": ds.skipped},
            "notes": self.notes,
            **extra,
        }
        atomic_write_text(self.run_dir / "run.json", json.dumps(info, indent=2, default=str) + "\n")

    def _finish(self, state: dict[str, Any], status: str) -> TrainResult:
        cfg = self.cfg
        test_metrics = evaluation = None
        if status == "interrupted":
            self.log(f"interrupted: progress saved in {self.run_dir / 'last.safetensors'}; "
                     f"continue with: imgclf train --resume {self.run_dir}")
        else:
            final = "best"
            best_path = self.run_dir / "best.safetensors"
            if cfg.restore_best and best_path.is_file():
                # restore-best holds whether or not early stopping triggered
                best = load_checkpoint(best_path)
                self.model.load_state_dict({k: v.to(self.device) for k, v in best.state_dict.items()})
            elif not cfg.restore_best:
                final = "last"
            if self.ds.test is not None:
                logits = predict_logits(self.model, to_tensor(self.ds.test.x, self.device), self.normalizer,
                                        batch_size=cfg.eval_batch_size, autocast_dtype=self.autocast_dtype,
                                        channels_last=cfg.channels_last)
                # the report's numbers (evaluate.py) from these same logits: no second forward pass
                evaluation = evaluation_from_logits(logits, self.ds.test.y, self.ds.classes, self.ds.test.x)
                test_metrics = {k: evaluation.metrics[k] for k in ("n", "loss", "top1", "top5",
                                                                    "per_class_accuracy")}
                evaluation.metrics.update(split="test", data=self.ds.source,
                                          checkpoint=str(self.run_dir / f"{final}.safetensors"))
                m = test_metrics
                m["weights"] = f"{final} (epoch {state['best_epoch'] if final == 'best' else state['epoch']})"
                self.log(f"test   loss {m['loss']:.4f}  top-1 {m['top1']:.2%}  top-5 {m['top5']:.2%}  "
                         f"on {m['n']:,} images ({m['weights']})")
            # the deliverable checkpoint carries its final metrics
            target = self.run_dir / f"{final}.safetensors"
            if final == "best" and target.is_file():
                ckpt = load_checkpoint(target)
                meta = {k: v for k, v in ckpt.meta.items() if k not in ("format", "format_version")}
                meta["test_metrics"] = test_metrics
                save_checkpoint(target, ckpt.state_dict, meta)
        self._write_run_json(status, epochs_done=state["epoch"], best_epoch=state["best_epoch"],
                             test_metrics=test_metrics)
        if status != "interrupted":
            self._write_report(evaluation)
        print(self.run_dir, flush=True)  # the last line printed: the run folder
        return TrainResult(run_dir=self.run_dir, status=status, epochs_done=state["epoch"],
                           best_epoch=state["best_epoch"], history=state["history"], test_metrics=test_metrics,
                           notes=self.notes)

    def _write_report(self, evaluation) -> None:
        """Plots + report.html; a failure here must never cost the run, so it only warns."""
        from .report import write_report

        try:
            path = write_report(self.run_dir, evaluation)
            self.log(f"report {path}")
        except Exception as e:  # noqa: BLE001 -- the weights and metrics are saved; the report can be redone
            self.log(f"warning: could not write the report ({type(e).__name__}: {e}); "
                     f"retry with: imgclf report {self.run_dir}")


# ---------------------------------------------------------------------------- helpers
def _autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def _steps_per_epoch(n: int, batch_size: int) -> int:
    # Keep a final partial batch (as Keras does) unless it would hold a single image, which
    # BatchNorm cannot normalise in training mode.
    steps = math.ceil(n / batch_size)
    if n % batch_size == 1 and steps > 1:
        steps -= 1
    if n < 2:
        raise ImgclfError(f"only {n} training image(s): need at least 2")
    return steps


def _build_optimizer(cfg: TrainConfig, model: torch.nn.Module, backbone_lr_mult: float = 1.0
                     ) -> torch.optim.Optimizer:
    """Two parameter groups, backbone and head: fine-tuning gives the backbone a lower learning rate."""
    lr, wd = cfg.resolved_lr(), cfg.weight_decay or 0.0
    head = {id(p) for p in model.get_classifier().parameters()}
    groups = [{"params": [p for p in model.parameters() if p.requires_grad and id(p) not in head],
               "lr": lr * backbone_lr_mult},
              {"params": [p for p in model.parameters() if p.requires_grad and id(p) in head], "lr": lr}]
    # fused kernels: one pass over all parameters instead of ~10 small ops per tensor (a measurable
    # share of a small CNN's step on a CPU); fall back where this build has none for the device.
    for fused in (True, None):
        kw = {"fused": fused} if fused else {}
        try:
            if cfg.optimizer == "sgd":
                return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0,
                                       weight_decay=wd, **kw)
            if cfg.optimizer == "adamw":
                return torch.optim.AdamW(groups, lr=lr, weight_decay=wd, **kw)
            return torch.optim.Adam(groups, lr=lr, weight_decay=wd, **kw)
        except (RuntimeError, TypeError, ValueError):
            continue
    raise AssertionError("unreachable")


def _match_state_layout(opt: torch.optim.Optimizer) -> None:
    """Give loaded optimizer buffers their parameter's memory layout. Checkpoints store tensors contiguous,
    while channels-last conv weights have NHWC strides; fused optimizers walk parameter and buffer memory
    in lockstep, so a layout mismatch would silently pair the wrong elements."""
    for p, st in opt.state.items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor) and v.shape == p.shape and v.stride() != p.stride():
                st[k] = torch.empty_like(p, dtype=v.dtype).copy_(v)


def _build_scheduler(cfg: TrainConfig, opt: torch.optim.Optimizer, steps_per_epoch: int):
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in opt.param_groups],
                                                   total_steps=total,
                                                   cycle_momentum=cfg.optimizer == "sgd")
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    if cfg.schedule == "plateau":
        mode = "max" if cfg.monitor == "val_acc" else "min"
        return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode=mode, factor=cfg.plateau_factor,
                                                          patience=cfg.plateau_patience)
    return None


def _new_run_dir(project: Path, name: str) -> Path:
    """runs/NAME, or NAME-2, NAME-3 ... if taken: a run folder is never reused or overwritten."""
    project.mkdir(parents=True, exist_ok=True)
    for i in range(1, 10_000):
        path = project / (name if i == 1 else f"{name}-{i}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise ImgclfError(f"too many runs named {name} in {project}; pass --name")


def _write_metrics_csv(path: Path, history: list[dict[str, float]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=METRIC_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_text(path, buf.getvalue())


def _n(split) -> int:
    return 0 if split is None else len(split.y)


class _stop_on_sigint:
    """First Ctrl-C asks the loop to stop after the current step (so weights are never saved
    half-updated); a second one interrupts at once."""

    def __init__(self, trainer: Trainer):
        self.trainer, self.previous = trainer, None

    def _handler(self, signum, frame):
        if self.trainer.stop_requested:
            raise KeyboardInterrupt
        self.trainer.request_stop()
        tqdm.write("\nstopping after this step and saving `last` (Ctrl-C again to abort at once)", file=sys.stderr)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
        return False
