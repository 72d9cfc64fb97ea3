"""What every reader backend provides, and the pixel helpers they share.

A backend reads one slide file: level geometry, vendor properties, the pixel size it states, and RGB
uint8 regions in level-0 coordinates that are white (glass) wherever the request leaves the image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..errors import SlideFormatError
from ..remote import SlideURL

#: A rectangle (x0, y0, x1, y1) in level px, relative to a requested region: where a corrupt tile was left white.
BadRect = tuple[int, int, int, int]


class Backend(Protocol):
    name: str
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    vendor: str
    properties: dict[str, str]
    associated_images: dict[str, tuple[int, int]]

    def read_region(
        self,
        location: tuple[int, int],
        level: int,
        size: tuple[int, int],
        bad: list[BadRect] | None = None,
    ) -> np.ndarray: ...

    def stated_mpp(self) -> tuple[float, float, str] | None: ...

    def close(self) -> None: ...


def _rgb(arr: np.ndarray) -> np.ndarray:
    """Return an (h, w, 3) uint8 array; alpha composited on white, greyscale expanded."""
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    elif arr.shape[2] == 2:  # grey + alpha
        arr = arr[..., [0, 0, 0, 1]]
    if arr.dtype != np.uint8:
        if arr.dtype == np.uint16:
            arr = (arr >> 8).astype(np.uint8)
        else:
            raise SlideFormatError(f"unsupported pixel type {arr.dtype}; convert the slide to 8-bit RGB")
    if arr.shape[2] == 4:
        alpha = arr[..., 3:4].astype(np.uint16)
        rgb = arr[..., :3].astype(np.uint16)
        arr = ((rgb * alpha + 255 * (255 - alpha)) // 255).astype(np.uint8)
    return np.ascontiguousarray(arr[..., :3])


def _blank(w: int, h: int) -> np.ndarray:
    """A region of glass: every backend returns white where the request leaves the image."""
    return np.full((h, w, 3), 255, dtype=np.uint8)


def _paste(
    out: np.ndarray, x: int, y: int, clip: tuple[int, int, int, int], tile: np.ndarray, gx0: int, gy0: int
) -> None:
    """Copy the part of ``tile`` (top-left at level px gx0, gy0) inside ``clip`` into ``out`` (top-left x, y)."""
    x0, y0, x1, y1 = clip
    sx0, sy0 = max(x0, gx0), max(y0, gy0)
    sx1, sy1 = min(x1, gx0 + tile.shape[1]), min(y1, gy0 + tile.shape[0])
    if sx1 > sx0 and sy1 > sy0:
        out[sy0 - y : sy1 - y, sx0 - x : sx1 - x] = tile[sy0 - gy0 : sy1 - gy0, sx0 - gx0 : sx1 - gx0]


#: TIFF compression codes whose tiles are JPEG or JPEG 2000 codestreams (both end with the FFD9 marker).
_JPEG_LIKE = {6, 7, 33003, 33004, 33005, 34712}


def _check_segment(data: bytes | None, expected: int, compression: int) -> None:
    """Catch truncation that decoders let through: short reads, and JPEG/JPEG 2000 streams without their
    end marker (libjpeg only warns on a premature end and fills the rest of the tile)."""
    if data is None or len(data) < expected:
        raise ValueError(f"tile data truncated ({0 if data is None else len(data)} of {expected} bytes)")
    if compression in _JPEG_LIKE and not bytes(data).rstrip(b"\x00").endswith(b"\xff\xd9"):
        raise ValueError("JPEG stream has no end marker (truncated or overwritten)")


def _reopen(cls: type[Any], path: Path | SlideURL, options: dict[str, Any]) -> Any:
    return cls(path, **options)


class ReopensWhenUnpickled:
    """Pickles as its class, path and open options, and opens the file again when unpickled: a backend sent
    to another process never shares the parent's file handles (or their offsets)."""

    path: Path | SlideURL

    def _open_options(self) -> dict[str, Any]:
        return {}

    def __reduce__(self) -> tuple[Any, tuple[type[Any], Path | SlideURL, dict[str, Any]]]:
        return _reopen, (type(self), self.path, self._open_options())
