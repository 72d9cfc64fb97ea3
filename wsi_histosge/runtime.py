"""Process-wide settings for CPU inference.

A convolutional encoder's forward pass on CPU allocates and frees its activation buffers (tens of MB each)
every batch. glibc serves blocks that large with fresh ``mmap`` calls and unmaps them on free, so every
batch touches new pages: ~19,000 minor page faults per image at batch 64 for EfficientNet-Lite0, a third of
the forward's time spent in the kernel. Raising glibc's mmap and trim thresholds keeps those buffers in
the heap and reuses them (``benchmarks/cpu_allocator.py`` measures both, interleaved).
"""

from __future__ import annotations

import ctypes
import sys

#: glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: Allocations below this come from the heap instead of their own mmap (glibc's default: 128 KiB, growing
#: dynamically up to 32 MiB); the encoder's largest activation buffers at batch 64 are ~200 MB.
MMAP_THRESHOLD_BYTES = 1 << 30
#: Free heap memory at the top is returned to the OS only beyond this.
TRIM_THRESHOLD_BYTES = 1 << 30

_applied: bool | None = None
_libc: ctypes.CDLL | None = None


def keep_freed_memory() -> bool:
    """Tell glibc to reuse large freed blocks instead of unmapping them (once per process).

    Returns whether the setting is in effect (False off Linux/glibc). Memory is not lost: the heap keeps
    what the largest batch needed and reuses it for the next one."""
    global _applied, _libc
    if _applied is not None:
        return _applied
    _applied = False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    _applied = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )
    _libc = libc if _applied else None
    return _applied


def release_free_memory() -> None:
    """Return the heap's free pages to the OS (``malloc_trim``) where ``keep_freed_memory`` is in effect.

    Called after each super-tile: buffers are reused across the batches of one tile, and a slide's peak
    RSS stays that of one tile's work (without it, tiles of varying size fragment a heap that is never
    trimmed: 9.8 GB instead of 1.4 GB on a 100k px slide in ``benchmarks/memory_scaling.py``)."""
    if _libc is not None:
        _libc.malloc_trim(0)
