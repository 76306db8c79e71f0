"""imgclf serve: the HTTP API (status codes, micro-batching), one preprocessing on every path, the web page."""
import asyncio
import io
import socket
import struct
import tarfile
import threading
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

import imgclf
from imgclf.deploy.export import export
from imgclf.deploy.serve import ServeConfig, create_app
from imgclf.evaluation.evaluate import compute_evaluation

from support import CHROMIUM, CIFAR_JPEG
from synthetic import COLOURS, pixels

CONFIG = ServeConfig(max_files=4, max_upload_bytes=300_000, max_pixels=2_000_000)


def _png(colour=(200, 40, 40), size=(40, 30), seed=0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels(colour, size, noise=20, rng=np.random.default_rng(seed))).save(buf, "PNG")
    return buf.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height: a decompression bomb as far as the header goes."""
    data = bytearray(_png(size=(1, 1)))
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
    r = client.post("/predict?top_k=2", files=[("files", ("red.png", _png(), "image/png")),
                                               ("files", ("blue.jpg", _png((40, 40, 200)), "image/jpeg"))])
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
    good = _png()
    files = {
        "not-an-image": [("files", ("notes.jpg", b"this is not an image", "image/jpeg"))],
        "truncated": [("files", ("cut.png", good[: len(good) // 2], "image/png"))],
        "body-too-large": [("files", ("huge.png", b"\0" * 400_000, "image/png"))],
        "too-many-files": [("files", (f"{i}.png", good, "image/png")) for i in range(5)],
        "too-many-pixels": [("files", ("wide.png", _png(size=(3000, 1000)), "image/png"))],
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
        r = c.post("/predict", files=[("files", (f"{i}.png", _png(), "image/png")) for i in range(2)])
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert c.post("/predict", files=[("files", ("a.png", _png(), "image/png"))]).status_code == 200


def test_concurrent_requests_share_forward_passes(tiny_run):
    app = create_app(tiny_run.run_dir, ServeConfig(max_wait_ms=50))

    async def run():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
                rs = await asyncio.gather(*(
                    c.post("/predict", files=[("files", (f"{i}.png", _png(seed=i), "image/png"))]) for i in range(12)))
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
    out.write_bytes(_png((200, 40, 40), size=(64, 48)))
    return out


@pytest.fixture
def live_server(tiny_run):
    """uvicorn on 127.0.0.1 and a free port, in a thread, for the length of one test."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(tiny_run.run_dir), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Chromium at /usr/bin/chromium (apt-get install chromium)")
def test_web_page_in_chromium(live_server, tmp_path):
    from playwright.sync_api import sync_playwright

    photo = _real_photo(tmp_path)
    expected = httpx.post(f"{live_server}/predict", files={"files": (photo.name, photo.read_bytes())},
                          timeout=30).json()["predictions"][0]["top"][0]["class"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM),
                                    args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
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
