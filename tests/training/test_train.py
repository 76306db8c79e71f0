"""train() end to end: synthetic folders, a config file, the fast and photo recipes, real CIFAR-10 and MNIST."""
import json

import pytest
import torch

import imgclf
from imgclf.checkpoint import load_checkpoint
from imgclf.errors import ImgclfError
from imgclf.training.callbacks import Callback

from support import CIFAR_JPEG, MNIST_PNG, train_run
from synthetic import colour_folder


def test_tiny_run_learns(tiny_run):
    assert tiny_run.status == "finished"
    assert tiny_run.test_metrics["top1"] >= 0.9  # colour classes are easy


def test_config_file_with_flag_override(tiny_folder, tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'data = "{tiny_folder}"\nepochs = 5\nbatch_size = 16\nmodel = "seed-cnn"\n')
    r = imgclf.train(cfg, epochs=1, project=str(tmp_path / "runs"), progress=False)
    assert r.epochs_done == 1
    assert "epochs = 1" in (r.run_dir / "config.toml").read_text()
    cfg.write_text("epoks = 5\n")
    with pytest.raises(ImgclfError, match="did you mean 'epochs'"):
        imgclf.train(cfg)


@pytest.mark.realdata
def test_real_cifar10_seed_cnn_one_epoch(cifar_seed_run):
    """The seed CNN, 1 epoch on 10,000 real CIFAR-10 training images, scores >= 33 % on the full test set
    (chance: 10 %; an H100 scored 34.8 %)."""
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


def test_photo_recipe_fine_tunes_pretrained_backbone(tmp_path, capsys):
    """A folder of 80px images gets the photo recipe by itself: ImageNet EfficientNet-Lite0, head-only
    first epoch on cached features, then fine-tuning with the stem and first 4 blocks kept as loaded, its
    normalisation stored; it learns the colours."""
    data = colour_folder(tmp_path / "photos", n_train=8, n_test=4, size=80)
    from imgclf.models import efficientnet as E

    class Frozen(Callback):
        def on_epoch_end(self, trainer, row):
            if row["epoch"] == 1:  # the head-only epoch left the backbone exactly as loaded
                self.stem = trainer.model.stem.conv.weight.detach().clone()
            else:  # fine-tuning trained the later weights, on the pretrained BatchNorm statistics
                self.kept = trainer.model.stem.conv.weight.detach().clone()
                self.tuned = trainer.model.conv_head.conv.weight.detach().clone()
                self.bn_mean = trainer.model.stem.bn.running_mean.detach().clone()
    cb = Frozen()
    r = train_run(data, tmp_path, model=None, epochs=2, batch_size=8, callbacks=[cb])  # no model: the recipe picks
    out = capsys.readouterr().out
    assert "recipe photo" in out and "ImageNet-pretrained" in out and "cache  backbone features" in out
    meta = load_checkpoint(r.run_dir).meta
    assert meta["arch"]["name"] == "efficientnet-lite0" and meta["preprocess"]["image_size"] == 80
    assert tuple(meta["preprocess"]["mean"]) == E.IMAGENET_MEAN
    raw = torch.load(E.imagenet_weights_path(), map_location="cpu", weights_only=True)
    assert torch.equal(cb.stem.cpu(), raw["_conv_stem.weight"])
    assert torch.equal(cb.kept.cpu(), raw["_conv_stem.weight"]) and "first 4 blocks keep" in out  # --freeze-blocks 5
    assert not torch.equal(cb.tuned.cpu(), raw["_conv_head.weight"])
    assert torch.equal(cb.bn_mean.cpu(), raw["_bn0.running_mean"]) and "BatchNorm keeps the pretrained" in out
    assert "recipe = \"photo\"" in (r.run_dir / "config.toml").read_text()
    assert r.test_metrics["top1"] >= 0.75
    assert r.best_epoch == 2 and "val skipped" in out  # validated after the last epoch only; its weights kept
    assert r.test_metrics["weights"] == "last (epoch 2)"
    # the plan, timed here, before the first epoch; the time taken checked against it at the end
    lines = out.splitlines()
    plan = next(i for i, line in enumerate(lines) if line.startswith("plan   efficientnet-lite0, 1 head-only epoch"))
    assert plan < next(i for i, line in enumerate(lines) if line.startswith("epoch "))
    assert "1 fine-tuning (80px x1), stem + 4 blocks frozen, tested at 80px: about" in lines[plan]
    timing = json.loads((r.run_dir / "run.json").read_text())["plan"]
    assert timing["planned_seconds"] > 0 and timing["seconds"] > 0 and "the plan said" in out


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
