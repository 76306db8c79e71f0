"""batches.py: the streamed source gives the in-memory source's numbers, reads ahead, and resumes exactly."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import imgclf
from imgclf.checkpoint import load_checkpoint
from imgclf.training import setup as training_setup

from support import StopAt, train_run, weights

# FastNet with the fast recipe's augmentation (alternating flips, translation) and progressive resizing:
# every way a batch is made, on both sources
FAST = dict(model="fastnet-xs", recipe="fast", epochs=3, batch_size=16, val_split=0.25, seed=5, tta="flip",
            val_every=1)


def notes(result) -> list[str]:
    return json.loads((result.run_dir / "run.json").read_text())["notes"]


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_streamed_training_gives_the_in_memory_numbers(tiny_folder, tmp_path):
    memory = train_run(tiny_folder, tmp_path, name="memory", data_in_memory="yes", **FAST)
    streamed = train_run(tiny_folder, tmp_path, name="streamed", data_in_memory="no", **FAST)
    assert same(weights(memory.run_dir), weights(streamed.run_dir))
    assert [r["val_loss"] for r in memory.history] == [r["val_loss"] for r in streamed.history]
    assert memory.test_metrics["top1"] == streamed.test_metrics["top1"]
    assert memory.test_metrics["tta"]["top1"] == streamed.test_metrics["tta"]["top1"]


def test_streamed_run_resumes_mid_epoch_exactly(tiny_folder, tmp_path):
    kw = dict(FAST, data_in_memory="no")
    full = train_run(tiny_folder, tmp_path, name="full", **kw)
    mid = train_run(tiny_folder, tmp_path, name="mid", callbacks=[StopAt(1, 1)], **kw)
    assert mid.status == "interrupted"
    assert load_checkpoint(mid.run_dir / "last.safetensors").train_state["step"] == 2
    imgclf.train(resume=mid.run_dir, progress=False)
    assert same(weights(full.run_dir), weights(mid.run_dir))


def test_auto_streams_when_the_data_would_take_over_half_the_memory(tiny_folder, tmp_path, monkeypatch):
    decoded = imgclf.load_dataset(str(tiny_folder), progress=False)
    size = sum(p.x.nbytes for p in (decoded.train, decoded.test))
    monkeypatch.setattr(training_setup, "available_memory", lambda: int(1.9 * size))
    streamed = train_run(tiny_folder, tmp_path, name="low", epochs=1)
    assert any(n.startswith("data: streamed from the cache") and "--data-in-memory" in n for n in notes(streamed))
    monkeypatch.setattr(training_setup, "available_memory", lambda: int(2.1 * size))
    memory = train_run(tiny_folder, tmp_path, name="high", epochs=1)
    assert any(n.startswith("data: in memory") for n in notes(memory))
    assert same(weights(streamed.run_dir), weights(memory.run_dir))


def test_a_batch_not_read_ahead_is_read_on_demand(tiny_folder):
    from imgclf.config import TrainConfig
    from imgclf.data.tensors import Normalizer
    from imgclf.training.batches import StreamedBatches

    ds = imgclf.load_dataset(str(tiny_folder), progress=False)
    rows, y = ds.train.x, torch.from_numpy(ds.train.y)
    src = StreamedBatches(rows, y, Normalizer((0.5,) * 3, (0.25,) * 3), lambda x, g: x, torch.channels_last,
                          cfg=TrainConfig(batch_size=8), image_size=32, alternating_flip=False, num_classes=4,
                          device=torch.device("cpu"))
    perm = src.order(torch.Generator().manual_seed(0))
    src.prefetch(perm, 0, 8, lambda idx: idx)
    first = src.raw(perm[:8])
    assert torch.equal(first, torch.from_numpy(np.asarray(rows)[perm[:8].numpy()]).permute(0, 3, 1, 2))
    # in order: the batches read ahead; then an unexpected one: read there and then, same images
    g = torch.Generator()
    a = src.images(perm[:8], 0, g, 32)
    b = src.images(perm[16:24], 0, g, 32)
    norm = Normalizer((0.5,) * 3, (0.25,) * 3)
    assert torch.equal(a, norm(first))
    assert torch.equal(b, norm(src.raw(perm[16:24])))
    src.close()
    assert src._thread is None


@pytest.mark.parametrize("mode", ["maybe", "2"])
def test_data_in_memory_takes_yes_no_auto(mode):
    from imgclf.config import TrainConfig
    from imgclf.errors import ImgclfError

    with pytest.raises(ImgclfError, match="data_in_memory must be one of auto, yes, no"):
        TrainConfig(data_in_memory=mode)


def test_photo_crops_come_from_images_stored_larger(tmp_path):
    """With the photo augmentation, training crops are cut from the training images decoded PHOTO_MARGIN
    larger (40 px for a 32 px model), lined up with the 32 px ones; evaluation sees 32 px, as predict does."""
    from synthetic import colour_folder

    folder = colour_folder(tmp_path / "photos", n_train=12, n_test=4, size=48)
    kw = dict(model="fastnet-xs", augment="photo", image_size=32, epochs=1, batch_size=8, seed=1, tta="none")
    run = train_run(folder, tmp_path, name="margin", **kw)
    assert any(n.startswith("photos: training crops are taken from the images stored at 40px") for n in notes(run))
    small = imgclf.load_dataset(str(folder), image_size=32, progress=False)
    big = imgclf.load_dataset(str(folder), image_size=40, progress=False)
    assert (small.train.y == big.train.y).all() and big.train.x.shape[1:] == (40, 40, 3)
    # the same images: the 40 px one shrunk to 32 px is close to the 32 px one
    a = torch.from_numpy(np.asarray(big.train.x)).permute(0, 3, 1, 2).float()
    b = torch.from_numpy(np.asarray(small.train.x)).permute(0, 3, 1, 2).float()
    shrunk = torch.nn.functional.interpolate(a, size=(32, 32), mode="bilinear", antialias=True)
    assert (shrunk - b).abs().mean() < 4
    streamed = train_run(folder, tmp_path, name="margin-streamed", data_in_memory="no", **kw)
    assert same(weights(run.run_dir), weights(streamed.run_dir))
    # photos no larger than the margin: nothing stored twice
    plain = train_run(colour_folder(tmp_path / "small", n_train=12, n_test=4, size=36), tmp_path, name="plain", **kw)
    assert not any(n.startswith("photos:") for n in notes(plain))


def test_random_resized_crop_comes_out_at_the_asked_size():
    from imgclf.training.augment import build_augment, random_resized_crop

    x = torch.rand(3, 3, 40, 40)
    assert random_resized_crop(x, torch.Generator().manual_seed(0), size=32).shape == (3, 3, 32, 32)
    assert build_augment("photo", 32)(x, torch.Generator()).shape == (3, 3, 32, 32)
    # at the input's own size, the crop is what it always was
    same_size = random_resized_crop(x[..., :32, :32], torch.Generator().manual_seed(0))
    assert torch.equal(same_size, random_resized_crop(x[..., :32, :32], torch.Generator().manual_seed(0), size=32))
