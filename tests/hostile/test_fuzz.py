"""Property-based fuzzing (hypothesis): the image loader and the archive reader, given mangled versions of
valid files or plain random bytes, either succeed or raise ImgclfError; never anything else."""
from __future__ import annotations

import io
import tarfile
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from imgclf.data import Preprocess, preprocess_image
from imgclf.data.archives import iter_archive
from imgclf.errors import ImgclfError

SPEC = Preprocess(image_size=8, channels=3, mean=(0.5,) * 3, std=(0.25,) * 3)
FUZZ = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _seed_images() -> dict[str, bytes]:
    """One small valid file per format and a few modes: the starting points the mutations damage."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8))
    out = {}
    for fmt, img in [("JPEG", rgb), ("PNG", rgb), ("PNG", rgb.convert("LA")), ("PNG", rgb.convert("I;16")),
                     ("WEBP", rgb), ("GIF", rgb.convert("P")), ("BMP", rgb), ("TIFF", rgb),
                     ("TIFF", rgb.convert("F"))]:
        buf = io.BytesIO()
        img.save(buf, format=fmt)
        out[f"{fmt}-{img.mode}"] = buf.getvalue()
    return out


SEEDS = _seed_images()


@st.composite
def mangled(draw, seeds: dict[str, bytes]):  # seeds by name: hypothesis prints the name, not the bytes
    """A valid file with a few bytes overwritten, a run inserted or deleted, or cut short."""
    data = bytearray(seeds[draw(st.sampled_from(sorted(seeds)))])
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["set", "insert", "delete", "truncate", "max"]))
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        if op == "set":
            data[at] = draw(st.integers(0, 255))
        elif op == "max":  # header sizes and counts turned to their largest value
            data[at:at + 4] = b"\xff\xff\xff\x7f"
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif op == "delete":
            del data[at:at + draw(st.integers(1, 64))]
        else:
            del data[at:]
    return bytes(data)


def _loads_or_refuses(data: bytes, name: str) -> None:
    try:
        out = preprocess_image(data, SPEC)
    except ImgclfError as e:
        assert "\n" not in str(e)
        return
    assert out.shape == (8, 8, 3) and out.dtype == np.uint8, name


@FUZZ
@given(data=mangled(SEEDS))
def test_the_image_loader_on_mangled_files(data):
    _loads_or_refuses(data, "mangled")


@FUZZ
@given(data=st.binary(max_size=2048))
def test_the_image_loader_on_random_bytes(data):
    _loads_or_refuses(data, "random")


def _seed_archives() -> dict[str, bytes]:
    members = {f"train/c{i % 2}/{i}.png": SEEDS["PNG-RGB"] for i in range(4)}
    out = {}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    out["zip"] = buf.getvalue()
    for mode in ("w:", "w:gz"):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode=mode) as tar:
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        out[mode] = buf.getvalue()
    return out


ARCHIVES = _seed_archives()


@FUZZ
@given(data=mangled(ARCHIVES), suffix=st.sampled_from([".zip", ".tar", ".tar.gz"]))
def test_the_archive_reader_on_mangled_archives(data, suffix):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"data{suffix}"
        path.write_bytes(data)
        try:
            entries = list(iter_archive(path))
        except ImgclfError as e:
            assert "\n" not in str(e)
            return
        for entry in entries:
            assert entry.kind in ("file", "dir", "link")
            assert not entry.name.startswith(("/", "..")) and "/../" not in f"/{entry.name}/"


@pytest.mark.parametrize("name", sorted(SEEDS))
def test_every_seed_file_loads(name):
    """The mutations start from files that load: a refusal above is the damage's doing."""
    assert preprocess_image(SEEDS[name], SPEC).shape == (8, 8, 3)
