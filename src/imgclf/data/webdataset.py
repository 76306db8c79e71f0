"""WebDataset-style tar shards: read as --data, and written from an image folder.

    imgclf shards photos/ shards/        # shards/train-000000.tar, ..., test-000000.tar, classes.txt
    imgclf train --data shards/          # or --data 'shards/train-{000000..000009}.tar'

A shard is a plain tar of samples; a sample is the members that share a key (the name up to the first dot
of its last part): ``000123.jpg`` (the image, in any format imgclf reads) and ``000123.cls`` (the class
index, as text), plus ``000123.json`` with the image's path in the folder the shards were written from
(which puts a split back in that folder's order). That is the webdataset package's convention, so its
readers (and timm's, open_clip's) read these shards as they are. A shard's name starts with its split
(``train``, ``val``, ``test``, or ``all`` for images that --val-split/--test-split share out);
``classes.txt`` beside the shards names the classes, one a line in index order (without it the classes are
named by their index). Shards are read with the standard tarfile module, member by member, in the order
named, so a shard set of any size streams into the decode cache; the webdataset package is not needed.
"""
from __future__ import annotations

import json
import os
import re
import tarfile
import time
from pathlib import Path

from ..errors import ImgclfError
from .archives import iter_archive
from .decoded import Decoded
from .folder import SPLIT_FOLDERS, Layout, decode_images, is_image_path, read_images, scan_layout, walk

SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
_SHARD_NAME = re.compile(r"^(train|val|valid|validation|test|all)[-_.]", re.IGNORECASE)
_KEY = re.compile(r"^((?:.*/)?[^./]+)\.([^/]*)$")  # key, extension: "a/000123.jpg" -> "a/000123", "jpg"
_BRACES = re.compile(r"\{([^{}]*)\}")
CLASSES_FILE = "classes.txt"


def is_shard_pattern(text: str) -> bool:
    return "{" in text and text.lower().endswith(SHARD_SUFFIXES)


def expand_braces(pattern: str) -> list[str]:
    """``train-{000000..000002}.tar`` -> the three names (zero-padded as written); ``{a,b}`` -> both."""
    match = _BRACES.search(pattern)
    if match is None:
        return [pattern]
    body, head, tail = match.group(1), pattern[:match.start()], pattern[match.end():]
    numbers = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numbers:
        lo, hi = numbers.groups()
        if int(hi) < int(lo):
            raise ImgclfError(f"{pattern}: the range {{{body}}} runs backwards")
        options = [str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)]
    else:
        options = body.split(",")
    return [name for option in options for name in expand_braces(head + option + tail)]


def is_shard_folder(path: Path) -> bool:
    """A folder of shards: tar files named by split, and no sub-folders (an image folder has class folders)."""
    if not path.is_dir():
        return False
    entries = [e for e in os.scandir(path) if not e.name.startswith(".")]
    shards = [e for e in entries if e.is_file() and _is_shard(e.name)]
    return bool(shards) and not any(e.is_dir() for e in entries)


def shard_files(data: str) -> tuple[Path, list[Path]]:
    """--data as a shard folder or a brace pattern -> (the folder holding them, the shards in order)."""
    if is_shard_pattern(data):
        paths = [Path(p).expanduser().resolve() for p in expand_braces(data)]
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise ImgclfError(f"{data}: {len(missing)} of its {len(paths)} shards are missing, e.g. {missing[0]}")
        folder = paths[0].parent
    else:
        folder = Path(data).expanduser().resolve()
        paths = sorted(folder / name for name in os.listdir(folder) if _is_shard(name))
    bad = [p for p in paths if not _SHARD_NAME.match(p.name)]
    if bad:
        raise ImgclfError(f"{bad[0]}: a shard's name must start with its split (train-, val-, test- or all-)")
    return folder, paths


def load_shards(data: str | Path, *, image_size: int | None, channels: int | None, skip_bad_images: bool,
                progress: bool, store) -> Decoded:
    """Decode WebDataset-style shards (a folder of them or a brace pattern) into ``store``'s shards."""
    data = str(data)
    folder, paths = shard_files(data)
    labels: dict[str, int] = {}
    split_of: dict[str, str] = {}
    origin: dict[str, str] = {}  # the image's path in the folder the shards were written from, when recorded

    def samples(keep: set[str] | None = None):
        for path in paths:
            split = SPLIT_FOLDERS.get(_SHARD_NAME.match(path.name).group(1).lower(), "all")
            images, classes_of, recorded = {}, {}, {}
            for entry in iter_archive(path):
                key_ext = _KEY.match(entry.name) if entry.kind == "file" else None
                if key_ext is None:
                    continue
                key, ext = key_ext.groups()
                rel = f"{path.name}/{entry.name}"
                if ext.lower() == "cls":
                    classes_of[key] = _label(entry.data, path, entry.name)
                elif ext.lower() == "json" and keep is None:
                    recorded[key] = _origin(entry.data)
                elif is_image_path(entry.name):
                    images[key] = rel
                    if keep is None or rel in keep:
                        yield rel, f"{path} entry {entry.name}", entry.data
            if keep is None:
                for key, rel in images.items():
                    if key not in classes_of:
                        raise ImgclfError(f"{path}: sample {key} has an image but no {key}.cls (its class index); "
                                          "write the shards with `imgclf shards`")
                    labels[rel], split_of[rel] = classes_of[key], split
                    if recorded.get(key) is not None:
                        origin[rel] = recorded[key]

    def layout_of():
        classes = _classes(folder, labels, data)
        splits: dict[str, list[tuple[str, int]]] = {}
        for rel, label in labels.items():
            splits.setdefault(split_of[rel], []).append((rel, label))
        if len(origin) == len(labels):  # written by `imgclf shards`: the folder's own order, whatever the shards'
            splits = {s: sorted(items, key=lambda item: (item[1], origin[item[0]])) for s, items in splits.items()}
        if "train" not in splits and "all" not in splits:
            raise ImgclfError(f"{data}: no train- (or all-) shards; name the training shards train-000000.tar, ...")
        if "all" in splits and len(splits) > 1:
            raise ImgclfError(f"{data}: all- shards beside split shards; use either all- or train-/val-/test-")
        return Layout(classes, splits, []), {}

    return decode_images(folder, store, samples(), layout_of, samples, total=None, archive=True,
                         image_size=image_size, channels=channels, skip_bad_images=skip_bad_images,
                         progress=progress)


def write_shards(source: Path, out: Path, *, per_shard: int = 1000) -> dict:
    """Write an image folder (a directory or an archive of one) as shards in ``out``: per split, samples of
    the image's own bytes (never re-encoded), its class index and its path, ``per_shard`` a shard, in the
    folder's order (an archive's: as stored; reading sorts them back by path); then classes.txt.
    -> {split: images}, with "shards" and "classes"."""
    if per_shard < 1:
        raise ImgclfError(f"--per-shard must be at least 1, not {per_shard}")
    if out.exists() and any(_is_shard(n) or n == CLASSES_FILE for n in os.listdir(out)):
        raise ImgclfError(f"{out} already holds shards; write into an empty or new folder")
    out.mkdir(parents=True, exist_ok=True)
    if source.is_dir():
        files, dirs = walk(source)
        layout = scan_layout(files, dirs, where=str(source))
    else:  # the listing first (members read and let go), then the bytes in stored order
        names, dirs = [], []
        for entry in iter_archive(source):
            (dirs if entry.kind == "dir" else names).append(entry.name)
        layout = scan_layout(names, dirs, where=str(source))
    where = {rel: (split, label) for split, items in layout.splits.items() for rel, label in items}
    writers: dict[str, _ShardWriter] = {}
    # a folder's images in its splits' order (so the shards load exactly as the folder), an archive's as stored
    order = ((rel, None, str(source / rel)) for items in layout.splits.values() for rel, _ in items) \
        if source.is_dir() else read_images(source, set(where))
    for rel, _, src in order:
        split, label = where[rel]
        if split not in writers:
            writers[split] = _ShardWriter(out, split, per_shard)
        data = Path(src).read_bytes() if isinstance(src, str) else src
        writers[split].add(data, Path(rel).suffix.lower() or ".img", label, rel)
    counts = {split: w.close() for split, w in writers.items()}
    tmp = out / f".{CLASSES_FILE}.tmp"
    tmp.write_text("".join(f"{c}\n" for c in layout.classes), encoding="utf-8")
    os.replace(tmp, out / CLASSES_FILE)
    return {**counts, "shards": sum(w.shards for w in writers.values()), "classes": len(layout.classes)}


class _ShardWriter:
    """One split's shards: ``<split>-000000.tar``, ... each written under a temporary name, then renamed."""

    def __init__(self, out: Path, split: str, per_shard: int):
        self.out, self.split, self.per_shard = out, split, per_shard
        self.count, self.shards, self.tar, self.tmp = 0, 0, None, None

    def add(self, data: bytes, ext: str, label: int, origin: str) -> None:
        if self.tar is None:
            self.tmp = self.out / f".{self.split}-{self.shards:06d}.tar.tmp"
            self.tar = tarfile.open(self.tmp, "w", format=tarfile.PAX_FORMAT)  # noqa: SIM115 -- open across calls
        key = f"{self.count:08d}"
        meta = json.dumps({"path": origin}).encode()
        for name, payload in ((f"{key}{ext}", data), (f"{key}.cls", str(label).encode()), (f"{key}.json", meta)):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(payload), int(time.time()), 0o644
            self.tar.addfile(info, _Reader(payload))
        self.count += 1
        if self.count % self.per_shard == 0:
            self._finish_shard()

    def close(self) -> int:
        if self.tar is not None:
            self._finish_shard()
        return self.count

    def _finish_shard(self) -> None:
        self.tar.close()
        os.replace(self.tmp, self.out / f"{self.split}-{self.shards:06d}.tar")
        self.tar, self.shards = None, self.shards + 1


class _Reader:
    """bytes as the file object tarfile.addfile reads a member from."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def read(self, n: int = -1) -> bytes:
        end = len(self.data) if n < 0 else self.pos + n
        out, self.pos = self.data[self.pos:end], min(end, len(self.data))
        return out


def _is_shard(name: str) -> bool:
    return name.lower().endswith(SHARD_SUFFIXES) and not name.startswith(".")


def _label(data: bytes, path: Path, name: str) -> int:
    try:
        value = int(data.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise ImgclfError(f"{path}: {name} must hold a class index (a whole number), not {data[:20]!r}") from None
    if value < 0:
        raise ImgclfError(f"{path}: {name} holds a negative class index ({value})")
    return value


def _origin(data: bytes) -> str | None:
    try:
        value = json.loads(data).get("path")
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def _classes(folder: Path, labels: dict[str, int], data: str) -> list[str]:
    top = max(labels.values(), default=-1)
    names_file = folder / CLASSES_FILE
    if names_file.is_file():
        names = [line.strip() for line in names_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        if top >= len(names):
            raise ImgclfError(f"{data}: class index {top} but {names_file} names only {len(names)} classes")
    else:
        names = [str(i) for i in range(top + 1)]
    if len(names) < 2:
        raise ImgclfError(f"{data}: only {len(names)} class(es) found; a classifier needs at least two")
    return names

