"""webdataset.py: `imgclf shards` writes WebDataset-style shards that --data reads back as the folder they came from."""
from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest

from imgclf.data import load_dataset
from imgclf.data.webdataset import expand_braces, write_shards
from imgclf.errors import ImgclfError

from support import run_cli


def load(data, **kw):
    return load_dataset(str(data), progress=False, **kw)


def same_data(a, b, *, in_order: bool = True) -> None:
    assert a.classes == b.classes and a.image_size == b.image_size and a.channels == b.channels
    for split in ("train", "val", "test"):
        pa, pb = getattr(a, split), getattr(b, split)
        assert (pa is None) == (pb is None)
        if pa is not None:
            xa, xb = np.asarray(pa.x), np.asarray(pb.x)
            if not in_order:  # the same (image, label) pairs
                key = [lambda i, x=x, y=y: (x[i].tobytes(), y[i]) for x, y in ((xa, pa.y), (xb, pb.y))]
                ia, ib = (sorted(range(len(x)), key=k) for x, k in zip((xa, xb), key))
                xa, xb, ya, yb = xa[ia], xb[ib], pa.y[ia], pb.y[ib]
            else:
                ya, yb = pa.y, pb.y
            assert (ya == yb).all() and (xa == xb).all()


def test_shards_read_back_as_the_folder(image_tree, tmp_path):
    root = image_tree({"train/cat": 5, "train/dog": 4, "train/10": 2, "train/2": 2, "val/cat": 1, "val/dog": 1,
                       "test/cat": 2, "test/dog": 1}, size=(9, 9))
    info = write_shards(root, tmp_path / "shards", per_shard=4)
    assert info["train"] == 13 and info["val"] == 2 and info["test"] == 3 and info["shards"] == 4 + 1 + 1
    names = sorted(p.name for p in (tmp_path / "shards").iterdir())
    assert names[:2] == ["classes.txt", "test-000000.tar"] and "train-000003.tar" in names
    # the webdataset convention: key.ext + key.cls, the image's own bytes
    with tarfile.open(tmp_path / "shards" / "train-000000.tar") as tar:
        members = tar.getnames()
        assert members[:3] == ["00000000.png", "00000000.cls", "00000000.json"]
        assert tar.extractfile("00000000.cls").read() == b"0"  # class "2" comes first in natural order
    folder = load(root)
    same_data(load(tmp_path / "shards"), folder)
    assert folder.classes == ["2", "10", "cat", "dog"]
    pattern = load(str(tmp_path / "shards" / "{train-{000000..000003},test-000000}.tar"))
    assert len(pattern.train.y) == 13 and pattern.val is None and (pattern.test.y == folder.test.y).all()


def test_shards_of_an_archive_and_of_a_class_only_folder(image_tree, tmp_path):
    root = image_tree({"a": 12, "b": 13}, size=(8, 8), mode="L")
    tar_path = tmp_path / "src.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tar:
        tar.add(root, arcname="data")
    write_shards(tar_path, tmp_path / "s", per_shard=10)
    assert sorted(p.name for p in (tmp_path / "s").glob("*.tar")) == ["all-000000.tar", "all-000001.tar",
                                                                      "all-000002.tar"]
    # written as the archive stores them, read back in the folder's order (each sample records its path)
    same_data(load(tmp_path / "s"), load(root))
    same_data(load(tmp_path / "s", val_split=0.25, seed=3), load(root, val_split=0.25, seed=3))


def test_shards_cli_and_training(tiny_folder, tmp_path, capsys):
    code, out, _ = run_cli(capsys, "shards", str(tiny_folder), str(tmp_path / "shards"), "--per-shard", "20")
    assert code == 0 and "wrote" in out and "--data" in out
    import imgclf

    a = imgclf.train(data=str(tiny_folder), model="seed-cnn", epochs=1, batch_size=16, seed=2, progress=False,
                     project=str(tmp_path / "runs"), name="folder")
    b = imgclf.train(data=str(tmp_path / "shards"), model="seed-cnn", epochs=1, batch_size=16, seed=2,
                     progress=False, project=str(tmp_path / "runs"), name="shards")
    assert a.test_metrics["top1"] == b.test_metrics["top1"] and a.history[-1]["val_loss"] == b.history[-1]["val_loss"]


def test_bad_shards_are_clear_errors(tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    with tarfile.open(folder / "train-000000.tar", "w") as tar:
        for name, data in (("0001.png", _png()), ("0002.png", _png())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ImgclfError, match="sample 0001 has an image but no 0001.cls"):
        load(folder)
    with pytest.raises(ImgclfError, match="shards are missing"):
        load(str(folder / "train-{000000..000001}.tar"))
    (folder / "notes.tar").write_bytes(b"")
    with pytest.raises(ImgclfError, match="must start with its split"):
        load(folder)
    with pytest.raises(ImgclfError, match="already holds shards"):
        write_shards(folder, folder)


def test_expand_braces():
    assert expand_braces("s/train-{008..011}.tar") == [f"s/train-{i:03d}.tar" for i in (8, 9, 10, 11)]
    assert expand_braces("{a,b}-{0..1}.tar") == ["a-0.tar", "a-1.tar", "b-0.tar", "b-1.tar"]


def _png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, "PNG")
    return buf.getvalue()
