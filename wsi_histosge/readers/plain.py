"""Plain single-resolution images (JPEG, PNG): e.g. the full-resolution H&E of a Visium or legacy ST run.

Large 8-bit PNGs are read in row strips with bounded memory; other images are decoded whole, up to a limit
checked from the header before anything is allocated.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from .. import config
from ..errors import CorruptTileError, SlideFormatError
from .base import BadRect, ReopensWhenUnpickled, _blank, _paste, _rgb

PLAIN_SUFFIXES = {".jpg", ".jpeg", ".png"}

#: Plain images that cannot be read in strips (JPEG; interlaced, palette or 16-bit PNG) are decoded whole, up
#: to this many pixels (~1.7 GiB of RGB): the full-resolution H&E of Visium (~20000 x 20000 px) and legacy ST
#: runs (~9300 x 9900 px) fit; larger ones are refused from the header, before any allocation.
PLAIN_DECODE_MAX_PIXELS = 600_000_000
#: PNGs above this many pixels are read in row strips with bounded memory (about one strip plus checkpoints)
#: instead of being decoded whole in every process that reads them.
PNG_STRIPS_ABOVE_PIXELS = 64_000_000


def _image_size(path: Path) -> tuple[int, int]:
    """Width and height from a JPEG or PNG header, without decoding (and without PIL's global limit)."""
    with open(path, "rb") as fh:
        head = fh.read(32)
        if head.startswith(b"\x89PNG\r\n\x1a\n"):
            w, h = struct.unpack(">II", head[16:24])
            return int(w), int(h)
        if not head.startswith(b"\xff\xd8"):
            raise SlideFormatError(f"{path}: not a JPEG or PNG file (bad signature)")
        fh.seek(2)
        while True:
            marker = fh.read(2)
            if len(marker) < 2 or marker[0] != 0xFF:
                raise SlideFormatError(f"{path}: truncated or corrupt JPEG header")
            code = marker[1]
            if code in (0xD8, 0x01) or 0xD0 <= code <= 0xD7:
                continue
            seg_len_bytes = fh.read(2)
            if len(seg_len_bytes) < 2:
                raise SlideFormatError(f"{path}: truncated JPEG header")
            (seg_len,) = struct.unpack(">H", seg_len_bytes)
            if code in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF):
                data = fh.read(5)
                h, w = struct.unpack(">HH", data[1:5])
                return int(w), int(h)
            fh.seek(seg_len - 2, os.SEEK_CUR)


#: PNG colour type -> Pillow mode of the 8-bit images read in strips (grey, RGB, grey + alpha, RGBA).
_PNG_MODES = {0: "L", 2: "RGB", 4: "LA", 6: "RGBA"}


def _png_chunks(fh: BinaryIO) -> tuple[tuple[int, ...] | None, list[tuple[int, int]]]:
    """The IHDR fields and the (offset, length) of every IDAT chunk of a PNG, read past its signature."""
    idat: list[tuple[int, int]] = []
    header = None
    while True:
        head = fh.read(8)
        if len(head) < 8:
            break  # no IEND: a truncated file reads until its data ends, then says so
        length, kind = struct.unpack(">I4s", head)
        if kind == b"IEND":
            break
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", fh.read(13))
            fh.seek(length - 13 + 4, os.SEEK_CUR)
        else:
            if kind == b"IDAT":
                idat.append((fh.tell(), length))
            fh.seek(length + 4, os.SEEK_CUR)
    return header, idat


class _PngStrips:
    """Rows of a large PNG, decoded strip by strip with bounded memory.

    A PNG has no random access: its rows are one zlib stream, each row filtered against the row above. One
    pass inflates the stream and keeps checkpoints every ``interval`` rows (a copy of the inflater, the
    stream position, the last unfiltered row); a read restarts from the checkpoint at or above it. Each strip
    is unfiltered by Pillow's PNG row decoder, fed the strip's inflated rows re-wrapped in a stored zlib
    stream behind the unfiltered row above it (filter type 0), so memory holds about one strip (~16 MiB),
    the checkpoints (<= ~64 MiB) and the output. Only 8-bit, non-interlaced grey/RGB(A) PNGs: :meth:`open`
    returns None for others.
    """

    STRIP_BYTES = 16 << 20
    CHECKPOINT_BYTES = 64 << 20

    def __init__(self, path: Path, width: int, height: int, mode: str, idat: list[tuple[int, int]]) -> None:
        import threading
        import zlib

        self.path, self.width, self.height, self.mode, self.idat = path, width, height, mode, idat
        self.channels = len(mode)
        self.stride = width * self.channels + 1
        self.block = max(1, self.STRIP_BYTES // self.stride)
        most = max(1, self.CHECKPOINT_BYTES // (self.stride + (48 << 10)))
        self.interval = self.block * max(1, -(-height // (self.block * most)))
        self._fd = os.open(path, os.O_RDONLY)  # positional reads: no shared file offset to race on
        self._lock = threading.Lock()
        zero = bytes(self.stride - 1)
        # state: [row, inflater, IDAT chunk index, offset in chunk, inflated bytes not used yet, row above]
        self._checkpoints: dict[int, tuple[Any, int, int, bytes, bytes]] = {0: (zlib.decompressobj(), 0, 0, b"", zero)}
        self._cursor: list[Any] | None = None
        self._last: tuple[int, np.ndarray] | None = None  # the last decoded block (row, pixels)

    @classmethod
    def open(cls, path: Path) -> _PngStrips | None:
        with open(path, "rb") as fh:
            if fh.read(8) != b"\x89PNG\r\n\x1a\n":
                return None
            header, idat = _png_chunks(fh)
        if header is None or not idat:
            return None
        width, height, depth, colour, _, _, interlace = header
        if depth != 8 or interlace != 0 or colour not in _PNG_MODES:
            return None
        return cls(path, int(width), int(height), _PNG_MODES[colour], idat)

    def _inflate(self, state: list[Any], nbytes: int) -> bytes:
        """The next ``nbytes`` of the inflated stream, advancing ``state``."""
        parts, have = [state[4]], len(state[4])
        inflater = state[1]
        while have < nbytes:
            data = inflater.unconsumed_tail or self._read_compressed(state)
            try:
                chunk = inflater.decompress(data, nbytes - have)
            except Exception as exc:
                raise CorruptTileError(
                    f"{self.path}: PNG data near row {state[0]} of level 0 failed to inflate ({exc}); "
                    "the file is corrupt"
                ) from exc
            parts.append(chunk)
            have += len(chunk)
            if inflater.eof and have < nbytes:
                raise CorruptTileError(
                    f"{self.path}: PNG data ends before row {state[0]} of level 0 (of {self.height} rows); "
                    "the file is truncated or corrupt"
                )
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        if len(data) == nbytes:
            state[4] = b""
            return data
        state[4] = data[nbytes:]
        return data[:nbytes]

    def _read_compressed(self, state: list[Any]) -> bytes:
        """The next piece (<= 1 MiB) of the IDAT chunks' compressed data, advancing ``state``."""
        while state[2] < len(self.idat) and self.idat[state[2]][1] == 0:
            state[2] += 1  # empty IDAT chunks are legal
        offset, length = self.idat[state[2]] if state[2] < len(self.idat) else (0, 0)
        data = os.pread(self._fd, min(1 << 20, length - state[3]), offset + state[3]) if length else b""
        if not data:
            raise CorruptTileError(
                f"{self.path}: PNG data ends before row {state[0]} of level 0 (of {self.height} rows); "
                "the file is truncated, re-copy it"
            )
        state[3] += len(data)
        if state[3] >= length:
            state[2], state[3] = state[2] + 1, 0
        return data

    def _next_block(self, state: list[Any]) -> np.ndarray:
        """Decode the block of rows starting at ``state[0]``; returns (rows, width, channels) uint8."""
        import zlib

        from PIL import Image

        rows = min(self.block, self.height - state[0])
        raw = self._inflate(state, rows * self.stride)
        wrap = zlib.compressobj(0)  # stored blocks: a copy and a checksum, no compression work
        stream = wrap.compress(b"\x00" + state[5]) + wrap.compress(raw) + wrap.flush()
        del raw
        try:
            img = Image.frombytes(self.mode, (self.width, rows + 1), stream, "zip", self.mode)
        except Exception as exc:
            raise CorruptTileError(
                f"{self.path}: PNG rows {state[0]}-{state[0] + rows} of level 0 failed to decode ({exc}); "
                "the file is corrupt"
            ) from exc
        pix = np.asarray(img).reshape(rows + 1, self.width, self.channels)[1:]
        state[5] = pix[-1].tobytes()
        state[0] += rows
        if state[0] % self.interval == 0 and state[0] not in self._checkpoints and state[0] < self.height:
            self._checkpoints[state[0]] = (state[1].copy(), state[2], state[3], state[4], state[5])
        return pix

    def _state_at(self, row: int) -> list[Any]:
        """Inflater state positioned at ``row`` (a block boundary): the cursor, or a checkpoint decoded forward."""
        if self._cursor is not None and self._cursor[0] == row:
            return self._cursor
        start = max(r for r in self._checkpoints if r <= row)
        if self._cursor is not None and start < self._cursor[0] <= row:
            state = self._cursor
        else:
            inflater, idx, off, pending, above = self._checkpoints[start]
            state = [start, inflater.copy(), idx, off, pending, above]
        while state[0] < row:
            self._next_block(state)
        return state

    def read(self, y0: int, y1: int, x0: int, x1: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows [y0, y1), columns [x0, x1) of the image: (y1 - y0, x1 - x0, channels) uint8, written into
        ``out`` when given."""
        if out is None:
            out = np.empty((y1 - y0, x1 - x0, self.channels), dtype=np.uint8)
        with self._lock:
            for start in range(y0 // self.block * self.block, y1, self.block):
                if self._last is not None and self._last[0] == start:
                    pix = self._last[1]
                else:
                    state = self._state_at(start)
                    pix = self._next_block(state)
                    self._cursor = state
                    self._last = (start, pix)
                a, b = max(y0, start), min(y1, start + len(pix))
                out[a - y0 : b - y0] = pix[a - start : b - start, x0:x1]
        return out

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class PlainImageBackend(ReopensWhenUnpickled):
    """A single-resolution image (JPEG, PNG): large non-interlaced 8-bit PNGs are read in row strips with
    bounded memory (:class:`_PngStrips`); other images are decoded whole (once per process) and cut in
    memory, up to :data:`PLAIN_DECODE_MAX_PIXELS` (checked from the header, before decoding).
    """

    name = "plain-image"

    def __init__(self, path: Path) -> None:
        self.path = path
        w, h = _image_size(path)
        if w <= 0 or h <= 0 or w * h > config.MAX_PLAIN_IMAGE_PIXELS:
            raise SlideFormatError(
                f"{path}: image header says {w}x{h} px, beyond the plain-image limit of "
                f"{config.MAX_PLAIN_IMAGE_PIXELS} px; convert it to a tiled pyramidal TIFF"
            )
        self.vendor = "jpeg" if path.suffix.lower() in {".jpg", ".jpeg"} else "png"
        self._strips: _PngStrips | None = None
        if self.vendor == "png" and w * h > PNG_STRIPS_ABOVE_PIXELS:
            self._strips = _PngStrips.open(path)
        if self._strips is None and w * h > PLAIN_DECODE_MAX_PIXELS:
            kind = "JPEG" if self.vendor == "jpeg" else "PNG (interlaced, palette or 16-bit: not readable in strips)"
            raise SlideFormatError(
                f"{path}: {kind} of {w}x{h} = {w * h:,} px is over the limit of {PLAIN_DECODE_MAX_PIXELS:,} px "
                f"decoded whole (~{PLAIN_DECODE_MAX_PIXELS * 3 / 2**30:.1f} GiB); convert it to a tiled pyramidal "
                "TIFF (e.g. `vips tiffsave IN OUT.tif --tile --pyramid --compression jpeg --Q 90`, or tifffile) "
                "and pass that"
            )
        self.level_dimensions: tuple[tuple[int, int], ...] = ((w, h),)
        self.level_downsamples: tuple[float, ...] = (1.0,)
        self.properties: dict[str, str] = {"plain-image.read": "row strips" if self._strips else "whole"}
        self.associated_images: dict[str, tuple[int, int]] = {}
        self._pixels: np.ndarray | None = None

    def _array(self) -> np.ndarray:
        if self._pixels is None:
            import imagecodecs

            try:
                arr = imagecodecs.imread(str(self.path))
            except Exception as exc:
                raise SlideFormatError(
                    f"{self.path}: image (level 0) failed to decode ({exc}); the file is corrupt"
                ) from exc
            arr = _rgb(np.asarray(arr))
            if arr.shape[1] != self.level_dimensions[0][0] or arr.shape[0] != self.level_dimensions[0][1]:
                raise SlideFormatError(
                    f"{self.path}: decoded size of level 0 differs from the header; the file is corrupt"
                )
            self._pixels = arr
        return self._pixels

    def read_region(
        self,
        location: tuple[int, int],
        level: int,
        size: tuple[int, int],
        bad: list[BadRect] | None = None,
    ) -> np.ndarray:
        x, y = location
        w, h = size
        out = _blank(w, h)
        if self._strips is None:
            _paste(out, x, y, (max(x, 0), max(y, 0), x + w, y + h), self._array(), 0, 0)
            return out
        iw, ih = self.level_dimensions[0]
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(iw, x + w), min(ih, y + h)
        if x1 > x0 and y1 > y0:
            if self._strips.mode == "RGB":
                self._strips.read(y0, y1, x0, x1, out=out[y0 - y : y1 - y, x0 - x : x1 - x])
            else:
                out[y0 - y : y1 - y, x0 - x : x1 - x] = _rgb(self._strips.read(y0, y1, x0, x1))
        return out

    def stated_mpp(self) -> tuple[float, float, str] | None:
        # JFIF/PNG densities are screen DPI defaults, never a microscope's pixel size.
        return None

    def close(self) -> None:
        self._pixels = None
        if self._strips is not None:
            self._strips.close()
            self._strips = None
