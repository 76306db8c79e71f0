"""imgclf serve's POST /explain (a heat-map overlay as PNG) and the page's "Why?" toggle that shows it."""
import io
from urllib.parse import unquote

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

import imgclf
from imgclf.deploy.serve import ServeConfig, create_app

from support import CHROMIUM, bad_uploads, chromium, uvicorn_thread
from synthetic import png_bytes

CONFIG = ServeConfig(max_files=4, max_upload_bytes=300_000, max_pixels=2_000_000)


@pytest.fixture(scope="module")
def client(tiny_run):
    with TestClient(create_app(tiny_run.run_dir, CONFIG)) as c:
        yield c


def test_explain_answers_the_overlay_aspng_bytes(client, tiny_run):
    photo = png_bytes()
    assert client.get("/model").json()["explain"] is True
    r = client.post("/explain", files=[("files", ("red.png", photo, "image/png"))])
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    expected = imgclf.load(tiny_run.run_dir).explain(photo)[0]
    want = np.asarray(expected.overlay(), np.int16)
    with Image.open(io.BytesIO(r.content)) as img:
        assert img.format == "PNG" and img.size == (224, 224) == expected.overlay().size
        got = np.asarray(img.convert("RGB"), np.int16)
    assert np.abs(got - want).max() <= 2  # the same heat map over the same crop as clf.explain(...)
    assert unquote(r.headers["x-class"]) == expected.label == "red"
    assert abs(float(r.headers["x-probability"]) - expected.probability) < 1e-4
    # another class on request, by name or index; an unknown one is refused
    r = client.post("/explain", files=[("files", ("red.png", photo, "image/png"))], data={"target": "blue"})
    assert r.status_code == 200 and unquote(r.headers["x-class"]) == "blue"
    r = client.post("/explain", files=[("files", ("red.png", photo, "image/png"))], data={"target": "1"})
    assert r.status_code == 200 and unquote(r.headers["x-class"]) == "green"
    r = client.post("/explain", files=[("files", ("red.png", photo, "image/png"))], data={"target": "purple"})
    assert r.status_code == 422 and "purple" in r.json()["detail"]
    spec = client.get("/openapi.json").json()["paths"]["/explain"]["post"]
    assert "image/png" in spec["responses"]["200"]["content"] and "501" in spec["responses"]


@pytest.mark.parametrize("case,status", [
    ("not-an-image", 415), ("truncated", 422), ("body-too-large", 413), ("two-files", 413),
    ("too-many-pixels", 413), ("no-files", 400),
])
def test_explain_refuses_like_predict(client, case, status):
    good = png_bytes()
    files = {**bad_uploads(CONFIG.max_upload_bytes),
             "two-files": [("files", (f"{i}.png", good, "image/png")) for i in range(2)]}.get(case)
    r = client.post("/explain", files=files) if files else client.post("/explain", data={"note": "no file"})
    assert r.status_code == status, r.text
    if status in (415, 422):
        assert files[0][1][0] in r.json()["detail"]  # names the file
    ok = client.post("/explain", files=[("files", ("again.png", good, "image/png"))])
    assert ok.status_code == 200 and ok.headers["content-type"] == "image/png"


def test_onnx_model_answers_501(tiny_onnx):
    with TestClient(create_app(tiny_onnx[1], CONFIG)) as c:
        assert c.get("/model").json()["explain"] is False
        r = c.post("/explain", files=[("files", ("red.png", png_bytes(), "image/png"))])
        assert r.status_code == 501 and "cannot explain" in r.json()["detail"]
        assert c.post("/predict", files=[("files", ("red.png", png_bytes(), "image/png"))]).status_code == 200


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Chromium at /usr/bin/chromium (apt-get install chromium)")
@pytest.mark.parametrize("model", ["checkpoint", "onnx"])
def test_why_toggle_in_chromium(tiny_run, tiny_onnx, tmp_path, model):
    from playwright.sync_api import sync_playwright

    photo = tmp_path / "red.png"
    photo.write_bytes(png_bytes(size=(64, 48)))
    app = create_app(tiny_run.run_dir if model == "checkpoint" else tiny_onnx[1])
    with uvicorn_thread(app) as port, sync_playwright() as p:
        url = f"http://127.0.0.1:{port}"
        top = httpx.post(f"{url}/predict", files={"files": (photo.name, photo.read_bytes())},
                         timeout=30).json()["predictions"][0]["top"][0]["class"]
        browser = chromium(p)
        try:
            page = browser.new_page()
            page.goto(url + "/")
            page.wait_for_function("document.getElementById('model').textContent.includes('classes')")
            assert page.is_hidden("#why")  # nothing classified yet
            page.set_input_files("#file", str(photo))
            page.wait_for_selector("#why", state="visible", timeout=20_000)
            assert page.inner_text("#results .row .label") == top
            photo_src = page.get_attribute("#preview", "src")
            if model == "onnx":  # the server says it cannot explain: the button is off, and the page says why
                assert page.is_disabled("#why") and "cannot show why" in page.inner_text("#why-note")
                return
            with page.expect_response(lambda r: r.url.endswith("/explain")) as answer:
                page.click("#why")
            assert answer.value.status == 200 and answer.value.headers["content-type"] == "image/png"
            page.wait_for_function(f"""(() => {{ const p = document.getElementById('preview');
                return p.src !== {photo_src!r} && p.complete && p.naturalWidth > 0; }})()""", timeout=20_000)
            size = page.evaluate("[document.getElementById('preview').naturalWidth, "
                                 "document.getElementById('preview').naturalHeight]")
            assert page.get_attribute("#why", "aria-pressed") == "true" and top in page.inner_text("#why-note")
            page.screenshot(path=str(tmp_path / "why.png"), full_page=True)
            page.click("#why")  # off: the photo again
            assert page.get_attribute("#preview", "src") == photo_src
            assert page.get_attribute("#why", "aria-pressed") == "false"
        finally:
            browser.close()
    assert size == [224, 224]  # the overlay (32 px input scaled by 7), not the 64 x 48 photo
