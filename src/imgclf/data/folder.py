"""Image folders -> Decoded: find the class layout in a folder or archive, then decode every image.

    decoded = load_folder(Path("pets.zip"), image_size=None, channels=None, skip_bad_images=False,
                          progress=True, store=store)     # store: see cache.py

Layouts understood (one wrapping folder around either is looked through, as archives often have):

    train/<class>/*  test/<class>/*  [val/<class>/*]     -> Decoded.splits "train", "test", "val"
    <class>/*                                            -> Decoded.splits "all" (split later by fractions)

Images may sit in sub-folders of a class folder. Names starting with "." and ``__MACOSX`` folders are
ignored, as are files whose extension is not an image format (counted in a note). Classes come in
natural order ("2" before "10"); every split lists its files in sorted order, so results never depend on
the order a file system or archive lists them (an archive's images are stored in the order read).
"""
from __future__ import annotations

import os
import posixpath
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ImgclfError
from ..utils import natural_sorted
from .archives import iter_archive
from .decode import MAX_DEFAULT_SIZE, DecodedImage, Decoder
from .decoded import Decoded
from .notify import note, warn

IMAGE_SUFFIXES = frozenset({
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".bmp", ".dib", ".gif", ".tif", ".tiff", ".webp",
    ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".ico", ".qoi", ".avif", ".jp2", ".j2k", ".pcx", ".sgi",
})
# Folder names that mark a split (case-insensitive) -> the split they hold.
SPLIT_FOLDERS = {"train": "train", "test": "test", "val": "val", "valid": "val", "validation": "val"}
LAYOUT_HELP = "expected train/<class>/*, test/<class>/* (optional val/<class>/*), or just <class>/*"


@dataclass
class Layout:
    classes: list[str]                          # natural order
    splits: dict[str, list[tuple[str, int]]]    # "train"/"test"/"val" or "all" -> [(relpath, label)], sorted
    ignored: list[str]                          # non-image files inside the layout, left out


def load_folder(path: Path, *, image_size: int | None, channels: int | None, skip_bad_images: bool,
                progress: bool, store) -> Decoded:
    """Decode an image folder (a directory or an archive of one) into ``store``'s shards (see decode_images)."""
    options = dict(image_size=image_size, channels=channels, skip_bad_images=skip_bad_images, progress=progress)
    if path.is_dir():
        files, dirs = walk(path)
        layout = scan_layout(files, dirs, where=str(path))
        wanted = {rel for items in layout.splits.values() for rel, _ in items}
        return decode_images(path, store, read_images(path, wanted), lambda: (layout, {}),
                             lambda keep: read_images(path, keep), total=len(wanted), archive=False, **options)
    listing = _Listing([], [], {})

    def layout_of():
        return scan_layout(listing.files, listing.dirs, where=str(path)), listing.links

    return decode_images(path, store, _archive_images(path, listing), layout_of, lambda keep: read_images(path, keep),
                         total=None, archive=True, **options)


def decode_images(where: Path, store, images: Iterable[tuple[str, str, str | bytes]],
                  layout_of: Callable[[], tuple[Layout, dict[str, str]]],
                  again: Callable[[set[str]], Iterable[tuple[str, str, str | bytes]]], *, total: int | None,
                  archive: bool, image_size: int | None, channels: int | None, skip_bad_images: bool,
                  progress: bool) -> Decoded:
    """Decode ``images`` ((relpath, label for messages, path or bytes), read once) into ``store``'s shards.

    One pass decodes every image in the order given; without a size, at the first image's own size while
    every image is square and that size. Where they are not (photos), the pass reads only headers from there
    on, the size is chosen from them, and ``again(relpaths)`` reads the images for a second pass. Without a
    channel count, images are stored in colour, grey ones in three equal channels, and narrowed to one
    channel when every image turned out grey. ``layout_of()``, called after the first pass, says which images
    belong to which split and class, and which relpaths are links to another image (stored once)."""
    first = _Pass(store, image_size, channels, progress, total=total, archive=archive)
    for rel, label, src in images:
        first.add(rel, label, src)
    first.finish()
    layout, links = layout_of()
    if layout.ignored:
        note(f"ignored {len(layout.ignored)} non-image file(s) in {where}, e.g. {layout.ignored[0]}")
    wanted = [rel for items in layout.splits.values() for rel, _ in items]

    done = first
    headers = {rel: first.headers.get(links.get(rel, rel)) for rel in wanted}
    readable = [h for h in headers.values() if h is not None and not h.error]
    if not readable:  # nothing decodes: say why
        _drop_bad(layout, _bad(headers, first.bad, links, wanted), where, skip_bad_images=skip_bad_images)
    n_channels = channels or (1 if all(h.grey for h in readable) else 3)
    if first.failed:  # sizes vary: decode again at the size chosen from the headers
        size = image_size or _default_size(readable, where)
        done = _Pass(store, size, n_channels, progress, total=len(readable), archive=archive)
        keep = {links.get(rel, rel) for rel, h in headers.items() if h is not None and not h.error}
        for rel, label, src in again(keep):
            done.add(rel, label, src)
        done.finish()
    elif n_channels == 1 and done.writer.shape[-1] == 3:
        done.narrow_to_grey()
    size = done.writer.shape[0]

    positions, bad = done.positions, _bad(headers, {**first.bad, **done.bad}, links, wanted)
    for name, target in links.items():  # a link is its target's image, stored once
        if target in positions:
            positions[name] = positions[target]
    layout, skipped = _drop_bad(layout, bad, where, skip_bad_images=skip_bad_images)
    splits = {split: (np.array([positions[rel] for rel, _ in items], dtype=np.int64),
                      np.array([y for _, y in items], dtype=np.int64)) for split, items in layout.splits.items()}
    names = {split: [rel for rel, _ in items] for split, items in layout.splits.items()}
    return Decoded(layout.classes, n_channels, size, splits, skipped=skipped, pool=done.writer, names=names)


class _Pass:
    """One decoding pass: images in, pixels into a shard writer, in the order added. With ``size`` None, at
    the first image's own square size while every image agrees; at the first that does not, the pass has
    ``failed``: what it wrote is dropped and from there on it reads only headers (for choosing the size)."""

    def __init__(self, store, size: int | None, channels: int | None, progress: bool, total: int | None,
                 archive: bool):
        self.store, self.channels, self.archive, self.progress = store, channels, archive, progress
        self.decoder = Decoder(size=size, channels=channels, progress=progress, total=total)
        self.prober: Decoder | None = None
        self.writer = None
        self.failed = False
        self.positions: dict[str, int] = {}
        self.headers: dict[str, DecodedImage] = {}  # without pixels: grey, width, height, error
        self.bad: dict[str, str] = {}

    def add(self, rel: str, label: str, src: str | bytes) -> None:
        self._collect((self.prober or self.decoder).add(rel, label, src))

    def finish(self) -> None:
        self._collect(self.decoder.finish())
        if self.prober is not None:
            self._collect(self.prober.finish())
        if self.writer is not None:
            self.writer.close()

    def narrow_to_grey(self) -> None:
        """Every image was grey: keep one of the three equal channels."""
        rows, grey = self.writer.rows(), self.store.writer((*self.writer.shape[:2], 1))
        for start in range(0, len(rows), 4096):
            grey.extend(rows[start:start + 4096][..., :1])
        grey.close()
        self.writer.discard()
        self.writer = grey

    def _collect(self, results) -> None:
        for rel, d in results:
            self.headers[rel] = d._replace(pixels=None)
            if d.error:
                self.bad[rel] = d.error
            elif self.failed:
                continue
            elif d.pixels is None:  # not the first image's size: a second pass will decode
                self._fail()
            else:
                if self.writer is None:
                    side = d.pixels.shape[0]
                    self.writer = self.store.writer((side, side, self.channels or 3))
                self.positions[rel] = self.writer.append(d.pixels)

    def _fail(self) -> None:
        self.failed = True
        if self.writer is not None:
            self.writer.discard()
            self.writer = None
        self.positions.clear()
        # header reads of an archive's members are cheaper here than shipping their bytes to a worker
        self.prober = Decoder(size=None, channels=None, progress=self.progress, probe=True,
                              workers=1 if self.archive else None)
        for rel, label, src in self.decoder.take_pending():  # not decoded yet: their headers will do
            self._collect(self.prober.add(rel, label, src))


def _bad(headers: dict, bad: dict[str, str], links: dict[str, str], wanted: list[str]) -> dict[str, str]:
    """The unreadable images among ``wanted``: errors of their own, or of the image a link points to."""
    out = {}
    for rel in wanted:
        target = links.get(rel, rel)
        if target in bad:
            out[rel] = bad[target]
        elif headers.get(rel) is None:
            out[rel] = f"{rel}: not read"
    return out


def walk(root: Path) -> tuple[list[str], list[str]]:
    """All visible files and folders under ``root`` as relative POSIX paths (hidden ones pruned)."""
    files, dirs = [], []
    for current, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if not _hidden(d)]
        rel = Path(current).relative_to(root).as_posix()
        prefix = "" if rel == "." else rel + "/"
        dirs.extend(prefix + d for d in subdirs)
        files.extend(prefix + n for n in names if not _hidden(n))
    return files, dirs


def scan_layout(files: Iterable[str], dirs: Iterable[str], *, where: str) -> Layout:
    """Find the layout in a tree of relative POSIX paths. ImgclfError naming ``where`` if there is none."""
    tree = _Tree(files, dirs)
    root = ""
    top = tree.subdirs(root)
    # One wrapping folder (e.g. "pets/train/cat/1.jpg" in pets.zip): look through it, unless that folder
    # is itself a split ("train/") or a class (it holds images directly).
    if len(top) == 1 and not tree.images[root] and top[0].lower() not in SPLIT_FOLDERS:
        inner = top[0]
        if tree.subdirs(inner) and not tree.images[inner]:
            root = inner
    names = tree.subdirs(root)
    split_of = {name: SPLIT_FOLDERS[name.lower()] for name in names if name.lower() in SPLIT_FOLDERS}
    if not names:
        raise ImgclfError(f"no class folders found in {where}: {LAYOUT_HELP}")
    if not split_of:
        classes, items = _scan_classes(tree, root, where)
        return Layout(_at_least_two(classes, where), {"all": items}, tree.ignored_under(root))
    if "train" not in split_of.values():
        raise ImgclfError(f"{where} has {', '.join(n + '/' for n in split_of)} but no train/ folder: "
                          f"{LAYOUT_HELP}")
    strays = [n for n in names if n not in split_of]
    if strays:
        raise ImgclfError(f"unexpected folder {_join(root, strays[0])}/ beside train/ in {where}: "
                          f"{LAYOUT_HELP}; move or remove it")
    if len(split_of) != len(set(split_of.values())):
        raise ImgclfError(f"{where} has more than one validation folder ({', '.join(sorted(split_of))}); "
                          "keep one val/ folder")
    folder_of = {split: name for name, split in split_of.items()}
    found = {split: _scan_classes(tree, _join(root, folder_of[split]), where)
             for split in ("train", "val", "test") if split in folder_of}
    classes = _at_least_two(found["train"][0], where)
    index = {c: i for i, c in enumerate(classes)}
    splits = {}
    for split, (split_classes, items) in found.items():
        missing = [c for c in split_classes if c not in index]
        if missing:
            raise ImgclfError(f"class folder {folder_of[split]}/{missing[0]} in {where} has no matching "
                              f"{folder_of['train']}/{missing[0]} folder: class folders must agree between "
                              "train/, val/ and test/")
        # Relabel with the train order: a split may lack a class, its own indices would then shift.
        splits[split] = [(rel, index[split_classes[label]]) for rel, label in items]
    return Layout(classes, splits, tree.ignored_under(root))


def choose_size(sizes: Iterable[tuple[int, int]]) -> int:
    """Default side for images of varying size: the most common shorter side (ties: the larger),
    at most MAX_DEFAULT_SIZE."""
    counts = Counter(min(w, h) for w, h in sizes)
    best = max(counts, key=lambda side: (counts[side], side))
    return min(best, MAX_DEFAULT_SIZE)


# --- helpers ---------------------------------------------------------------------------------------

def _hidden(name: str) -> bool:
    return name.startswith(".") or name == "__MACOSX"


def is_image_path(relpath: str) -> bool:
    return posixpath.splitext(relpath)[1].lower() in IMAGE_SUFFIXES


def _join(root: str, name: str) -> str:
    return f"{root}/{name}" if root else name


class _Tree:
    """Folders of a relative-path listing: sub-folders, images and other files of each."""

    def __init__(self, files: Iterable[str], dirs: Iterable[str]):
        self.children: dict[str, set[str]] = defaultdict(set)
        self.images: dict[str, list[str]] = defaultdict(list)
        self.others: dict[str, list[str]] = defaultdict(list)
        for d in dirs:
            if not any(_hidden(p) for p in d.split("/")):
                self._add_dir(d)
        for f in files:
            if any(_hidden(p) for p in f.split("/")):
                continue
            parent = posixpath.dirname(f)
            self._add_dir(parent)
            (self.images if is_image_path(f) else self.others)[parent].append(f)

    def _add_dir(self, d: str) -> None:
        while d:
            parent, name = posixpath.split(d)
            if name in self.children[parent]:
                return
            self.children[parent].add(name)
            d = parent

    def subdirs(self, d: str) -> list[str]:
        return natural_sorted(self.children.get(d, ()))

    def images_under(self, d: str) -> list[str]:
        return sorted(f for sub in self._folders_under(d) for f in self.images.get(sub, ()))

    def ignored_under(self, d: str) -> list[str]:
        return sorted(f for sub in self._folders_under(d) for f in self.others.get(sub, ()))

    def _folders_under(self, d: str) -> list[str]:
        out, stack = [], [d]
        while stack:
            cur = stack.pop()
            out.append(cur)
            stack.extend(_join(cur, c) for c in self.children.get(cur, ()))
        return out


def _at_least_two(classes: list[str], where: str) -> list[str]:
    if len(classes) < 2:
        raise ImgclfError(f"only one class folder ({classes[0]}/) found in {where}: a classifier needs at "
                          f"least two; {LAYOUT_HELP}")
    return classes


def _scan_classes(tree: _Tree, folder: str, where: str) -> tuple[list[str], list[tuple[str, int]]]:
    """Class sub-folders of ``folder`` -> (classes, [(relpath, label)] in sorted file order)."""
    shown = f"{where}/{folder}" if folder else where
    classes = tree.subdirs(folder)
    if not classes:
        raise ImgclfError(f"no class folders found in {shown}: {LAYOUT_HELP}")
    if tree.images[folder]:
        raise ImgclfError(f"{len(tree.images[folder])} image(s) directly in {shown} (e.g. "
                          f"{tree.images[folder][0]}): put each image in a folder named after its class")
    items = []
    for label, name in enumerate(classes):
        files = tree.images_under(_join(folder, name))
        if not files:
            raise ImgclfError(f"class folder {where}/{_join(folder, name)} has no images: add some or remove "
                              "the folder")
        items.extend((f, label) for f in files)
    return classes, items


def _member_label(archive: Path, name: str) -> str:
    """How an archive member is named in messages; ends with the member's own name (and extension)."""
    return f"{archive} entry {name}"


@dataclass
class _Listing:
    files: list[str]                  # relative POSIX paths, links to images included
    dirs: list[str]
    links: dict[str, str]             # an archive's links to images -> their target


def _archive_images(path: Path, listing: _Listing):
    """An archive's images, read member by member (the bytes are not kept); its members and links are listed
    into ``listing`` on the way."""
    files, links = [], {}
    for entry in iter_archive(path):
        if any(_hidden(p) for p in entry.name.split("/")):
            continue
        if entry.kind == "dir":
            listing.dirs.append(entry.name)
        elif entry.kind == "link":
            links[entry.name] = entry.target
        else:
            files.append(entry.name)
            if is_image_path(entry.name):
                yield entry.name, _member_label(path, entry.name), entry.data
    images = {f for f in files if is_image_path(f)}
    # Links to images inside the archive stand for their target (targets may come later).
    listing.links.update({name: target for name, target in links.items() if is_image_path(name) and target in images})
    listing.files.extend(files + list(listing.links))


def read_images(path: Path, wanted: set[str]):
    """(relpath, label, path or bytes) of the wanted images: a folder's in sorted order, an archive's in
    stored order (read again, one member at a time)."""
    if path.is_dir():
        for rel in sorted(wanted):
            yield rel, str(path / rel), str(path / rel)
        return
    for entry in iter_archive(path):
        if entry.kind == "file" and entry.name in wanted:
            yield entry.name, _member_label(path, entry.name), entry.data


def _drop_bad(layout: Layout, bad: dict[str, str], path: Path, *, skip_bad_images: bool
              ) -> tuple[Layout, list[str]]:
    """Raise on the first unreadable image, or leave them all out (with a warning). -> (layout, bad files)"""
    bad_files = [rel for items in layout.splits.values() for rel, _ in items if rel in bad]
    if not bad_files:
        return layout, bad_files
    if not skip_bad_images:
        more = f" ({len(bad_files)} unreadable files in all)" if len(bad_files) > 1 else ""
        raise ImgclfError(f"{bad[bad_files[0]]}{more}; or pass --skip-bad-images to leave such files out")
    warn(f"skipped {len(bad_files)} unreadable image(s) in {path}, e.g. {bad_files[0]} (listed in Dataset.skipped)")
    splits = {s: [(rel, y) for rel, y in items if rel not in bad] for s, items in layout.splits.items()}
    main = "train" if "train" in splits else "all"
    empty = sorted(set(range(len(layout.classes))) - {y for _, y in splits[main]})
    if empty:
        raise ImgclfError(f"class {layout.classes[empty[0]]!r} in {path} has no readable images left after "
                          "skipping bad files; add some or remove its folder")
    return Layout(layout.classes, splits, layout.ignored), bad_files


def _default_size(images: list[DecodedImage], path: Path) -> int:
    """The native side when every image has the same square size; otherwise choose_size, with a note."""
    sizes = {(d.width, d.height) for d in images}
    w, h = min(sizes)
    if len(sizes) == 1 and w == h:
        return w
    size = choose_size([(d.width, d.height) for d in images])
    shape = f"are all {w}x{h}, not square" if len(sizes) == 1 else f"vary in size ({len(sizes)} sizes, e.g. {w}x{h})"
    note(f"images in {path} {shape}: resizing to {size}x{size} (the most common shorter side, at most "
         f"{MAX_DEFAULT_SIZE}); pass --image-size to choose")
    return size
