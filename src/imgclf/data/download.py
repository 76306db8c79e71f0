"""Download a file once, verify its checksum, and only then put it where it will be found.

    fetch("https://.../cifar-10-python.tar.gz", Path("~/.cache/imgclf/datasets/cifar-10-python.tar.gz"),
          "md5:c58f30108f718f92721af3b95e74349a", progress=True)
"""
from __future__ import annotations

import hashlib
import sys
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from ..errors import ImgclfError
from ..utils import atomic_path

LOCAL_COPY_HINT = "pass --data PATH to a local copy instead (e.g. --data ../shared/datasets/cifar10-jpeg.tar.gz)"
TIMEOUT_S = 60  # per network read, not for the whole file


def parse_checksum(checksum: str) -> tuple[str, str]:
    """"md5:<hex>" / "sha256:<hex>" -> (algorithm, lower-case hex)."""
    algo, _, digest = checksum.partition(":")
    if algo not in ("md5", "sha256") or not digest:
        raise ImgclfError(f"bad checksum {checksum!r}: write it as md5:<hex> or sha256:<hex>")
    return algo, digest.lower()


def fetch(url: str, dest: Path, checksum: str, *, progress: bool = True) -> Path:
    """Download ``url`` to ``dest`` with a progress bar; the checksum is verified before the file appears
    at ``dest`` (written beside it, then renamed), so ``dest`` never holds a partial or wrong file."""
    algo, expected = parse_checksum(checksum)
    digest = hashlib.new(algo)
    try:
        with atomic_path(dest) as tmp, urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with open(tmp, "wb") as out, tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                                              desc=f"download {dest.name}", disable=not progress,
                                              file=sys.stderr) as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
            got = digest.hexdigest()
            if got != expected:
                # Raising inside atomic_path deletes the temporary file: nothing is left behind.
                raise ImgclfError(f"checksum mismatch for {url}: expected {algo}:{expected}, got {algo}:{got}; "
                                  f"the download is damaged or the file changed upstream (partial file "
                                  f"deleted); try again, or {LOCAL_COPY_HINT}")
    except urllib.error.HTTPError as e:
        raise ImgclfError(f"could not download {url}: HTTP {e.code} {e.reason}; {LOCAL_COPY_HINT}") from None
    except urllib.error.URLError as e:
        raise ImgclfError(f"could not download {url} ({e.reason}); no network? {LOCAL_COPY_HINT}") from None
    except (OSError, ValueError) as e:  # connection reset, timeout mid-transfer, malformed URL, disk full
        raise ImgclfError(f"could not download {url} ({type(e).__name__}: {e}); {LOCAL_COPY_HINT}") from None
    return dest
