"""Image folders -> Decoded: find the class layout in a folder or archive, then decode every image.

    decoded = load_folder(Path("pets.zip"), image_size=None, channels=None, skip_bad_images=False,
                          progress=True)

Layouts understood (one wrapping folder around either is looked through, as archives often have):

    train/<class>/*  test/<class>/*  [val/<class>/*]     -> Decoded.splits "train", "test", "val"
    <class>/*                                            -> Decoded.splits "all" (split later by fractions)

Images may sit in sub-folders of a class folder. Names starting with "." and ``__MACOSX`` folders are
ignored, as are files whose extension is not an image format (counted in a note). Classes come in
natural order ("2" before "10"); files are decoded in sorted order, so results never depend on the
order a file system or archive lists them.
"""
from __future__ import annotations

import os
import posixpath
from collections import Counter, defaultdict
from collections.abc import Iterable
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
                progress: bool) -> Decoded:
    """Decode an image folder (a directory or an archive of one) into uint8 arrays per split."""
    if path.is_dir():
        files, dirs = walk(path)
        layout = scan_layout(files, dirs, where=str(path))
        wanted = [rel for items in layout.splits.values() for rel, _ in items]
        sources = {rel: str(path / rel) for rel in wanted}
        with Decoder(size=image_size, channels=channels, progress=progress, total=len(wanted)) as decoder:
            for rel in wanted:
                decoder.add(rel, sources[rel], sources[rel])
            results = decoder.finish()
    else:
        with Decoder(size=image_size, channels=channels, progress=progress) as decoder:
            sources, files, dirs = _read_archive(path, decoder)
            layout = scan_layout(files, dirs, where=str(path))  # while the workers finish decoding
            results = decoder.finish()
    if layout.ignored:
        note(f"ignored {len(layout.ignored)} non-image file(s) in {path}, e.g. {layout.ignored[0]}")
    return _assemble(layout, results, sources, path, image_size=image_size, channels=channels,
                     skip_bad_images=skip_bad_images, progress=progress)


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


def _is_image(relpath: str) -> bool:
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
            (self.images if _is_image(f) else self.others)[parent].append(f)

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


def _read_archive(path: Path, decoder: Decoder) -> tuple[dict[str, bytes], list[str], list[str]]:
    """Read an archive once, handing each image to ``decoder`` as it comes, so reading overlaps decoding.
    -> (sources {relpath: bytes}, file list, folder list)."""
    sources: dict[str, bytes] = {}
    files, dirs, links = [], [], {}
    for entry in iter_archive(path):
        if any(_hidden(p) for p in entry.name.split("/")):
            continue
        if entry.kind == "dir":
            dirs.append(entry.name)
        elif entry.kind == "link":
            links[entry.name] = entry.target
        else:
            files.append(entry.name)
            if _is_image(entry.name):
                sources[entry.name] = entry.data
                decoder.add(entry.name, _member_label(path, entry.name), entry.data)
    # Links to images inside the archive become copies of their target (targets may come later).
    for name, target in links.items():
        if _is_image(name) and target in sources:
            sources[name] = sources[target]
            files.append(name)
            decoder.add(name, _member_label(path, name), sources[name])
    return sources, files, dirs


def _assemble(layout: Layout, results: dict[str, DecodedImage], sources: dict[str, str | bytes], path: Path,
              *, image_size: int | None, channels: int | None, skip_bad_images: bool, progress: bool
              ) -> Decoded:
    """Decoded images + layout -> arrays per split, after dealing with bad files and choosing the size."""
    layout, bad = _drop_bad(layout, results, path, skip_bad_images=skip_bad_images)
    used = [rel for items in layout.splits.values() for rel, _ in items]
    size = image_size
    if size is None:
        size = _default_size([results[rel] for rel in used], path)
        if any(results[rel].pixels is None or results[rel].width != size for rel in used):
            # Second pass at the chosen size, from the files on disk or the archive bytes kept in memory.
            with Decoder(size=size, channels=channels, progress=progress, total=len(used)) as decoder:
                for rel in used:
                    label = sources[rel] if isinstance(sources[rel], str) else _member_label(path, rel)
                    decoder.add(rel, label, sources[rel])
                results = decoder.finish()
            layout, _ = _drop_bad(layout, results, path, skip_bad_images=False)  # cannot fail twice

    n_channels = channels or (1 if all(results[rel].grey for rel in used) else 3)
    arrays = {}
    for split, items in layout.splits.items():
        x = np.empty((len(items), size, size, n_channels), dtype=np.uint8)
        for i, (rel, _) in enumerate(items):
            x[i] = results[rel].pixels  # a grey (S, S, 1) image broadcasts into 3 equal channels
        arrays[split] = (x, np.array([y for _, y in items], dtype=np.int64))
    return Decoded(layout.classes, n_channels, size, arrays, skipped=bad)


def _drop_bad(layout: Layout, results: dict[str, DecodedImage], path: Path, *, skip_bad_images: bool
              ) -> tuple[Layout, list[str]]:
    """Raise on the first unreadable image, or leave them all out (with a warning). -> (layout, bad files)"""
    bad = [rel for items in layout.splits.values() for rel, _ in items if results[rel].error]
    if not bad:
        return layout, bad
    if not skip_bad_images:
        more = f" ({len(bad)} unreadable files in all)" if len(bad) > 1 else ""
        raise ImgclfError(f"{results[bad[0]].error}{more}; or pass --skip-bad-images to leave such files out")
    warn(f"skipped {len(bad)} unreadable image(s) in {path}, e.g. {bad[0]} (listed in Dataset.skipped)")
    bad_set = set(bad)
    splits = {s: [(rel, y) for rel, y in items if rel not in bad_set] for s, items in layout.splits.items()}
    main = "train" if "train" in splits else "all"
    empty = sorted(set(range(len(layout.classes))) - {y for _, y in splits[main]})
    if empty:
        raise ImgclfError(f"class {layout.classes[empty[0]]!r} in {path} has no readable images left after "
                          "skipping bad files; add some or remove its folder")
    return Layout(layout.classes, splits, layout.ignored), bad


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
