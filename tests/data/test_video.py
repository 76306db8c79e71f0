"""video.py: frames of files, cameras and streams (sampling, timestamps, damage, stalls, live dropping) and the
video writer."""
from __future__ import annotations

import glob
import http.server
import threading
import time

import av
import numpy as np
import pytest
from PIL import Image

from imgclf.data.video import VideoError, VideoSource, VideoWriter, camera_index
from imgclf.errors import ImgclfError

from support import serve_folder
from synthetic import video_clip


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """2 s at 10 frames/s: red, then blue."""
    return video_clip(tmp_path_factory.mktemp("clip") / "clip.mp4", ("red", "blue"))


def test_frames_in_order_with_times_and_sampling(clip):
    with VideoSource(clip) as video:
        assert not video.live and video.fps == 10 and video.size == (96, 64)
        frames = list(video.frames(every=3, prepare=lambda img: np.asarray(img).mean(axis=(0, 1))))
    assert [f.index for f in frames] == list(range(20))
    assert [f.time for f in frames] == pytest.approx([i / 10 for i in range(20)])
    assert [f.index for f in frames if f.sampled] == [0, 3, 6, 9, 12, 15, 18]
    assert all((f.prepared is None) != f.sampled for f in frames)
    red, blue = frames[0].prepared, frames[18].prepared  # prepare ran on the decoded RGB image
    assert red[0] > 150 > red[2] and blue[2] > 150 > blue[0]
    assert frames[5].image.size == (96, 64) and frames[5].image.mode == "RGB"  # unsampled: converted on use


def test_truncated_file_keeps_its_frames_then_says_so(tmp_path):
    for name, options in (("fast.mp4", {"movflags": "faststart"}), ("clip.mkv", {})):
        path = video_clip(tmp_path / name, ("red", "blue", "green"), **options)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        got = []
        with VideoSource(path) as video, pytest.raises(VideoError) as e:
            for frame in video.frames():
                got.append(frame.index)
        assert 0 < len(got) < 30 and got == list(range(len(got)))
        assert e.value.frames == len(got) and "truncated" in str(e.value) and "kept" in str(e.value)


def test_files_that_are_not_videos(tmp_path):
    with pytest.raises(ImgclfError, match="no such file.*camera index"):
        VideoSource(tmp_path / "missing.mp4")
    (tmp_path / "notes.mp4").write_text("not a video")
    with pytest.raises(ImgclfError, match="notes.mp4: cannot be opened as a video"):
        VideoSource(tmp_path / "notes.mp4")
    audio = tmp_path / "sound.m4a"
    with av.open(str(audio), "w") as out:
        stream = out.add_stream("aac", rate=8000)
        for i in range(4):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 8000, i * 1024
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    with pytest.raises(ImgclfError, match=r"sound.m4a: has no video stream \(it holds audio\)"):
        VideoSource(audio)


def test_camera_index_that_does_not_exist():
    assert [camera_index(s) for s in (0, "3", "/dev/video2", "clip.mp4", "rtsp://x/1")] == [0, 3, 2, None, None]
    missing = next(i for i in range(64) if not glob.glob(f"/dev/video{i}"))
    with pytest.raises(ImgclfError, match=f"camera {missing} not found: /dev/video{missing} does not exist"):
        VideoSource(str(missing))


def test_a_file_over_http_is_read_whole_and_an_endless_stream_is_live(tmp_path):
    video_clip(tmp_path / "clip.mkv", ("red", "blue"))
    video_clip(tmp_path / "clip.ts", ("red", "blue"), fmt="mpegts")  # broadcast format: states no length
    with serve_folder(tmp_path) as server:
        with VideoSource(f"{server.url}/clip.mkv") as video:
            assert not video.live  # it has an end: no frame is dropped however slow the caller
            frames = []
            for f in video.frames():
                frames.append(f.index)
                time.sleep(0.01)
        assert frames == list(range(20))
        with VideoSource(f"{server.url}/clip.ts") as video:
            assert video.live and [f.index for f in video.frames()][-1] == 19


def test_stalled_stream_times_out_after_its_frames(tmp_path):
    data = video_clip(tmp_path / "clip.ts", ("red", "blue", "green"), fmt="mpegts").read_bytes()

    class Stalls(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            time.sleep(8)  # then nothing: a camera whose network went away

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Stalls)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        got, started = [], time.monotonic()
        with VideoSource(f"http://127.0.0.1:{server.server_address[1]}/live.ts", timeout=1.0) as video, \
                pytest.raises(VideoError, match="stalled") as e:
            for frame in video.frames():
                got.append(frame.index)
        assert time.monotonic() - started < 6 and got and e.value.frames == len(got)
    finally:
        server.shutdown()
        server.server_close()


def test_a_live_source_drops_old_frames_when_the_caller_is_behind(clip):
    with VideoSource(clip) as video:
        video.live = True  # as a camera would be
        seen = []
        for frame in video.frames():
            seen.append(frame.index)
            time.sleep(0.02)  # a slow model
        assert video.dropped > 0 and len(seen) + video.dropped == 20 and seen == sorted(seen)


def test_writer_round_trip_and_bad_names(tmp_path):
    out = tmp_path / "out.mp4"
    with VideoWriter(out, fps=12) as writer:
        for i in range(15):
            writer.write(Image.new("RGB", (101, 75), (i * 16, 0, 0)))  # odd size: cropped to even
        assert not out.exists() and (tmp_path / "out.mp4.part").exists()  # whole or absent
    assert out.exists() and not (tmp_path / "out.mp4.part").exists()
    with VideoSource(out) as video:
        assert video.size == (100, 74) and video.fps == 12 and len(list(video.frames())) == 15
    with pytest.raises(ImgclfError, match="cannot write this kind of video"):
        VideoWriter(tmp_path / "out.gif", fps=10)
    with pytest.raises(ImgclfError, match="no such folder"):
        VideoWriter(tmp_path / "nowhere" / "out.mp4", fps=10)
    empty = VideoWriter(tmp_path / "empty.webm", fps=10)
    empty.close()
    assert list(tmp_path.glob("empty*")) == []
