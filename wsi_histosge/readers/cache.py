"""Per-process decoded-tile cache and decode thread pool, shared by the tiled readers."""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any

import numpy as np

from .. import config

_POOL: Any = None


def _decode_pool() -> Any:
    """One small thread pool per process (created lazily, so DataLoader workers each get their own)."""
    global _POOL
    if _POOL is None or getattr(_POOL, "_pid", None) != os.getpid():
        from concurrent.futures import ThreadPoolExecutor

        _POOL = ThreadPoolExecutor(max_workers=config.DECODE_THREADS, thread_name_prefix="wsi-histosge-decode")
        _POOL._pid = os.getpid()
    return _POOL


class _TileCache:
    """Decoded tiles, least recently used out first, bounded in bytes (per process).

    Neighbouring super-tiles share their border tiles; keeping about a block row of tiles means
    each tile is decoded about once."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._tiles: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    def get(self, key: tuple[int, int]) -> np.ndarray | None:
        tile = self._tiles.get(key)
        if tile is not None:
            self._tiles.move_to_end(key)
        return tile

    def put(self, key: tuple[int, int], tile: np.ndarray) -> None:
        if self.max_bytes <= 0 or key in self._tiles:
            return
        self._tiles[key] = tile
        self.bytes += tile.nbytes
        while self.bytes > self.max_bytes and self._tiles:
            _, old = self._tiles.popitem(last=False)
            self.bytes -= old.nbytes
