"""Small shared helpers: atomic writes, natural sort, the cache folder, device choice."""
from __future__ import annotations

import contextlib
import errno
import os
import re
import tempfile
import time
from pathlib import Path

import torch

from .errors import ImgclfError


def imgclf_home() -> Path:
    """The cache folder: ``$IMGCLF_HOME``, default ``~/.cache/imgclf``."""
    return Path(os.environ.get("IMGCLF_HOME") or Path.home() / ".cache" / "imgclf").expanduser()


def natural_key(s: str) -> list:
    """Sort key that orders ``2`` before ``10`` (``class2`` < ``class10``); case-insensitive, stable."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t.lower()) for t in re.split(r"(\d+)", s) if t] + [(2, 0, s)]


def natural_sorted(items) -> list[str]:
    return sorted(items, key=natural_key)


# Errors of the disk, not of what is being written: a full or read-only disk, a quota, a failing device.
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EFBIG, errno.EACCES, errno.EPERM})


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, durable: bool = False):
    """Yield a temporary path beside ``path``; on success it is renamed over ``path`` (atomic on POSIX),
    on failure removed, so a reader never sees a half-written file. The file gets the permissions the
    user's umask gives a new file (a temporary file is created 0600). ``durable``: the data and the rename
    reach the disk before this returns (fsync of the file, then of its folder), so a power loss right after
    cannot leave neither the old nor the new file (ext4 and xfs may otherwise commit the rename first).
    A full, read-only or failing disk is an ImgclfError naming ``path``; the previous file is kept."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # after the writer: some (safetensors) replace the file they are given
        if durable:
            _fsync(tmp, os.O_RDONLY)
        os.replace(tmp, path)
        tmp = None
        if durable:
            _fsync(path.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as e:
        if e.errno not in DISK_ERRNOS:
            raise
        kept = "; the previous file is unchanged" if path.exists() else ""
        raise ImgclfError(f"cannot write {path} ({os.strerror(e.errno)}){kept}; free disk space or check "
                          "the folder's permissions, then run again") from None
    finally:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


def _fsync(path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    """The process's umask, read without changing it where Linux tells (os.umask can only set it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str, durable: bool = False) -> None:
    with atomic_path(path, durable=durable) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data)


def flush_denormals() -> bool:
    """Make this CPU treat float32/bf16 subnormals (|x| < 1.2e-38) as zero (x86 FTZ/DAZ), as TensorFlow does on
    its CPU threads. x86 cores compute subnormals 10-100x slower, and trained nets produce them (tiny
    gradients, near-dead activations); no model here resolves values that small. Measured on FastNet,
    CIFAR-10: inference 576-757 -> 863-1,025 img/s in bf16 (three runs each), late full-size training
    epochs ~160 -> ~125-145 s, bit-identical accuracy.

    It reaches the calling thread and the threads it creates afterwards (PyTorch's OpenMP pool is created
    on the first parallel op), so this module does it when imported: every imgclf module that computes with
    torch imports it, before any tensor op (tests/test_utils.py checks). IMGCLF_KEEP_DENORMALS=1 turns it off.
    Returns whether it is on."""
    if os.environ.get("IMGCLF_KEEP_DENORMALS", "") not in ("", "0"):
        return False
    return bool(torch.set_flush_denormal(True))


flush_denormals()


def available_memory() -> int:
    """Bytes this process can still take: the system's MemAvailable, or less under a memory cgroup's limit
    (v1 or v2: containers and ``cgexec`` set one; the page cache it holds counts as reclaimable)."""
    avail = _meminfo().get("MemAvailable", 1 << 62)
    for limit, usage, cache in _cgroup_memory():
        if limit < 1 << 60:
            avail = min(avail, max(0, limit - usage + cache))
    return avail


def _meminfo() -> dict[str, int]:
    try:
        with open("/proc/meminfo") as f:
            return {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in f)}
    except (OSError, ValueError):
        return {}


def _cgroup_memory() -> list[tuple[int, int, int]]:
    """(limit, usage, page cache) of every memory cgroup this process is in (v1 and v2), innermost first."""
    out = []
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            base, files = Path("/sys/fs/cgroup/memory"), ("memory.limit_in_bytes", "memory.usage_in_bytes", "cache")
        elif controllers == "":
            base, files = Path("/sys/fs/cgroup"), ("memory.max", "memory.current", "file")
        else:
            continue
        folder = base / path.lstrip("/")
        try:
            limit_text = (folder / files[0]).read_text().strip()
            limit = 1 << 62 if limit_text == "max" else int(limit_text)
            usage = int((folder / files[1]).read_text())
            stat = dict(line.split() for line in (folder / "memory.stat").read_text().splitlines())
            out.append((limit, usage, int(stat.get(files[2], 0))))
        except (OSError, ValueError):
            continue
    return out


def process_age() -> float:
    """Seconds since this process started (interpreter start-up and imports included) where the OS tells
    (Linux /proc); otherwise since this module was imported."""
    try:
        ticks = os.sysconf("SC_CLK_TCK")
        start = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19]) / ticks
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - start)
    except (OSError, ValueError, IndexError, AttributeError):
        return time.monotonic() - _IMPORTED


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 natively: a CUDA GPU that supports it, or a CPU with AVX512-BF16
    or AMX (on AVX2-only CPUs bf16 is emulated and slower than fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    probes = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    if all(probe is None for probe in probes):  # private probes gone in some release: read the CPU flags
        try:
            flags = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
        return " avx512_bf16" in flags or " amx_bf16" in flags
    return any(probe() for probe in probes if probe is not None)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> cuda when available, else cpu. Asking for cuda without one is a clear error."""
    name = str(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ImgclfError(f"--device {name} asked for, but no CUDA GPU is available here; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise ImgclfError(f"unknown device {name!r}: use auto, cpu or cuda[:N]") from e


_IMPORTED = time.monotonic()
