"""The final test after training: a validation on the test split is not scored twice."""

import pytest

from support import train_run


@pytest.mark.parametrize("val_split,passes", [(0.0, 0), (0.25, 1)])
def test_final_test_reuses_the_validation_on_test(tiny_folder, tmp_path, monkeypatch, val_split, passes):
    """Validating on the test split scores the final weights already: the final test then makes no second
    pass and reports the same figures; with a validation split of its own it scores the test split once."""
    from imgclf.training import final as train_mod

    calls = []
    real = train_mod.predict_logits
    monkeypatch.setattr(train_mod, "predict_logits", lambda *a, **k: calls.append(1) or real(*a, **k))
    r = train_run(tiny_folder, tmp_path, epochs=2, val_split=val_split, tta="none")
    assert len(calls) == passes
    if not passes:
        assert r.test_metrics["loss"] == pytest.approx(r.history[r.best_epoch - 1]["val_loss"], abs=1e-6)
