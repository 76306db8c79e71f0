"""Built-in CIFAR-10: download from a local HTTP server, checksum, caching, parsing, restricted unpickling."""
from __future__ import annotations

import dataclasses
import hashlib
import os
import pickle
import tarfile

import numpy as np
import pytest

from imgclf.data import BUILTINS, RemoteFile, load_dataset
from imgclf.data.cifar import restricted_loads
from imgclf.errors import ImgclfError

from support import serve_folder

LABEL_NAMES = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]


PER_BATCH = 4


def write_cifar_folder(root):
    """A tiny cifar-10-batches-py/ laid out and pickled like the official one (protocol 2, bytes keys)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, name in enumerate([*(f"data_batch_{k}" for k in range(1, 6)), "test_batch"]):
        data = rng.integers(0, 256, (PER_BATCH, 3072), dtype=np.uint8)
        labels = [(i + j) % 10 for j in range(PER_BATCH)]
        if name == "data_batch_1":
            data[0, 0], data[0, 1024], data[0, 2048] = 11, 22, 33     # pixel (0, 0) = RGB (11, 22, 33)
            data[0, 1024 + 32 * 1 + 2] = 99                            # green at row 1, column 2
        with open(folder / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"data": data, b"labels": labels}, f, protocol=2)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": LABEL_NAMES, b"num_cases_per_batch": PER_BATCH, b"num_vis": 3072}, f,
                    protocol=2)
    (folder / "readme.html").write_text("<html></html>")
    return folder


@pytest.fixture
def cifar_archive(tmp_path):
    folder = write_cifar_folder(tmp_path / "src")
    dest = tmp_path / "serve" / "cifar-10-python.tar.gz"
    dest.parent.mkdir()
    with tarfile.open(dest, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    return dest


@pytest.fixture
def server(cifar_archive):
    """Serves cifar_archive's folder on 127.0.0.1; .requests counts GETs."""
    with serve_folder(cifar_archive.parent) as httpd:
        yield httpd


def point_cifar10_at(monkeypatch, url, checksum):
    files = (RemoteFile(url, "cifar-10-python.tar.gz", checksum),)
    monkeypatch.setitem(BUILTINS, "cifar10", dataclasses.replace(BUILTINS["cifar10"], files=files))


def digest(path, algo):
    return f"{algo}:{hashlib.new(algo, path.read_bytes()).hexdigest()}"


def check_parsed(ds):
    assert ds.classes == [n.decode() for n in LABEL_NAMES]
    assert ds.train.x.shape == (5 * PER_BATCH, 32, 32, 3) and ds.test.x.shape == (PER_BATCH, 32, 32, 3)
    assert ds.channels == 3 and ds.image_size == 32
    assert ds.train.x[0, 0, 0].tolist() == [11, 22, 33] and ds.train.x[0, 1, 2, 1] == 99
    assert ds.train.y[:PER_BATCH].tolist() == [0, 1, 2, 3] and ds.test.y.tolist() == [5, 6, 7, 8]


@pytest.mark.parametrize("algo", ["md5", "sha256"])
def test_download_verify_cache_parse(fresh_home, server, cifar_archive, monkeypatch, algo):
    point_cifar10_at(monkeypatch, f"{server.url}/cifar-10-python.tar.gz", digest(cifar_archive, algo))
    ds = load_dataset("cifar10", progress=False)
    check_parsed(ds)
    assert ds.name == "cifar10"
    stored = fresh_home / "datasets" / "cifar-10-python.tar.gz"
    assert ds.source == str(stored.resolve()) and stored.read_bytes() == cifar_archive.read_bytes()
    again = load_dataset("cifar10", val_split=0.25, progress=False)
    assert len(server.requests) == 1  # the second call used the stored file (and the decoded cache)
    assert len(again.val.y) + len(again.train.y) == 5 * PER_BATCH and again.val_origin == "val-split"


def test_wrong_checksum_leaves_nothing_behind(fresh_home, server, monkeypatch):
    point_cifar10_at(monkeypatch, f"{server.url}/cifar-10-python.tar.gz", "md5:" + "0" * 32)
    with pytest.raises(ImgclfError, match=r"checksum mismatch.*expected md5:0{32}, got md5:[0-9a-f]{32}.*--data"):
        load_dataset("cifar10", progress=False)
    assert os.listdir(fresh_home / "datasets") == []


def test_http_404_is_a_clear_error(fresh_home, server, monkeypatch):
    url = f"{server.url}/nope.tar.gz"
    point_cifar10_at(monkeypatch, url, "md5:" + "0" * 32)
    with pytest.raises(ImgclfError, match=rf"{url}.*404.*--data PATH"):
        load_dataset("cifar10", progress=False)
    assert not (fresh_home / "datasets").exists() or os.listdir(fresh_home / "datasets") == []


def test_unreachable_server_suggests_a_local_copy(fresh_home, monkeypatch):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    point_cifar10_at(monkeypatch, f"http://127.0.0.1:{port}/c.tar.gz", "md5:" + "0" * 32)
    with pytest.raises(ImgclfError, match=r"127\.0\.0\.1.*--data PATH.*cifar10-jpeg"):
        load_dataset("cifar10", progress=False)


def test_download_off_asks_for_a_local_copy(fresh_home):
    with pytest.raises(ImgclfError, match="--data"):
        load_dataset("cifar10", download=False, progress=False)


def test_official_folder_and_archive_paths(fresh_home, tmp_path, cifar_archive):
    folder = write_cifar_folder(tmp_path / "local")
    check_parsed(load_dataset(str(folder), progress=False))
    check_parsed(load_dataset(str(folder.parent), progress=False))  # the folder holding cifar-10-batches-py
    check_parsed(load_dataset(str(cifar_archive), progress=False))


def test_resize_and_greyscale_on_request(fresh_home, tmp_path):
    folder = write_cifar_folder(tmp_path / "local")
    ds = load_dataset(str(folder), image_size=16, channels=1, progress=False)
    assert ds.train.x.shape == (5 * PER_BATCH, 16, 16, 1) and ds.channels == 1


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_restricted_unpickler_refuses_other_globals(tmp_path):
    with pytest.raises(ImgclfError, match=r"refusing to unpickle (posix|os|nt)\.system"):
        restricted_loads(pickle.dumps({b"data": Evil()}, protocol=2))
    folder = write_cifar_folder(tmp_path / "evil")
    (folder / "data_batch_3").write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}, protocol=2))
    with pytest.raises(ImgclfError, match="data_batch_3.*refusing"):
        load_dataset(str(folder), progress=False)


def test_restricted_unpickler_reads_numpy_arrays():
    arr = np.arange(12, dtype=np.uint8).reshape(3, 4)
    for protocol in (2, 4):
        out = restricted_loads(pickle.dumps({b"data": arr, b"labels": [1, 2]}, protocol=protocol))
        assert (out[b"data"] == arr).all() and out[b"labels"] == [1, 2]


def test_damaged_batch_is_a_clear_error(tmp_path):
    folder = write_cifar_folder(tmp_path / "bad")
    (folder / "test_batch").write_bytes(b"\x80\x02}q\x00")  # a pickle cut short
    with pytest.raises(ImgclfError, match="test_batch.*not a readable CIFAR batch"):
        load_dataset(str(folder), progress=False)
