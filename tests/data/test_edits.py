"""Images excluded and relabelled by a person (edits.py): the CSV read back, the names the cache keeps,
the edits applied after the cache, one clear line for every mistake."""
from __future__ import annotations

import tarfile

import numpy as np
import pytest

from imgclf.data import load_dataset
from imgclf.data.dataset import load_decoded
from imgclf.data.decoded import Decoded, split_names
from imgclf.data.edits import read_edits
from imgclf.errors import ImgclfError


def _csv(tmp_path, text: str, name: str = "list.csv"):
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8"))
    return path


def test_read_edits_by_action_and_without_an_action_column(tmp_path):
    both = _csv(tmp_path, "\ufeffPath,split,given,suggested,confidence,issue,detail,Action\n"  # a spreadsheet's BOM
                          "a.jpg,all,cat,dog,0.9,label,,relabel\nb.jpg,all,cat,cat,0.8,duplicate,,EXCLUDE\n"
                          "c.jpg,all,cat,dog,0.7,label,,\n\n d.jpg ,all,dog,cat,0.6,label,,keep\n")
    assert read_edits(both, "exclude") == ["b.jpg"]
    assert read_edits(both, "relabel") == {"a.jpg": "dog"}
    bare = _csv(tmp_path, "path\nx/1.png\nx/2.png\nx/1.png\n", "bare.csv")
    assert read_edits(bare, "exclude") == ["x/1.png", "x/2.png"]  # every row, once


@pytest.mark.parametrize("text, action, match", [
    ("file\na.jpg\n", "exclude", "has no path column"),
    ("path\na.jpg\n", "relabel", "has no suggested column"),
    ("path,action\na.jpg,delete\n", "exclude", "line 2: action 'delete' is not one of keep, exclude, relabel"),
    ("path,suggested,action\na.jpg,,relabel\n", "relabel", "its suggested column is empty"),
    ("path,suggested,action\na.jpg,cat,relabel\na.jpg,dog,relabel\n", "relabel", "relabelled to both cat and dog"),
    ("path,action\n,exclude\n", "exclude", "line 2: the path column is empty"),
])
def test_read_edits_refuses_bad_lists(tmp_path, text, action, match):
    with pytest.raises(ImgclfError, match=match):
        read_edits(_csv(tmp_path, text), action)


def test_read_edits_unreadable_file(tmp_path):
    with pytest.raises(ImgclfError, match="cannot read .*missing.csv as a CSV list of images"):
        read_edits(tmp_path / "missing.csv", "exclude")
    binary = tmp_path / "binary.csv"
    binary.write_bytes(b"path\n\xff\xfe\x00junk\n")
    with pytest.raises(ImgclfError, match="cannot read"):
        read_edits(binary, "exclude")


def test_names_are_kept_in_the_cache_for_folders_and_archives(image_tree, tmp_path):
    data = image_tree({"train/cat": 3, "train/dog": 2, "test/cat": 1, "test/dog": 1})
    for _ in range(2):  # decoded, then read back from the cache entry
        _, _, decoded = load_decoded(str(data), progress=False)
        assert split_names(decoded, "train") == ["train/cat/0.png", "train/cat/1.png", "train/cat/2.png",
                                                 "train/dog/0.png", "train/dog/1.png"]
        assert split_names(decoded, "test") == ["test/cat/0.png", "test/dog/0.png"]
    with tarfile.open(tmp_path / "d.tar.gz", "w:gz") as tf:
        tf.add(data, arcname="pets")
    _, _, decoded = load_decoded(str(tmp_path / "d.tar.gz"), progress=False)
    assert split_names(decoded, "test") == ["pets/test/cat/0.png", "pets/test/dog/0.png"]  # member names


def test_images_without_files_are_named_by_split_and_index():
    decoded = Decoded(["a", "b"], 3, 4, {"train": (np.zeros((3, 4, 4, 3), np.uint8), np.array([0, 1, 0]))})
    assert split_names(decoded, "train") == ["train/0", "train/1", "train/2"]


def test_edits_apply_before_the_split_fractions(image_tree):
    data = image_tree({"cat": 12, "dog": 12})
    plain = load_dataset(str(data), progress=False)
    edited = load_dataset(str(data), progress=False, exclude=["cat/0.png", "cat/1.png"],
                          relabel={"dog/3.png": "cat", "dog/4.png": "dog"})  # the second is no move
    assert edited.edits == {"excluded": 2, "relabelled": 1} and plain.edits == {"excluded": 0, "relabelled": 0}
    n = lambda ds: sum(len(s.y) for s in (ds.train, ds.val, ds.test))  # noqa: E731
    assert n(plain) == 24 and n(edited) == 22
    counts = sum(np.bincount(s.y, minlength=2) for s in (edited.train, edited.val, edited.test))
    assert counts.tolist() == [11, 11]  # cat: 12 - 2 + 1, dog: 12 - 1


@pytest.mark.parametrize("edits, match", [
    ({"exclude": ["cat/0.png", "a.png", "b.png", "c.png", "d.png"]},
     r"4 image\(s\) listed are not in .*: a.png, b.png, c.png \.\.\.; paths are relative"),
    ({"relabel": {"cat/0.png": "cow"}}, "cannot relabel to 'cow': not a class of .* classes: cat, dog"),
    ({"exclude": ["cat/0.png", "cat/1.png"]}, "class 'cat' of .* has no images left after the exclusions"),
    ({"exclude": ["cat/0.png"], "relabel": {"cat/0.png": "dog"}}, "both excluded and relabelled, e.g. cat/0.png"),
])
def test_bad_edits_are_one_line(image_tree, edits, match):
    data = image_tree({"cat": 2, "dog": 3})
    with pytest.raises(ImgclfError, match=match):
        load_dataset(str(data), progress=False, **edits)
