"""imgclf serve's web page in camera mode: Chromium's fake camera plays a clip, the page labels it live at a
bounded rate, and a refused, absent or busy camera or a failing server gets a clear message."""
import re
import time
from pathlib import Path

import numpy as np
import pytest

from imgclf.deploy.serve import create_app

from support import CHROMIUM, chromium, uvicorn_thread
from synthetic import COLOURS, pixels

MAX_FPS = 8  # the page's MAX_FPS
SIZE, RATE = (320, 240), 10  # the clip: 320x240 at 10 frames/s
needs_chromium = pytest.mark.skipif(not CHROMIUM.exists(),
                                    reason="needs Chromium at /usr/bin/chromium (apt-get install chromium)")


def _y4m(path: Path, colours: list[str], seconds: float = 1.5) -> Path:
    """A Y4M clip (4:2:0, BT.601 full range) of ``seconds`` of each colour in turn, a little noise on each
    frame: what Chromium's fake camera plays, in a loop."""
    w, h = SIZE
    rng = np.random.default_rng(0)
    with open(path, "wb") as f:
        f.write(f"YUV4MPEG2 W{w} H{h} F{RATE}:1 Ip A1:1 C420jpeg\n".encode())
        for name in colours:
            for _ in range(round(seconds * RATE)):
                r, g, b = np.moveaxis(pixels(COLOURS[name], SIZE, noise=10, rng=rng).astype(np.float64), 2, 0)
                y = 0.299 * r + 0.587 * g + 0.114 * b
                u = 128 - 0.168736 * r - 0.331264 * g + 0.5 * b
                v = 128 + 0.5 * r - 0.418688 * g - 0.081312 * b
                planes = [y] + [c.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3)) for c in (u, v)]
                f.write(b"FRAME\n" + b"".join(np.clip(np.rint(p), 0, 255).astype(np.uint8).tobytes() for p in planes))
    return path


@pytest.fixture
def live_server(tiny_run):
    with uvicorn_thread(create_app(tiny_run.run_dir)) as port:
        yield f"http://127.0.0.1:{port}"  # 127.0.0.1 is a secure context: getUserMedia is offered


# every top class the page shows, when it starts each /predict fetch, and the most it ever had open at once
WATCH = """
window.seen = [];
window.starts = [];
window.inFlight = 0;
window.maxInFlight = 0;
const realFetch = window.fetch;
window.fetch = async (...args) => {
  const predict = String(args[0]).includes("/predict");
  if (predict) {
    window.starts.push(performance.now() / 1000);
    window.maxInFlight = Math.max(window.maxInFlight, ++window.inFlight);
  }
  try { return await realFetch(...args); } finally { if (predict) window.inFlight--; }
};
new MutationObserver(() => {
  const top = document.getElementById("live-label")?.dataset.top;
  if (top && window.seen.at(-1) !== top) window.seen.push(top);
}).observe(document, { subtree: true, attributes: true, attributeFilter: ["data-top"] });
"""
TOP = "document.getElementById('live-label').dataset.top"


@needs_chromium
def test_live_camera_labels_the_clip_at_a_bounded_rate(live_server, tmp_path):
    from playwright.sync_api import sync_playwright

    clip = _y4m(tmp_path / "clip.y4m", ["red", "blue"])
    requests = []  # monotonic times of the page's /predict requests
    with sync_playwright() as p:
        browser = chromium(p, "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
                            f"--use-file-for-fake-video-capture={clip}")
        try:
            page = browser.new_page()
            page.add_init_script(WATCH)
            page.on("request", lambda r: "/predict" in r.url and requests.append(time.monotonic()))
            page.goto(live_server + "/")
            page.wait_for_function("document.getElementById('model').textContent.includes('classes')")
            page.click("#live-toggle")
            page.wait_for_function(TOP, timeout=15_000)
            first = page.evaluate(TOP)
            page.wait_for_function(f"{TOP} && {TOP} !== {first!r}", timeout=20_000)
            page.wait_for_function("['red', 'blue'].every((c) => window.seen.includes(c))", timeout=20_000)
            page.wait_for_timeout(1000)  # a little longer at the steady rate
            seen, fps = page.evaluate("window.seen"), page.inner_text("#fps")
            max_in_flight, starts = page.evaluate("window.maxInFlight"), page.evaluate("window.starts")
            video, overlay = page.locator("#video").bounding_box(), page.locator("#overlay").bounding_box()
            assert page.inner_text("#live-label") == page.evaluate(TOP)
            page.screenshot(path=str(tmp_path / "live.png"))
            sent = list(requests)

            page.evaluate("window.stream = document.getElementById('video').srcObject")
            page.click("#live-toggle")
            stopped = time.monotonic()
            page.wait_for_timeout(1200)
            ended = page.evaluate("window.stream.getTracks().map((t) => t.readyState)")
            toggle, status = page.inner_text("#live-toggle"), page.inner_text("#status")
        finally:
            browser.close()

    assert {"red", "blue"} <= set(seen) and set(seen) <= {"red", "green", "blue"}, seen
    assert 0 < float(fps) <= MAX_FPS + 0.5, fps  # answers per second, as the page counts them
    assert max_in_flight == 1
    # at most MAX_FPS requests a second: as the server sees them on average, and, by the page's own clock,
    # 1/MAX_FPS s or more from one start to the next (a millisecond's slack for timer rounding)
    span = sent[-1] - sent[0]
    assert len(sent) >= 10 and (len(sent) - 1) / span <= MAX_FPS + 0.5, (len(sent), span)
    assert min(np.diff(starts)) >= 1 / MAX_FPS - 0.001, np.diff(starts)
    assert max(sum(t <= s < t + 1 for s in starts) for t in starts) <= MAX_FPS
    # the top-3 box lies over the video
    assert video["x"] <= overlay["x"] and overlay["x"] + overlay["width"] <= video["x"] + video["width"]
    assert video["y"] <= overlay["y"] and overlay["y"] + overlay["height"] <= video["y"] + video["height"]
    # stopped: the camera is released and nothing more is sent
    assert ended and all(s == "ended" for s in ended), ended
    assert not [t for t in requests if t > stopped + 0.5]
    assert toggle == "Live camera" and "stopped" in status


def _reject(name: str) -> str:
    return (f"navigator.mediaDevices.getUserMedia = () => "
            f"Promise.reject(new DOMException('the test says no', {name!r}));")


@needs_chromium
def test_camera_trouble_gets_one_clear_message(live_server):
    from playwright.sync_api import sync_playwright

    cases = [  # (script run before the page's, what the status must say)
        (_reject("NotAllowedError"), r"refused camera access.*allow"),
        (_reject("SecurityError"), r"refused camera access"),
        (_reject("NotFoundError"), r"no camera found"),
        (_reject("OverconstrainedError"), r"no camera found"),
        (_reject("NotReadableError"), r"camera is busy"),
        ("Object.defineProperty(Navigator.prototype, 'mediaDevices', { get: () => undefined });", r"https.*localhost"),
    ]
    with sync_playwright() as p:
        # a fake camera (Chromium's test pattern) for the failing-server case; the others replace getUserMedia
        browser = chromium(p, "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream")
        try:
            for script, message in cases:
                page = browser.new_page()
                page.add_init_script(script)
                page.goto(live_server + "/")
                page.click("#live-toggle")
                page.wait_for_selector("#status.error", timeout=10_000)
                text = page.inner_text("#status")
                assert re.search(message, text, re.I) and "\n" not in text, (message, text)
                assert page.inner_text("#live-toggle") == "Live camera"  # ready to try again
                page.close()

            # the server fails: its detail is shown, the page backs off, and recovers when the server does
            page = browser.new_page()
            tries = []

            def busy(route):
                tries.append(time.monotonic())
                route.fulfill(status=503, json={"detail": "busy: 9 images queued; retry shortly"},
                              headers={"Retry-After": "1"})

            page.route("**/predict*", busy)
            page.goto(live_server + "/")
            page.click("#live-toggle")
            page.wait_for_selector("#status.error", timeout=10_000)
            assert page.inner_text("#status") == "busy: 9 images queued; retry shortly"
            page.wait_for_timeout(2500)
            window = [t for t in tries if t >= tries[0] + 0.2]  # after the first answer: one try a second
            assert 1 <= len(window) <= 4, len(window)
            page.unroute("**/predict*")
            page.wait_for_function(TOP, timeout=10_000)
            page.wait_for_function("!document.getElementById('status').classList.contains('error')")
            page.click("#live-toggle")
        finally:
            browser.close()
