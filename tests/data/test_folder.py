"""load_dataset on image folders: layouts, class order, splits, channels, sizes and bad input."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from imgclf.data import decode, load_dataset
from imgclf.errors import ImgclfError

from synthetic import write_image


def load(path, **kw):
    return load_dataset(str(path), progress=False, **kw)


def test_train_test_layout_in_natural_class_order(image_tree):
    root = image_tree({"train/10": 2, "train/2": 3, "train/b": 1, "test/2": 1, "test/10": 1, "test/b": 1})
    ds = load(root)
    assert ds.classes == ["2", "10", "b"]
    assert ds.name == "data" and ds.source == str(root.resolve())
    assert ds.train.x.shape == (6, 8, 8, 3) and ds.train.x.dtype == np.uint8
    assert ds.train.y.dtype == np.int64 and ds.train.y.tolist() == [0, 0, 0, 1, 1, 2]
    assert ds.test.y.tolist() == [0, 1, 2]
    assert ds.val is None and ds.val_origin == "none" and ds.skipped == []
    assert ds.image_size == 8 and ds.channels == 3
    # labels follow the pixels: every image of a class has that class's colour
    for split in (ds.train, ds.test):
        for x, y in zip(split.x, split.y):
            assert (x == split.x[split.y == y][0]).all()


def test_class_only_layout_is_split_by_fractions(image_tree):
    root = image_tree({"cat": 10, "dog": 10, "eel": 5})
    ds = load(root, val_split=0.2, test_split=0.2, seed=3)
    assert ds.classes == ["cat", "dog", "eel"]
    assert len(ds.train.y) + len(ds.val.y) + len(ds.test.y) == 25
    for split in (ds.train, ds.val, ds.test):       # stratified: every class on every side
        assert set(split.y.tolist()) == {0, 1, 2}
    assert np.bincount(ds.test.y).tolist() == [2, 2, 1]
    assert ds.val_origin == "val-split"


def test_class_only_without_fractions_holds_out_val_and_test(image_tree, capsys):
    assert load(image_tree({"a": 9, "b": 12}, name="few")).test is None  # too few in "a" to hold any out
    capsys.readouterr()
    ds = load(image_tree({"a": 10, "b": 10}))
    assert len(ds.test.y) == 2 and len(ds.val.y) == 2 and len(ds.train.y) == 16
    assert sorted(ds.test.y.tolist()) == [0, 1] and ds.val_origin == "val-split"
    assert "holding out 10% for validation and 10% for test" in capsys.readouterr().err


def test_split_is_seeded(image_tree):
    root = image_tree({"cat": 20, "dog": 20})
    # give each image a unique pixel so the carved sets can be compared
    for i, path in enumerate(sorted(root.rglob("*.png"))):
        Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(path)
    a, b, c = (load(root, val_split=0.25, seed=s) for s in (0, 0, 1))
    assert (np.asarray(a.val.x) == np.asarray(b.val.x)).all() and (np.asarray(a.train.x) == np.asarray(b.train.x)).all()
    assert not (a.val.x[:, 0, 0, 0] == c.val.x[:, 0, 0, 0]).all()
    assert sorted(a.val.x[:, 0, 0, 0].tolist() + a.train.x[:, 0, 0, 0].tolist()) == list(range(40))


def test_val_carved_from_train_and_val_folder(image_tree):
    root = image_tree({"train/a": 10, "train/b": 10, "test/a": 2, "test/b": 2})
    ds = load(root, val_split=0.1)
    assert ds.val_origin == "val-split" and len(ds.val.y) == 2 and len(ds.train.y) == 18
    assert len(ds.test.y) == 4  # the test folder is untouched
    with_val = image_tree({"train/a": 3, "train/b": 3, "val/a": 1, "val/b": 2, "test/a": 1}, name="v")
    ds = load(with_val, val_split=0.5)  # val/ wins over val_split
    assert ds.val_origin == "val-folder" and ds.val.y.tolist() == [0, 1, 1] and len(ds.train.y) == 6


def test_test_split_carves_from_train_only_without_test_folder(image_tree):
    ds = load(image_tree({"train/a": 10, "train/b": 10}), test_split=0.2)
    assert len(ds.test.y) == 4 and len(ds.train.y) == 16


def test_greyscale_dataset_has_one_channel(image_tree):
    ds = load(image_tree({"train/a": 2, "train/b": 2, "test/a": 1, "test/b": 1}, mode="L"))
    assert ds.channels == 1 and ds.train.x.shape == (4, 8, 8, 1)


def test_mixed_modes_give_three_channels(tmp_path):
    root = tmp_path / "mixed"
    write_image(root / "a" / "rgba.png", mode="RGBA")
    write_image(root / "a" / "pal.png", mode="P")
    write_image(root / "a" / "cmyk.jpg", mode="CMYK")
    write_image(root / "b" / "grey.png", mode="L", value=3)
    write_image(root / "b" / "la.png", mode="LA", value=3)
    Image.fromarray(np.full((8, 8), 40000, np.uint16)).save(root / "b" / "deep.png")
    ds = load(root)
    assert ds.channels == 3 and ds.train.x.shape == (6, 8, 8, 3)
    grey = ds.train.x[ds.train.y == 1]
    assert (grey[..., 0] == grey[..., 2]).all()  # grey images are copied into all three channels
    # files decode in sorted order: a/cmyk.jpg, a/pal.png, a/rgba.png, b/deep.png, b/grey.png, b/la.png
    assert (ds.train.x[3] == round(40000 * 255 / 65535)).all()  # 16 bit scaled to 8, not clipped


def test_all_grey_modes_give_one_channel(tmp_path):
    root = tmp_path / "greys"
    write_image(root / "a" / "l.png", mode="L")
    write_image(root / "a" / "la.png", mode="LA")
    write_image(root / "b" / "one.png", mode="1")
    Image.fromarray(np.full((8, 8), 1000, np.uint16)).save(root / "b" / "deep.png")
    assert load(root).channels == 1


def test_varying_sizes_use_most_common_shorter_side(tmp_path, capsys):
    root = tmp_path / "sizes"
    for i, size in enumerate([(20, 10), (30, 10), (10, 10), (40, 50)]):
        write_image(root / ("a" if i % 2 else "b") / f"{i}.png", size=size)
    ds = load(root)
    assert ds.image_size == 10 and ds.train.x.shape == (4, 10, 10, 3)
    assert "10x10" in capsys.readouterr().err
    assert load(root, image_size=6).train.x.shape == (4, 6, 6, 3)


def test_large_images_default_capped_at_64_and_resized(tmp_path):
    root = tmp_path / "big"
    write_image(root / "a" / "0.jpg", size=(500, 375))
    write_image(root / "b" / "0.jpg", size=(375, 500))
    write_image(root / "b" / "1.jpg", size=(200, 100))
    ds = load(root)
    assert ds.image_size == 64 and ds.train.x.shape == (3, 64, 64, 3)
    assert load(root, image_size=32).train.x.shape == (3, 32, 32, 3)


def test_large_square_jpegs_keep_their_native_pixels(tmp_path):
    # The first pass decodes large JPEGs at a reduced scale (open_image's min_side); when every image turns
    # out to be the same square size, that native size is kept, so they are decoded again in full.
    root = tmp_path / "squares"
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        arr = np.repeat(np.repeat(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8), 10, 0), 10, 1)  # 200x200
        (root / cls).mkdir(parents=True)
        Image.fromarray(arr).save(root / cls / "0.jpg")
    ds = load(root, test_split=0.5)
    assert ds.image_size == 200
    full = np.asarray(Image.open(root / "a" / "0.jpg").convert("RGB"))
    assert any((x == full).all() for x in (*ds.train.x, *ds.test.x))


def _corrupt_files(root):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, "JPEG")
    (root / "train" / "a" / "cut.jpg").write_bytes(buf.getvalue()[:300])
    (root / "train" / "b" / "text.jpg").write_text("hello")


def test_bad_images_raise_or_are_skipped(image_tree, capsys):
    root = image_tree({"train/a": 2, "train/b": 2, "test/a": 1, "test/b": 1})
    _corrupt_files(root)
    with pytest.raises(ImgclfError, match=r"cut\.jpg.*skip-bad-images"):
        load(root)
    ds = load(root, skip_bad_images=True)
    assert ds.skipped == ["train/a/cut.jpg", "train/b/text.jpg"]
    assert len(ds.train.y) == 4
    assert "skipped 2" in capsys.readouterr().err


def test_text_file_named_jpg_is_named_in_error(image_tree):
    root = image_tree({"train/a": 1, "train/b": 1})
    (root / "train" / "b" / "text.jpg").write_text("hello")
    with pytest.raises(ImgclfError, match=r"text\.jpg"):
        load(root)


def test_hidden_and_non_image_files_are_ignored(image_tree, capsys):
    root = image_tree({"train/a": 1, "train/b": 1})
    (root / "train" / "a" / ".DS_Store").write_text("junk")
    (root / "train" / "a" / "notes.txt").write_text("junk")
    (root / ".hidden").mkdir()
    (root / "__MACOSX" / "train" / "a").mkdir(parents=True)
    (root / "__MACOSX" / "train" / "a" / "._0.png").write_text("junk")
    ds = load(root)
    assert ds.classes == ["a", "b"] and len(ds.train.y) == 2
    assert "notes.txt" in capsys.readouterr().err


def test_layout_errors(tmp_path, image_tree):
    with pytest.raises(ImgclfError, match="no such file or folder"):
        load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImgclfError, match="no class folders found.*expected train/<class>"):
        load(tmp_path / "empty")
    root = image_tree({"train/a": 1, "train/b": 1}, name="e")
    (root / "train" / "c").mkdir()
    with pytest.raises(ImgclfError, match="train/c has no images"):
        load(root)
    root = image_tree({"train/a": 1, "train/b": 1, "test/a": 1, "test/zebra": 1}, name="m")
    with pytest.raises(ImgclfError, match="test/zebra.*train/zebra"):
        load(root)
    with pytest.raises(ImgclfError, match=r"only one class folder \(cat/\)"):
        load(image_tree({"cat": 2}, name="one"))
    root = image_tree({"test/a": 1, "test/b": 1}, name="t")
    with pytest.raises(ImgclfError, match="no train/ folder"):
        load(root)


def test_unknown_builtin_name_lists_the_valid_ones():
    with pytest.raises(ImgclfError, match="unknown dataset 'imagenet'.*cifar10.*path"):
        load_dataset("imagenet", progress=False)


def test_file_that_is_not_an_archive(tmp_path):
    path = tmp_path / "list.csv"
    path.write_text("a,b")
    with pytest.raises(ImgclfError, match="not a folder or an archive"):
        load(path)


def test_parallel_decode_matches_serial(image_tree, monkeypatch):
    root = image_tree({"train/a": 7, "train/b": 6, "test/a": 2, "test/b": 3}, size=(9, 9))
    serial = load(root)
    monkeypatch.setattr(decode, "PARALLEL_MIN", 4)
    monkeypatch.setattr(decode, "CHUNK", 3)
    parallel = load(root, image_size=9, channels=3)  # other options -> another cache entry, decoded again
    assert (np.asarray(serial.train.x) == np.asarray(parallel.train.x)).all()
    assert (serial.test.y == parallel.test.y).all()


def test_progress_bars_go_to_stderr_only_when_asked(image_tree, capsys):
    root = image_tree({"train/a": 2, "train/b": 2})
    load(root)
    assert capsys.readouterr() == ("", "")
    load_dataset(str(root), image_size=4, progress=True)
    out, err = capsys.readouterr()
    assert out == "" and "decode" in err


def test_channels_can_be_forced(image_tree):
    root = image_tree({"train/a": 2, "train/b": 2}, mode="L")
    rgb = load(root, channels=3)
    assert rgb.channels == 3 and rgb.train.x.shape[-1] == 3
    assert (rgb.train.x[..., 0] == load(root).train.x[..., 0]).all()


def test_script_without_main_guard_still_loads(image_tree, tmp_path):
    """Worker processes re-run a script that has no `if __name__ == "__main__":` guard and die on start; the
    decoder then finishes in the calling process, with a warning that says how to get the workers back."""
    import subprocess
    import sys

    root = image_tree({"train/a": 7, "train/b": 6, "test/a": 2, "test/b": 3}, size=(9, 9))
    script = tmp_path / "unguarded.py"
    script.write_text("import imgclf.data.decode as d\nd.PARALLEL_MIN, d.CHUNK = 4, 3\n"
                      "from imgclf import load_dataset\n"
                      f"ds = load_dataset({str(root)!r}, progress=False)\n"
                      "print('loaded', len(ds.train.y), len(ds.test.y))\n")
    env = {**__import__("os").environ, "IMGCLF_HOME": str(tmp_path / "home")}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "loaded 13 5"
    assert '__name__ == "__main__"' in proc.stderr


def test_decoding_processes_leave_when_their_parent_is_killed(tmp_path):
    """A process killed outright (out of memory, kill -9) cannot shut its decoding pool down: the workers and
    the fork server that started them leave on their own instead of waiting for work forever."""
    import signal
    import subprocess
    import sys
    import time

    image = write_image(tmp_path / "a.png")
    script = tmp_path / "hold.py"
    script.write_text("import time\nfrom imgclf.data import decode\n\nif __name__ == '__main__':\n"
                      "    decode.PARALLEL_MIN, decode.CHUNK = 2, 1\n"
                      "    d = decode.Decoder(size=8, channels=3, progress=False)\n"
                      f"    for i in range(6):\n        d.add(str(i), 'a.png', {str(image)!r})\n"
                      "    time.sleep(2)\n    print('pool', flush=True)\n    time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "pool"
        family = _descendants(proc.pid)
        assert len(family) >= 3  # the fork server, its workers (and the resource tracker)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(p) for p in family):
        time.sleep(0.2)
    assert not [p for p in family if _alive(p)]


def _descendants(pid: int) -> list[int]:
    import os

    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    children.setdefault(int(f.read().rsplit(")", 1)[1].split()[1]), []).append(int(entry))
            except (OSError, ValueError):
                continue
    out, todo = [], [pid]
    while todo:
        for kid in children.get(todo.pop(), []):
            out.append(kid)
            todo.append(kid)
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has left, only its entry is left
    except OSError:
        return False
