"""inspect.py: counts, sizes, modes, imbalance, duplicates and unreadable files of a dataset."""
import json

import pytest
from PIL import Image

import imgclf
from imgclf.evaluation.plots import PLOT_SIZES

from support import CIFAR_JPEG
from support import run_cli as _cli
from synthetic import colour_folder


def test_inspect_finds_imbalance_duplicates_and_bad_files(tmp_path, capsys):
    data = colour_folder(tmp_path / "data", n_train=6, n_test=3)
    for i in range(6, 12):  # blue gets twice the images: imbalance
        Image.open(data / "train/blue/0.png").rotate(90 * i).save(data / f"train/blue/{i}.png")
    (data / "test/red/dup.png").write_bytes((data / "train/red/2.png").read_bytes())  # leaked into test
    Image.new("L", (20, 10), 128).save(data / "train/green/grey.png")
    (data / "train/green/broken.png").write_bytes(b"not a png")
    info = imgclf.inspect(str(data), out=tmp_path / "out", progress=False)
    assert info["classes"] == ["blue", "green", "red"]
    assert info["counts"]["train"] == {"blue": 12, "green": 7, "red": 6}  # the broken file is not counted
    assert info["counts"]["test"] == {"blue": 3, "green": 3, "red": 4}
    assert info["unreadable"] == ["train/green/broken.png"]
    assert info["duplicates"]["train_test"] == 1
    assert info["imbalance"] == {"largest": "blue", "smallest": "red", "ratio": 2.0}
    assert info["sizes"]["32x32"] == 34 and info["sizes"]["20x10"] == 1
    assert info["modes"] == {"RGB": 34, "L": 1}
    assert any("imbalance" in w for w in info["warnings"]) and any("also appear in train" in w
                                                                  for w in info["warnings"])
    for name in ("class_counts.png", "samples.png"):
        with Image.open(tmp_path / "out" / name) as img:
            assert img.size == PLOT_SIZES[name]
    assert json.loads((tmp_path / "out" / "inspect.json").read_text())["totals"] == {"train": 25, "test": 10}

    code, out, _ = _cli(capsys, "inspect", str(data), "--out", str(tmp_path / "o2"), "--no-progress")
    assert code == 0 and "warning: class imbalance" in out and "1 train/test" in out and "unreadable    1" in out
    code, out, _ = _cli(capsys, "inspect", str(data), "--out", str(tmp_path / "o2"), "--json", "--no-progress")
    assert code == 0 and json.loads(out)["counts"]["train"]["blue"] == 12
    code, _, err = _cli(capsys, "inspect", str(tmp_path / "nope"))
    assert code == 2 and "nope" in err


@pytest.mark.realdata
@pytest.mark.skipif(not CIFAR_JPEG.exists(), reason="needs ../shared/datasets/cifar10-jpeg.tar.gz")
def test_inspect_cifar10_counts(tmp_path):
    info = imgclf.inspect(str(CIFAR_JPEG), out=tmp_path, progress=False)
    assert len(info["classes"]) == 10 and info["classes"][0] == "airplane"
    assert set(info["counts"]["train"].values()) == {5000} and set(info["counts"]["test"].values()) == {1000}
    assert info["sizes"] == {"32x32": 60_000} and info["modes"] == {"RGB": 60_000}
    assert info["unreadable"] == [] and not any("imbalance" in w for w in info["warnings"])
