"""shards.py: fixed-size shards written in a stream, read back (mapped, or with plain reads) in any order."""
from __future__ import annotations

import numpy as np
import pytest

from imgclf.data.shards import ImageRows, ShardWriter, open_shards
from imgclf.data.tensors import chunks


@pytest.fixture
def stored(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (1000, 5, 5, 3), dtype=np.uint8)
    writer = ShardWriter(tmp_path, (5, 5, 3), shard_bytes=75 * 300)  # 300 images a shard
    positions = np.concatenate([[writer.append(x[0])], writer.extend(x[1:])])
    records = writer.close()
    assert (positions == np.arange(1000)).all() and [r["n"] for r in records] == [300, 300, 300, 100]
    return x, open_shards(tmp_path, records, (5, 5, 3))


@pytest.mark.parametrize("how", ["all", "permuted", "runs", "few", "repeats", "mask", "negative"])
def test_any_gather_gives_the_images_in_that_order(stored, how):
    x, rows = stored
    rng = np.random.default_rng(1)
    idx = {"all": np.arange(1000), "permuted": rng.permutation(1000), "runs": np.r_[5:300, 700:999, 3],
           "few": np.array([999, 0, 301]), "repeats": np.array([7, 7, 650, 7]),
           "mask": rng.random(1000) < 0.3, "negative": np.array([-1, -1000])}[how]
    assert rows.mapped and (rows[idx] == x[idx]).all()


def test_lazy_subsets_compose_and_index_like_arrays(stored):
    x, rows = stored
    pick = np.random.default_rng(2).permutation(1000)[:500]
    sub = rows.select(pick).select(slice(10, 200, 3))
    expect = x[pick][10:200:3]
    assert sub.shape == expect.shape and sub.nbytes == expect.nbytes
    assert (np.asarray(sub) == expect).all() and (sub[4] == expect[4]).all()
    assert (sub[:, 1, 2, 0] == expect[:, 1, 2, 0]).all() and (sub[..., 0] == expect[..., 0]).all()
    assert sum(len(part) for _, part in chunks(sub, 16)) == len(expect)
    with pytest.raises(IndexError):
        sub[len(expect)]


def test_in_memory_writer_and_discard(tmp_path):
    x = np.arange(4 * 2 * 2 * 1, dtype=np.uint8).reshape(4, 2, 2, 1)
    memory = ShardWriter(None, (2, 2, 1), shard_bytes=8)
    memory.extend(x)
    memory.close()
    assert not memory.rows().mapped and (np.asarray(memory.rows()) == x).all()
    disk = ShardWriter(tmp_path, (2, 2, 1), shard_bytes=8, name="tmp")
    disk.extend(x)
    disk.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tmp-00000.npy", "tmp-00001.npy"]
    disk.discard()
    assert not list(tmp_path.iterdir())
    assert (np.asarray(ImageRows.from_array(x)[[3, 0]]) == x[[3, 0]]).all()
