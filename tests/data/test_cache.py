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


@pytest.mark.parametrize("damage", ["truncate", "delete", "bad-json", "wrong-shape", "changed", "labels"])
def test_damaged_entry_is_rebuilt(fresh_home, image_tree, count_decodes, capsys, damage):
    root = image_tree(SPEC)
    first = np.asarray(load(root).train.x)  # read now: the damage below rewrites the mapped file in place
    (entry,) = (fresh_home / "cache").iterdir()
    target = entry / "images-00000.npy"
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:100])
    elif damage == "delete":
        target.unlink()
    elif damage == "bad-json":
        (entry / "meta.json").write_text("{not json")
    elif damage == "wrong-shape":
        np.save(target, np.zeros((6, 2, 2, 3), np.uint8))
    elif damage == "changed":  # same size, other pixels: only the hash tells
        data = bytearray(target.read_bytes())
        data[-1] ^= 0xFF
        target.write_bytes(bytes(data))
    else:
        np.save(entry / "train_y.npy", np.full(6, 7, np.int64))  # labels beyond the classes
    again = load(root)
    assert count_decodes["n"] == 2 and "damaged" in capsys.readouterr().err
    assert (np.asarray(again.train.x) == first).all()
    assert (entry / "meta.json").is_file()
    load(root)
    assert count_decodes["n"] == 2  # the rebuilt entry is used


def test_images_are_memory_mapped_from_fixed_size_shards(fresh_home, image_tree, monkeypatch):
    from imgclf.data import shards

    monkeypatch.setattr(shards, "SHARD_BYTES", 3 * 8 * 8 * 3)  # 3 images a shard
    monkeypatch.setattr(shards.ShardWriter.__init__, "__defaults__", (shards.SHARD_BYTES, "images"))
    ds = load(image_tree(SPEC))
    (entry,) = (fresh_home / "cache").iterdir()
    meta = json.loads((entry / "meta.json").read_text())
    assert [s["n"] for s in meta["shards"]] == [3, 3, 2] and all(len(s["sha256"]) == 64 for s in meta["shards"])
    assert ds.train.x.mapped and ds.train.x.shape == (6, 8, 8, 3)
    # gathers across shards in any order give the images in that order
    x = np.asarray(ds.train.x)
    idx = np.array([5, 0, 3, 3, 1])
    assert (ds.train.x[idx] == x[idx]).all() and (ds.train.x.select(idx)[1:3] == x[idx[1:3]]).all()
    assert (ds.train.x[ds.train.y == 1] == x[ds.train.y == 1]).all() and (ds.train.x[-1] == x[5]).all()


def test_entry_without_meta_is_not_trusted(fresh_home, image_tree, count_decodes):
    root = image_tree(SPEC)
    load(root)
    (entry,) = (fresh_home / "cache").iterdir()
    (entry / "meta.json").unlink()  # as if the write had crashed before its last step
    load(root)
    assert count_decodes["n"] == 2


@pytest.mark.parametrize("where", ["shard", "meta"])
def test_full_disk_leaves_no_entry_and_decodes_into_memory(fresh_home, image_tree, monkeypatch, capsys, where):
    from imgclf.data import shards

    root = image_tree(SPEC)

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    if where == "shard":  # the first shard's bytes are written, then the disk is full
        monkeypatch.setattr(shards.os, "fsync", full)
    else:
        monkeypatch.setattr(cache.Path, "write_text", full)  # meta.json, the entry's last file
    ds = load(root)
    assert len(ds.train.y) == 6 and not ds.train.x.mapped
    assert "could not write the dataset cache" in capsys.readouterr().err
    assert not list((fresh_home / "cache").iterdir())  # no partial entry or temporary folder left behind
    monkeypatch.undo()
    again = load(root)  # with room on the disk, the next run writes the entry
    assert again.train.x.mapped and (np.asarray(again.train.x) == np.asarray(ds.train.x)).all()
