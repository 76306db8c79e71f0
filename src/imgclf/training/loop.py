"""The training loop, top to bottom: for each epoch, the seeded order; for each step, a batch augmented on the
device, the loss, one optimisation step; at the epoch's end, validation and the record; the callbacks'
hooks in between (checkpoints, early stopping, the time budget, Ctrl-C, frozen BatchNorm, the user's).

    status = fit(trainer)   # "finished", "early-stopped" or "interrupted"
"""
from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import ImgclfError
from ..evaluation.metrics import metrics_from_logits
from ..inference import autocast_context
from .precision import scaled_backward


def fit(t) -> str:
    """Train ``t`` (a :class:`~imgclf.training.train.Trainer` after its setup) until its planned epochs are done,
    an early stop, or an interruption; every callback's ``on_train_end`` runs whatever happens."""
    for cb in t.callbacks:
        cb.on_train_start(t)
    status = "failed"
    try:
        status = _epochs(t)
    finally:
        t.setup.batches.close()
        for cb in t.callbacks:
            cb.on_train_end(t, status)
    return status


def _epochs(t) -> str:
    setup, state, batches, world = t.setup, t.state, t.setup.batches, t.world
    cfg, model, opt = setup.cfg, setup.model, state.optimizer
    bs, steps = cfg.batch_size, batches.steps_per_epoch
    train_model = world.wrap(model, cfg.sync_bn)  # DDP over several processes; `model` stays bare
    features = None  # the frozen backbone's features of every image, for head-only epochs
    while state.epoch < state.epochs:
        epoch = state.epoch
        # 1. the epoch's order: the generator state at the epoch's start is saved, so a resumed run
        #    mid-epoch redraws the same permutation
        state.g_shuffle.set_state(state.shuffle_state)
        perm = batches.order(state.g_shuffle)
        batches.prefetch(perm, state.step, bs, world.local_rows)
        if state.stem_epochs is not None:  # set every epoch, so that a resumed run agrees
            for p in state.stem_params:
                p.requires_grad_(epoch < state.stem_epochs)
        frozen = epoch < (cfg.freeze_epochs or 0)
        size = batches.input_size(epoch, state.epochs)
        if frozen and features is None:
            features = batches.backbone_features(model, cfg.eval_batch_size, setup.autocast_dtype, t.log)
        elif not frozen:
            features = None  # the whole model trains from here on
        t0 = time.perf_counter()
        model.train()
        t.end_epoch_now = False
        for cb in t.callbacks:
            cb.on_epoch_start(t, epoch)
        desc = f"epoch {epoch + 1}/{state.epochs}" + (" head" if frozen else "")
        bar = tqdm(total=steps, initial=state.step, desc=desc, unit="step", disable=not t.progress, leave=False,
                   dynamic_ncols=True, file=sys.stderr)
        # several processes each sum their own images; rank 0 carries the figures from before a resume
        loss_sum, correct, seen = state.sums if world.is_main else [0.0, 0, 0]
        seen_at_start = seen
        for step in range(state.step, steps):
            idx = perm[step * bs:(step + 1) * bs]
            share = world.share(idx, batches.y, batches.loss_weight, cfg.seed, epoch, step)
            if share is not None:  # several processes: this one's images of the global batch
                idx = share.idx
            yb = batches.labels(idx)
            # 2. normalise and augment the whole batch on the device (head-only epochs read the cached
            #    features of the un-augmented images instead: the backbone is frozen)
            with autocast_context(setup.device, setup.autocast_dtype):
                if frozen:
                    logits = model.forward_head(features[idx])
                else:
                    g = state.g_augment if share is None else share.generator
                    logits = train_model(batches.images(idx, epoch, g, size))
                # 3. one optimisation step
                loss = F.cross_entropy(logits.float(), yb, weight=batches.loss_weight,
                                       label_smoothing=cfg.label_smoothing,
                                       reduction="mean" if share is None else "sum")
                if share is not None:  # so that DDP's mean over processes is the global batch's mean
                    loss = loss * share.loss_scale
            if not torch.isfinite(loss):
                raise ImgclfError(f"the loss became {loss.item()} at epoch {epoch + 1}, step {step + 1}; "
                                  "lower the learning rate (--lr) or check the data")
            opt.zero_grad(set_to_none=True)
            scaled_backward(loss, cfg.batch_size, model)
            if frozen:  # head-only steps bypass DDP: average the head's gradients by hand
                world.average_grads(model)
            opt.step()
            if state.scheduler is not None and cfg.schedule != "plateau":
                state.scheduler.step()
            # 4. running figures for the bar (one .item() per step is cheap next to the step)
            loss_sum += loss.item() * (len(yb) if share is None else share.loss_count)
            correct += int((logits.argmax(1) == yb).sum())
            seen += len(yb)
            state.step, state.sums = step + 1, [loss_sum, correct, seen]
            bar.update(1)
            if step % 10 == 0 or step + 1 == steps:
                ips = (seen - seen_at_start) / max(time.perf_counter() - t0, 1e-9)
                bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}", img_s=f"{ips:.0f}",
                                refresh=False)
            for cb in t.callbacks:
                cb.on_step_end(t, epoch, step, loss.item())
            if world.any(t.stop_requested) and step + 1 < steps:
                bar.close()
                state.sums = world.sum(state.sums)  # the whole job's figures, for `last`
                return "interrupted"
            if t.end_epoch_now:  # the time budget cut the epoch short
                break
        bar.close()
        seconds = time.perf_counter() - t0
        loss_sum, correct, seen = world.sum([loss_sum, correct, seen])  # over the processes

        # 5. validate and record; the callbacks then checkpoint, re-plan, stop early
        row = end_epoch(t, epoch, loss_sum / seen, correct / seen, seconds)
        for cb in t.callbacks:
            cb.on_epoch_end(t, row)
        if t.early_stop:
            t.log(t.early_stop)
            return "early-stopped"
        if world.any(t.stop_requested):
            return "interrupted"
    return "finished"


def end_epoch(t, epoch: int, train_loss: float, train_acc: float, seconds: float) -> dict[str, float]:
    """Score the validation split when due, keep the best score, log the epoch's line; -> metrics.csv's row."""
    setup, state, cfg = t.setup, t.state, t.setup.cfg
    every = 1 if cfg.val_every is None else cfg.val_every
    validate = setup.val is not None and (epoch + 1 >= state.epochs or (every > 0 and (epoch + 1) % every == 0))
    if validate:
        # several processes: each scores a slice, every one gets all the logits (and so the same metrics)
        x, y = setup.val_tensors
        logits = t.world.predict_logits(setup.model, x, setup.normalizer, batch_size=cfg.eval_batch_size,
                                        autocast_dtype=setup.autocast_dtype, channels_last=cfg.channels_last)
        m = metrics_from_logits(logits, y, setup.ds.classes)
        val_loss, val_acc = m["loss"], m["top1"]
        if setup.val_is_test:  # the final test of these same weights needs no second pass
            t.scored_test = (epoch + 1, logits)
    else:
        val_loss, val_acc = float("nan"), float("nan")
    # the head's lr (the backbone's is lower when fine-tuning); with Muon the filters' (its SGD groups'
    # rates are per-example figures times the batch size, not comparable with other optimizers')
    lr = state.optimizer.param_groups[0 if cfg.optimizer == "muon" else -1]["lr"]
    row = {"epoch": epoch + 1, "train_loss": train_loss, "train_acc": train_acc, "val_loss": val_loss,
           "val_acc": val_acc, "lr": lr, "seconds": seconds}
    score = {"val_loss": val_loss, "val_acc": val_acc}[cfg.monitor] if setup.val is not None else train_loss
    # --val-every skips some epochs: neither better nor worse; with 0 only the last is scored, on train loss too
    scored = validate or (setup.val is None and (every > 0 or epoch + 1 >= state.epochs))
    if state.scheduler is not None and cfg.schedule == "plateau" and scored:
        state.scheduler.step(score)
    improved = state.record(score, lower_is_better=cfg.monitor == "val_loss" or setup.val is None, scored=scored)
    state.end_epoch(row)
    mark = " *" if improved else ""
    val_txt = (f"val loss {val_loss:.4f} acc {val_acc:.2%}" if validate else
               "no val" if setup.val is None else "val skipped (--val-every)")
    t.log(f"epoch {epoch + 1:>3}/{state.epochs}  train loss {train_loss:.4f} acc {train_acc:.2%}  {val_txt}  "
          f"lr {lr:.3g}  {seconds:.1f}s  {len(setup.batches) / seconds:.0f} img/s{mark}")
    return row
