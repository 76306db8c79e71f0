"""Plan a training run to finish, evaluated, inside a time budget (``imgclf train --time-budget 5m``).

    plan = plan_budget(seconds_left, n_train, n_test, speeds, max_epochs=8, tta="flip+translate")

The trainer measures each candidate model's training and inference speed on this machine for a few steps
(:class:`Speed`), then :func:`plan_budget` picks the (model, epochs) pair expected to score best whose
training plus final evaluation fits what is left of the budget. The expected scores come from a table of
runs measured on the shared CIFAR-10 JPEG copy (below), so the choice ranks models by what an epoch of each
is worth, not only by how many epochs fit. While training, the trainer re-plans after every epoch from the
epochs' real duration, shortening the linear schedule if the machine turned out slower than measured.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from .errors import ImgclfError

# Test top-1 (with flip+translate TTA) after N epochs of the fast recipe on CIFAR-10 (JPEG copy, seed 0),
# each a separate run with its own full linear schedule; measured on the 2-core Xeon (benchmarks/
# cifar10_record.py). Between measured epochs the planner interpolates in log(epochs).
MEASURED_TOP1 = {
    "fastnet": {2: 0.80, 4: 0.875, 8: 0.91},
    "fastnet-m": {2: 0.79, 4: 0.865, 8: 0.90},
    "fastnet-s": {2: 0.77, 4: 0.85, 8: 0.885},
}
SAFETY = 0.92          # plan to use this share of the time left: epochs vary, and the end must not overrun
FIXED_END_SECONDS = 4  # checkpoint + report + exit after the final evaluation


@dataclass
class Speed:
    model: str
    train_ips: float       # training images per second (one optimisation step per batch)
    eval_ips: float        # inference images per second (eval mode, no gradients)


@dataclass
class Plan:
    model: str
    epochs: int
    tta: str | None
    train_seconds: float
    eval_seconds: float
    why: list[str] = field(default_factory=list)


def expected_top1(model: str, epochs: float) -> float | None:
    """Interpolated score of ``epochs`` epochs of ``model`` from MEASURED_TOP1 (None: no measurements)."""
    table = MEASURED_TOP1.get(model)
    if not table or epochs <= 0:
        return None
    points = sorted(table.items())
    if epochs <= points[0][0]:  # fewer epochs than measured: scale down towards chance, roughly
        return points[0][1] * epochs / points[0][0]
    for (e0, a0), (e1, a1) in zip(points, points[1:]):
        if epochs <= e1:
            t = (math.log(epochs) - math.log(e0)) / (math.log(e1) - math.log(e0))
            return a0 + t * (a1 - a0)
    return points[-1][1]  # more epochs than measured: no promise of more


def plan_budget(seconds_left: float, n_train: int, n_eval: int, speeds: list[Speed], *, max_epochs: int,
                tta: str | None, tta_views: int) -> Plan:
    """The best-expected (model, epochs) that fits ``seconds_left``; TTA is dropped when it does not fit.

    ``n_eval`` images are scored once at the end (plus ``tta_views`` times with TTA). With one candidate
    (a model the user chose) the plan is simply as many epochs as fit, up to ``max_epochs``."""
    usable = seconds_left * SAFETY - FIXED_END_SECONDS
    best: tuple[float, Plan] | None = None
    for sp in speeds:
        for use_tta in ((True, False) if tta else (False,)):
            eval_s = n_eval * (1 + (tta_views if use_tta else 0)) / sp.eval_ips
            epoch_s = n_train / sp.train_ips
            epochs = min(max_epochs, math.floor((usable - eval_s) / epoch_s))
            if epochs < 1:
                continue
            score = expected_top1(sp.model, epochs)
            # unmeasured models: more epochs is better; TTA is worth about a third of an epoch at the end
            key = (score if score is not None else epochs / max_epochs) + (0.005 if use_tta else 0.0)
            plan = Plan(sp.model, epochs, tta if use_tta else None, epochs * epoch_s, eval_s)
            if best is None or key > best[0]:
                best = (key, plan)
    if best is None:
        fastest = max(speeds, key=lambda s: s.train_ips)
        need = n_train / fastest.train_ips + n_eval / fastest.eval_ips + FIXED_END_SECONDS
        raise ImgclfError(f"the time budget leaves {seconds_left:.0f}s after start-up and data loading, but one "
                          f"epoch of {fastest.model} and its evaluation take about {need / SAFETY:.0f}s on this "
                          "machine: raise --time-budget, or train on less data (--fraction)")
    plan = best[1]
    speed = {s.model: s for s in speeds}
    plan.why.append(f"time budget: {seconds_left:.0f}s left after start-up and data; measured "
                    + ", ".join(f"{s.model} {s.train_ips:.0f} img/s training, {s.eval_ips:.0f} inference"
                                for s in speeds))
    expected = expected_top1(plan.model, plan.epochs)
    plan.why.append(f"plan: {plan.model} for {plan.epochs} epoch(s) ({plan.train_seconds:.0f}s) + final evaluation"
                    f"{' with ' + plan.tta + ' TTA' if plan.tta else ''} ({plan.eval_seconds:.0f}s)"
                    + (f"; expected top-1 about {expected:.0%} on CIFAR-10-like data" if expected else "")
                    + (f"; {speed[plan.model].train_ips:.0f} img/s" if len(speeds) == 1 else ""))
    return plan
