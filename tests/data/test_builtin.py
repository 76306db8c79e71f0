"""CIFAR-100 (fine/coarse), MNIST and Fashion-MNIST as built-ins: official formats, served from 127.0.0.1."""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import pickle
import struct
import tarfile

import numpy as np
import pytest

from imgclf.cli import main
from imgclf.data import BUILTINS, RemoteFile, list_datasets, load_dataset
from imgclf.data.idx import read_idx
from imgclf.errors import ImgclfError

from support import serve_folder


@pytest.fixture
def serve(tmp_path):
    """Serve tmp_path/'www' on 127.0.0.1; returns (folder, base url, list of requested paths)."""
    www = tmp_path / "www"
    www.mkdir()
    with serve_folder(www) as httpd:
        yield www, httpd.url + "/", httpd.requests


def _md5(path):
    return "md5:" + hashlib.md5(path.read_bytes()).hexdigest()


def _point_at(monkeypatch, name, www, base):
    entry = BUILTINS[name]
    files = tuple(RemoteFile(base + f.filename, f.filename, _md5(www / f.filename)) for f in entry.files)
    monkeypatch.setitem(BUILTINS, name, dataclasses.replace(entry, files=files))


def write_idx(path, array):
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def write_idx_set(folder, n_train=6, n_test=4):
    rng = np.random.default_rng(1)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        x[0, 3, 5] = 7
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", x)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)


@pytest.mark.parametrize("name, first_class", [("mnist", "0"), ("fashion-mnist", "T-shirt/top")])
def test_idx_builtins_download_and_parse(fresh_home, serve, monkeypatch, name, first_class):
    www, base, requests = serve
    write_idx_set(www)
    _point_at(monkeypatch, name, www, base)
    ds = load_dataset(name, progress=False)
    assert ds.channels == 1 and ds.image_size == 28 and ds.classes[0] == first_class and len(ds.classes) == 10
    assert ds.train.x.shape == (6, 28, 28, 1) and ds.test.x.shape == (4, 28, 28, 1)
    assert ds.train.x[0, 3, 5, 0] == 7 and ds.train.y.tolist() == [0, 1, 2, 3, 4, 5]
    assert len(requests) == 4 and (fresh_home / "datasets" / name / "t10k-labels-idx1-ubyte.gz").is_file()
    load_dataset(name, progress=False)
    assert len(requests) == 4  # stored files are reused
    rgb = load_dataset(name, channels=3, image_size=32, progress=False)
    assert rgb.train.x.shape == (6, 32, 32, 3)


def test_idx_corrupt_download_is_refused(fresh_home, serve, monkeypatch):
    www, base, _ = serve
    write_idx_set(www)
    _point_at(monkeypatch, "mnist", www, base)
    (www / "t10k-images-idx3-ubyte.gz").write_bytes(b"changed upstream")
    with pytest.raises(ImgclfError, match="checksum mismatch"):
        load_dataset("mnist", progress=False)
    assert not (fresh_home / "datasets" / "mnist" / "t10k-images-idx3-ubyte.gz").exists()


def test_idx_header_checks(tmp_path):
    bad = tmp_path / "x.gz"
    bad.write_bytes(gzip.compress(b"\x00\x00\x0d\x01" + struct.pack(">I", 2) + b"\x00" * 8))
    with pytest.raises(ImgclfError, match="uint8"):
        read_idx(bad)
    short = tmp_path / "y.gz"
    short.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + struct.pack(">I", 5) + b"\x00" * 2))
    with pytest.raises(ImgclfError, match="header says"):
        read_idx(short)


def write_cifar100(root, n=5):
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(2)
    for split in ("train", "test"):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        data[0, 0] = 201
        with open(folder / split, "wb") as f:
            pickle.dump({b"data": data, b"fine_labels": [99 - i for i in range(n)],
                         b"coarse_labels": [19 - i for i in range(n)]}, f, protocol=2)
    with open(folder / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"f{i}".encode() for i in range(100)],
                     b"coarse_label_names": [f"c{i}".encode() for i in range(20)]}, f, protocol=2)
    return folder


def test_cifar100_fine_and_coarse_share_one_download(fresh_home, serve, monkeypatch):
    www, base, requests = serve
    folder = write_cifar100(www / "src")
    with tarfile.open(www / "cifar-100-python.tar.gz", "w:gz") as tar:
        tar.add(folder, arcname="cifar-100-python")
    _point_at(monkeypatch, "cifar100", www, base)
    _point_at(monkeypatch, "cifar100-coarse", www, base)
    fine = load_dataset("cifar100", progress=False)
    coarse = load_dataset("cifar100-coarse", progress=False)
    assert len(requests) == 1
    assert len(fine.classes) == 100 and fine.train.y.tolist() == [99, 98, 97, 96, 95]
    assert len(coarse.classes) == 20 and coarse.train.y.tolist() == [19, 18, 17, 16, 15]
    assert fine.train.x[0, 0, 0, 0] == 201 and fine.test.x.shape == (5, 32, 32, 3)


def test_official_folders_are_detected(fresh_home, tmp_path):
    c100 = write_cifar100(tmp_path / "a")
    assert len(load_dataset(str(c100), progress=False).classes) == 100
    idx = tmp_path / "idx"
    idx.mkdir()
    write_idx_set(idx)
    ds = load_dataset(str(idx), progress=False)
    assert ds.channels == 1 and ds.classes == [str(i) for i in range(10)]


def test_imgclf_datasets_lists_builtins(fresh_home, capsys):
    rows = list_datasets()
    assert {r["name"] for r in rows} == {"cifar10", "cifar100", "cifar100-coarse", "mnist", "fashion-mnist"}
    assert not any(r["downloaded"] for r in rows)
    try:
        main(["datasets"])
    except SystemExit as e:
        assert not e.code
    out = capsys.readouterr().out
    assert "fashion-mnist" in out and str(fresh_home / "datasets") in out
