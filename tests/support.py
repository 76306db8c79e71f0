"""Helpers the test modules share: where the real datasets are, the CLI in-process, a local HTTP server,
`imgclf serve`'s app on a real port, a short training run, and a callback that stops one at a chosen step."""
from __future__ import annotations

import contextlib
import functools
import http.server
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import imgclf
from imgclf.checkpoint import load_checkpoint
from imgclf.training.callbacks import Callback

SHARED_DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"
CIFAR_JPEG = SHARED_DATASETS / "cifar10-jpeg.tar.gz"
MNIST_PNG = SHARED_DATASETS / "mnist-png.tar.gz"
CHROMIUM = Path("/usr/bin/chromium")  # Debian's, headless, for the browser tests


def train_run(data, tmp_path, **kw):
    """``imgclf.train`` on ``data`` into tmp_path/runs, quietly; the seed CNN at batch 16 unless told."""
    kw.setdefault("model", "seed-cnn")
    kw.setdefault("batch_size", 16)
    return imgclf.train(data=str(data), project=str(tmp_path / "runs"), progress=False, **kw)


def weights(run_dir, name="last") -> dict:
    return load_checkpoint(run_dir / f"{name}.safetensors").state_dict


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class StopAt(Callback):
    """Asks training to stop after the given (epoch, step), as an interruption would."""

    def __init__(self, epoch: int, step: int):
        self.at = (epoch, step)

    def on_step_end(self, trainer, epoch, step, loss):
        if (epoch, step) == self.at:
            trainer.request_stop()


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args, tmp_path, timeout=120, nproc=2, env=None) -> tuple[subprocess.CompletedProcess, float]:
    """torchrun (the module form) with ``args`` after it; -> (finished process, seconds)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    return proc, time.monotonic() - t0


def cli_flags(settings: dict) -> list[str]:
    """{"batch_size": 16} -> ["--batch-size", "16"]"""
    out = []
    for k, v in settings.items():
        out += [f"--{k.replace('_', '-')}", str(v)]
    return out


@contextlib.contextmanager
def uvicorn_thread(app):
    """uvicorn on 127.0.0.1 and a free port, in a thread, with the options `imgclf serve` uses -> port."""
    import uvicorn

    from imgclf.deploy.serve import uvicorn_options

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning",
                                           **uvicorn_options(app.state.config)))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield server.config.port
    finally:
        server.should_exit = True
        thread.join(10)


def bad_uploads(max_bytes: int) -> dict[str, list]:
    """Multipart ``files`` that `imgclf serve` refuses on every upload route, by case: not an image (415), a
    truncated PNG (422), a body over ``max_bytes`` (413), a PNG over 2,000,000 pixels (413)."""
    from synthetic import png_bytes

    good = png_bytes()
    return {
        "not-an-image": [("files", ("notes.jpg", b"this is not an image", "image/jpeg"))],
        "truncated": [("files", ("cut.png", good[: len(good) // 2], "image/png"))],
        "body-too-large": [("files", ("huge.png", b"\0" * (max_bytes + 100_000), "image/png"))],
        "too-many-pixels": [("files", ("wide.png", png_bytes(size=(3000, 1000)), "image/png"))],
    }


def chromium(playwright, *args: str):
    """Debian's Chromium (CHROMIUM), headless, through Playwright, with the flags a VM needs, plus ``args``."""
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=[
        "--no-sandbox", "--disable-gpu", "--disable-background-networking", *args])
