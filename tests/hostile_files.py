"""Hostile files, generated: headers that lie about their size, formats imgclf does not read, bombs. Each
maker writes one file into a folder and returns its path; small on disk, large if believed. And
:func:`run_measured`: run the command line and read that process's own peak RSS."""
from __future__ import annotations

import io
import os
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_header_bomb(path: Path, w: int = 30_000, h: int = 30_000) -> Path:
    """A valid PNG header for w x h RGB and a few bytes of pixel data: 2.7 GB if decoded."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 4096))
    path.write_bytes(data + _png_chunk(b"IEND", b""))
    return path


def png_zlib_bomb(path: Path, w: int = 12_000, h: int = 12_000) -> Path:
    """A complete, valid RGBA PNG of w x h zeros (576 MB decoded), ~0.6 MB compressed."""
    row = b"\0" * (1 + 4 * w)
    z = zlib.compressobj(9)
    body = b"".join(z.compress(row) for _ in range(h)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 6, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", body)
                     + _png_chunk(b"IEND", b""))
    return path


def png_16bit_scan(path: Path, side: int = 7_000) -> Path:
    """A real 16-bit greyscale PNG (98 MB decoded): within the budget, decoded in row blocks."""
    arr = np.zeros((side, side), np.uint16)
    arr[::97] = 40_000
    Image.fromarray(arr).save(path)
    return path


def gif_screen_bomb(path: Path) -> Path:
    """A GIF whose logical screen is 65535 x 65535 (4.3 G pixels) around a 1-pixel frame."""
    buf = io.BytesIO()
    Image.new("P", (1, 1)).save(buf, format="GIF")
    data = bytearray(buf.getvalue())
    data[6:10] = struct.pack("<HH", 65535, 65535)
    path.write_bytes(bytes(data))
    return path


def tiff_header_bomb(path: Path, side: int = 40_000) -> Path:
    """A TIFF header for side x side 8-bit grey (1.6 GB) with one strip of 8 bytes."""
    entries = [(256, 4, side), (257, 4, side), (258, 3, 8), (259, 3, 1), (262, 3, 1), (273, 4, 8),
               (277, 3, 1), (278, 4, side), (279, 4, side * side)]
    ifd = struct.pack("<H", len(entries)) + b"".join(
        struct.pack("<HHI", tag, kind, 1) + (struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value))
        for tag, kind, value in entries) + struct.pack("<I", 0)
    path.write_bytes(b"II*\0" + struct.pack("<I", 16) + b"\0" * 8 + ifd)
    return path


def eps_file(path: Path) -> Path:
    """PostScript: Pillow would hand it to Ghostscript."""
    path.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    return path


def other_format(path: Path, fmt: str) -> Path:
    """A real image in a format imgclf does not read (PPM, ICO, TGA, PCX ...)."""
    Image.new("RGB", (16, 16), (200, 10, 10)).save(path, format=fmt)
    return path


def junk(path: Path, size: int = 4096, seed: int = 0) -> Path:
    path.write_bytes(np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes())
    return path


def truncated_jpeg(path: Path) -> Path:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, format="JPEG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return path


def fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def image_corpus(folder: Path) -> dict[str, Path]:
    """Every hostile image of this module in ``folder``, by name."""
    folder.mkdir(parents=True, exist_ok=True)
    return {
        "png_header_bomb": png_header_bomb(folder / "header_bomb.png"),
        "png_zlib_bomb": png_zlib_bomb(folder / "zlib_bomb.png"),
        "gif_screen_bomb": gif_screen_bomb(folder / "screen_bomb.gif"),
        "tiff_header_bomb": tiff_header_bomb(folder / "header_bomb.tif"),
        "eps": eps_file(folder / "drawing.eps"),
        "eps_as_jpg": eps_file(folder / "drawing_eps.jpg"),
        "ppm": other_format(folder / "pixmap.ppm", "PPM"),
        "ico": other_format(folder / "icon.ico", "ICO"),
        "tga": other_format(folder / "targa.tga", "TGA"),
        "junk": junk(folder / "junk.jpg"),
        "empty": _empty(folder / "empty.png"),
        "truncated": truncated_jpeg(folder / "truncated.jpg"),
        "fifo": fifo(folder / "pipe.jpg"),
    }


def _empty(path: Path) -> Path:
    path.write_bytes(b"")
    return path


# The command runs under this small wrapper, which reads the peak RSS through wait4: a process forked from a
# large one (pytest late in a run: 1.7 GB) keeps that parent's high-water mark in its ru_maxrss across exec,
# a child of this fresh interpreter only its ~10 MB.
_WRAPPER = """
import os, subprocess, sys
proc = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(proc.pid, 0)
open(sys.argv[1], "w").write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status) % 256)
"""


def run_measured(args: list[str], timeout: float = 300, env: dict | None = None) -> tuple[int, str, str, float]:
    """``python -m imgclf ARGS`` -> (exit status, stdout, stderr, peak RSS of that process in MB; its children's,
    such as decode workers, where larger)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err, \
            tempfile.NamedTemporaryFile("r") as peak:
        proc = subprocess.Popen([sys.executable, "-c", _WRAPPER, peak.name, sys.executable, "-m", "imgclf", *args],
                                stdout=out, stderr=err, text=True, env={**os.environ, **(env or {})},
                                start_new_session=True)
        timer = threading.Timer(timeout, lambda: os.killpg(proc.pid, signal.SIGKILL))
        timer.start()
        try:
            proc.wait()
        finally:
            timer.cancel()
        out.seek(0)
        err.seek(0)
        kb = peak.read().strip()
        return proc.returncode, out.read(), err.read(), int(kb) / 1024 if kb else float("nan")
