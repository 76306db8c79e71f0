"""Image folders inside .tar / .tar.gz / .zip archives, and refusal of unsafe archive entries."""
from __future__ import annotations

import io
import tarfile
import zipfile

import numpy as np
import pytest

from imgclf.data import load_dataset
from imgclf.data.archives import iter_archive
from imgclf.errors import ImgclfError

SPEC = {"train/cat": 2, "train/dog": 3, "test/cat": 1, "test/dog": 1}


def make_tar(root, dest, *, arcroot="", mode="w"):
    with tarfile.open(dest, mode) as tar:
        tar.add(root, arcname=arcroot or ".")
    return dest


def make_zip(root, dest, *, arcroot=""):
    with zipfile.ZipFile(dest, "w") as zf:
        for path in sorted(root.rglob("*")):
            rel = path.relative_to(root).as_posix()
            zf.write(path, f"{arcroot}/{rel}" if arcroot else rel)
    return dest


@pytest.mark.parametrize("kind", ["tar", "tar.gz", "tgz", "zip"])
def test_archive_loads_like_the_folder(image_tree, tmp_path, kind):
    root = image_tree(SPEC)
    _same_as_folder(root, tmp_path, kind)


@pytest.mark.parametrize("images", ["varying-sizes", "grey", "large-jpegs"])
def test_archive_decoded_in_stored_order_equals_the_folder(tmp_path, images, monkeypatch):
    """An archive is decoded in one pass in stored order (its bytes are not kept); a second pass reads it again
    where sizes vary, and grey images stored in colour are narrowed afterwards: the folder's pixels all the same."""
    from imgclf.data import decode

    from synthetic import write_image

    monkeypatch.setattr(decode, "PARALLEL_MIN", 4)  # worker processes too, in small chunks
    monkeypatch.setattr(decode, "CHUNK", 3)
    root = tmp_path / "data"
    for i in range(14):
        split, cls = ("test" if i % 5 == 0 else "train"), ("cat" if i % 2 else "dog")
        if images == "varying-sizes":
            write_image(root / split / cls / f"{i}.png", size=(8 + i, 10 + 2 * i), value=10 * i)
        elif images == "grey":
            write_image(root / split / cls / f"{i}.png", size=(9, 9), mode="L", value=10 * i)
        else:
            write_image(root / split / cls / f"{i}.jpg", size=(300 + 10 * i, 280), value=10 * i)
    ds = _same_as_folder(root, tmp_path, "tar")
    assert ds.channels == (1 if images == "grey" else 3) and len(ds.train.y) == 11


def _same_as_folder(root, tmp_path, kind):
    dest = tmp_path / f"pets.{kind}"
    if kind == "zip":
        make_zip(root, dest)
    else:
        make_tar(root, dest, mode="w" if kind == "tar" else "w:gz")
    folder, archive = (load_dataset(str(p), progress=False) for p in (root, dest))
    assert archive.name == "pets" and archive.source == str(dest.resolve())
    assert archive.classes == folder.classes == ["cat", "dog"]
    assert archive.image_size == folder.image_size and archive.channels == folder.channels
    assert (np.asarray(archive.train.x) == np.asarray(folder.train.x)).all() and (archive.test.y == folder.test.y).all()
    assert (np.asarray(archive.test.x) == np.asarray(folder.test.x)).all()
    return archive


@pytest.mark.parametrize("kind", ["tar.gz", "zip"])
def test_archive_with_one_wrapping_folder(image_tree, tmp_path, kind):
    root = image_tree(SPEC)
    dest = tmp_path / f"wrapped.{kind}"
    make_zip(root, dest, arcroot="pets-v1") if kind == "zip" else make_tar(root, dest, arcroot="pets-v1", mode="w:gz")
    ds = load_dataset(str(dest), progress=False)
    assert ds.classes == ["cat", "dog"] and len(ds.train.y) == 5 and len(ds.test.y) == 2


def test_class_only_archive_with_wrapper(image_tree, tmp_path):
    root = image_tree({"cat": 4, "dog": 4})
    ds = load_dataset(str(make_tar(root, tmp_path / "c.tar.gz", arcroot="inner", mode="w:gz")),
                      val_split=0.25, progress=False)
    assert ds.classes == ["cat", "dog"] and len(ds.val.y) == 2 and ds.test is None


def test_bad_member_named_with_archive_and_skippable(image_tree, tmp_path):
    root = image_tree(SPEC)
    (root / "train" / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    dest = make_tar(root, tmp_path / "bad.tar.gz", mode="w:gz")
    with pytest.raises(ImgclfError, match=r"bad\.tar\.gz entry train/cat/broken\.png"):
        load_dataset(str(dest), progress=False)
    ds = load_dataset(str(dest), skip_bad_images=True, progress=False)
    assert ds.skipped == ["train/cat/broken.png"]


def test_internal_symlink_is_followed(image_tree, tmp_path):
    root = image_tree(SPEC)
    (root / "train" / "cat" / "linked.png").symlink_to("0.png")
    ds = load_dataset(str(make_tar(root, tmp_path / "l.tar", mode="w")), progress=False)
    assert np.bincount(ds.train.y).tolist() == [3, 3]


def _tar_with(dest, name, *, kind=tarfile.REGTYPE, linkname="", data=b"x"):
    with tarfile.open(dest, "w:gz") as tar:
        good = tarfile.TarInfo("train/cat/0.png")
        good.size = 1
        tar.addfile(good, io.BytesIO(b"x"))
        info = tarfile.TarInfo(name)
        info.type, info.linkname = kind, linkname
        info.size = len(data) if kind == tarfile.REGTYPE else 0
        tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
    return dest


@pytest.mark.parametrize("name, kind, linkname, reason", [
    ("../evil", tarfile.REGTYPE, "", "'..'"),
    ("train/../../evil", tarfile.REGTYPE, "", "'..'"),
    ("/tmp/evil", tarfile.REGTYPE, "", "absolute"),
    ("train/cat/link", tarfile.SYMTYPE, "../../../etc/passwd", "outside"),
    ("train/cat/link", tarfile.SYMTYPE, "/etc/passwd", "outside"),
    ("train/cat/hard", tarfile.LNKTYPE, "../outside", "outside"),
])
def test_unsafe_tar_entries_are_refused(tmp_path, name, kind, linkname, reason):
    work = tmp_path / "work"
    work.mkdir()
    dest = _tar_with(work / "evil.tar.gz", name, kind=kind, linkname=linkname)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(ImgclfError, match=rf"unsafe archive entry '{name}'.*{reason}"):
        load_dataset(str(dest), progress=False)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written anywhere
    assert not (tmp_path / "evil").exists()


@pytest.mark.parametrize("name", ["../evil", "a/../../evil", "/abs/evil", "..\\evil"])
def test_unsafe_zip_entries_are_refused(tmp_path, name):
    work = tmp_path / "work"
    work.mkdir()
    dest = work / "evil.zip"
    with zipfile.ZipFile(dest, "w") as zf:
        zf.writestr("train/cat/0.png", b"x")
        zf.writestr(zipfile.ZipInfo(name), b"pwned")
    with pytest.raises(ImgclfError, match="unsafe archive entry"):
        load_dataset(str(dest), progress=False)
    assert not (tmp_path / "evil").exists() and not list(tmp_path.rglob("evil"))


def test_truncated_archive_is_a_clear_error(image_tree, tmp_path):
    dest = make_tar(image_tree(SPEC), tmp_path / "cut.tar.gz", mode="w:gz")
    dest.write_bytes(dest.read_bytes()[:200])
    with pytest.raises(ImgclfError, match=r"cut\.tar\.gz.*(truncated|readable)"):
        load_dataset(str(dest), progress=False)


def test_iter_archive_streams_checked_names(image_tree, tmp_path):
    dest = make_tar(image_tree(SPEC), tmp_path / "s.tar.gz", mode="w:gz")
    names = {e.name for e in iter_archive(dest) if e.kind == "file"}
    assert "train/cat/0.png" in names and all(not n.startswith((".", "/")) for n in names)


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_oversized_member_is_refused_before_it_is_read(tmp_path, monkeypatch, kind):
    from imgclf.data import archives

    monkeypatch.setattr(archives, "MEMBER_MAX", 1 << 20)
    big = b"\0" * (3 << 20)  # 3 MiB of zeros: a few KB compressed
    dest = tmp_path / ("bomb.zip" if kind == "zip" else "bomb.tar.gz")
    if kind == "zip":
        with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("train/a/0.png", big)
    else:
        with tarfile.open(dest, "w:gz") as tar:
            info = tarfile.TarInfo("train/a/0.png")
            info.size = len(big)
            tar.addfile(info, io.BytesIO(big))
    with pytest.raises(ImgclfError, match=r"bomb\.(zip|tar\.gz): entry train/a/0.png holds 3 MiB, more than the 1 MiB"):
        list(iter_archive(dest))


def test_decompression_bomb_tar_is_refused(tmp_path, monkeypatch):
    from imgclf.data import archives

    monkeypatch.setattr(archives, "BOMB_MIN", 1 << 20)
    dest = tmp_path / "bomb.tar.gz"
    with tarfile.open(dest, "w:gz") as tar:
        for i in range(4):  # 4 x 1 MiB of zeros: each member is small, the whole expands 1000x
            info = tarfile.TarInfo(f"train/a/{i}.png")
            info.size = 1 << 20
            tar.addfile(info, io.BytesIO(b"\0" * info.size))
    with pytest.raises(ImgclfError, match="expands to more than .* decompression bomb"):
        list(iter_archive(dest))
    monkeypatch.setattr(archives, "BOMB_RATIO", 10 ** 6)  # a tar allowed to expand that much reads fine
    assert len(list(iter_archive(dest))) == 4
