"""`imgclf predict --source`: a label for every frame of a video (files, streams, .onnx models), smoothing and
sampling, the labelled video written back, Ctrl-C, and one-line errors for videos that are not."""
from __future__ import annotations

import http.server
import json
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

import numpy as np
import pytest
from PIL import Image

import imgclf
from imgclf.data.video import VideoSource

from support import run_cli
from synthetic import COLOURS, pixels, video_clip

SEGMENTS = ("red", "blue", "green")  # 1 s each at 10 frames/s


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return video_clip(tmp_path_factory.mktemp("video") / "clip.mp4", SEGMENTS, size=(120, 80))


def _majority(labels: list[str]) -> str:
    return Counter(labels).most_common(1)[0][0]


def test_every_frame_labelled_as_its_photo_is(tiny_run, clip, tmp_path, capsys):
    """Each segment's majority label is what `imgclf predict` says of a still photo of that segment."""
    run = str(tiny_run.run_dir)
    code, out, err = run_cli(capsys, "predict", run, "--source", str(clip), "--format", "json")
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [r["frame"] for r in rows] == list(range(30))
    assert [r["time"] for r in rows] == pytest.approx([i / 10 for i in range(30)])
    assert all(len(r["top"]) == 3 and r["fps"] > 0 for r in rows)
    for i, colour in enumerate(SEGMENTS):
        still = tmp_path / f"{colour}.png"
        Image.fromarray(pixels(COLOURS[colour], (120, 80), 20, np.random.default_rng(i))).save(still)
        _, photo_out, _ = run_cli(capsys, "predict", run, str(still), "--format", "json")
        expected = json.loads(photo_out)[0]["top"][0]["class"]
        assert _majority([r["top"][0]["class"] for r in rows[10 * i:10 * i + 10]]) == expected == colour
    assert "30 frames in" in err and "frames/s), 30 classified" in err
    code, out, _ = run_cli(capsys, "predict", run, "--source", str(clip))  # the table, with a frames/s column
    assert code == 0 and out.splitlines()[0].split() == ["frame", "time", "frames/s", "top", "classes"]
    assert len(out.splitlines()) == 31


def test_every_and_smooth_in_python_and_csv(tiny_run, clip, capsys):
    clf = imgclf.load(tiny_run.run_dir)
    raw = list(clf.predict_video(str(clip), top_k=3, every=4))
    assert [r.index for r in raw] == list(range(0, 30, 4)) and all(r.frames == [] for r in raw)
    smooth = list(clf.predict_video(str(clip), top_k=3, every=4, smooth=3, batch_size=2))
    probs = np.array([[dict(r.top)[c] for c in clf.classes] for r in raw])
    for i, rec in enumerate(smooth):  # the mean of this and the two classified frames before it
        mean = probs[max(0, i - 2):i + 1].mean(axis=0)
        assert [c for c, _ in rec.top] == [clf.classes[j] for j in np.argsort(-mean, kind="stable")]
        assert [p for _, p in rec.top] == pytest.approx(sorted(mean, reverse=True), abs=1e-5)
    code, out, _ = run_cli(capsys, "predict", str(tiny_run.run_dir), "--source", str(clip), "--every", "4",
                           "--smooth", "3", "--top-k", "1", "--format", "csv")
    lines = out.splitlines()
    assert code == 0 and lines[0] == "frame,time,rank,class,probability,fps" and len(lines) == 1 + len(smooth)
    assert [line.split(",")[3] for line in lines[1:]] == [r.label for r in smooth]


def test_onnx_model_labels_frames_as_the_checkpoint_does(tiny_run, tiny_onnx, clip):
    _, onnx_path = tiny_onnx
    torch_labels = [r.label for r in imgclf.load(tiny_run.run_dir).predict_video(str(clip))]
    onnx_labels = [r.label for r in imgclf.load(onnx_path).predict_video(str(clip))]
    assert len(onnx_labels) == 30 and onnx_labels == torch_labels


def test_save_writes_the_labelled_video(tiny_run, clip, tmp_path, capsys):
    out = tmp_path / "labelled.mp4"
    code, _, err = run_cli(capsys, "predict", str(tiny_run.run_dir), "--source", str(clip), "--every", "3",
                           "--save", str(out), "--format", "json")
    assert code == 0 and f"saved {out}" in err
    with VideoSource(clip) as src, VideoSource(out) as dst:
        assert dst.size == src.size and dst.fps == src.fps
        before = [np.asarray(f.image, np.int16) for f in src.frames()]
        after = [np.asarray(f.image, np.int16) for f in dst.frames()]
    assert len(after) == len(before) == 30  # every frame, sampled or not
    for a, b in zip(after, before):
        assert np.abs(a[:8, :30] - b[:8, :30]).mean() > 30   # the label's dark box, top left
        assert np.abs(a[-20:, -40:] - b[-20:, -40:]).mean() < 12  # the rest as it was (two lossy encodings)


def test_a_truncated_video_keeps_its_frames_and_fails(tiny_run, tmp_path, capsys):
    path = video_clip(tmp_path / "cut.mkv", SEGMENTS)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    saved = tmp_path / "saved.mkv"
    code, out, err = run_cli(capsys, "predict", str(tiny_run.run_dir), "--source", str(path), "--format", "json",
                             "--save", str(saved))
    kept = [json.loads(line)["frame"] for line in out.splitlines()]
    assert code == 2 and 0 < len(kept) < 30 and kept == list(range(len(kept)))
    assert f"{len(kept)} frames in" in err and "error: " in err and "truncated" in err and "Traceback" not in err
    with VideoSource(saved) as video:
        assert len(list(video.frames())) == len(kept)


def test_bad_sources_and_flags_get_one_line(tiny_run, tmp_path, capsys):
    run = str(tiny_run.run_dir)
    (tmp_path / "notes.mp4").write_text("not a video")
    for args, message in (
        (["--source", str(tmp_path / "missing.mp4")], "no such file"),
        (["--source", str(tmp_path / "notes.mp4")], "cannot be opened as a video"),
        (["--source", "http://127.0.0.1:9/cam"], "cannot be opened as a video"),
        (["x.jpg", "--source", str(tmp_path / "notes.mp4")], "give images or --source, not both"),
        ([], "or --source for a video"),
        (["--source", str(tmp_path / "notes.mp4"), "--every", "0"], "at least 1"),
    ):
        code, _, err = run_cli(capsys, "predict", run, *args)
        assert code == 2 and err.count("\n") == 1 and message in err, (args, err)


def test_ctrl_c_stops_a_live_stream_cleanly(tiny_run, tmp_path):
    """A real SIGINT while labelling an endless stream: exit 130, the summary, and a saved video that plays."""
    data = video_clip(tmp_path / "live.ts", ("red", "blue") * 20, fmt="mpegts").read_bytes()

    class Trickle(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            try:
                for i in range(0, len(data), 4096):  # about as fast as a camera sends it
                    self.wfile.write(data[i:i + 4096])
                    time.sleep(0.05)
            except (BrokenPipeError, ConnectionResetError):  # the client stopped, as it should
                pass

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Trickle)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    saved = tmp_path / "live.mp4"
    cmd = [sys.executable, "-m", "imgclf", "predict", str(tiny_run.run_dir), "--format", "json", "--save",
           str(saved), "--source", f"http://127.0.0.1:{server.server_address[1]}/live.ts"]
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        first = proc.stdout.readline()  # a frame is labelled: the stream is running
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=60)
    finally:
        server.shutdown()
        server.server_close()
    assert json.loads(first)["frame"] == 0
    assert proc.returncode == 130 and "stopped by Ctrl-C" in err and "Traceback" not in err, err
    with VideoSource(saved) as video:
        assert len(list(video.frames())) >= 1
