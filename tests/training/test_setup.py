"""setup.prepare(): class order, channels, stratified fractions, class weights, heads from another run."""
import json

import pytest
import torch

from imgclf.checkpoint import load_checkpoint
from imgclf.errors import ImgclfError
from imgclf.training.callbacks import Callback

from support import train_run
from synthetic import colour_folder


def test_natural_class_order_and_test_as_validation_note(tmp_path, capsys):
    data = colour_folder(tmp_path / "d", classes=("c10", "c2", "c1"), n_train=4, n_test=2)
    r = train_run(data, tmp_path, epochs=1)
    out = capsys.readouterr().out
    assert "scored once on the TEST set; no epoch is chosen on it" in out  # the fast recipe keeps its last
    assert out.strip().splitlines()[-1] == str(r.run_dir)  # the last line printed is the run folder
    assert load_checkpoint(r.run_dir).meta["classes"] == ["c1", "c2", "c10"]


def test_greyscale_folder_trains_greyscale_model(tmp_path):
    data = colour_folder(tmp_path / "grey", mode="L", n_train=6, n_test=2, size=28)
    r = train_run(data, tmp_path, epochs=1)
    meta = load_checkpoint(r.run_dir).meta
    assert meta["preprocess"]["channels"] == 1 and meta["arch"]["in_channels"] == 1
    assert meta["preprocess"]["image_size"] == 28


def test_fraction_is_stratified(tiny_folder, tmp_path):
    r = train_run(tiny_folder, tmp_path, epochs=1, fraction=0.5)
    info = json.loads((r.run_dir / "run.json").read_text())
    assert any("50% of the training images (36)" in n for n in info["notes"])


def test_init_from_other_classes_keeps_backbone_new_head(tiny_run, tmp_path, capsys):
    data = colour_folder(tmp_path / "two", n_train=8, n_test=4, classes=("red", "blue"), size=32)
    r = train_run(data, tmp_path, model=None, init_from=str(tiny_run.run_dir), epochs=1)
    out = capsys.readouterr().out
    assert "backbone kept, new 2-class head" in out and "initialised from" in out
    meta = load_checkpoint(r.run_dir).meta
    assert meta["arch"]["name"] == "seed-cnn" and meta["classes"] == ["blue", "red"]
    assert meta["preprocess"]["mean"] == load_checkpoint(tiny_run.run_dir).meta["preprocess"]["mean"]
    with pytest.raises(ImgclfError, match="holds a seed-cnn, not a resnet18"):
        train_run(data, tmp_path, init_from=str(tiny_run.run_dir), model="resnet18")


def test_imbalance_is_noted_and_weighted(tmp_path, capsys):
    data = colour_folder(tmp_path / "imb", n_train=4, n_test=2)
    for i in range(4, 20):  # make "red" five times as common
        (data / "train" / "red" / f"{i}.png").write_bytes((data / "train" / "red" / "0.png").read_bytes())
    seen = {}

    class Grab(Callback):
        def on_epoch_end(self, trainer, row):
            seen["w"], seen["s"] = trainer.batches.loss_weight, trainer.batches.sample_weight
    r = train_run(data, tmp_path, epochs=1, class_weights="auto", balanced_sampling=True, callbacks=[Grab()])
    out = capsys.readouterr().out
    assert "class imbalance: 'red' has 20 training images" in out
    classes = load_checkpoint(r.run_dir).meta["classes"]
    w = dict(zip(classes, seen["w"].tolist()))
    assert w["red"] == pytest.approx(28 / (3 * 20)) and w["blue"] == pytest.approx(28 / (3 * 4))
    assert seen["s"].shape == (28,)


def test_freeze_blocks_keeps_the_first_blocks_out_of_the_backward_pass_and_the_optimizer():
    from imgclf.config import TrainConfig
    from imgclf.models import create_model
    from imgclf.training.optim import build_optimizer
    from imgclf.training.setup import _freeze_blocks

    model = create_model("efficientnet-lite0", num_classes=3, image_size=32)
    notes = []
    _freeze_blocks(model, 5, True, notes)
    frozen = {id(p) for block in model.early_blocks()[:5] for p in block.parameters()}
    assert frozen and notes == ["fine-tuning: the stem and first 4 blocks keep their pretrained weights "
                                "(--freeze-blocks 5)"]
    opt = build_optimizer(TrainConfig(optimizer="adamw", lr=1e-3), model, 0.1)
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not held & frozen and len(held) == sum(1 for p in model.parameters()) - len(frozen)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is None for b in model.early_blocks()[:5] for p in b.parameters())
    assert all(p.grad is not None for p in model.early_blocks()[5].parameters())
    for n, fine_tuning, match in [(5, False, "pretrained"), (99, True, "has 17"), (2, True, "no blocks")]:
        with pytest.raises(ImgclfError, match=match):
            _freeze_blocks(create_model("fastnet" if match == "no blocks" else "efficientnet-lite0", num_classes=3,
                                        image_size=32), n, fine_tuning, [])
