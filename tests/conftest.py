"""Fixtures: a private cache folder for the session, synthetic image folders, and the trained runs the
session shares. A shared run is checked unchanged when the session ends: a test that alters it must copy
it first (``shutil.copytree``), or later tests would see its changes."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import imgclf
from imgclf.deploy.export import export

from support import CIFAR_JPEG
from synthetic import colour_folder, image_folder


@pytest.fixture(scope="session")
def session_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("imgclf_home")


@pytest.fixture(autouse=True)
def _private_cache(session_home, monkeypatch):
    """Never touch ~/.cache/imgclf from tests; the cache keys on content, so one folder serves the session."""
    monkeypatch.setenv("IMGCLF_HOME", str(session_home))


def _fingerprint(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _shared(folder: Path):
    """Context for a session fixture: fails the session's teardown if a test changed ``folder``."""
    before = _fingerprint(folder)

    def check():
        after = _fingerprint(folder)
        changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
        assert not changed, f"a test changed the shared {folder.name}/ (copy it before changing it): {changed}"
    return check


@pytest.fixture
def tiny_folder(tmp_path) -> Path:
    return colour_folder(tmp_path / "tiny")


@pytest.fixture
def image_tree(tmp_path):
    """Factory: image_tree({"train/cat": 3, "test/cat": 1, ...}, size=(8, 8), mode="RGB", name="data")
    -> tmp_path/name holding that many PNGs per folder (see synthetic.image_folder)."""
    def make(spec: dict[str, int], size=(8, 8), mode: str = "RGB", name: str = "data", ext: str = ".png") -> Path:
        return image_folder(tmp_path / name, spec, size=size, mode=mode, ext=ext)
    return make


@pytest.fixture
def fresh_home(tmp_path, monkeypatch) -> Path:
    """An empty IMGCLF_HOME for one test, for tests that count downloads or cache entries."""
    home = tmp_path / "imgclf_home"
    monkeypatch.setenv("IMGCLF_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, session_home):
    """One tiny trained run shared by evaluate/predict/CLI tests (trained once per session)."""
    os.environ["IMGCLF_HOME"] = str(session_home)
    root = tmp_path_factory.mktemp("tinyrun")
    data = colour_folder(root / "data")
    # fp32: the run's own test score must equal what `imgclf evaluate` (fp32 unless asked) computes
    result = imgclf.train(data=str(data), model="seed-cnn", epochs=3, batch_size=16, project=str(root / "runs"),
                          name="tiny", progress=False, precision="fp32")
    check = _shared(root)
    yield result
    check()


@pytest.fixture(scope="session")
def tiny_onnx(tiny_run, tmp_path_factory):
    """The tiny run exported once: (report, path of the .onnx)."""
    out = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    report = export(tiny_run.run_dir, out=out, speed=False, progress=False)
    check = _shared(out.parent)
    yield report, out
    check()


@pytest.fixture(scope="session")
def cifar_seed_run(tmp_path_factory, session_home):
    """The seed CNN trained once per session, 1 epoch on 10,000 real CIFAR-10 training images (~40 s on 2
    cores): the real-data model the training, predict and int8 tests share."""
    if not CIFAR_JPEG.is_file():
        pytest.skip(f"{CIFAR_JPEG} not present")
    os.environ["IMGCLF_HOME"] = str(session_home)
    root = tmp_path_factory.mktemp("cifar_run")
    result = imgclf.train(data=str(CIFAR_JPEG), model="seed-cnn", epochs=1, batch_size=64, fraction=0.2,
                          project=str(root), name="seed", progress=False)
    check = _shared(root)
    yield result
    check()


@pytest.fixture
def photos(tmp_path):
    """Odd photos: big, greyscale, RGBA, CMYK, EXIF-rotated, a truncated JPEG and a text file named .jpg."""
    d = tmp_path / "photos"
    d.mkdir()
    red = np.zeros((375, 500, 3), np.uint8)
    red[..., 0] = 210
    Image.fromarray(red).save(d / "big_red.jpg", quality=90)
    Image.fromarray(red).convert("L").save(d / "grey.png")
    rgba = Image.fromarray(red).convert("RGBA")
    rgba.putalpha(200)
    rgba.save(d / "alpha.png")
    Image.fromarray(red).convert("CMYK").save(d / "cmyk.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(red).save(d / "rotated.jpg", exif=exif)
    data = (d / "big_red.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (tmp_path / "notes.jpg").write_text("this is not an image")
    return d
