"""The end of a run: the final weights tested on the test split (with test-time augmentation if asked), the
deliverable checkpoint stamped with its test metrics, run.json, the report, and the run folder printed last.

    result = finish(trainer, status)   # -> TrainResult
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import load_checkpoint, save_checkpoint
from ..evaluation.evaluate import tta_metrics
from ..evaluation.metrics import evaluation_from_logits
from ..inference import predict_logits
from .eta import duration


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


def finish(t, status: str) -> TrainResult:
    """Test, stamp, write and print; -> the run's :class:`TrainResult`."""
    state = t.state
    result = dict(run_dir=t.run_dir, status=status, epochs_done=state.epoch, best_epoch=state.best_epoch,
                  history=state.history, notes=t.notes)
    if not t.world.is_main:  # rank 0 alone tests the final model, writes the report, prints the folder
        t.end_callbacks(status, None)
        return TrainResult(**result)
    test_metrics = evaluation = None
    if status == "interrupted":
        t.log(f"interrupted: progress saved in {t.run_dir / 'last.safetensors'}; "
              f"continue with: imgclf train --resume {t.run_dir}")
    else:
        test_metrics, evaluation = _final_test(t)
    t.write_run_json(status, epochs_done=state.epoch, best_epoch=state.best_epoch, test_metrics=test_metrics)
    if status != "interrupted":
        _write_report(t, evaluation)
        if t.setup.plan is not None:  # the time taken, report included, against the plan's
            t.write_run_json(status, epochs_done=state.epoch, best_epoch=state.best_epoch,
                             test_metrics=test_metrics, plan=_check_plan(t))
    t.end_callbacks(status, test_metrics)  # the trackers log the report's files, which exist from here on
    print(t.run_dir, flush=True)  # the last line printed: the run folder
    return TrainResult(**result, test_metrics=test_metrics)


def _final_test(t):
    """-> (test metrics, the whole Evaluation) of the final weights: best (restored) unless asked otherwise."""
    setup, state, cfg = t.setup, t.state, t.setup.cfg
    test_metrics = evaluation = None
    final = "best"
    best_path = t.run_dir / "best.safetensors"
    if cfg.restore_best and best_path.is_file():
        # restore-best holds whether or not early stopping triggered
        best = load_checkpoint(best_path)
        setup.model.load_state_dict({k: v.to(setup.device) for k, v in best.state_dict.items()})
    else:  # asked for the last weights, or no epoch was ever scored (--val-every 0 cut short)
        final = "last"
    test = setup.ds.test
    if test is not None:
        final_epoch = state.best_epoch if final == "best" else state.epoch
        if t.scored_test is not None and t.scored_test[0] == final_epoch:
            logits = t.scored_test[1]  # validated on the test split with these very weights
        else:
            logits = predict_logits(setup.model, test.x, setup.normalizer,  # a chunk of images at a time
                                    batch_size=cfg.eval_batch_size, autocast_dtype=setup.autocast_dtype,
                                    channels_last=cfg.channels_last)
        # the report's numbers from these same logits: no second forward pass
        evaluation = evaluation_from_logits(logits, test.y, setup.ds.classes, test.x)
        test_metrics = {k: evaluation.metrics[k] for k in ("n", "loss", "top1", "top5", "per_class_accuracy")}
        evaluation.metrics.update(split="test", data=setup.ds.source,
                                  checkpoint=str(t.run_dir / f"{final}.safetensors"))
        m = test_metrics
        # validated only after the last epoch (--val-every 0), "best" is the last: say which it is
        kept_last = final == "last" or (cfg.val_every == 0 and final_epoch == state.epoch)
        m["weights"] = f"{'last' if kept_last else 'best'} (epoch {final_epoch})"
        t.log(f"test   loss {m['loss']:.4f}  top-1 {m['top1']:.2%}  top-5 {m['top5']:.2%}  "
              f"on {m['n']:,} images ({m['weights']})")
        if cfg.tta not in (None, "none"):
            m["tta"] = evaluation.metrics["tta"] = _test_tta(t, m["top1"], logits)
            t.log(f"test   top-1 {m['tta']['top1']:.2%} with test-time augmentation "
                  f"({cfg.tta}, {m['tta']['views']} views)")
    # the deliverable checkpoint carries its final metrics
    target = t.run_dir / f"{final}.safetensors"
    if final == "best" and target.is_file():
        ckpt = load_checkpoint(target)
        meta = {k: v for k, v in ckpt.meta.items() if k not in ("format", "format_version")}
        meta["test_metrics"] = test_metrics
        save_checkpoint(target, ckpt.state_dict, meta)
    return test_metrics, evaluation


def _check_plan(t) -> dict[str, Any]:
    """Logs the time taken so far against the plan's; -> run.json's ``plan``."""
    plan, setup = t.setup.plan, t.setup
    planned = plan.started_at - t.started + plan.seconds
    took = time.monotonic() - t.started
    t.log(f"time   {duration(took)} in all; the plan said {duration(planned)} ({took / planned - 1:+.0%})")
    return {"description": plan.describe(setup.ds.image_size), "planned_seconds": round(planned, 1),
            "seconds": round(took, 1)}


def _test_tta(t, plain_top1: float, plain_logits: torch.Tensor) -> dict[str, Any]:
    """TTA top-1 on the test split, through the same batched, normalised forward pass; the un-augmented
    view reuses the test logits already computed (tta_views returns the batch itself first)."""
    setup, cfg = t.setup, t.setup.cfg

    def logits(v, batch_size):
        return predict_logits(setup.model, v, setup.normalizer, batch_size=batch_size,
                              autocast_dtype=setup.autocast_dtype, channels_last=cfg.channels_last)

    return tta_metrics(logits, setup.ds.test.x, setup.ds.test.y, cfg.tta, batch_size=cfg.eval_batch_size,
                       plain_top1=plain_top1, plain_logits=plain_logits)


def _write_report(t, evaluation) -> None:
    """Plots + report.html; a failure here must never cost the run, so it only warns."""
    from ..evaluation.report import write_report  # matplotlib is imported only when a report is drawn

    try:
        path = write_report(t.run_dir, evaluation, _final_classifier(t, evaluation))
        t.log(f"report {path}")
    except Exception as e:  # noqa: BLE001 -- the weights and metrics are saved; the report can be redone
        t.log(f"warning: could not write the report ({type(e).__name__}: {e}); "
              f"retry with: imgclf report {t.run_dir}")


def _final_classifier(t, evaluation):
    """The final weights as a Classifier, for the report's heat-map galleries (None without test data, or
    when they cannot be loaded: the report is then drawn without heat maps). Loaded from the checkpoint
    just written rather than wrapping the training model, which may be compiled or distributed."""
    if evaluation is None:
        return None
    from ..classifier import load

    try:
        return load(evaluation.metrics["checkpoint"], device=str(t.setup.device))
    except Exception as e:  # noqa: BLE001 -- the heat maps are a nicety; the report itself must be written
        t.log(f"warning: the report's heat maps were left out (could not load the final weights: {e})")
        return None
