"""One-line notes and warnings for the user, on stderr, printed so they don't break a running tqdm bar."""
from __future__ import annotations

import sys

from tqdm import tqdm


def note(message: str) -> None:
    tqdm.write(f"imgclf: {message}", file=sys.stderr)


def warn(message: str) -> None:
    tqdm.write(f"imgclf: warning: {message}", file=sys.stderr)
