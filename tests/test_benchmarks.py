"""The benchmark scripts' own logic (their figures need the real runs; see README.md)."""
import importlib.util
from pathlib import Path

import pytest


def _load(name):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_recipe_seeds_variants_and_paired_summary():
    rs = _load("recipe_seeds")
    assert rs.parse_variant("base") == ("base", {})
    assert rs.parse_variant("x:lr=0.2,epochs=9,tta=flip") == ("x", {"lr": 0.2, "epochs": 9, "tta": "flip"})
    with pytest.raises(SystemExit, match="key=value"):
        rs.parse_variant("x:lr")
    rows = [{"variant": "a", "seed": s, "top1": 0.9, "tta": t} for s, t in [(0, 0.905), (1, 0.907), (2, 0.91)]]
    rows += [{"variant": "b", "seed": s, "top1": 0.9, "tta": t} for s, t in [(0, 0.906), (1, 0.906), (2, 0.912)]]
    a, b = rs.summarise(rows, ["a", "b"], bar=90.66)
    assert a["n"] == 3 and a["tta"]["mean"] == pytest.approx(90.733, abs=1e-3) and "paired" not in a
    assert a["at_or_above_bar"] == 2 and b["at_or_above_bar"] == 1  # 90.5, 90.7, 91.0 vs 90.6, 90.6, 91.2
    assert b["paired"] == {"mean": pytest.approx(0.067, abs=1e-3), "n": 3, "better": 2, "worse": 1}


def test_recipe_seeds_moves_the_yardstick_source():
    rs = _load("recipe_seeds")
    if not rs.YARDSTICK.is_file():
        pytest.skip("the shared yardstick is not beside this checkout")
    src = rs.YARDSTICK.read_text()
    assert all(old in src for old, _ in rs._MOVE)  # else --yardstick would stop with a clear message


def test_train_speed_counts_grouped_convolutions_backward_as_grouped():
    """A depthwise convolution's backward costs twice its forward pass (input and weight gradients), as a dense
    one's does; PyTorch's own counter takes it as dense, 64x too much here."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    ts = _load("train_speed")
    for groups in (64, 1):
        conv = torch.nn.Conv2d(64, 64, 3, padding=1, groups=groups, bias=False)
        x = torch.randn(2, 64, 8, 8, requires_grad=True)
        with FlopCounterMode(display=False, custom_mapping={torch.ops.aten.convolution_backward:
                                                            ts.conv_backward_flop}) as counter:
            conv(x).sum().backward()
        forward = 2 * 2 * 8 * 8 * 64 * (64 // groups) * 9
        assert counter.get_total_flops() == 3 * forward


def test_data_scale_folder_and_process_tree_memory(tmp_path, monkeypatch):
    import os
    import sys

    from imgclf.data import load_dataset

    ds_mod = _load("data_scale")
    monkeypatch.setitem(sys.modules, "data_scale", ds_mod)  # its writer processes find _write_part by name
    folder = ds_mod.make_folder(tmp_path, 120, 16)
    assert ds_mod.make_folder(tmp_path, 120, 16) == folder  # written once, then reused
    ds = load_dataset(str(folder), progress=False)
    assert len(ds.classes) == 10 and len(ds.train.y) == 100 and len(ds.test.y) == 20
    assert ds.image_size == 16 and sorted(set(ds.test.y.tolist())) == list(range(10))
    m = ds_mod.tree_memory(os.getpid())
    assert m["anon"] > 10 << 20 and m["pss"] > 0


def test_kill_resume_three_random_kills_end_with_the_uninterrupted_weights(tmp_path):
    """benchmarks/kill_resume.py in small: 3 kill -9 at random moments, each resumed to the reference's weights
    with no process outliving the kill (the benchmark runs 20)."""
    kr = _load("kill_resume")
    assert kr.main(["--trials", "3", "--seed", "1", "--work", str(tmp_path)]) == 0


def test_serve_soak_in_small(tiny_run):
    """benchmarks/serve_soak.py for 10 s with 4 clients (the benchmark runs 10 minutes with 32): every kind
    of request gets its status, no 5xx, slow clients are cut off, the queue ends empty, SIGTERM exits."""
    soak = _load("serve_soak")
    r = soak.main([str(tiny_run.run_dir), "--minutes", str(10 / 60), "--clients", "4"])
    kinds = r["statuses_by_kind"]
    assert set(kinds["good"]) <= {"200", "503"} and kinds["good"].get("200", 0) > 0
    assert set(kinds["junk"]) == {"415"} and set(kinds["truncated"]) == {"422"} and set(kinds["bomb"]) == {"413"}
    assert set(kinds.get("oversize", {"413": 1})) == {"413"}
    assert r["server_errors_not_503"] == 0 and not r["connection_errors"]
    assert r["slow_cut"]["headers"]["n"] >= 1 and r["slow_answered_408"] >= 1
    assert r["queued_at_end"] == 0 and r["server_log"]["tracebacks"] == 0
    assert r["sigterm_to_exit_s"] is not None and r["sigterm_to_exit_s"] < 10 and r["rss_mb"]["samples"] >= 3


@pytest.mark.realdata
def test_video_benchmark_clip_is_two_photos_a_class(tmp_path):
    vb = _load("video")
    if not vb.WEATHER.is_file():
        pytest.skip(f"{vb.WEATHER} not present")
    from imgclf.data.video import VideoSource

    names = vb.make_clip(tmp_path / "clip.mp4", size=(160, 90), fps=2, seconds=1)
    assert [n.split("/")[0] for n in names] == [c for c in vb.CLASSES for _ in range(2)]
    with VideoSource(tmp_path / "clip.mp4") as video:
        frames = list(video.frames())
    assert video.size == (160, 90) and len(frames) == 16
    assert frames[0].image.getpixel((80, 45)) != frames[-1].image.getpixel((80, 45))  # the photos differ


def test_gradcam_hides_the_hottest_pixels_with_the_mean():
    from types import SimpleNamespace

    import numpy as np

    gc = _load("gradcam")
    heat = np.zeros((4, 5), np.float32)
    heat[1, 2], heat[3, 4], heat[0, 0] = 1.0, 0.8, 0.5
    rng = np.random.default_rng(0)
    assert list(gc.hottest(heat, 0.15, rng)) == [7, 19, 0]  # 3 of 20 pixels, hottest first
    ties = {tuple(sorted(gc.hottest(np.zeros((4, 5)), 0.2, rng))) for _ in range(5)}
    assert len(ties) > 1  # a flat map hides random pixels, not always the first row
    clf = SimpleNamespace(preprocess=SimpleNamespace(mean=(124 / 255, 116 / 255, 104 / 255)))
    image = np.full((4, 5, 3), 9, np.uint8)
    out = gc.hider(clf, "mean")(image, np.array([7, 19]))
    assert (out[1, 2] == [124, 116, 104]).all() and (out[3, 4] == [124, 116, 104]).all()
    assert (out == 9).all(axis=2).sum() == 18 and (image == 9).all()  # the input is untouched
    # inpainting: a hidden pixel takes its kept neighbours' colour; a region out of reach the mean
    image[:, :, 0] = np.arange(5) * 10  # a horizontal ramp
    out = gc.hider(clf, "inpaint")(image, np.array([7]))
    assert abs(int(out[1, 2, 0]) - 20) <= 1 and (out[1, 2, 1:] == 9).all()
    assert (np.delete(out.reshape(-1, 3), 7, 0) == np.delete(image.reshape(-1, 3), 7, 0)).all()  # the rest kept


def test_doctor_benchmark_flips_a_share_into_other_classes_and_adds_copies(tmp_path):
    from synthetic import image_folder

    db = _load("doctor")
    folder = image_folder(tmp_path / "d", {"a": 20, "b": 20}, size=(16, 12))
    flipped = db.flip_labels(folder, 0.05, seed=0)
    assert len(flipped) == 2 and all((folder / p).is_file() for p in flipped)
    assert all(p.split("/")[1].startswith("flipped-") for p in flipped)  # in another class's folder, moved
    assert len(list(folder.rglob("*.png"))) == 40
    assert db.flip_labels(image_folder(tmp_path / "e", {"a": 20, "b": 20}), 0.05, seed=0) == flipped  # seeded
    copies = db.add_copies(folder, 5, seed=0)
    assert len(copies) == 5 and {c.split("copy-")[1].split("-")[0] for c in copies} == {"half_q60", "crop10",
                                                                                      "mirror", "bright", "q40"}
    assert all((folder / c).is_file() and (folder / o).is_file() and c.split("/")[0] == o.split("/")[0]
               for c, o in copies.items())
