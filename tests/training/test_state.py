"""TrainState through checkpoints: a resumed run equals an uninterrupted one, changed settings are refused."""

import pytest
import torch

import imgclf
from imgclf.checkpoint import load_checkpoint
from imgclf.errors import ImgclfError

from support import StopAt, train_run, weights


@pytest.mark.parametrize("model,augment,schedule", [("seed-cnn", "standard", "onecycle"),
                                                    ("seed-cnn-bn", "seed004", "plateau")])
def test_resume_equals_uninterrupted(tiny_folder, tmp_path, model, augment, schedule):
    kw = dict(model=model, augment=augment, schedule=schedule, val_split=0.25, seed=3, val_every=1)
    full = train_run(tiny_folder, tmp_path, epochs=3, name="full", **kw)
    part = train_run(tiny_folder, tmp_path, epochs=1, name="part", **kw) if schedule != "onecycle" else None
    if part is not None:  # stopped at an epoch boundary, resumed with more epochs
        resumed = imgclf.train(resume=part.run_dir, epochs=3, progress=False)
        assert resumed.run_dir == part.run_dir and resumed.epochs_done == 3
        a, b = weights(full.run_dir), weights(part.run_dir)
        assert all(torch.equal(a[k], b[k]) for k in a)

    # stopped mid-epoch by a callback, resumed: identical weights, history and best
    mid = train_run(tiny_folder, tmp_path, epochs=3, name="mid", callbacks=[StopAt(1, 1)], **kw)
    assert mid.status == "interrupted"
    ts = load_checkpoint(mid.run_dir / "last.safetensors").train_state
    assert (ts["epoch"], ts["step"]) == (1, 2)
    resumed = imgclf.train(resume=mid.run_dir, progress=False)
    a, b = weights(full.run_dir), weights(mid.run_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["val_loss"] for r in resumed.history] == [r["val_loss"] for r in full.history]
    assert resumed.best_epoch == full.best_epoch
    a, b = weights(full.run_dir, "best"), weights(mid.run_dir, "best")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_changed_settings(tiny_run):
    with pytest.raises(ImgclfError, match="cannot change model"):
        imgclf.train(resume=tiny_run.run_dir, model="resnet18")
    with pytest.raises(ImgclfError, match="cannot resume"):
        imgclf.train(resume=tiny_run.run_dir / "nope")


def test_resume_inside_head_only_phase_equals_uninterrupted(tiny_folder, tmp_path):
    kw = {"model": "efficientnet-lite0", "pretrained": "imagenet", "freeze_epochs": 1, "augment": "photo",
          "schedule": "onecycle", "optimizer": "adamw", "val_split": 0.25, "epochs": 2}
    full = train_run(tiny_folder, tmp_path, name="full", **kw)
    mid = train_run(tiny_folder, tmp_path, name="mid", callbacks=[StopAt(0, 1)], **kw)
    assert mid.status == "interrupted"
    imgclf.train(resume=mid.run_dir, progress=False)
    a, b = weights(full.run_dir), weights(mid.run_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)
