import csv
import json
import os
import signal

import pytest
import torch

import imgclf
from imgclf.checkpoint import load_checkpoint
from imgclf.errors import ImgclfError
from imgclf.training.callbacks import Callback


def _train(data, tmp_path, **kw):
    kw.setdefault("model", "seed-cnn")
    kw.setdefault("batch_size", 16)
    return imgclf.train(data=str(data), project=str(tmp_path / "runs"), progress=False, **kw)


def test_run_folder_contents(tiny_run, capsys):
    run = tiny_run.run_dir
    names = sorted(p.name for p in run.iterdir() if p.suffix != ".png")  # the plots: tests/test_report.py
    assert names == ["best.safetensors", "classification_report.json", "classification_report.txt", "config.toml",
                     "evaluation.json", "last.safetensors", "metrics.csv", "report.html", "run.json"]
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert set(rows[0]) == {"epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"}
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "finished" and info["data"]["classes"] == ["blue", "green", "red"]
    best = load_checkpoint(run / "best.safetensors")
    assert best.meta["arch"]["name"] == "seed-cnn"
    assert best.meta["preprocess"]["image_size"] == 32 and best.meta["preprocess"]["channels"] == 3
    assert best.meta["test_metrics"]["top1"] == tiny_run.test_metrics["top1"]
    assert best.train_state is None and load_checkpoint(run / "last.safetensors").train_state is not None
    # no pickle anywhere in a run folder: every file is text or safetensors (JSON header first)
    for p in run.iterdir():
        head = p.read_bytes()[:2] if p.suffix != ".safetensors" else p.read_bytes()[8:9]  # after its length
        assert head[:1] != b"\x80" and head != b"PK", p.name
        assert p.suffix != ".safetensors" or head == b"{"


def test_tiny_run_learns(tiny_run):
    assert tiny_run.status == "finished"
    assert tiny_run.test_metrics["top1"] >= 0.9  # colour classes are easy


def test_natural_class_order_and_test_as_validation_note(tmp_path, capsys):
    from conftest import make_image_folder
    data = make_image_folder(tmp_path / "d", classes=("c10", "c2", "c1"), n_train=4, n_test=2)
    r = _train(data, tmp_path, epochs=1)
    out = capsys.readouterr().out
    assert "validating on the TEST set" in out
    assert out.strip().splitlines()[-1] == str(r.run_dir)  # the last line printed is the run folder
    assert load_checkpoint(r.run_dir).meta["classes"] == ["c1", "c2", "c10"]


@pytest.mark.parametrize("val_split,passes", [(0.0, 0), (0.25, 1)])
def test_final_test_reuses_the_validation_on_test(tiny_folder, tmp_path, monkeypatch, val_split, passes):
    """Validating on the test split scores the final weights already: the final test then makes no second
    pass and reports the same figures; with a validation split of its own it scores the test split once."""
    from imgclf.training import final as train_mod

    calls = []
    real = train_mod.predict_logits
    monkeypatch.setattr(train_mod, "predict_logits", lambda *a, **k: calls.append(1) or real(*a, **k))
    r = _train(tiny_folder, tmp_path, epochs=2, val_split=val_split, tta="none")
    assert len(calls) == passes
    if not passes:
        assert r.test_metrics["loss"] == pytest.approx(r.history[r.best_epoch - 1]["val_loss"], abs=1e-6)


def _weights(run_dir, name="last"):
    return load_checkpoint(run_dir / f"{name}.safetensors").state_dict


@pytest.mark.parametrize("model,augment,schedule", [("seed-cnn", "standard", "onecycle"),
                                                    ("seed-cnn-bn", "seed004", "plateau")])
def test_resume_equals_uninterrupted(tiny_folder, tmp_path, model, augment, schedule):
    kw = dict(model=model, augment=augment, schedule=schedule, val_split=0.25, seed=3, val_every=1)
    full = _train(tiny_folder, tmp_path, epochs=3, name="full", **kw)
    part = _train(tiny_folder, tmp_path, epochs=1, name="part", **kw) if schedule != "onecycle" else None
    if part is not None:  # stopped at an epoch boundary, resumed with more epochs
        resumed = imgclf.train(resume=part.run_dir, epochs=3, progress=False)
        assert resumed.run_dir == part.run_dir and resumed.epochs_done == 3
        a, b = _weights(full.run_dir), _weights(part.run_dir)
        assert all(torch.equal(a[k], b[k]) for k in a)

    # stopped mid-epoch by a callback, resumed: identical weights, history and best
    class StopAt(Callback):
        def on_step_end(self, trainer, epoch, step, loss):
            if (epoch, step) == (1, 1):
                trainer.request_stop()

    mid = _train(tiny_folder, tmp_path, epochs=3, name="mid", callbacks=[StopAt()], **kw)
    assert mid.status == "interrupted"
    ts = load_checkpoint(mid.run_dir / "last.safetensors").train_state
    assert (ts["epoch"], ts["step"]) == (1, 2)
    resumed = imgclf.train(resume=mid.run_dir, progress=False)
    a, b = _weights(full.run_dir), _weights(mid.run_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["val_loss"] for r in resumed.history] == [r["val_loss"] for r in full.history]
    assert resumed.best_epoch == full.best_epoch
    a, b = _weights(full.run_dir, "best"), _weights(mid.run_dir, "best")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sigint_saves_last_and_exits_cleanly(tiny_folder, tmp_path):
    class CtrlC(Callback):
        def on_step_end(self, trainer, epoch, step, loss):
            if step == 0:
                os.kill(os.getpid(), signal.SIGINT)  # the real signal path, handled after the step

    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN under `nohup ... &`
    r = _train(tiny_folder, tmp_path, epochs=2, callbacks=[CtrlC()])
    assert r.status == "interrupted"
    assert json.loads((r.run_dir / "run.json").read_text())["status"] == "interrupted"
    ts = load_checkpoint(r.run_dir / "last.safetensors").train_state
    assert (ts["epoch"], ts["step"]) == (0, 1)
    assert signal.getsignal(signal.SIGINT) is before  # handler restored


def test_early_stopping_restores_best(tiny_folder, tmp_path):
    r = _train(tiny_folder, tmp_path, epochs=40, monitor="val_acc", patience=2, val_split=0.25, lr=3e-3, val_every=1)
    assert r.status == "early-stopped" and r.epochs_done < 40
    accs = [row["val_acc"] for row in r.history]
    assert r.best_epoch == accs.index(max(accs)) + 1  # first epoch reaching the best score
    best = load_checkpoint(r.run_dir / "best.safetensors")
    assert best.meta["epoch"] == r.best_epoch
    assert r.test_metrics["weights"].startswith(f"best (epoch {r.best_epoch})")


def test_resume_refuses_changed_settings(tiny_run):
    with pytest.raises(ImgclfError, match="cannot change model"):
        imgclf.train(resume=tiny_run.run_dir, model="resnet18")
    with pytest.raises(ImgclfError, match="cannot resume"):
        imgclf.train(resume=tiny_run.run_dir / "nope")


def test_run_folders_are_never_reused(tiny_folder, tmp_path):
    a = _train(tiny_folder, tmp_path, epochs=1, name="same")
    b = _train(tiny_folder, tmp_path, epochs=1, name="same")
    assert a.run_dir.name == "same" and b.run_dir.name == "same-2"


def test_greyscale_folder_trains_greyscale_model(tmp_path):
    from conftest import make_image_folder
    data = make_image_folder(tmp_path / "grey", mode="L", n_train=6, n_test=2, size=28)
    r = _train(data, tmp_path, epochs=1)
    meta = load_checkpoint(r.run_dir).meta
    assert meta["preprocess"]["channels"] == 1 and meta["arch"]["in_channels"] == 1
    assert meta["preprocess"]["image_size"] == 28


def test_config_file_with_flag_override(tiny_folder, tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'data = "{tiny_folder}"\nepochs = 5\nbatch_size = 16\nmodel = "seed-cnn"\n')
    r = imgclf.train(cfg, epochs=1, project=str(tmp_path / "runs"), progress=False)
    assert r.epochs_done == 1
    assert "epochs = 1" in (r.run_dir / "config.toml").read_text()
    cfg.write_text("epoks = 5\n")
    with pytest.raises(ImgclfError, match="did you mean 'epochs'"):
        imgclf.train(cfg)


def test_fraction_is_stratified(tiny_folder, tmp_path):
    r = _train(tiny_folder, tmp_path, epochs=1, fraction=0.5)
    info = json.loads((r.run_dir / "run.json").read_text())
    assert any("50% of the training images (36)" in n for n in info["notes"])


@pytest.mark.realdata
def test_real_cifar10_seed_cnn_one_epoch(cifar_seed_run):
    """The seed CNN, 1 epoch on 10,000 real CIFAR-10 training images, scores >= 33 % on the full test set
    (chance: 10 %; an H100 scored 34.8 %)."""
    from conftest import CIFAR_JPEG
    r = cifar_seed_run
    assert r.test_metrics["n"] == 10_000
    assert r.test_metrics["top1"] >= 0.33, r.test_metrics

    # predict on the archive's own test JPEGs agrees with the evaluated accuracy, and the same images
    # blown up to 500x500 photos (then shrunk back by the stored preprocessing) keep their predictions
    import io
    import tarfile

    from PIL import Image
    clf = imgclf.load(r.run_dir)
    originals, photos, labels = [], [], []
    with tarfile.open(CIFAR_JPEG) as tf:
        for m in tf:
            parts = m.name.split("/")
            if m.isfile() and parts[0] == "test" and parts[-1] < "0020.jpg":
                data = tf.extractfile(m).read()
                originals.append(data)
                big = Image.open(io.BytesIO(data)).resize((500, 500), Image.BICUBIC)
                buf = io.BytesIO()
                big.save(buf, "JPEG", quality=92)
                photos.append(buf.getvalue())
                labels.append(parts[1])
    assert len(labels) == 200
    small = [p.label for p in clf.predict(originals)]
    large = [p.label for p in clf.predict(photos)]
    acc = sum(a == b for a, b in zip(small, labels)) / len(labels)
    assert abs(acc - r.test_metrics["top1"]) < 0.1, (acc, r.test_metrics["top1"])
    assert sum(a == b for a, b in zip(small, large)) / len(labels) >= 0.8


@pytest.mark.realdata
def test_real_mnist_trains_a_greyscale_model(tmp_path):
    from conftest import MNIST_PNG
    if not MNIST_PNG.is_file():
        pytest.skip(f"{MNIST_PNG} not present")
    # the default recipe (FastNet) on 10% of MNIST: 2 short epochs, no TTA to keep CI quick
    r = imgclf.train(data=str(MNIST_PNG), epochs=2, batch_size=250, fraction=0.1, tta="none",
                     project=str(tmp_path / "runs"), progress=False)
    meta = load_checkpoint(r.run_dir).meta
    assert meta["preprocess"]["channels"] == 1 and meta["preprocess"]["image_size"] == 28
    assert meta["classes"] == [str(i) for i in range(10)]
    assert meta["arch"]["name"] == "fastnet" and meta["arch"]["in_channels"] == 1
    assert r.test_metrics["n"] == 10_000 and r.test_metrics["top1"] >= 0.9, r.test_metrics


def _photo_folder(root, classes=("red", "green", "blue"), n_train=8, n_test=4, size=80):
    from conftest import make_image_folder
    return make_image_folder(root, n_train=n_train, n_test=n_test, size=size, classes=classes)


def test_photo_recipe_fine_tunes_pretrained_backbone(tmp_path, capsys):
    """A folder of 80px images gets the photo recipe by itself: ImageNet EfficientNet-Lite0, head-only
    first epoch on cached features, its normalisation stored; it learns the colours."""
    data = _photo_folder(tmp_path / "photos")
    from imgclf.models import efficientnet as E

    class Frozen(Callback):
        def on_epoch_end(self, trainer, row):
            if row["epoch"] == 1:  # the head-only epoch left the backbone exactly as loaded
                self.stem = trainer.model.stem.conv.weight.detach().clone()
            else:  # fine-tuning trained the weights, on the pretrained BatchNorm statistics
                self.tuned = trainer.model.stem.conv.weight.detach().clone()
                self.bn_mean = trainer.model.stem.bn.running_mean.detach().clone()
    cb = Frozen()
    r = _train(data, tmp_path, model=None, epochs=2, batch_size=8, callbacks=[cb])  # no model: the recipe picks
    out = capsys.readouterr().out
    assert "recipe photo" in out and "ImageNet-pretrained" in out and "cache  backbone features" in out
    meta = load_checkpoint(r.run_dir).meta
    assert meta["arch"]["name"] == "efficientnet-lite0" and meta["preprocess"]["image_size"] == 80
    assert tuple(meta["preprocess"]["mean"]) == E.IMAGENET_MEAN
    raw = torch.load(E.imagenet_weights_path(), map_location="cpu", weights_only=True)
    assert torch.equal(cb.stem.cpu(), raw["_conv_stem.weight"])
    assert not torch.equal(cb.tuned.cpu(), raw["_conv_stem.weight"])
    assert torch.equal(cb.bn_mean.cpu(), raw["_bn0.running_mean"]) and "BatchNorm keeps the pretrained" in out
    assert "recipe = \"photo\"" in (r.run_dir / "config.toml").read_text()
    assert r.test_metrics["top1"] >= 0.75
    assert r.best_epoch == 2 and "val skipped" in out  # validated after the last epoch only; its weights kept


def test_init_from_other_classes_keeps_backbone_new_head(tiny_run, tmp_path, capsys):
    data = _photo_folder(tmp_path / "two", classes=("red", "blue"), size=32)
    r = _train(data, tmp_path, model=None, init_from=str(tiny_run.run_dir), epochs=1)
    out = capsys.readouterr().out
    assert "backbone kept, new 2-class head" in out and "initialised from" in out
    meta = load_checkpoint(r.run_dir).meta
    assert meta["arch"]["name"] == "seed-cnn" and meta["classes"] == ["blue", "red"]
    assert meta["preprocess"]["mean"] == load_checkpoint(tiny_run.run_dir).meta["preprocess"]["mean"]
    with pytest.raises(ImgclfError, match="holds a seed-cnn, not a resnet18"):
        _train(data, tmp_path, init_from=str(tiny_run.run_dir), model="resnet18")


def test_imbalance_is_noted_and_weighted(tmp_path, capsys):
    from conftest import make_image_folder
    data = make_image_folder(tmp_path / "imb", n_train=4, n_test=2)
    for i in range(4, 20):  # make "red" five times as common
        (data / "train" / "red" / f"{i}.png").write_bytes((data / "train" / "red" / "0.png").read_bytes())
    seen = {}

    class Grab(Callback):
        def on_epoch_end(self, trainer, row):
            seen["w"], seen["s"] = trainer.batches.loss_weight, trainer.batches.sample_weight
    r = _train(data, tmp_path, epochs=1, class_weights="auto", balanced_sampling=True, callbacks=[Grab()])
    out = capsys.readouterr().out
    assert "class imbalance: 'red' has 20 training images" in out
    classes = load_checkpoint(r.run_dir).meta["classes"]
    w = dict(zip(classes, seen["w"].tolist()))
    assert w["red"] == pytest.approx(28 / (3 * 20)) and w["blue"] == pytest.approx(28 / (3 * 4))
    assert seen["s"].shape == (28,)


def test_resume_inside_head_only_phase_equals_uninterrupted(tiny_folder, tmp_path):
    kw = {"model": "efficientnet-lite0", "pretrained": "imagenet", "freeze_epochs": 1, "augment": "photo",
          "schedule": "onecycle", "optimizer": "adamw", "val_split": 0.25, "epochs": 2}
    full = _train(tiny_folder, tmp_path, name="full", **kw)

    class StopAt(Callback):
        def on_step_end(self, trainer, epoch, step, loss):
            if (epoch, step) == (0, 1):
                trainer.request_stop()
    mid = _train(tiny_folder, tmp_path, name="mid", callbacks=[StopAt()], **kw)
    assert mid.status == "interrupted"
    imgclf.train(resume=mid.run_dir, progress=False)
    a, b = _weights(full.run_dir), _weights(mid.run_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)
