"""The time budget: which model and how many epochs a plan picks, and a run that keeps to it."""
from types import SimpleNamespace

import numpy as np
import pytest

import imgclf
from imgclf.errors import ImgclfError
from imgclf.training import budget
from imgclf.training.budget import Speed, plan_budget

TTA = [("flip+translate", 6), ("flip", 2)]


def test_budget_plan_picks_the_widest_model_with_enough_epochs():
    speeds = [Speed("fastnet", 400, 1200), Speed("fastnet-m", 700, 2000), Speed("fastnet-s", 1300, 3500)]
    kw = dict(n_train=50_000, n_eval=10_000, speeds=speeds, max_epochs=8, tta=TTA)
    roomy = plan_budget(1500, **kw)
    assert (roomy.model, roomy.epochs, roomy.tta) == ("fastnet", 8, "flip+translate")
    assert roomy.train_seconds + roomy.eval_seconds <= 1500
    tight = plan_budget(300, **kw)  # fastnet fits 2 epochs, fastnet-m 3, fastnet-s 6
    assert (tight.model, tight.epochs) == ("fastnet-s", 5) or (tight.model, tight.epochs) == ("fastnet-s", 6)
    assert tight.train_seconds + tight.eval_seconds <= 300 * 0.92
    assert any("plan: fastnet-s" in line and "widest" in line for line in tight.why)
    squeezed = plan_budget(150, **kw)  # nothing fits 5 epochs: the most epochs
    assert squeezed.model == "fastnet-s" and 1 <= squeezed.epochs < 5
    with pytest.raises(ImgclfError, match="raise --time-budget"):
        plan_budget(20, **kw)
    # a model the user chose: as many epochs as fit, TTA only when it costs no epoch
    mine = plan_budget(100, 10_000, 1000, [Speed("resnet18", 1000, 4000)], max_epochs=20, tta=[])
    assert mine.epochs == 8 and mine.tta is None


def test_budget_plan_takes_a_narrower_net_as_at_least_as_fast():
    # measured on a VM under load: fastnet-s's one step was slowed, so it looked slower than fastnet-m
    speeds = [Speed("fastnet", 285, 1473), Speed("fastnet-m", 661, 2549), Speed("fastnet-s", 570, 4619)]
    plan = plan_budget(277, 50_000, 10_000, speeds, max_epochs=8, tta=TTA)
    # planned as 661 img/s, fastnet-s fits as many epochs as fastnet-m: the wider is kept; never fewer epochs
    assert (plan.model, plan.epochs) == ("fastnet-m", 3)
    assert any("fastnet-s 570 img/s" in line and "at least as fast" in line for line in plan.why)
    assert [s.train_ips for s in speeds] == [285, 661, 570]  # the caller's list is left as measured
    honest = plan_budget(277, 50_000, 10_000, [*speeds[:2], Speed("fastnet-s", 1100, 4619)], max_epochs=8,
                         tta=TTA)
    assert (honest.model, honest.epochs) == ("fastnet-s", 5)
    assert not any("at least as fast" in line for line in honest.why)


def test_budget_plan_takes_fewer_tta_views_before_an_epoch():
    speeds = [Speed("fastnet-xs", 800, 3600)]
    # 290 s: 262.8 s usable, 62.5 s an epoch; 4 epochs leave 12.8 s for the final evaluation: enough for flip's
    # 3 passes over 10,000 images (8.3 s), not flip+translate's 7 (19.4 s)
    plan = plan_budget(290, 50_000, 10_000, speeds, max_epochs=8, tta=TTA)
    assert (plan.epochs, plan.tta) == (4, "flip")
    roomy = plan_budget(310, 50_000, 10_000, speeds, max_epochs=8, tta=TTA)
    assert (roomy.epochs, roomy.tta) == (4, "flip+translate")
    assert plan_budget(290, 50_000, 10_000, speeds, max_epochs=8, tta=TTA[:1]).tta is None


def test_a_plan_of_too_few_epochs_goes_short_where_that_fits_more():
    speeds = [Speed("fastnet-s", 302, 2069), Speed("fastnet-xs", 601, 2342)]  # measured on 2 AVX2 cores
    kw = dict(n_train=50_000, n_eval=10_000, speeds=speeds, max_epochs=8, tta=TTA)
    full = plan_budget(269, **kw)
    assert (full.model, full.epochs, full.progressive, full.batch_size) == ("fastnet-xs", 2, None, None)
    # 243.5 s usable, 83.2 s a full-size epoch; short, the epochs before the last cost 0.6 each: 2.2 for 3 epochs,
    # 2.8 for 4. With 6 TTA views (29.9 s) 2.57 epochs of room: 3; without TTA (4.3 s) 2.88: 4, and TTA never
    # costs an epoch
    short = plan_budget(269, **kw, short=True)
    assert (short.model, short.epochs, short.tta) == ("fastnet-xs", 4, None)
    assert (short.progressive, short.batch_size) == (budget.SHORT["progressive"], budget.SHORT["batch_size"])
    assert short.train_seconds == pytest.approx(2.8 * 50_000 / 601)
    assert short.train_seconds + short.eval_seconds <= 269 * budget.SAFETY - budget.FIXED_END_SECONDS
    assert any("4 epoch(s) (the first 3 at 0.75x the side, batch 500)" in line for line in short.why)
    with_tta = plan_budget(255, **kw, short=True)
    assert (with_tta.epochs, with_tta.tta, with_tta.batch_size) == (3, "flip+translate", 500)
    # enough full-size epochs fit: the plan stays as it was
    roomy = plan_budget(600, **kw, short=True)
    assert roomy.epochs >= budget.MIN_EPOCHS and roomy.progressive is None and roomy.batch_size is None
    # a budget so tight that going short fits no more epochs: full size
    assert plan_budget(140, **kw, short=True).progressive is None


@pytest.mark.parametrize("left, epochs", [(100, 2), (120, 3)])
def test_the_replan_after_a_reduced_epoch_counts_a_full_one_as_dearer(left, epochs):
    import time

    from imgclf.training.callbacks import TimeBudget

    # epoch 1 of 3 took 40 s at 24 px; epoch 2 (24 px) takes about 40 s more, epoch 3 (32 px) about 71 s
    logged = []
    trainer = SimpleNamespace(state=SimpleNamespace(epoch=1, epochs=3, scheduler=None),
                              cfg=SimpleNamespace(schedule="linear"), log=logged.append,
                              batches=SimpleNamespace(input_sizes=lambda n: [24] * (n - 1) + [32],
                                                      steps_per_epoch=50))
    cb = TimeBudget(budget_seconds=left + 1, end_seconds=1, started=time.monotonic())
    cb.epoch_started = time.perf_counter() - 40
    assert cb._replan(trainer) == epochs
    assert bool(logged) == (epochs < 3)


def test_wider_candidates_are_measured_only_while_they_could_be_chosen(monkeypatch):
    ips = {"fastnet": 165, "fastnet-m": 277, "fastnet-s": 546, "fastnet-xs": 834}  # measured on 2 AVX2 cores
    measured = []

    def fake(cfg, names, ds, device):
        measured.append(list(names))
        return [Speed(n, ips[n], ips[n] * 4.4) for n in names]

    monkeypatch.setattr(budget, "measure_speeds", fake)
    cfg = imgclf.TrainConfig(epochs=8)
    ds = SimpleNamespace(train=SimpleNamespace(y=np.zeros(50_000)))
    names = ["fastnet", "fastnet-m", "fastnet-s", "fastnet-xs"]
    plan = budget.measure_and_plan(cfg, names, ds, "cpu", 10_000, TTA, seconds_left=lambda: 280)
    # xs fits 4 epochs, s 2: fastnet-m and fastnet could fit no more than 2, so they are not measured
    assert measured == [["fastnet-xs", "fastnet-s"]] and plan.model == "fastnet-xs"
    assert any("not measured: fastnet, fastnet-m" in line for line in plan.why)
    measured.clear()
    plan = budget.measure_and_plan(cfg, names, ds, "cpu", 10_000, TTA, seconds_left=lambda: 1500)
    # on a roomy budget fastnet-s fits 8 epochs, fastnet-m 7 (chosen), fastnet 4: all are measured
    assert measured == [["fastnet-xs", "fastnet-s"], ["fastnet-m"], ["fastnet"]] and plan.model == "fastnet-m"


def test_time_budget_run_plans_and_finishes(tiny_folder, tmp_path, capsys):
    r = imgclf.train(data=str(tiny_folder), time_budget=120, epochs=2, batch_size=32, project=str(tmp_path),
                     progress=False)
    out = capsys.readouterr().out
    assert "time budget:" in out and "measured fastnet " in out and "fastnet-s " in out
    assert "plan: fastnet" in out and "for 2 epoch(s)" in out  # the user's epochs cap the plan
    assert r.status == "finished" and r.test_metrics is not None
    assert "time_budget = 120.0" in (r.run_dir / "config.toml").read_text()
