"""The fast recipe's parts: FastNet's whitening, Muon, alternating flips, --val-every, precision auto and the
time-budget planner."""
import sys

import pytest
import torch

import imgclf
from imgclf.checkpoint import load_checkpoint
from imgclf.errors import ImgclfError
from imgclf.models import create_model
from imgclf.training import precision
from imgclf.training.augment import alternating_flip
from imgclf.training.budget import Speed, plan_budget
from imgclf.training.callbacks import Callback
from imgclf.training.optim import Muon, orthogonalize
from imgclf.training.schedule import PhasedOneCycle


def test_whitening_layer_decorrelates_patches():
    torch.manual_seed(0)
    # correlated channels: a shared component plus a little noise
    base = torch.randn(64, 1, 16, 16)
    x = torch.cat([base + 0.1 * torch.randn(64, 1, 16, 16) for _ in range(3)], dim=1)
    model = create_model("fastnet-s", num_classes=3, image_size=16)
    model.init_from_data(x)
    w = model.whiten.weight.detach()
    out = torch.nn.functional.conv2d(x, w[: len(w) // 2])  # the first half: the eigenvector filters
    flat = out.permute(0, 2, 3, 1).reshape(-1, out.shape[1])
    cov = flat.T @ flat / len(flat)
    # unit variance where the data has variance, no correlation between the outputs
    assert torch.allclose(cov, torch.diag(torch.diag(cov)), atol=0.05)
    assert cov.diag().max() <= 1.01
    assert torch.equal(w[len(w) // 2:], -w[: len(w) // 2])  # each filter and its negation
    assert not model.whiten.weight.requires_grad


def test_orthogonalize_flattens_the_spectrum():
    torch.manual_seed(0)
    g = torch.randn(64, 576) @ torch.diag(torch.logspace(-3, 0, 576))  # very uneven singular values
    s = torch.linalg.svdvals(orthogonalize(g, steps=5).float())
    assert s.min() > 0.3 and s.max() < 1.3  # roughly semi-orthogonal, as Muon needs (not exactly 1)
    tall = orthogonalize(torch.randn(300, 20))
    assert tall.shape == (300, 20)


def test_orthogonalize_runs_in_bf16_only_where_it_is_native(monkeypatch):
    """AVX2-only CPUs emulate bf16 matrix products (50x slower than float32 there): the iteration uses float32."""
    from imgclf.training import optim

    for native, dtype in ((True, torch.bfloat16), (False, torch.float32)):
        optim._native_bf16.cache_clear()
        monkeypatch.setattr(optim, "native_bf16", lambda device, native=native: native)
        assert optim.iteration_dtype(torch.device("cpu")) == dtype
        assert orthogonalize(torch.randn(8, 16)).dtype == dtype
    optim._native_bf16.cache_clear()


def test_muon_fits_a_small_problem_and_normalizes_filters():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16, bias=False), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                              torch.nn.Linear(16, 2))
    x, y = torch.randn(256, 8), (torch.randn(256, 8).sum(1) > 0).long()
    y = (x[:, 0] + x[:, 1] > 0).long()
    opt = Muon([{"params": [net[0].weight], "muon": True, "lr": 0.05, "momentum": 0.6, "normalize": True},
                {"params": [p for p in net.parameters() if p is not net[0].weight], "lr": 0.1, "momentum": 0.9}])
    for _ in range(150):
        loss = torch.nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.2
    # each output row was rescaled to unit norm (on average) before the last step, then moved by lr x ~1/sqrt(8)
    assert abs(net[0].weight.norm().item() - 16 ** 0.5) < 0.5


def test_alternating_flip_mirrors_every_other_epoch():
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).view(2, 3, 4, 5)
    bits = torch.tensor([True, False])
    e0, e1 = alternating_flip(x, bits, 0), alternating_flip(x, bits, 1)
    assert torch.equal(e0[0], x[0].flip(-1)) and torch.equal(e0[1], x[1])
    assert torch.equal(e1[0], x[0]) and torch.equal(e1[1], x[1].flip(-1))


def test_fast_recipe_trains_and_reports_tta(tiny_folder, tmp_path, capsys):
    r = imgclf.train(data=str(tiny_folder), model="fastnet-s", epochs=3, batch_size=32, project=str(tmp_path),
                     progress=False)
    out = capsys.readouterr().out
    assert "recipe fast" in out and "muon lr 0.18 (linear)" in out
    assert r.test_metrics["top1"] > 0.9 and r.test_metrics["tta"]["views"] == 6
    # validation only after the last epoch (val_every 0): earlier rows carry no score, and best = last
    assert [row["val_acc"] == row["val_acc"] for row in r.history] == [False, False, True]
    assert r.best_epoch == 3 and out.count("val skipped") == 2
    # every 2 epochs when asked (and always after the last)
    r2 = imgclf.train(data=str(tiny_folder), model="fastnet-s", epochs=3, batch_size=32, val_every=2,
                      project=str(tmp_path), progress=False)
    assert [row["val_acc"] == row["val_acc"] for row in r2.history] == [False, True, True]


def test_precision_auto_follows_the_hardware_and_the_model(monkeypatch):
    cpu = torch.device("cpu")
    fast, effnet = create_model("fastnet-s", 3), create_model("efficientnet-lite0", 3)
    monkeypatch.setattr(precision, "native_bf16", lambda device: True)
    assert precision.autocast_dtype("auto", cpu, fast) == torch.bfloat16
    assert precision.autocast_dtype("auto", cpu, effnet) is None  # depthwise convs: fp32 pays more on a CPU
    assert precision.autocast_dtype("fp32", cpu, fast) is None
    monkeypatch.setattr(precision, "native_bf16", lambda device: False)
    assert precision.autocast_dtype("auto", cpu, fast) is None   # AVX2-only CPU: bf16 would be emulated
    assert precision.autocast_dtype("bf16", cpu, fast) == torch.bfloat16  # asked for explicitly


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


def test_progressive_sizes_keep_their_shape_and_end_at_full_size():
    from imgclf.config import TrainConfig, progressive_sizes
    spec = "0.75:0.375,0.875:0.25"
    assert progressive_sizes(spec, 32, 8) == [24, 24, 24, 28, 28, 32, 32, 32]
    assert progressive_sizes(spec, 32, 4) == [24, 28, 32, 32]   # shares, so a shorter run keeps the shape
    assert progressive_sizes(spec, 28, 8)[:3] == [20, 20, 20]   # relative to the input size (MNIST: 28px)
    assert progressive_sizes(spec, 32, 1) == [32]               # the last epoch is always full size
    assert progressive_sizes(None, 32, 3) == progressive_sizes("none", 32, 3) == [32, 32, 32]
    for bad in ("0.75", "2:0.5", "0.5:0.7,0.75:0.5"):
        with pytest.raises(ImgclfError, match="progressive"):
            TrainConfig(progressive=bad)


def test_phased_one_cycle_keeps_head_only_epochs_at_full_rate():
    f = PhasedOneCycle(flat=10, total=110)
    assert [f(s) for s in (0, 9)] == [1.0, 1.0]           # head-only steps: the full lr
    assert f(10) == pytest.approx(1 / 25)                   # then one cycle: warm up from 1/25 ...
    assert f(40) == pytest.approx(1.0)                      # ... to the peak at 30 % of the rest ...
    assert f(110) == pytest.approx(1 / 25_000) and f(75) < f(50)  # ... and down


def _product_of_tiny_numbers(env: dict) -> float:
    """1e-30 * 1e-10 = 1e-40 is a float32 subnormal: 0.0 when the CPU flushes them, after `import imgclf`."""
    import os
    import subprocess

    code = "import imgclf, torch; print((torch.tensor([1e-30]) * torch.tensor([1e-10])).item())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, **env})
    return float(out.stdout.strip())


@pytest.mark.skipif(not torch.set_flush_denormal(True), reason="this CPU cannot flush subnormals (not x86 with SSE3)")
def test_import_flushes_subnormals_unless_told_not_to():
    """x86 computes subnormals 10-100x slower; imgclf flushes them to zero (IMGCLF_KEEP_DENORMALS=1 keeps them)."""
    assert _product_of_tiny_numbers({"IMGCLF_KEEP_DENORMALS": ""}) == 0.0
    assert 0.0 < _product_of_tiny_numbers({"IMGCLF_KEEP_DENORMALS": "1"}) < 1e-39


def test_whitening_bias_trains_early_then_freezes(tiny_folder, tmp_path):
    """FastNet's whitening bias trains for stem_bias_epochs (3), its lr decaying to 0, then stops needing a
    gradient; a run stopped after that resumes to the uninterrupted run's weights."""
    class Record(Callback):
        def __init__(self, stop_at=None):
            self.bias, self.stop_at = [], stop_at

        def on_step_end(self, trainer, epoch, step, loss):
            if (epoch, step) == self.stop_at:
                trainer.request_stop()

        def on_epoch_end(self, trainer, row):
            self.bias.append(trainer.model.whiten.bias.detach().clone())
            self.needs_grad = trainer.model.whiten.bias.requires_grad

    kw = dict(data=str(tiny_folder), model="fastnet-s", epochs=5, batch_size=16, project=str(tmp_path),
              progress=False, tta="none")
    rec = Record()
    full = imgclf.train(name="full", callbacks=[rec], **kw)
    b = rec.bias
    assert not torch.equal(b[0], b[1]) and not torch.equal(b[1], b[2])  # epochs 2 and 3 still move it
    assert torch.equal(b[2], b[3]) and torch.equal(b[3], b[4]) and not rec.needs_grad  # frozen from epoch 4
    mid = imgclf.train(name="mid", callbacks=[Record(stop_at=(3, 1))], **kw)
    assert mid.status == "interrupted"
    imgclf.train(resume=mid.run_dir, progress=False)
    a, c = (load_checkpoint(r / "last.safetensors").state_dict for r in (full.run_dir, mid.run_dir))
    assert all(torch.equal(a[k], c[k]) for k in a)
