"""cache.py: decoded arrays are reused, invalidated when the source changes, and rebuilt when damaged."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from imgclf.data import cache, folder, load_dataset

from synthetic import write_image

SPEC = {"train/a": 3, "train/b": 3, "test/a": 1, "test/b": 1}


@pytest.fixture
def count_decodes(monkeypatch):
    """Counts calls to the image-folder decoder; ``forbid()`` makes any further call fail."""
    calls = {"n": 0, "allowed": True}
    real = folder.load_folder

    def counting(*args, **kwargs):
        assert calls["allowed"], "decoded again although the cache should have answered"
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr("imgclf.data.dataset.load_folder", counting)
    calls["forbid"] = lambda: calls.update(allowed=False)
    return calls


def load(path, **kw):
    return load_dataset(str(path), progress=False, **kw)


def test_second_load_comes_from_the_cache(fresh_home, image_tree, count_decodes):
    root = image_tree(SPEC)
    first = load(root)
    count_decodes["forbid"]()
    second = load(root, val_split=0.34, seed=5)  # splitting happens after the cache: no new decode
    assert count_decodes["n"] == 1
    assert len(second.train.y) + len(second.val.y) == len(first.train.y)
    entries = list((fresh_home / "cache").iterdir())
    assert len(entries) == 1 and (entries[0] / "meta.json").is_file()
    meta = json.loads((entries[0] / "meta.json").read_text())
    assert meta["classes"] == ["a", "b"] and meta["splits"] == {"train": 6, "test": 2}


def test_options_that_change_pixels_get_their_own_entry(fresh_home, image_tree, count_decodes):
    root = image_tree(SPEC)
    load(root)
    load(root, image_size=4)
    load(root, skip_bad_images=True)
    assert count_decodes["n"] == 3 and len(list((fresh_home / "cache").iterdir())) == 3


def test_changed_source_is_decoded_again(fresh_home, image_tree, count_decodes):
    root = image_tree(SPEC)
    load(root)
    path = root / "train" / "a" / "0.png"
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched: mtime differs
    load(root)
    write_image(root / "train" / "b" / "new.png", value=1)         # a file added
    ds = load(root)
    assert count_decodes["n"] == 3 and len(ds.train.y) == 7


def test_changed_archive_is_decoded_again(fresh_home, image_tree, tmp_path, count_decodes):
    import tarfile

    root = image_tree(SPEC)
    dest = tmp_path / "d.tar"
    with tarfile.open(dest, "w") as tar:
        tar.add(root, arcname=".")
    load(dest)
    load(dest)
    assert count_decodes["n"] == 1
    with tarfile.open(dest, "a") as tar:
        tar.add(root / "train" / "a" / "0.png", arcname="train/a/extra.png")  # size changes
    assert len(load(dest).train.y) == 7 and count_decodes["n"] == 2


@pytest.mark.parametrize("damage", ["truncate", "delete", "bad-json", "wrong-shape"])
def test_damaged_entry_is_rebuilt(fresh_home, image_tree, count_decodes, capsys, damage):
    root = image_tree(SPEC)
    first = load(root)
    (entry,) = (fresh_home / "cache").iterdir()
    target = entry / "train_x.npy"
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:100])
    elif damage == "delete":
        target.unlink()
    elif damage == "bad-json":
        (entry / "meta.json").write_text("{not json")
    else:
        np.save(target, np.zeros((6, 2, 2, 3), np.uint8))
    again = load(root)
    assert count_decodes["n"] == 2 and "damaged" in capsys.readouterr().err
    assert (again.train.x == first.train.x).all()
    assert (entry / "meta.json").is_file()
    load(root)
    assert count_decodes["n"] == 2  # the rebuilt entry is used


def test_entry_without_meta_is_not_trusted(fresh_home, image_tree, count_decodes):
    root = image_tree(SPEC)
    load(root)
    (entry,) = (fresh_home / "cache").iterdir()
    (entry / "meta.json").unlink()  # as if the write had crashed before its last step
    load(root)
    assert count_decodes["n"] == 2


def test_unwritable_cache_only_warns(fresh_home, image_tree, monkeypatch, capsys):
    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache.np, "save", fail)
    ds = load(image_tree(SPEC))
    assert len(ds.train.y) == 6 and "could not write the dataset cache" in capsys.readouterr().err
    assert not [p for p in (fresh_home / "cache").iterdir()]  # no temporary folder left behind
