"""Shared fixtures: a private cache folder for the whole session and tiny synthetic image folders."""
from __future__ import annotations

import contextlib
import functools
import http.server
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SHARED_DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"
CIFAR_JPEG = SHARED_DATASETS / "cifar10-jpeg.tar.gz"
MNIST_PNG = SHARED_DATASETS / "mnist-png.tar.gz"

# Colour prototypes: a tiny CNN separates these in a few epochs, so training tests can assert learning.
_COLOURS = {"red": (200, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 200)}


@pytest.fixture(scope="session")
def session_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("imgclf_home")


@pytest.fixture(autouse=True)
def _private_cache(session_home, monkeypatch):
    """Never touch ~/.cache/imgclf from tests; the cache keys on content, so one folder serves the session."""
    monkeypatch.setenv("IMGCLF_HOME", str(session_home))


@contextlib.contextmanager
def serve_folder(folder: Path):
    """Serve ``folder`` over HTTP on 127.0.0.1 (a free port) for download tests.
    Yields the server with ``.url`` (no trailing slash) and ``.requests`` (paths asked for)."""
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    httpd.url, httpd.requests = f"http://127.0.0.1:{httpd.server_address[1]}", requests
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """Run the ``imgclf`` command in-process; returns (exit code, stdout, stderr)."""
    from imgclf.cli import main

    code = 0
    try:
        main(list(args))
    except SystemExit as e:
        code = e.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


def make_image_folder(root: Path, n_train: int = 24, n_test: int = 8, size: int = 32, seed: int = 0,
                      classes=tuple(_COLOURS), mode: str = "RGB") -> Path:
    """train/<class>/*.png + test/<class>/*.png of noisy colour patches, one colour per class."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        for cls in classes:
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            base = np.array(_COLOURS.get(cls, rng.integers(0, 255, 3)), dtype=np.float64)
            for i in range(n):
                img = np.clip(base + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).convert(mode).save(d / f"{i}.png")
    return root


@pytest.fixture
def tiny_folder(tmp_path) -> Path:
    return make_image_folder(tmp_path / "tiny")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, session_home):
    """One tiny trained run shared by evaluate/predict/CLI tests (trained once per session)."""
    import os

    import imgclf

    os.environ["IMGCLF_HOME"] = str(session_home)
    root = tmp_path_factory.mktemp("tinyrun")
    data = make_image_folder(root / "data")
    # fp32: the run's own test score must equal what `imgclf evaluate` (fp32 unless asked) computes
    result = imgclf.train(data=str(data), model="seed-cnn", epochs=3, batch_size=16, project=str(root / "runs"),
                          name="tiny", progress=False, precision="fp32")
    return result


@pytest.fixture(scope="session")
def cifar_seed_run(tmp_path_factory, session_home):
    """The seed CNN trained once per session, 1 epoch on 10,000 real CIFAR-10 training images (~40 s on 2
    cores): the real-data model the training, predict and int8 tests share. Tests copy it before changing it."""
    import os

    import imgclf

    if not CIFAR_JPEG.is_file():
        pytest.skip(f"{CIFAR_JPEG} not present")
    os.environ["IMGCLF_HOME"] = str(session_home)
    root = tmp_path_factory.mktemp("cifar_run")
    return imgclf.train(data=str(CIFAR_JPEG), model="seed-cnn", epochs=1, batch_size=64, fraction=0.2,
                        project=str(root), name="seed", progress=False)


# --- data-layer fixtures (tests/test_data_*.py) -----------------------------------------------------

@pytest.fixture
def fresh_home(tmp_path, monkeypatch) -> Path:
    """An empty IMGCLF_HOME for one test, for tests that count downloads or cache entries."""
    home = tmp_path / "imgclf_home"
    monkeypatch.setenv("IMGCLF_HOME", str(home))
    return home


def write_image(path: Path, size=(8, 8), mode: str = "RGB", value: int = 0, fmt: str | None = None) -> Path:
    """A small image whose pixels encode ``value`` (class colour), in any Pillow mode."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.full((size[1], size[0], 3), (value * 37 % 256, value * 91 % 256, 200 - value * 23 % 200), np.uint8)
    Image.fromarray(rgb).convert(mode).save(path, format=fmt)
    return path


@pytest.fixture
def image_tree(tmp_path):
    """Factory: image_tree({"train/cat": 3, "test/cat": 1, ...}, size=(8, 8), mode="RGB", name="data")
    -> root folder holding that many PNGs per folder, coloured by the folder's class (its last part)."""
    def make(spec: dict[str, int], size=(8, 8), mode: str = "RGB", name: str = "data", ext: str = ".png") -> Path:
        root = tmp_path / name
        classes = sorted({folder.rsplit("/", 1)[-1] for folder in spec})
        for folder, n in spec.items():
            value = classes.index(folder.rsplit("/", 1)[-1])
            for i in range(n):
                write_image(root / folder / f"{i}{ext}", size=size, mode=mode, value=value)
        return root
    return make
