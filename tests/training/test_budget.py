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
