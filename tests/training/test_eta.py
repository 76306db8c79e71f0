"""The run's expected duration: scaled by each epoch's pixels, validations and the final test counted."""
from types import SimpleNamespace

import pytest

from imgclf.training import eta

from synthetic import colour_folder


def _trainer(sizes, n_val=0, n_test=0, tta="none", val_is_test=False):
    batches = type("B", (), {"image_size": 32, "input_sizes": lambda self, n: sizes,
                             "__len__": lambda self: 1000})()
    split = lambda n: SimpleNamespace(y=[0] * n) if n else None  # noqa: E731
    setup = SimpleNamespace(val=split(n_val), ds=SimpleNamespace(test=split(n_test)), val_is_test=val_is_test)
    return SimpleNamespace(state=SimpleNamespace(epochs=len(sizes)), setup=setup, batches=batches,
                           cfg=SimpleNamespace(val_every=None, tta=tta))


def test_later_epochs_cost_their_pixels():
    t = _trainer([16, 32, 32])
    # epoch 0 took 10 s at 16 px: each later epoch at 32 px takes 4x as long
    assert eta.Eta()._after(t, 0, 10.0, 16, include_this_validation=False) == pytest.approx(80 + eta.END_SECONDS)


def test_validations_and_the_final_test_are_counted():
    t = _trainer([32, 32], n_val=500, n_test=1000, tta="flip")
    e = eta.Eta()
    e.val_seconds_per_image = 0.001
    # epoch 1 (10 s), validations after epochs 0 and 1 (0.5 s each), test + its mirror view (2 s)
    assert e._after(t, 0, 10.0, 32, include_this_validation=True) == pytest.approx(10 + 1 + 2 + eta.END_SECONDS)
    # validating on the test split: the last validation is the final test, only the TTA view is extra
    t = _trainer([32, 32], n_val=1000, n_test=1000, tta="flip", val_is_test=True)
    assert e._after(t, 0, 10.0, 32, include_this_validation=False) == pytest.approx(10 + 1 + 1 + eta.END_SECONDS)


def test_the_first_estimate_takes_the_fastest_timed_step(monkeypatch):
    clock = iter([100.0, 107.0, 113.0, 118.5])  # after the warm-up step, then steps of 7, 6 and 5.5 s
    monkeypatch.setattr(eta.time, "perf_counter", lambda: next(clock))
    monkeypatch.setattr(eta.time, "monotonic", lambda: 1000.0)
    monkeypatch.setattr(eta, "_eval_seconds_per_image", lambda trainer: 0.0)
    t = _trainer([32, 32])
    t.batches.steps_per_epoch, t.batches.input_size = 10, lambda epoch, epochs: 32
    logs = []
    t.cfg.freeze_epochs, t.started, t.log = 0, 1000.0, logs.append
    t.setup.device, t.setup.autocast_dtype = SimpleNamespace(type="cpu"), None
    e = eta.Eta()
    for step in range(4):
        e.on_step_end(t, 0, step, 1.0)
    # 5.5 s a step: 6 steps left of epoch 1 (33 s), epoch 2 (55 s), the end (END_SECONDS)
    assert len(logs) == 1 and f"about {eta.duration(33 + 55 + eta.END_SECONDS)} on this CPU" in logs[0]
    assert "(measured 3 steps)" in logs[0]


def test_a_run_says_how_long_it_will_take(tmp_path, capsys):
    import imgclf

    data = colour_folder(tmp_path / "data", n_train=24, n_test=8)
    imgclf.train(data=str(data), model="seed-cnn", epochs=2, batch_size=6, project=str(tmp_path / "runs"),
                 progress=False)
    out = capsys.readouterr().out
    first = next(line for line in out.splitlines() if line.startswith("eta    the whole run: about"))
    assert "on this CPU" in first and "ending around" in first
    assert out.index(first) < out.index("epoch   1/2")  # said during the first epoch
    assert "eta    about" in out.split("epoch   1/2")[1]  # and again after it
