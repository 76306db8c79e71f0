"""The time budget: which model and how many epochs a plan picks, and a run that keeps to it."""
import pytest

import imgclf
from imgclf.errors import ImgclfError
from imgclf.training.budget import Speed, plan_budget


def test_budget_plan_picks_the_widest_model_with_enough_epochs():
    speeds = [Speed("fastnet", 400, 1200), Speed("fastnet-m", 700, 2000), Speed("fastnet-s", 1300, 3500)]
    kw = dict(n_train=50_000, n_eval=10_000, speeds=speeds, max_epochs=8, tta="flip+translate", tta_views=6)
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
    mine = plan_budget(100, 10_000, 1000, [Speed("resnet18", 1000, 4000)], max_epochs=20, tta=None, tta_views=0)
    assert mine.epochs == 8 and mine.tta is None


def test_budget_plan_takes_a_narrower_net_as_at_least_as_fast():
    # measured on a VM under load: fastnet-s's one step was slowed, so it looked slower than fastnet-m
    speeds = [Speed("fastnet", 285, 1473), Speed("fastnet-m", 661, 2549), Speed("fastnet-s", 570, 4619)]
    plan = plan_budget(277, 50_000, 10_000, speeds, max_epochs=8, tta="flip+translate", tta_views=6)
    # planned as 661 img/s, fastnet-s fits as many epochs as fastnet-m: the wider is kept; never fewer epochs
    assert (plan.model, plan.epochs) == ("fastnet-m", 3)
    assert any("fastnet-s 570 img/s" in line and "at least as fast" in line for line in plan.why)
    assert [s.train_ips for s in speeds] == [285, 661, 570]  # the caller's list is left as measured
    honest = plan_budget(277, 50_000, 10_000, [*speeds[:2], Speed("fastnet-s", 1100, 4619)], max_epochs=8,
                         tta="flip+translate", tta_views=6)
    assert (honest.model, honest.epochs) == ("fastnet-s", 5)
    assert not any("at least as fast" in line for line in honest.why)


def test_time_budget_run_plans_and_finishes(tiny_folder, tmp_path, capsys):
    r = imgclf.train(data=str(tiny_folder), time_budget=120, epochs=2, batch_size=32, project=str(tmp_path),
                     progress=False)
    out = capsys.readouterr().out
    assert "time budget:" in out and "measured fastnet " in out and "fastnet-s " in out
    assert "plan: fastnet" in out and "for 2 epoch(s)" in out  # the user's epochs cap the plan
    assert r.status == "finished" and r.test_metrics is not None
    assert "time_budget = 120.0" in (r.run_dir / "config.toml").read_text()
