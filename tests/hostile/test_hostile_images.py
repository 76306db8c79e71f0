"""Hostile images (tests/hostile/corpus.py): each one gets a one-line error, the good files beside it are
still predicted, and the process stays under a stated peak memory while refusing them."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image, ImageFile

import imgclf
from imgclf.data import Preprocess, preprocess_image
from imgclf.data.decode import decode_chunk
from imgclf.errors import ImgclfError

from hostile_files import eps_file, image_corpus, png_16bit_scan, png_zlib_bomb, run_measured

PEAK_RSS_LIMIT_MB = 1024  # the bound for any imgclf process refusing a hostile input


def _good(folder, name="good.png", colour=(200, 30, 30)):
    path = folder / name
    Image.new("RGB", (40, 30), colour).save(path)
    return path


def test_predict_refuses_every_hostile_image_in_one_line_and_keeps_the_good_ones(tiny_run, tmp_path):
    corpus = image_corpus(tmp_path / "bad")
    good = [_good(tmp_path, "good_a.png"), _good(tmp_path, "good_b.jpg", (10, 200, 10))]
    code, out, err, peak = run_measured(["predict", str(tiny_run.run_dir), str(good[0]), *map(str, corpus.values()),
                                         str(good[1]), "--format", "table"])
    assert code == 1, (out, err)
    assert "Traceback" not in out + err
    lines = out.splitlines()
    assert len(lines) == len(corpus) + 2
    for name, path in corpus.items():
        line = next(line for line in lines if line.startswith(f"{path}: "))
        assert ": error: " in line, (name, line)
    assert not any("error" in line for line in lines if "good_" in line.split(":")[0])
    assert f"{len(corpus)} of {len(corpus) + 2} image(s) could not be read" in err
    assert peak < PEAK_RSS_LIMIT_MB, f"peak RSS {peak:.0f} MB"


def test_a_large_scan_within_the_budget_is_predicted_under_the_memory_bound(tiny_run, tmp_path):
    scan = png_16bit_scan(tmp_path / "scan16.png")  # 7,000 x 7,000 16-bit: 98 MB decoded, 0.3 MB stored
    code, out, err, peak = run_measured(["predict", str(tiny_run.run_dir), str(scan)])
    assert code == 0 and "error" not in out, (out, err)
    assert peak < PEAK_RSS_LIMIT_MB, f"peak RSS {peak:.0f} MB"


def test_the_byte_budget_is_read_from_the_header_and_can_be_raised(tmp_path, monkeypatch):
    from imgclf.data import images

    bomb = png_zlib_bomb(tmp_path / "rgba.png", 1200, 1000)  # 4.6 MB decoded
    spec = Preprocess(image_size=8, channels=3, mean=(0.5,) * 3, std=(0.25,) * 3)
    monkeypatch.setattr(images, "MAX_IMAGE_BYTES", 4 * 1024 ** 2)
    decoded = []
    monkeypatch.setattr(Image.Image, "load", lambda self: decoded.append(self) or None)
    with pytest.raises(ImgclfError, match=r"rgba.png: 1200x1000 RGBA image would take 5 MB decoded, over the 4 MB"):
        preprocess_image(bomb, spec)
    assert decoded == []  # refused from the header: not a pixel decoded
    monkeypatch.undo()
    monkeypatch.setenv("IMGCLF_MAX_IMAGE_MB", "5")
    monkeypatch.setattr(images, "MAX_IMAGE_BYTES", 4 * 1024 ** 2)
    assert preprocess_image(bomb, spec).shape == (8, 8, 3)
    monkeypatch.setenv("IMGCLF_MAX_IMAGE_MB", "lots")
    with pytest.raises(ImgclfError, match="IMGCLF_MAX_IMAGE_MB='lots' is not a number"):
        preprocess_image(bomb, spec)


def test_a_memory_error_costs_only_its_own_image(tiny_run, tmp_path, monkeypatch):
    """Out of memory while decoding or converting one image is that image's error, in predict and in the
    dataset decoder alike; the images after it are still read."""
    paths = [_good(tmp_path, f"{name}.png") for name in ("first", "oom_decode", "oom_convert", "last")]
    real_load, real_resize = ImageFile.ImageFile.load, Image.Image.resize

    def load(self):
        if "oom_decode" in str(getattr(self, "filename", "")):
            raise MemoryError
        return real_load(self)

    def resize(self, *args, **kwargs):
        if "oom_convert" in str(getattr(self, "filename", "")):
            raise MemoryError
        return real_resize(self, *args, **kwargs)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    monkeypatch.setattr(Image.Image, "resize", resize)

    clf = imgclf.load(tiny_run.run_dir)
    preds = clf.predict([str(p) for p in paths], errors="report")
    assert [p.error is None for p in preds] == [True, False, False, True]
    assert "out of memory decoding this 40x30 image" in preds[1].error
    assert "out of memory converting this 40x30 image" in preds[2].error
    decoded = decode_chunk([(p.name, str(p)) for p in paths], 8, 3)
    assert [d.error is None for d in decoded] == [True, False, False, True]
    assert all(d.pixels.shape == (8, 8, 3) for d in decoded if d.error is None)


def test_images_only_reach_the_formats_imgclf_reads(tmp_path, monkeypatch):
    """An EPS file is never handed to Pillow's EPS plugin (which runs Ghostscript), whatever its name says."""
    from PIL import EpsImagePlugin

    opened = []
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", lambda self: opened.append(self))
    spec = Preprocess(image_size=8, channels=3, mean=(0.5,) * 3, std=(0.25,) * 3)
    for name in ("figure.eps", "figure.jpg", "figure"):
        with pytest.raises(ImgclfError, match=r"not an image in a format imgclf reads \(JPEG, PNG, WebP, GIF, BMP"):
            preprocess_image(eps_file(tmp_path / name), spec)
    assert opened == []
    for fmt in ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"):  # every allowed one still opens
        path = tmp_path / f"ok.{fmt.lower()}"
        Image.new("RGB", (16, 12), (0, 90, 200)).save(path, format=fmt)
        assert preprocess_image(path, spec).shape == (8, 8, 3)
    assert np.asarray(Image.open(path)).shape == (12, 16, 3)


def test_a_dataset_folder_with_hostile_files_trains_on_the_good_ones_under_the_memory_bound(tmp_path):
    from synthetic import colour_folder

    data = colour_folder(tmp_path / "data", n_train=12, n_test=6)
    corpus = image_corpus(tmp_path / "data" / "train" / "red")
    corpus["fifo"].unlink()  # a FIFO has its own test; here the folder walk would list it as a file
    home = tmp_path / "home"
    args = ["train", "--data", str(data), "--model", "seed-cnn", "--epochs", "1", "--batch-size", "8",
            "--project", str(tmp_path / "runs"), "--name", "bad", "--no-progress"]
    code, out, err, peak = run_measured(args, env={"IMGCLF_HOME": str(home)})
    assert code == 2 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith("error: ")
    assert peak < PEAK_RSS_LIMIT_MB, f"peak RSS {peak:.0f} MB refusing the folder"
    code, out, err, peak = run_measured([*args, "--skip-bad-images"], env={"IMGCLF_HOME": str(home)})
    assert code == 0 and "Traceback" not in err, err
    run = json.loads((tmp_path / "runs" / "bad" / "run.json").read_text())
    assert run["status"] == "finished"
    images = {f"train/red/{path.name}" for name, path in corpus.items() if name not in ("fifo", "eps")}
    assert set(run["data"]["skipped"]) == images  # drawing.eps is no image file by its name: not even listed
    assert peak < PEAK_RSS_LIMIT_MB, f"peak RSS {peak:.0f} MB training beside them"


@pytest.mark.parametrize("error", [IndexError("tile index out of range"), KeyError(279), ZeroDivisionError()])
def test_whatever_a_decoder_raises_on_a_files_bytes_is_that_files_error(tmp_path, monkeypatch, error):
    """Pillow's plugins raise more than OSError on crafted bytes (struct.error, IndexError, KeyError ...): that
    is the file's error, one line, and the files after it are still read."""
    paths = [_good(tmp_path, f"{name}.png") for name in ("first", "crafted", "last")]
    real_load = ImageFile.ImageFile.load

    def load(self):
        if "crafted" in str(getattr(self, "filename", "")):
            raise error
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    decoded = decode_chunk([(p.name, str(p)) for p in paths], 8, 3)
    assert [d.error is None for d in decoded] == [True, False, True]
    assert decoded[1].error.startswith("crafted.png: truncated or corrupt image (" + type(error).__name__)
