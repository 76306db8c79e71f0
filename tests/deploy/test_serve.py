"""imgclf serve: the HTTP API (status codes, micro-batching), one preprocessing on every path, the web page."""
import asyncio
import contextlib
import io
import os
import signal
import socket
import struct
import subprocess
import sys
import tarfile
import threading
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import imgclf
from imgclf.deploy import serve as serve_module
from imgclf.deploy.export import export
from imgclf.deploy.serve import ServeConfig, create_app
from imgclf.deploy.serve.batcher import MicroBatcher, Overloaded
from imgclf.evaluation.evaluate import compute_evaluation

from support import CHROMIUM, CIFAR_JPEG, bad_uploads, chromium, free_port, uvicorn_thread
from synthetic import COLOURS, pixels, png_bytes

CONFIG = ServeConfig(max_files=4, max_upload_bytes=300_000, max_pixels=2_000_000)


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height: a decompression bomb as far as the header goes."""
    data = bytearray(png_bytes(size=(1, 1)))
    ihdr = bytearray(data[16:29])
    ihdr[0:8] = struct.pack(">II", width, height)
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


@pytest.fixture(scope="module")
def client(tiny_run):
    with TestClient(create_app(tiny_run.run_dir, CONFIG)) as c:
        yield c


def test_predict_health_model_page(client):
    r = client.post("/predict?top_k=2", files=[("files", ("red.png", png_bytes(), "image/png")),
                                               ("files", ("blue.jpg", png_bytes((40, 40, 200)), "image/jpeg"))])
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert [p["source"] for p in preds] == ["red.png", "blue.jpg"]
    assert [p["top"][0]["class"] for p in preds] == ["red", "blue"]
    assert all(len(p["top"]) == 2 and p["top"][0]["probability"] >= p["top"][1]["probability"] for p in preds)
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["images"] >= 2 and health["queued"] == 0
    info = client.get("/model").json()
    assert info["classes"] == ["blue", "green", "red"] and info["input"]["image_size"] == 32
    assert info["format"] == "checkpoint" and info["test_metrics"]["top1"] == 1.0
    page = client.get("/").text
    assert 'type="file"' in page and "capture" in page and "/predict" in page
    assert "://" not in page  # nothing from the internet: works offline
    docs = client.get("/docs")
    assert docs.status_code == 200 and "/docs-assets/swagger-ui-bundle.js" in docs.text
    assert client.get("/docs-assets/swagger-ui-bundle.js").status_code == 200
    assert "/predict" in client.get("/openapi.json").json()["paths"]


@pytest.mark.parametrize("case,status", [
    ("not-an-image", 415), ("truncated", 422), ("body-too-large", 413), ("too-many-files", 413),
    ("too-many-pixels", 413), ("bomb-header", 413), ("no-files", 400), ("bad-top-k", 422),
])
def test_bad_requests_get_their_status_and_the_server_keeps_serving(client, case, status):
    good = png_bytes()
    files = {
        **bad_uploads(CONFIG.max_upload_bytes),
        "too-many-files": [("files", (f"{i}.png", good, "image/png")) for i in range(5)],
        "bomb-header": [("files", ("bomb.png", _png_claiming(40_000, 40_000), "image/png"))],
        "bad-top-k": [("files", ("ok.png", good, "image/png"))],
    }.get(case)
    url = "/predict?top_k=0" if case == "bad-top-k" else "/predict"
    r = client.post(url, files=files) if files else client.post(url, data={"note": "no file"})
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    if status in (415, 422) and case != "bad-top-k":
        assert files[0][1][0] in detail  # names the file
    ok = client.post("/predict", files=[("files", ("again.png", good, "image/png"))])
    assert ok.status_code == 200 and ok.json()["predictions"][0]["top"][0]["class"] == "red"


def test_full_queue_answers_503_with_retry_after(tiny_run):
    with TestClient(create_app(tiny_run.run_dir, ServeConfig(max_queue=1))) as c:
        r = c.post("/predict", files=[("files", (f"{i}.png", png_bytes(), "image/png")) for i in range(2)])
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert c.post("/predict", files=[("files", ("a.png", png_bytes(), "image/png"))]).status_code == 200


def test_concurrent_requests_share_forward_passes(tiny_run):
    app = create_app(tiny_run.run_dir, ServeConfig(max_wait_ms=50))

    async def run():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
                rs = await asyncio.gather(*(c.post("/predict", files=[("files", (f"{i}.png", png_bytes(seed=i),
                                                                                  "image/png"))]) for i in range(12)))
                return rs, (await c.get("/health")).json()

    responses, health = asyncio.run(run())
    assert all(r.status_code == 200 for r in responses)
    assert health["images"] == 12 and health["batches"] < 12  # micro-batched


def _held_out(root: Path) -> tuple[Path, list[Path]]:
    """50 held-out images of odd sizes, modes and formats (so every resize/convert path runs), plus a
    token train/ split so the folder is a dataset."""
    rng = np.random.default_rng(7)
    colours = {k: COLOURS[k] for k in ("blue", "green", "red")}
    files = []
    for i in range(50 + 6):
        cls = list(colours)[i % 3]
        split, n = ("train", i) if i >= 50 else ("test", i)
        w, h = int(rng.integers(20, 90)), int(rng.integers(20, 90))
        img = Image.fromarray(pixels(np.array(colours[cls]) * rng.uniform(0.5, 1.1), (w, h), noise=45, rng=rng))
        kind = i % 4
        path = root / split / cls / f"{n}.{'jpg' if kind in (0, 3) else 'png'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        if kind == 1:
            img = img.convert("RGBA")
        elif kind == 3:
            exif = Image.Exif()
            exif[0x0112] = 6  # rotated 90 degrees
            img.save(path, quality=85, exif=exif)
        if kind != 3:
            img.save(path, **({"quality": 85} if path.suffix == ".jpg" else {}))
        if split == "test":
            files.append(path)
    return root, files


def test_one_preprocessing_everywhere(tiny_run, tmp_path):
    """The same 50 held-out images through evaluate, predict, ONNX Runtime fp32 and POST /predict: same
    top-1 for every image, probabilities within 1e-3."""
    root, files = _held_out(tmp_path / "held")
    ckpt = imgclf.load(tiny_run.run_dir)
    onnx_path = export(tiny_run.run_dir, out=tmp_path / "m.onnx", speed=False, progress=False).out

    ev = compute_evaluation(tiny_run.run_dir, data=str(root), split="test", progress=False)
    arrays = [ckpt._to_array(f) for f in files]  # the loader predict uses
    # evaluate decodes through the dataset pipeline: match its images to the files by pixels
    order = [next(j for j in range(len(ev.images)) if np.array_equal(ev.images[j], a)) for a in arrays]
    p_eval = ev.probs[order]
    p_pred = ckpt.predict_proba(files)
    p_onnx = imgclf.load(onnx_path).predict_proba(files)
    with TestClient(create_app(onnx_path, ServeConfig(max_files=50))) as c:
        r = c.post(f"/predict?top_k={len(ckpt.classes)}",
                   files=[("files", (f.name, f.read_bytes(), "application/octet-stream")) for f in files])
    assert r.status_code == 200, r.text
    p_api = np.array([[dict((t["class"], t["probability"]) for t in p["top"])[c] for c in ckpt.classes]
                      for p in r.json()["predictions"]])
    for name, p in (("predict", p_pred), ("onnx", p_onnx), ("POST /predict", p_api)):
        assert (p.argmax(1) == p_eval.argmax(1)).all(), name
        assert np.abs(p - p_eval).max() < 1e-3, name




def _real_photo(tmp_path: Path) -> Path:
    """One CIFAR-10 test JPEG from the shared archive (a synthetic photo when it is absent)."""
    out = tmp_path / "photo.jpg"
    if CIFAR_JPEG.exists():
        with tarfile.open(CIFAR_JPEG) as tf:
            for m in tf:
                if m.isfile() and m.name.startswith("test/") and m.name.endswith(".jpg"):
                    out.write_bytes(tf.extractfile(m).read())
                    return out
    out.write_bytes(png_bytes((200, 40, 40), size=(64, 48)))
    return out


@pytest.fixture
def live_server(tiny_run):
    """uvicorn on 127.0.0.1 and a free port, in a thread, for the length of one test."""
    with uvicorn_thread(create_app(tiny_run.run_dir)) as port:
        yield f"http://127.0.0.1:{port}"


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Chromium at /usr/bin/chromium (apt-get install chromium)")
def test_web_page_in_chromium(live_server, tmp_path):
    from playwright.sync_api import sync_playwright

    photo = _real_photo(tmp_path)
    expected = httpx.post(f"{live_server}/predict", files={"files": (photo.name, photo.read_bytes())},
                          timeout=30).json()["predictions"][0]["top"][0]["class"]
    with sync_playwright() as p:
        browser = chromium(p)
        try:
            page = browser.new_page()
            page.goto(live_server + "/")
            page.wait_for_function("document.getElementById('model').textContent.includes('classes')")
            page.set_input_files("#file", str(photo))
            page.wait_for_selector("#results .row .bar span", timeout=20_000)
            top = page.inner_text("#results .row .label")
            pct = page.inner_text("#results .row .pct")
            rows = page.locator("#results .row").count()
            page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
            assert page.evaluate("document.getElementById('preview').naturalWidth") > 0  # the image is shown
            # the OpenAPI page renders from local files only (the machine has no internet)
            requested = []
            page.on("request", lambda r: requested.append(r.url))
            page.goto(live_server + "/docs")
            page.wait_for_selector(".opblock-summary-path", timeout=20_000)
            assert "/predict" in page.locator(".opblock-summary-path").all_inner_texts()
            assert all(u.startswith(live_server) for u in requested), requested
        finally:
            browser.close()
    assert top == expected and pct.endswith("%") and rows == 3
    assert (tmp_path / "page.png").stat().st_size > 1000


# --- load and abuse: timeouts, limits, shedding, shutdown, junk -----------------------------------------

GUARDED = ServeConfig(max_files=4, max_upload_bytes=300_000, max_pixels=2_000_000, max_connections=4,
                      header_timeout_s=1.0, body_timeout_s=1.5)
BOUNDARY = "imgclf-test-boundary"


def _multipart(parts: list[tuple[str, str | None, bytes]]) -> bytes:
    """(field name, filename or None, content) -> a multipart/form-data body with BOUNDARY."""
    out = b""
    for name, filename, content in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
        out += f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n".encode("utf-8", "replace")
        out += content + b"\r\n"
    return out + f"--{BOUNDARY}--\r\n".encode()


def _head(length: int, path: str = "/predict") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {length}\r\n"
            f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n\r\n").encode()


def _until_closed(sock: socket.socket, dribble: list[bytes] = (), every: float = 0.2,
                  limit: float = 15.0) -> tuple[bytes, float]:
    """Send ``dribble`` one piece every ``every`` seconds while reading; -> (all bytes read, seconds until
    the server closed the connection)."""
    t0, got = time.monotonic(), b""
    pieces = list(dribble)
    sock.settimeout(every)
    while time.monotonic() - t0 < limit:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            if pieces:
                with contextlib.suppress(OSError):
                    sock.sendall(pieces.pop(0))
            continue
        except ConnectionResetError:
            break
        if not chunk:
            break
        got += chunk
    return got, time.monotonic() - t0


@pytest.fixture(scope="module")
def guarded_port(tiny_run):
    with uvicorn_thread(create_app(tiny_run.run_dir, GUARDED)) as port:
        yield port


def test_slow_headers_and_slow_bodies_are_cut_off(guarded_port):
    """Slowloris: a silent client, one sending its headers a line at a time and one sending its body a
    byte at a time are each disconnected after the timeouts (1 s headers, 1.5 s body), with a 408 where
    they sent something; the server answers others meanwhile."""
    png = png_bytes()
    body = _multipart([("files", "a.png", png)])
    cut = body.index(png) + 10
    results = {}

    def run(kind):
        with socket.create_connection(("127.0.0.1", guarded_port)) as s:
            if kind == "silent":
                results[kind] = _until_closed(s)
            elif kind == "headers":
                s.sendall(b"POST /predict HTTP/1.1\r\n")
                results[kind] = _until_closed(s, [b"X-Slow: %d\r\n" % i for i in range(100)])
            else:
                s.sendall(_head(len(body)) + body[:cut])
                results[kind] = _until_closed(s, [body[i:i + 1] for i in range(cut, len(body))])

    threads = [threading.Thread(target=run, args=(k,)) for k in ("silent", "headers", "body")]
    for t in threads:
        t.start()
    ok = httpx.post(f"http://127.0.0.1:{guarded_port}/predict", files={"files": ("a.png", png)}, timeout=10)
    for t in threads:
        t.join(20)
    assert ok.status_code == 200
    silent, headers, body_ = results["silent"], results["headers"], results["body"]
    assert silent[0] == b"" and 0.8 < silent[1] < 3, silent
    assert headers[0].startswith(b"HTTP/1.1 408 ") and 0.8 < headers[1] < 3, headers
    assert body_[0].startswith(b"HTTP/1.1 408 ") and b"connection: close" in body_[0].lower(), body_
    assert b"did not arrive within 1.5 s" in body_[0] and 1.3 < body_[1] < 4, body_


def test_too_many_connections_get_503_with_retry_after(guarded_port):
    idle = [socket.create_connection(("127.0.0.1", guarded_port)) for _ in range(GUARDED.max_connections)]
    try:
        with socket.create_connection(("127.0.0.1", guarded_port)) as s:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            answer, _ = _until_closed(s, limit=5)
    finally:
        for s in idle:
            s.close()
    head = answer.split(b"\r\n\r\n")[0].lower()
    assert head.startswith(b"http/1.1 503 ") and b"retry-after: 1" in head and b"connection: close" in head
    deadline = time.monotonic() + 5
    while (r := httpx.get(f"http://127.0.0.1:{guarded_port}/health", timeout=5)).status_code != 200:
        assert time.monotonic() < deadline, r.status_code  # the idle sockets' closes are seen at once
        time.sleep(0.05)


def test_queue_counts_images_from_acceptance_and_sheds_the_rest(tiny_run, monkeypatch):
    """max_queue=3 under 16 concurrent requests of 1-2 images: the images are counted before decoding,
    so a shed request is never decoded (decodes == images answered), the count never passes 3, some
    requests get 503 + Retry-After, none another 5xx, and the count is 0 afterwards."""
    app = create_app(tiny_run.run_dir, ServeConfig(max_queue=3, max_wait_ms=20))
    decode, calls, seen = serve_module.decode_upload, [], []

    def slow_decode(*args):
        calls.append(1)
        seen.append(app.state.batcher.queued)
        time.sleep(0.02)
        return decode(*args)

    monkeypatch.setattr(serve_module, "decode_upload", slow_decode)

    async def run():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
                requests = [[("files", (f"{i}-{j}.png", png_bytes(seed=i), "image/png")) for j in range(1 + i % 2)]
                            for i in range(16)]
                requests.append([("files", ("junk.png", b"not an image at all", "image/png"))])
                rs = await asyncio.gather(*(c.post("/predict", files=f) for f in requests))
                return rs, (await c.get("/health")).json()

    responses, health = asyncio.run(run())
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 415, 503} and codes.count(415) <= 1, codes
    assert 200 in codes and 503 in codes, codes
    assert all(r.headers["retry-after"] == "1" for r in responses if r.status_code == 503)
    answered = sum(len(r.json()["predictions"]) for r in responses if r.status_code == 200)
    assert len(calls) == answered + codes.count(415)  # nothing decoded for a shed request
    assert max(seen) <= 3 and health["queued"] == 0


def test_batcher_reservation_is_released_on_every_path(tiny_run):
    clf = imgclf.load(tiny_run.run_dir)
    img = np.zeros((32, 32, 3), np.uint8)

    async def run():
        b = MicroBatcher(clf, max_wait_ms=300, max_queue=3)
        await b.start()
        try:
            with pytest.raises(ValueError), b.reserve(2):  # an error while decoding
                assert b.queued == 2
                raise ValueError
            assert b.queued == 0
            task = asyncio.create_task(b.probs([img, img]))  # a request cancelled while it waits
            await asyncio.sleep(0.05)
            assert b.queued == 2 and not b.has_room(2)
            with pytest.raises(Overloaded), b.reserve(2):
                pass
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert b.queued == 0
            with b.reserve(1):  # the path of the server: counted once, answered
                probs = await b.probs([img], reserved=True)
                assert b.queued == 1
            assert probs.shape == (1, 3) and b.queued == 0
            assert b.batches == 1  # the cancelled request's images went through no forward pass
        finally:
            await b.stop()

    asyncio.run(run())


def test_formats_outside_the_list_get_415(client, monkeypatch):
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), (200, 40, 40)).save(buf, "PPM")  # Pillow reads it; the docs do not name it
    r = client.post("/predict", files=[("files", ("red.ppm", buf.getvalue(), "image/x-portable-pixmap"))])
    assert r.status_code == 415 and "red.ppm" in r.json()["detail"] and "TIFF" in r.json()["detail"]

    from imgclf.data.images import ImageTooLarge, UnsupportedFormat

    for error, status in ((UnsupportedFormat, 415), (ImageTooLarge, 413), (imgclf.ImgclfError, 422)):
        def refuse(data, spec, error=error):  # the loader's own refusals, by their kind
            raise error("<image bytes>: what is wrong with it")

        monkeypatch.setattr(serve_module, "preprocess_image", refuse)
        r = client.post("/predict", files=[("files", ("odd.png", png_bytes(), "image/png"))])
        assert r.status_code == status and r.json()["detail"] == "odd.png: what is wrong with it"


def _serve_subprocess(run_dir, *args) -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "imgclf", "serve", str(run_dir), "--port", str(port), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=dict(os.environ))
    deadline = time.monotonic() + 60
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return proc, port
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()[-2000:]
        time.sleep(0.1)


def test_client_leaving_mid_upload_is_one_log_line(tiny_run):
    proc, port = _serve_subprocess(tiny_run.run_dir)
    try:
        body = _multipart([("files", "a.png", png_bytes())])
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(_head(len(body)) + body[: len(body) // 2])
            time.sleep(0.3)
        assert httpx.post(f"http://127.0.0.1:{port}/predict", files={"files": ("b.png", png_bytes())},
                          timeout=10).status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        err = proc.communicate(timeout=20)[1].decode()
    left = [line for line in err.splitlines() if "left before the answer" in line]
    assert len(left) == 1 and left[0].startswith("INFO:") and "127.0.0.1:" in left[0], err
    assert "Traceback" not in err and "ERROR" not in err, err


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(stat.parent.name))
    return out


def test_sigterm_exits_within_seconds_and_finishes_requests_in_progress(tiny_run):
    """An idle keep-alive connection, a half-sent request and one in progress (the batcher waits 1.5 s for
    company): SIGTERM -> the one in progress gets its answer, the process is gone within 10 s."""
    proc, port = _serve_subprocess(tiny_run.run_dir, "--max-wait-ms", "1500")
    body = _multipart([("files", "a.png", png_bytes())])
    try:
        idle = socket.create_connection(("127.0.0.1", port))
        idle.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        got = b""
        while b"\r\n\r\n" not in got or not got.endswith(b"}"):  # one whole answer (a JSON body)
            got += idle.recv(4096)
        assert got.startswith(b"HTTP/1.1 200 ")
        slow = socket.create_connection(("127.0.0.1", port))
        slow.sendall(_head(len(body)) + body[:40])
        busy = socket.create_connection(("127.0.0.1", port))
        busy.sendall(_head(len(body)) + body)
        time.sleep(0.4)
        assert _children(proc.pid) == []  # threads only: nothing that could outlive the server
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        answer, _ = _until_closed(busy, limit=10)
        proc.wait(10)
        took = time.monotonic() - t0
        assert answer.startswith(b"HTTP/1.1 200 ") and b'"class":"red"' in answer, answer
        assert _until_closed(idle, limit=1)[0] == b""  # closed, nothing more said
        assert not _until_closed(slow, limit=1)[0].startswith(b"HTTP/1.1 200")
    finally:
        if proc.poll() is None:
            proc.kill()
        err = proc.communicate(timeout=10)[1].decode()
    assert took < 10, err
    assert "Traceback" not in err and "left before the answer" not in err, err
    assert "shutting down: closed 127.0.0.1:" in err and "still sending its request" in err, err


_PNG = png_bytes(size=(12, 9))
_parts = st.lists(st.tuples(
    st.sampled_from(["files", "file", "x", ""]) | st.text(max_size=8),
    st.none() | st.sampled_from(["a.png", "b.jpg", "", "c"]) | st.text(max_size=12),
    st.one_of(st.binary(max_size=300),
              st.just(_PNG),
              st.integers(0, len(_PNG)).map(lambda n: _PNG[:n]),  # truncated
              st.tuples(st.integers(0, len(_PNG) - 1), st.integers(0, 255)).map(  # one byte changed
                  lambda t: _PNG[:t[0]] + bytes([t[1]]) + _PNG[t[0] + 1:]),
              st.tuples(st.integers(1, 2 ** 31 - 1), st.integers(1, 2 ** 31 - 1)).map(
                  lambda wh: _png_claiming(*wh)))), max_size=6)


@settings(max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(["multipart", "raw"]), parts=_parts, raw=st.binary(max_size=600),
       ctype=st.sampled_from([f"multipart/form-data; boundary={BOUNDARY}", "multipart/form-data",
                              "multipart/form-data; boundary=", "application/x-www-form-urlencoded",
                              "image/png", "application/octet-stream", "text/plain; charset=utf-8"]),
       top_k=st.none() | st.integers(-2, 120) | st.text(max_size=4))
def test_random_requests_never_get_500(client, kind, parts, raw, ctype, top_k):
    content = _multipart(parts) if kind == "multipart" else raw
    headers = {"content-type": f"multipart/form-data; boundary={BOUNDARY}" if kind == "multipart" else ctype}
    params = {} if top_k is None else {"top_k": str(top_k)}
    r = client.post("/predict", content=content, headers=headers, params=params)  # a 500 raises here
    assert r.status_code in {200, 400, 408, 413, 415, 422, 503}, (r.status_code, r.text)
    if r.status_code == 200:
        assert len(r.json()["predictions"]) >= 1


def test_decodes_in_progress_share_one_memory_budget(monkeypatch):
    """Concurrent decodes never hold more than the budget together; an image bigger than the whole budget
    still decodes, alone; a large one trims the C heap afterwards."""
    import threading

    from imgclf.deploy.serve import DecodeBudget

    trimmed = []
    monkeypatch.setattr(serve_module, "_trim_heap", lambda: trimmed.append(1))
    budget = DecodeBudget(total=100 * 2**20)
    inside, peak, lock = [0], [0], threading.Lock()

    def decode(nbytes):
        with budget.hold(nbytes):
            with lock:
                inside[0] += min(budget.total, budget.COST * nbytes)
                peak[0] = max(peak[0], inside[0])
            time.sleep(0.02)
            with lock:
                inside[0] -= min(budget.total, budget.COST * nbytes)

    sizes = [20 * 2**20, 30 * 2**20, 1 * 2**20, 500 * 2**20, 10 * 2**20, 33 * 2**20] * 3
    threads = [threading.Thread(target=decode, args=(n,)) for n in sizes]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    assert peak[0] <= budget.total and budget.used == 0
    assert len(trimmed) == 3 * 2  # the 500 MB and 33 MB images: past TRIM_AFTER
