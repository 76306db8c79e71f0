"""One-line notes and warnings for the user, on stderr, printed so they don't break a running tqdm bar."""
from __future__ import annotations

import contextlib
import sys

from tqdm import tqdm

_quiet = [0]


def note(message: str) -> None:
    if not _quiet[0]:
        tqdm.write(f"imgclf: {message}", file=sys.stderr)


@contextlib.contextmanager
def quiet_notes():
    """No notes (warnings still print) while loading what was already announced, e.g. a second copy."""
    _quiet[0] += 1
    try:
        yield
    finally:
        _quiet[0] -= 1


def warn(message: str) -> None:
    tqdm.write(f"imgclf: warning: {message}", file=sys.stderr)
