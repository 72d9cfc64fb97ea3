"""A reader plugin that takes the process down, as a buggy native reader would (tests only)."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path


def opener(path: Path) -> None:
    if path.suffix == ".segv":
        ctypes.string_at(0)  # reads address 0: SIGSEGV
    if path.suffix == ".abort":
        os.abort()
    return None
