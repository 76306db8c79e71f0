"""A video file decoded in a process of its own while torch loads: the same frames, preprocessing and errors as
VideoSource's thread, and the command that uses it starts without torch."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import imgclf
from imgclf.data import video_process as vp
from imgclf.data.images import preprocess_image
from imgclf.data.video import VideoError, VideoSource
from imgclf.errors import ImgclfError

from support import run_cli
from synthetic import video_clip

# The command with ForkedVideo.frames counted, and the processes left behind listed, on stderr's last line.
DRIVER = """
import multiprocessing, sys
import imgclf.data.video_process as vp
torch_at_start = "torch" in sys.modules
used, frames = [], vp.ForkedVideo.frames
def counted(self, *a, **k):
    used.append(self)
    yield from frames(self, *a, **k)
vp.ForkedVideo.frames = counted
from imgclf.cli import main
try:
    main(sys.argv[1:])
finally:
    print(json.dumps({"torch_at_start": torch_at_start, "forked": len(used),
                      "children": len(multiprocessing.active_children())}), file=sys.stderr)
""".replace("import multiprocessing, sys", "import json, multiprocessing, sys")


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return video_clip(tmp_path_factory.mktemp("forked") / "clip.mp4", ("red", "blue", "green"), size=(120, 80))


def test_forked_frames_are_the_threads_frames(tiny_run, clip):
    spec = imgclf.load(tiny_run.run_dir).preprocess
    with VideoSource(clip) as video:
        want = list(video.frames(2, prepare=lambda im: preprocess_image(im, spec), min_side=spec.image_size))
    forked = vp.ForkedVideo(str(clip), spec, every=2)
    try:
        got = list(forked.frames(2))
    finally:
        forked.close()
    assert [(f.index, f.time, f.sampled) for f in got] == [(f.index, f.time, f.sampled) for f in want]
    assert len(got) == 30 and sum(f.sampled for f in got) == 15
    assert all(np.array_equal(a.prepared, b.prepared) for a, b in zip(got, want) if a.sampled)
    assert forked.read == 30 and forked.fps == pytest.approx(10) and not forked._child.is_alive()


def test_forked_errors_are_the_sources_errors(tiny_run, tmp_path):
    spec = imgclf.load(tiny_run.run_dir).preprocess
    cut = video_clip(tmp_path / "cut.mkv", ("red", "blue", "green"))
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    (tmp_path / "notes.mp4").write_text("not a video")
    forked = vp.ForkedVideo(str(cut), spec, every=1)
    with pytest.raises(VideoError, match="truncated") as e:
        for _ in forked.frames():
            pass
    forked.close()
    assert 0 < e.value.frames == forked.read < 30  # the frames before the break were handed out
    for name, message in (("missing.mp4", "no such file"), ("notes.mp4", "cannot be opened as a video")):
        forked = vp.ForkedVideo(str(tmp_path / name), spec, every=1)
        with pytest.raises(ImgclfError, match=message):
            list(forked.frames())
        forked.close()


def test_only_files_of_checkpoints_fork_and_only_before_torch(tiny_run, tiny_onnx, clip, tmp_path, monkeypatch):
    run = tiny_run.run_dir
    clf = imgclf.load(run)
    assert vp.start_decoding(run, str(clip)) is None  # torch is imported here: no fork under its threads
    monkeypatch.delitem(sys.modules, "torch")  # as in a command that has not imported it yet
    for model, source in ((run, "0"), (run, "rtsp://127.0.0.1:9/cam"), (run / "best.tflite", str(clip))):
        assert vp.start_decoding(model, source) is None
    exported = vp.start_decoding(tiny_onnx[1], str(clip))  # an .onnx file carries its preprocessing too
    try:
        assert exported.spec == clf.preprocess
    finally:
        exported.close()
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    assert vp.start_decoding(tmp_path / "junk.safetensors", str(clip)) is None  # the normal path says why
    video = vp.start_decoding(run, str(clip), every=3)
    try:
        assert video.spec == clf.preprocess and video.checked(clf) is video
    finally:
        video.close()
    other = vp.ForkedVideo(str(clip), vp.Preprocess(16, 3, (0.5,) * 3, (0.5,) * 3), every=1)
    assert other.checked(clf) is None and not other._child.is_alive()  # another preprocessing: not used


def test_the_command_decodes_while_torch_loads(tiny_run, clip, capsys):
    """`imgclf predict RUN --source FILE` as launched: no torch before the fork, the forked decoder used, the
    same rows as the in-process (thread) path, and no process left behind."""
    run = str(tiny_run.run_dir)
    proc = subprocess.run([sys.executable, "-c", DRIVER, "predict", run, "--source", str(clip), "--format", "json"],
                          capture_output=True, text=True, timeout=120)
    stats = json.loads(proc.stderr.strip().splitlines()[-1])
    assert proc.returncode == 0, proc.stderr
    assert stats == {"torch_at_start": False, "forked": 1, "children": 0}
    code, out, _ = run_cli(capsys, "predict", run, "--source", str(clip), "--format", "json")
    assert code == 0

    def rows(text):
        return [{k: v for k, v in json.loads(line).items() if k != "fps"} for line in text.splitlines()]
    assert rows(proc.stdout) == rows(out) and len(rows(out)) == 30


def test_the_command_keeps_the_frames_of_a_broken_file_and_leaves_no_process(tiny_run, tmp_path):
    cut = video_clip(tmp_path / "cut.mkv", ("red", "blue", "green"))
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    (tmp_path / "notes.mp4").write_text("not a video")
    for args, message in ((["--source", str(cut)], "truncated"), (["--source", str(cut), "--top-k", "0"],
                                                                 "at least 1"),
                          (["--source", str(tmp_path / "notes.mp4"), "--format", "table"], "cannot be opened")):
        proc = subprocess.run([sys.executable, "-c", DRIVER, "predict", str(tiny_run.run_dir), "--format", "json",
                               *args], capture_output=True, text=True, timeout=120)
        *lines, last = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and any(message in line for line in lines), proc.stderr
        assert json.loads(last)["children"] == 0 and "Traceback" not in proc.stderr
        if message == "cannot be opened":  # refused at the start, as the thread path does: not even a header
            assert proc.stdout == "" and json.loads(last)["forked"] == 0
    kept = [json.loads(line)["frame"] for line in subprocess.run(
        [sys.executable, "-m", "imgclf", "predict", str(tiny_run.run_dir), "--source", str(cut), "--format", "json"],
        capture_output=True, text=True, timeout=120).stdout.splitlines()]
    assert 0 < len(kept) < 30 and kept == list(range(len(kept)))


def test_ctrl_c_stops_the_command_and_its_decoding_process(tiny_run, tmp_path):
    import signal

    long = video_clip(tmp_path / "long.mp4", ("red", "blue") * 150, size=(64, 48))  # 3,000 frames
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, "predict", str(tiny_run.run_dir), "--source", str(long),
                             "--format", "json", "--batch-size", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = proc.stdout.readline()  # a frame is labelled: the model and the decoder are both running
    proc.send_signal(signal.SIGINT)
    rest, err = proc.communicate(timeout=60)
    stats = json.loads(err.strip().splitlines()[-1])
    assert json.loads(first)["frame"] == 0 and len(rest.splitlines()) < 2999
    assert proc.returncode == 130 and "stopped by Ctrl-C" in err and "Traceback" not in err, err
    assert stats["forked"] == 1 and stats["children"] == 0
