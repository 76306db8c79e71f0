"""Prune a trained run's channels, then fine-tune it briefly with the run's own recipe: a smaller, faster model in a
run folder of its own, which evaluates, predicts, exports and serves like any other.

    result = imgclf.prune("runs/cifar10-jpeg-fastnet", amount=0.5)      # -> TrainResult (runs/...-pruned50)

Steps: load the run's best weights; rank each prunable layer group's channels by their first-order Taylor
importance on a calibration sample of the run's training images (|sum of weight x gradient of the loss|, Molchanov
et al. 2019); remove ``amount`` of every group (models._prune: torch-pruning's dependency graph); re-estimate the
BatchNorm statistics on the same sample, since a layer whose inputs lost channels no longer has the output
statistics it had (EagleEye's adaptive BatchNorm, Li et al. 2020); write the result to ``pruned.safetensors`` in
the new run folder; then ``train(init_from=that)`` with the run's ``config.toml`` for ``epochs`` epochs.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm
from tqdm.auto import tqdm

from ..checkpoint import resolve_checkpoint_path, save_checkpoint
from ..classifier import Classifier, load
from ..config import TrainConfig
from ..data.run_data import load_run_data
from ..data.tensors import to_tensor
from ..errors import ImgclfError
from ..models import check_amount, check_importance, prune_channels
from .callbacks import Callback
from .final import TrainResult
from .run_folder import new_run_dir
from .train import train

CALIBRATION_IMAGES = 2000   # training images for the Taylor importance and the BatchNorm statistics
CALIBRATION_PIXELS = 250 * 32 * 32  # images a calibration batch: 250 at 32 px, 10 at 160 px (backward memory)
# How the pruned model trains on, whatever the recipe: every layer lost inputs or outputs, so all of them learn at
# the recipe's own rates, BatchNorm statistics included. With the backbone at a tenth of the rate and BatchNorm
# frozen, as fine-tuning a pretrained model goes, FastNet recovered to 76.3 % instead of 80.8 %; at the full rate
# with BatchNorm frozen it diverged (docs/prune.md). No head-only epochs: the head is not new. No frozen blocks
# either: a photo run's frozen early blocks were cut too, and kept frozen they cannot adapt (Lite0 on the weather
# photos, 50 %, 1 epoch: 89.9 % with the run's 9 blocks frozen).
FINE_TUNE = {"backbone_lr_mult": 1.0, "freeze_bn": False, "freeze_epochs": 0, "freeze_blocks": 0}
# checkpoint metadata that described the unpruned weights: the pruned ones start without it
_STALE = ("kind", "epoch", "metrics", "best", "test_metrics", "temperature", "temperature_fitted_on", "onnx")


def prune(run: str | Path, amount: float = 0.5, *, epochs: int | None = None, name: str | None = None,
          project: str | Path | None = None, importance: str = "taylor", global_ranking: bool = False,
          calibration_images: int = CALIBRATION_IMAGES, progress: bool = True, callbacks: list[Callback] = (),
          **overrides: Any) -> TrainResult:
    """Prune ``amount`` (0 < amount < 1) of the channels of ``run``'s model and fine-tune it for ``epochs`` epochs
    (default :func:`default_epochs`) with the run's settings; -> the new run's :class:`TrainResult`. ``name``,
    ``project``: the new run folder (default ``<run>-pruned<amount>`` beside the run's own project).
    ``importance``: "taylor" (a calibration on ``calibration_images`` training images) or "magnitude" (the
    weights' L2 norms, no data). ``overrides``: other training settings for the fine-tune (lr, batch_size...)."""
    amount, importance = check_amount(amount), check_importance(importance)
    if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1):
        raise ImgclfError(f"--epochs must be a positive number of fine-tuning epochs, got {epochs!r}")
    source = resolve_checkpoint_path(run)
    config = source.parent / "config.toml"
    if not config.is_file():
        raise ImgclfError(f"{source.parent} has no config.toml: prune fine-tunes with the run's own settings, so it "
                          "takes a run folder written by `imgclf train`")
    cfg = TrainConfig.from_sources(config)
    clf = load(source, device="cpu")
    if not isinstance(clf, Classifier):
        raise ImgclfError(f"{run}: prune needs a run folder or .safetensors checkpoint, not an ONNX file")
    model, spec = clf.model.to(memory_format=torch.contiguous_format), clf.preprocess
    t0 = time.perf_counter()
    calib = _calibration_batches(clf, calibration_images, progress)
    if importance == "taylor":
        _accumulate_gradients(model, calib, clf.normalizer)
    result = prune_channels(model, amount, spec.image_size, global_ranking=global_ranking, importance=importance)
    model.zero_grad(set_to_none=True)
    recalibrate_batchnorm(model, calib, clf.normalizer)
    kept = "; ".join(f"{layer} ({why})" for layer, why in result.kept.items())
    _log(f"prune  {clf.meta['arch']['name']}: {amount:.0%} of the channels of {len(result.widths)} layer groups "
         f"({'global' if global_ranking else 'uniform'}, {importance} importance) in {time.perf_counter() - t0:.1f} s;"
         f" {result.summary()}")
    _log(f"prune  kept whole: {kept}")
    out = new_run_dir(Path(project or cfg.project), name or f"{source.parent.name}-pruned{round(amount * 100)}")
    record = {"source": str(source), "amount": amount, "importance": importance,
              "ranking": "global" if global_ranking else "uniform",
              "calibration_images": sum(len(y) for _, y in calib),
              "params_before": result.params_before, "params_after": result.params_after,
              "macs_before": result.macs_before, "macs_after": result.macs_after,
              "widths": {k: list(v) for k, v in result.widths.items()}, "kept": result.kept}
    meta = {k: v for k, v in clf.meta.items() if k not in _STALE + ("format", "format_version")}
    save_checkpoint(out / "pruned.safetensors", model, {**meta, "arch": model.arch_args, "kind": "pruned",
                                                        "pruning": record})
    tune = dataclasses.replace(cfg, **FINE_TUNE, init_from=str(out / "pruned.safetensors"),
                               epochs=epochs or default_epochs(cfg), time_budget=None, project=str(out.parent),
                               name=out.name)
    settings = {**dataclasses.asdict(tune), **{k: v for k, v in overrides.items() if v is not None}}
    return train(run_dir=out, run_info={"pruning": record}, progress=progress, callbacks=callbacks, **settings)


def default_epochs(cfg: TrainConfig) -> int:
    """A short fine-tune: an eighth of a run from scratch's epochs, at least one; a pretrained model's fine-tune
    (the photo recipe: a few epochs) again in full, as a pretrained backbone cut by half must relearn what its
    data needs (Lite0 on the weather photos, 50 %: 1 epoch 87-90 %, the recipe's 4-5 about 99 %, unpruned 100 %)."""
    if cfg.pretrained not in (None, "none"):
        return max(1, (cfg.epochs or 1) - (cfg.freeze_epochs or 0))
    return max(1, round((cfg.epochs or 8) / 8))


def _calibration_batches(clf: Classifier, n: int, progress: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` of the run's training images (a seeded sample; uint8) and their labels, in batches."""
    ds = load_run_data(clf, None, progress=progress)
    pick = np.sort(np.random.default_rng(0).permutation(len(ds.train.y))[:n])
    batch = max(1, CALIBRATION_PIXELS // clf.preprocess.image_size ** 2)
    return list(zip(to_tensor(ds.train.x[pick]).split(batch), torch.as_tensor(ds.train.y[pick]).split(batch)))


def _accumulate_gradients(model: torch.nn.Module, batches, normalizer) -> None:
    """The loss gradients of the calibration sample, summed into each weight's .grad (inference-mode BatchNorm:
    the statistics are the run's)."""
    model.eval().zero_grad(set_to_none=True)
    for x, y in batches:
        F.cross_entropy(model(normalizer(x)), y, reduction="sum").backward()


@torch.no_grad()
def recalibrate_batchnorm(model: torch.nn.Module, batches, normalizer) -> None:
    """Every BatchNorm's running statistics re-estimated as the plain mean over the (uint8 images, labels) batches
    (its momentum set aside)."""
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches, not an exponential one
    model.train()
    for x, _ in batches:
        model(normalizer(x))
    model.eval()
    for m, momentum in zip(norms, saved):
        m.momentum = momentum


def _log(msg: str) -> None:
    tqdm.write(msg)
