"""Whole-slide images behind one small interface.

``Slide`` opens a file with the first backend that can read it: tiffslide (SVS, pyramidal and
OME-TIFF, generic tiled TIFF), OpenSlide (DICOM, MRXS, NDPI, ... via openslide-bin), or a plain RGB
image (JPEG, PNG, untiled TIFF: e.g. the full-resolution H&E of a Visium or legacy ST run; large PNGs
are read in row strips). A folder holding the .dcm files of one DICOM WSI series is one slide
(:func:`dicom_series_folder`). All coordinates are level-0 pixels. A lower pyramid level is compared
with level 0 before it is used, and skipped when its pixels are wrong (:meth:`Slide.level_check`).
A ``Slide`` is picklable: it keeps the path and reopens its backend lazily in each DataLoader worker.
"""

from __future__ import annotations

import hashlib
import os
import struct
import warnings
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from . import config
from .errors import CorruptTileError, MPPMissingError, SlideFormatError, SlideNotFoundError

PLAIN_SUFFIXES = {".jpg", ".jpeg", ".png"}

#: A pyramid level is compared with level 0 before it is used (see :meth:`Slide.level_check`): probe regions
#: are reduced to cells of mean colour, and a level fails when a channel's mean absolute difference from
#: level 0, over the probes' cells (or over their tissue cells alone), exceeds this many 8-bit units.
#: Measured: correct levels of the sample slides differ by at most 2.8 (JPEG re-encoding, resampling,
#: misalignment below a pixel); CMU-1 with red and blue swapped (BGR) by 12.7-15.5, other channel orders by
#: ~40, YCbCr shown as RGB by ~70, inverted, black or blank levels by 80-200.
LEVEL_CHECK_MAX_DIFF = 8.0
#: Side of a probe at the checked level (px), the most level-0 px one probe reads per side (bounds the cost on
#: coarse levels), and the side of the cells (level px) whose mean colours are compared.
LEVEL_CHECK_PROBE_PX = 64
LEVEL_CHECK_MAX_LEVEL0_PX = 1024
LEVEL_CHECK_CELL_PX = 16

#: Plain images that cannot be read in strips (JPEG; interlaced, palette or 16-bit PNG) are decoded whole, up
#: to this many pixels (~1.7 GiB of RGB): the full-resolution H&E of Visium (~20000 x 20000 px) and legacy ST
#: runs (~9300 x 9900 px) fit; larger ones are refused from the header, before any allocation.
PLAIN_DECODE_MAX_PIXELS = 600_000_000
#: PNGs above this many pixels are read in row strips with bounded memory (about one strip plus checkpoints)
#: instead of being decoded whole in every process that reads them.
PNG_STRIPS_ABOVE_PIXELS = 64_000_000


@dataclass(frozen=True)
class MPP:
    """Pixel size of level 0 in µm/px, and where it came from."""

    x: float
    y: float
    source: str

    @property
    def mean(self) -> float:
        return (self.x + self.y) / 2.0


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
        bad: list[tuple[int, int, int, int]] | None = None,
    ) -> np.ndarray: ...

    def stated_mpp(self) -> tuple[float, float, str] | None: ...

    def close(self) -> None: ...


def _plausible(mpp: float) -> bool:
    lo, hi = config.MPP_PLAUSIBLE
    return lo <= mpp <= hi


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
        from collections import OrderedDict

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


class _TiledLevel:
    """Direct reads of one tiled, chunky, 8-bit TIFF page: fetch and decode only the tiles a region
    touches. Skips tiffslide's zarr layer (a ~2x saving on JPEG tiles) and names the tile that fails."""

    def __init__(self, page: Any, level: int, cache: _TileCache) -> None:
        self.page = page
        self.level = level
        self.cache = cache
        self.tw, self.th = int(page.tilewidth), int(page.tilelength)
        self.width, self.height = int(page.imagewidth), int(page.imagelength)
        self.ntx = -(-self.width // self.tw)
        self.spp = int(page.samplesperpixel)
        self.compression = int(page.compression)

    @staticmethod
    def usable(page: Any) -> bool:
        if page.is_tiled and max(int(page.tilewidth), int(page.tilelength)) > config.MAX_TILE_SIDE_PX:
            raise SlideFormatError(
                f"tiles of {page.tilewidth}x{page.tilelength} px are beyond {config.MAX_TILE_SIDE_PX} px; "
                "the header is corrupt or hostile"
            )
        return bool(
            page.is_tiled
            and int(page.planarconfig) == 1
            and int(page.samplesperpixel) in (1, 3, 4)
            and np.dtype(page.dtype) == np.uint8
            and int(page.imagedepth) == 1
        )

    def read(
        self,
        fh: Any,
        x: int,
        y: int,
        w: int,
        h: int,
        path: Path,
        downsample: float,
        bad: list[tuple[int, int, int, int]] | None = None,
    ) -> np.ndarray:
        """Pixels [y, y+h) x [x, x+w) of this level, white outside the image.

        A tile that is missing or fails to decode raises :class:`CorruptTileError`, or, when ``bad`` is a
        list (the ``--on-bad-tile skip`` policy), is left white and its rectangle (level px, relative to
        the region) appended to ``bad`` so callers can drop the spots it touches."""
        out = _blank(w, h)
        x0, y0 = max(0, x), max(0, y)
        x1, y1 = min(self.width, x + w), min(self.height, y + h)
        if x1 <= x0 or y1 <= y0:
            return out
        tiles = [
            (ty * self.ntx + tx, tx, ty)
            for ty in range(y0 // self.th, (y1 - 1) // self.th + 1)
            for tx in range(x0 // self.tw, (x1 - 1) // self.tw + 1)
        ]
        page = self.page
        # Neighbouring super-tiles overlap only near their edges: cache the tiles of an outer ring (about
        # 2 tiles wide, > halo + context at usual settings), so the cache is not flushed by interior tiles.
        ring = 2
        tx_lo, tx_hi = x0 // self.tw + ring, (x1 - 1) // self.tw - ring
        ty_lo, ty_hi = y0 // self.th + ring, (y1 - 1) // self.th - ring
        decoded: dict[int, np.ndarray] = {}
        for i, _, _ in tiles:
            hit = self.cache.get((self.level, i))
            if hit is not None:
                decoded[i] = hit
        tiles = [t for t in tiles if t[0] not in decoded] if decoded else tiles
        offsets = [int(page.dataoffsets[i]) for i, _, _ in tiles]
        counts = [int(page.databytecounts[i]) for i, _, _ in tiles]
        where = {i: (tx, ty) for i, tx, ty in tiles}
        if bad is not None:
            ok = [k for k, c in enumerate(counts) if c > 0]
            for k, c in enumerate(counts):
                if c == 0:
                    _, tx, ty = tiles[k]
                    bad.append((tx * self.tw - x, ty * self.th - y, (tx + 1) * self.tw - x, (ty + 1) * self.th - y))
            tiles = [tiles[k] for k in ok]
            offsets = [offsets[k] for k in ok]
            counts = [counts[k] for k in ok]
        for (_i, tx, ty), count in zip(tiles, counts, strict=True):
            if count == 0:
                raise CorruptTileError(
                    f"{path}: tile (col {tx}, row {ty}) of level {self.level} is missing (zero byte count, "
                    f"near level-0 x={int(tx * self.tw * downsample)}, y={int(ty * self.th * downsample)}); "
                    "the slide is truncated or was written incompletely"
                )
        segments: list[tuple[bytes | None, int]] = []
        if tiles:
            with fh.lock:
                segments = list(fh.read_segments(offsets, counts, [i for i, _, _ in tiles], sort=True))
        expected = dict(zip([t[0] for t in tiles], counts, strict=True))

        def decode(item: tuple[bytes | None, int]) -> tuple[int, np.ndarray | Exception]:
            data, index = item
            try:
                _check_segment(data, expected[index], self.compression)
                tile, _, _ = page.decode(data, index, jpegtables=page.jpegtables)
                if tile is None:
                    raise ValueError("no data")
                return index, _rgb(np.asarray(tile).reshape(self.th, self.tw, self.spp))
            except Exception as exc:  # codecs raise their own types (RuntimeError, zlib.error, ...)
                return index, exc

        # Codecs release the GIL: decode a super-tile's tiles on a few threads (JPEG 2000 above all).
        if len(segments) >= 4 and config.DECODE_THREADS > 1:
            results = list(_decode_pool().map(decode, segments))
        else:
            results = [decode(item) for item in segments]
        for index, result in results:
            tx, ty = where[index]
            if isinstance(result, Exception):
                if bad is not None:
                    bad.append((tx * self.tw - x, ty * self.th - y, (tx + 1) * self.tw - x, (ty + 1) * self.th - y))
                    continue
                raise CorruptTileError(
                    f"{path}: tile (col {tx}, row {ty}) of level {self.level} failed to decode "
                    f"({type(result).__name__}: {str(result)[:120]}; near level-0 x={int(tx * self.tw * downsample)}, "
                    f"y={int(ty * self.th * downsample)}); the slide is corrupt"
                ) from result
            tx, ty = index % self.ntx, index // self.ntx
            if not (tx_lo <= tx <= tx_hi and ty_lo <= ty <= ty_hi):
                self.cache.put((self.level, index), result)
            decoded[index] = result
        for index, tile in decoded.items():
            _paste(out, x, y, (x0, y0, x1, y1), tile, (index % self.ntx) * self.tw, (index // self.ntx) * self.th)
        return out


class TiffSlideBackend:
    name = "tiffslide"

    def __init__(self, path: Path) -> None:
        import logging

        import tiffslide

        problems: list[str] = []

        class _Collect(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                msg = record.getMessage()
                if "circular" in msg or "invalid offset" in msg or "invalid page offset" in msg:
                    problems.append(msg)

        handler = _Collect(level=logging.WARNING)
        tlog = logging.getLogger("tifffile")
        tlog.addHandler(handler)
        try:
            self._slide = tiffslide.TiffSlide(path)
            _ = self._slide.level_dimensions
            _ = self._slide.ts_tifffile.pages  # walks the IFD chain now, inside the handler
        finally:
            tlog.removeHandler(handler)
        if problems:
            self._slide.close()
            raise SlideFormatError(f"{path}: malformed TIFF structure ({problems[0]}); the file is corrupt")
        self.level_dimensions = tuple((int(d[0]), int(d[1])) for d in self._slide.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in self._slide.level_downsamples)
        self.properties = {k: str(v) for k, v in self._slide.properties.items() if v is not None}
        self.vendor = self.properties.get("tiffslide.vendor") or self._guess_vendor()
        self.associated_images = {k: (0, 0) for k in self._slide.associated_images}
        self.path = Path(path)
        self._direct: list[_TiledLevel | None] = []
        cache = _TileCache(config.TILE_CACHE_BYTES)
        try:
            levels = self._slide.ts_tifffile.series[0].levels
        except Exception:
            levels = []
        for i, lvl in enumerate(levels[: len(self.level_dimensions)]):
            page = lvl.keyframe
            fits = len(lvl.pages) == 1 and (int(page.imagewidth), int(page.imagelength)) == self.level_dimensions[i]
            try:
                usable = fits and _TiledLevel.usable(page)
            except SlideFormatError as exc:
                self._slide.close()
                raise SlideFormatError(f"{path}: {exc}") from None
            self._direct.append(_TiledLevel(page, i, cache) if usable else None)

    def _guess_vendor(self) -> str:
        tf = self._slide.ts_tifffile
        if tf.is_ome:
            return "ome"
        return "generic-tiff"

    def read_region(
        self,
        location: tuple[int, int],
        level: int,
        size: tuple[int, int],
        bad: list[tuple[int, int, int, int]] | None = None,
    ) -> np.ndarray:
        direct = self._direct[level] if level < len(self._direct) else None
        if direct is not None:
            ds = self.level_downsamples[level]
            x, y = int(np.floor(location[0] / ds)), int(np.floor(location[1] / ds))
            return direct.read(self._slide.ts_tifffile.filehandle, x, y, size[0], size[1], self.path, ds, bad)
        # tiffslide pads with black; read the part inside the level and put it on glass instead
        ds = self.level_downsamples[level]
        x, y = int(np.floor(location[0] / ds)), int(np.floor(location[1] / ds))
        lw, lh = self.level_dimensions[level]
        out = _blank(*size)
        x0, y0, x1, y1 = max(0, x), max(0, y), min(lw, x + size[0]), min(lh, y + size[1])
        if x1 > x0 and y1 > y0:
            # ceil: tiffslide floors location / ds, which must land exactly on x0, y0
            loc = (int(np.ceil(x0 * ds)), int(np.ceil(y0 * ds)))
            arr = self._slide.read_region(loc, level, (x1 - x0, y1 - y0), as_array=True, padding=False)
            _paste(out, x, y, (x0, y0, x1, y1), _rgb(np.asarray(arr)), x0, y0)
        return out

    def stated_mpp(self) -> tuple[float, float, str] | None:
        mx = self.properties.get("tiffslide.mpp-x")
        my = self.properties.get("tiffslide.mpp-y") or mx
        if not mx:
            return None
        if self.vendor == "aperio":
            source = "aperio image description (MPP)"
        elif self.vendor == "ome":
            source = "OME-XML PhysicalSizeX/Y"
        else:
            source = "TIFF resolution tags"
        return float(mx), float(my or mx), source

    def close(self) -> None:
        self._slide.close()


class OpenSlideBackend:
    name = "openslide"

    def __init__(self, path: Path) -> None:
        import openslide

        self.path = Path(path)
        self._slide = openslide.OpenSlide(path)
        self.level_dimensions = tuple((int(d[0]), int(d[1])) for d in self._slide.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in self._slide.level_downsamples)
        self.properties = dict(self._slide.properties)
        self.vendor = self.properties.get("openslide.vendor", "unknown")
        self.associated_images = {k: (0, 0) for k in self._slide.associated_images}

    def read_region(
        self,
        location: tuple[int, int],
        level: int,
        size: tuple[int, int],
        bad: list[tuple[int, int, int, int]] | None = None,
    ) -> np.ndarray:
        import openslide

        try:
            img = self._slide.read_region(location, level, size)
        except openslide.OpenSlideError as exc:
            # OpenSlide errors are sticky: the handle refuses every later read. Reopen it, so one bad level
            # (e.g. cropped edge frames of a DICOM level) does not poison reads of the others.
            try:
                self._slide.close()
                self._slide = openslide.OpenSlide(self.path)
            except openslide.OpenSlideError:
                pass
            raise CorruptTileError(
                f"{self.path}: OpenSlide failed to read level {level} at level-0 {tuple(location)}, size "
                f"{tuple(size)} ({str(exc)[:160]}); the slide is corrupt or truncated, or this level is broken"
            ) from exc
        return _rgb(np.asarray(img))

    def stated_mpp(self) -> tuple[float, float, str] | None:
        mx = self.properties.get("openslide.mpp-x")
        my = self.properties.get("openslide.mpp-y") or mx
        if not mx:
            return None
        return float(mx), float(my or mx), f"{self.vendor} metadata (openslide.mpp-x/y)"

    def close(self) -> None:
        self._slide.close()


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
            idat: list[tuple[int, int]] = []
            header = None
            while True:
                head = fh.read(8)
                if len(head) < 8:
                    break  # no IEND: a truncated file reads until its data ends, then says so
                length, kind = struct.unpack(">I4s", head)
                if kind == b"IHDR":
                    header = struct.unpack(">IIBBBBB", fh.read(13))
                    fh.seek(length - 13 + 4, os.SEEK_CUR)
                elif kind == b"IDAT":
                    idat.append((fh.tell(), length))
                    fh.seek(length + 4, os.SEEK_CUR)
                elif kind == b"IEND":
                    break
                else:
                    fh.seek(length + 4, os.SEEK_CUR)
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
            data = inflater.unconsumed_tail
            if not data:
                while state[2] < len(self.idat) and self.idat[state[2]][1] == 0:
                    state[2] += 1  # empty IDAT chunks are legal
                offset, length = self.idat[state[2]] if state[2] < len(self.idat) else (0, 0)
                if length:
                    data = os.pread(self._fd, min(1 << 20, length - state[3]), offset + state[3])
                if not data:
                    raise CorruptTileError(
                        f"{self.path}: PNG data ends before row {state[0]} of level 0 (of {self.height} rows); "
                        "the file is truncated, re-copy it"
                    )
                state[3] += len(data)
                if state[3] >= length:
                    state[2], state[3] = state[2] + 1, 0
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


class PlainImageBackend:
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
        bad: list[tuple[int, int, int, int]] | None = None,
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


class DicomBackend:
    """Single-file DICOM VL whole-slide images (TILED_FULL frames) through pydicom, for files OpenSlide
    refuses (e.g. minimal metadata). One level; frames decoded on demand and cached."""

    name = "pydicom"
    WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"

    def __init__(self, path: Path) -> None:
        import pydicom

        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as exc:
            raise SlideFormatError(f"{path}: not a DICOM file ({type(exc).__name__})") from exc
        if str(ds.get("SOPClassUID", "")) != self.WSI_SOP_CLASS:
            raise SlideFormatError(f"{path}: DICOM, but not a VL whole-slide image (SOP class {ds.get('SOPClassUID')})")
        declared = ds.get("DimensionOrganizationType")
        org = str(declared or "TILED_FULL")
        if org != "TILED_FULL":
            raise SlideFormatError(f"{path}: DICOM frames are {org}; only TILED_FULL is read here")
        self.path = path
        self.tw, self.th = int(ds.Columns), int(ds.Rows)
        w, h = int(ds.TotalPixelMatrixColumns), int(ds.TotalPixelMatrixRows)
        if max(w, h) > config.MAX_SLIDE_SIDE_PX or max(self.tw, self.th) > config.MAX_TILE_SIDE_PX:
            raise SlideFormatError(
                f"{path}: header claims {w}x{h} px in {self.tw}x{self.th} frames; corrupt or hostile"
            )
        self.ntx, self.nty = -(-w // self.tw), -(-h // self.th)
        self.n_frames = int(ds.get("NumberOfFrames", 1))
        if self.n_frames < self.ntx * self.nty:
            raise SlideFormatError(f"{path}: {self.n_frames} frames cannot tile {w}x{h} px; the file is incomplete")
        self.transfer_syntax = str(ds.file_meta.TransferSyntaxUID)
        self.spp = int(ds.get("SamplesPerPixel", 3))
        self.level_dimensions: tuple[tuple[int, int], ...] = ((w, h),)
        self.level_downsamples: tuple[float, ...] = (1.0,)
        self.vendor = "dicom"
        self.properties = {"dicom.transfer-syntax": self.transfer_syntax}
        self.associated_images: dict[str, tuple[int, int]] = {}
        self._mpp: tuple[float, float] | None = None
        try:
            spacing = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
            self._mpp = (float(spacing[1]) * 1000.0, float(spacing[0]) * 1000.0)
        except (AttributeError, IndexError, KeyError, TypeError):
            self._mpp = None
        self._frames: list[bytes] | None = None
        self._cache = _TileCache(64 * 2**20)
        # TILED_FULL means row-major frames. Files that do not declare their organisation exist with
        # column-major frames; for those the order whose tile edges continue best is used, and recorded.
        self.column_major = False
        if declared is None and self.n_frames <= 1024 and self.ntx > 2 and self.nty > 2:
            self.column_major = self._edges_fit_column_major()
        self.properties["dicom.frame-order"] = ("column-major" if self.column_major else "row-major") + (
            "" if declared else " (inferred from tile edges)"
        )

    def _frame_bytes(self) -> list[bytes]:
        if self._frames is None:
            import pydicom
            from pydicom.encaps import generate_frames

            if self.path.stat().st_size > 4 * 2**30:
                raise SlideFormatError(
                    f"{self.path}: level 0 is a DICOM file over 4 GB, too large for the pydicom reader; "
                    "open the series folder with OpenSlide (multi-file WSI)"
                )
            ds = pydicom.dcmread(self.path)
            data = ds.PixelData
            if ds.file_meta.TransferSyntaxUID.is_encapsulated:
                self._frames = list(generate_frames(data, number_of_frames=self.n_frames))
            else:
                size = self.tw * self.th * self.spp
                self._frames = [data[i * size : (i + 1) * size] for i in range(self.n_frames)]
        return self._frames

    def _frame_index(self, tx: int, ty: int) -> int:
        return tx * self.nty + ty if self.column_major else ty * self.ntx + tx

    def _edges_fit_column_major(self) -> bool:
        """Compare tile-edge continuity of the two frame orders on interior tiles."""

        def mismatch(column_major: bool) -> float:
            self.column_major = column_major
            diffs = []
            for ty in range(self.nty - 2):
                for tx in range(self.ntx - 2):
                    a = self._tile(self._frame_index(tx, ty)).astype(np.int16)
                    right = self._tile(self._frame_index(tx + 1, ty)).astype(np.int16)
                    below = self._tile(self._frame_index(tx, ty + 1)).astype(np.int16)
                    diffs.append(np.abs(a[:, -1] - right[:, 0]).mean())
                    diffs.append(np.abs(a[-1, :] - below[0, :]).mean())
            return float(np.mean(diffs))

        try:
            return mismatch(True) < 0.5 * mismatch(False)
        finally:
            self._cache = _TileCache(64 * 2**20)

    def _tile(self, index: int) -> np.ndarray:
        hit = self._cache.get((0, index))
        if hit is not None:
            return hit
        import imagecodecs

        data = self._frame_bytes()[index]
        try:
            if self.transfer_syntax in ("1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"):
                arr = imagecodecs.jpeg2k_decode(data)
            elif self.transfer_syntax.startswith("1.2.840.10008.1.2.4."):
                _check_segment(data, 0, 7)
                arr = imagecodecs.jpeg8_decode(data)
            else:
                arr = np.frombuffer(data, dtype=np.uint8).reshape(self.th, self.tw, self.spp)
        except Exception as exc:
            tx, ty = (
                (index // self.nty, index % self.nty) if self.column_major else (index % self.ntx, index // self.ntx)
            )
            raise CorruptTileError(
                f"{self.path}: frame {index} (col {tx}, row {ty}) of level 0 failed to decode ({type(exc).__name__}: "
                f"{str(exc)[:100]}); the slide is corrupt"
            ) from exc
        tile = _rgb(np.asarray(arr))
        self._cache.put((0, index), tile)
        return tile

    def read_region(
        self,
        location: tuple[int, int],
        level: int,
        size: tuple[int, int],
        bad: list[tuple[int, int, int, int]] | None = None,
    ) -> np.ndarray:
        x, y = location
        w, h = size
        W, H = self.level_dimensions[0]
        out = _blank(w, h)
        x0, y0, x1, y1 = max(0, x), max(0, y), min(W, x + w), min(H, y + h)
        if x1 <= x0 or y1 <= y0:
            return out
        for ty in range(y0 // self.th, (y1 - 1) // self.th + 1):
            for tx in range(x0 // self.tw, (x1 - 1) // self.tw + 1):
                gx0, gy0 = tx * self.tw, ty * self.th
                try:
                    tile = self._tile(self._frame_index(tx, ty))
                except CorruptTileError:
                    if bad is None:
                        raise
                    bad.append((gx0 - x, gy0 - y, gx0 + self.tw - x, gy0 + self.th - y))
                    continue
                _paste(out, x, y, (x0, y0, x1, y1), tile, gx0, gy0)
        return out

    def stated_mpp(self) -> tuple[float, float, str] | None:
        if self._mpp is None:
            return None
        return self._mpp[0], self._mpp[1], "DICOM PixelSpacing"

    def close(self) -> None:
        self._frames = None


def _has_dicom_preamble(path: Path) -> bool:
    with open(path, "rb") as fh:
        fh.seek(128)
        return fh.read(4) == b"DICM"


#: Suffixes of slide files other than DICOM: a folder holding any of them is not one DICOM slide.
_OTHER_SLIDE_SUFFIXES = {
    ".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".bif", ".vms", ".vmu", ".svslide", ".jpg", ".jpeg", ".png",
}  # fmt: skip
#: DICOM ImageType values (3rd value) that are not part of the pyramid: scanners may store them as their own series.
_DICOM_SIDE_IMAGES = {"LABEL", "OVERVIEW", "MACRO"}


@dataclass(frozen=True)
class _DicomInstance:
    path: Path
    series: str
    flavour: str  # ImageType's 3rd value (VOLUME, THUMBNAIL, LABEL, OVERVIEW), "" when absent
    pixels: int  # TotalPixelMatrixColumns x TotalPixelMatrixRows


def _dicom_instances(folder: Path, *, stop_at_second_series: bool = False) -> tuple[list[_DicomInstance], list[str]]:
    """The DICOM VL whole-slide instances among the .dcm files of ``folder`` (headers only, no pixels), and
    one line per .dcm file that is not one. With ``stop_at_second_series``, stops once a second pyramid series
    shows up (enough to tell that the folder is not one slide)."""
    import pydicom

    tags = ["SOPClassUID", "SeriesInstanceUID", "ImageType", "TotalPixelMatrixColumns", "TotalPixelMatrixRows"]
    found: list[_DicomInstance] = []
    others: list[str] = []
    series: set[str] = set()
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() != ".dcm" or not path.is_file():
            continue
        # pydicom warns (lazily, as values are read) about third-party headers that bend the standard, e.g.
        # 65-character UIDs: such files are still read, and the warnings would only be noise in a header scan.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=tags)
                sop = str(ds.get("SOPClassUID", ""))
                image_type = [str(v) for v in (ds.get("ImageType") or [])]
                uid = str(ds.get("SeriesInstanceUID", "")) or f"(no SeriesInstanceUID: {path.name})"
                pixels = int(ds.get("TotalPixelMatrixColumns", 0) or 0) * int(ds.get("TotalPixelMatrixRows", 0) or 0)
            except Exception as exc:
                others.append(f"{path.name} (not readable as DICOM: {type(exc).__name__})")
                continue
        if sop != DicomBackend.WSI_SOP_CLASS:
            others.append(f"{path.name} (SOP class {sop or 'missing'}, not a VL whole-slide image)")
            continue
        flavour = image_type[2].upper() if len(image_type) > 2 else ""
        found.append(_DicomInstance(path, uid, flavour, pixels))
        if flavour not in _DICOM_SIDE_IMAGES:
            series.add(uid)
            if stop_at_second_series and len(series) > 1:
                break
    return found, others


def _dicom_series_files(folder: Path) -> list[_DicomInstance]:
    """The instances of the one DICOM WSI series in ``folder``, level 0 (largest) first; else SlideFormatError."""
    others = sorted(f.name for f in folder.iterdir() if f.suffix.lower() in _OTHER_SLIDE_SUFFIXES and f.is_file())
    if others:
        listed = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        raise SlideFormatError(
            f"{folder}: is a directory holding slide files ({listed}); "
            "a folder is read as one slide only when it holds the .dcm files of one DICOM WSI: pass each slide file "
            "on its own (MRXS: pass the .mrxs file)"
        )
    found, not_wsi = _dicom_instances(folder)
    if not found:
        what = (
            f"its .dcm files are not DICOM whole-slide images ({'; '.join(not_wsi[:2])})"
            if not_wsi
            else "no .dcm files"
        )
        raise SlideFormatError(
            f"{folder}: is a directory with {what}; a folder may hold only the .dcm files of one DICOM WSI series "
            "(one file per pyramid level); for other formats pass the slide file itself (MRXS: the .mrxs file)"
        )
    pyramid = [d for d in found if d.flavour not in _DICOM_SIDE_IMAGES]
    series = sorted({d.series for d in pyramid})
    if len(series) > 1:
        raise SlideFormatError(
            f"{folder}: holds the .dcm files of {len(series)} DICOM WSI series "
            f"({', '.join('...' + u[-12:] for u in series[:4])}{', ...' if len(series) > 4 else ''}); "
            "a folder must hold one slide: split them into one folder per slide (series), by SeriesInstanceUID"
        )
    if not pyramid:
        raise SlideFormatError(
            f"{folder}: its DICOM files hold only label/overview images, no pyramid level; pass the slide's series"
        )
    uid = series[0]
    return sorted((d for d in found if d.series == uid), key=lambda d: (d.flavour != "VOLUME", -d.pixels, d.path.name))


def dicom_series_folder(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a folder holding the .dcm files of exactly one DICOM WSI series (one slide).

    Cheap: reads DICOM headers only, and stops at the second series. A folder that also holds other
    slide files (SVS, TIFF, JPEG, ...) is not one slide."""
    folder = Path(path)
    try:
        if not folder.is_dir():
            return False
        if any(f.suffix.lower() in _OTHER_SLIDE_SUFFIXES for f in folder.iterdir()):
            return False
        found, _ = _dicom_instances(folder, stop_at_second_series=True)
    except OSError:
        return False
    series = {d.series for d in found if d.flavour not in _DICOM_SIDE_IMAGES}
    return len(series) == 1


def _open_dicom_folder(folder: Path) -> Backend:
    """OpenSlide through the series' level-0 file (it finds the other levels in the folder), else pydicom."""
    files = _dicom_series_files(folder)
    errors: list[str] = []
    try:
        return OpenSlideBackend(files[0].path)
    except Exception as exc:
        errors.append(f"openslide: {type(exc).__name__}: {str(exc)[:160]}")
    try:
        backend = DicomBackend(files[0].path)  # level 0 only: the other levels are optional
        backend.properties["dicom.series-files"] = str(len(files))
        return backend
    except SlideFormatError as exc:
        errors.append(f"pydicom: {str(exc)[:160]}")
    raise SlideFormatError(
        f"{folder}: DICOM WSI series of {len(files)} file(s) that no reader can open ({'; '.join(errors)}); "
        "check that the series is complete"
    )


def _plugin_backends() -> list[Any]:
    """Site reader plugins: ``WSI_HISTOSGE_READER_PLUGINS="pkg.module:opener,..."``; each opener takes a
    path and returns a backend, or None to pass. Tried before the built-in readers."""
    import importlib

    openers = []
    for spec in filter(None, (x.strip() for x in os.environ.get("WSI_HISTOSGE_READER_PLUGINS", "").split(","))):
        module, _, name = spec.partition(":")
        try:
            openers.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError) as exc:
            raise SlideFormatError(
                f"reader plugin {spec!r} cannot be loaded ({exc}); fix WSI_HISTOSGE_READER_PLUGINS"
            ) from exc
    return openers


def _open_backend(path: Path) -> Backend:
    for opener in _plugin_backends():
        backend = opener(path)
        if backend is not None:
            return backend  # type: ignore[no-any-return]
    if path.is_dir():
        return _open_dicom_folder(path)
    if path.suffix.lower() in PLAIN_SUFFIXES:
        return PlainImageBackend(path)
    errors: list[str] = []
    try:
        return TiffSlideBackend(path)
    except SlideFormatError:
        raise  # a TIFF we refused on purpose (loop, hostile sizes): no other reader gets to guess
    except Exception as exc:
        errors.append(f"tiffslide: {type(exc).__name__}: {str(exc)[:160]}")
    try:
        return OpenSlideBackend(path)
    except Exception as exc:
        errors.append(f"openslide: {type(exc).__name__}: {str(exc)[:160]}")
    if path.suffix.lower() == ".dcm" or _has_dicom_preamble(path):
        try:
            return DicomBackend(path)
        except SlideFormatError as exc:
            errors.append(f"pydicom: {str(exc)[:160]}")
    raise SlideFormatError(
        f"{path}: not a slide any reader can open ({'; '.join(errors)}). "
        "Check that the file is complete and is a supported format (SVS, TIFF/OME-TIFF, NDPI, MRXS, "
        "DICOM WSI, JPEG/PNG)."
    )


def _hash_ends(h: Any, path: Path) -> None:
    """Feed the size and the first and last MiB of ``path`` into ``h``."""
    size = path.stat().st_size
    h.update(str(size).encode())
    with open(path, "rb") as fh:
        h.update(fh.read(1 << 20))
        if size > 2 << 20:
            fh.seek(-(1 << 20), os.SEEK_END)
            h.update(fh.read(1 << 20))


@dataclass
class Slide:
    """A whole-slide image. Open with ``Slide(path, mpp=None)``."""

    path: Path
    mpp_override: float | None = None
    skip_bad_tiles: bool = False  # the `--on-bad-tile skip` policy for reads that do not collect bad tiles
    _backend: Backend | None = field(default=None, init=False, repr=False, compare=False)
    _backend_pid: int = field(default=0, init=False, repr=False, compare=False)
    #: level -> (ok, reason, difference) of the checks made so far (see :meth:`level_check`)
    _level_verdicts: dict[int, tuple[bool, str, float | None]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        if not self.path.exists():
            raise SlideNotFoundError(f"{self.path}: no such file; check the path")
        if self.path.is_dir():
            _dicom_series_files(self.path)  # one DICOM WSI series, or an error that says what a folder may hold
        elif self.path.stat().st_size == 0:
            raise SlideFormatError(f"{self.path}: file is empty (0 bytes); re-copy the slide")
        if self.mpp_override is not None and not (self.mpp_override > 0):
            raise MPPMissingError(f"--mpp must be a positive number of µm/px, got {self.mpp_override}")
        w, h = self.backend.level_dimensions[0]  # open now so format errors surface at construction
        if w <= 0 or h <= 0 or max(w, h) > config.MAX_SLIDE_SIDE_PX:
            self.close()
            raise SlideFormatError(
                f"{self.path}: the header claims {w}x{h} px, beyond any scanned slide "
                f"(limit {config.MAX_SLIDE_SIDE_PX} px per side); the file is corrupt or hostile"
            )

    # -- pickling: keep the path, reopen lazily in each worker --------------------------------
    def __getstate__(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "mpp_override": self.mpp_override,
            "skip_bad_tiles": self.skip_bad_tiles,
            "level_verdicts": dict(self._level_verdicts),  # workers need not check the levels again
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path = state["path"]
        self.mpp_override = state["mpp_override"]
        self.skip_bad_tiles = state.get("skip_bad_tiles", False)
        self._level_verdicts = dict(state.get("level_verdicts", {}))
        self._backend = None
        self._backend_pid = 0

    @property
    def backend(self) -> Backend:
        if self._backend is None or self._backend_pid != os.getpid():
            # A forked DataLoader worker inherits the parent's open files, whose offsets it would share with
            # the parent and its sibling workers (seek + read would interleave): each process opens its own.
            self._backend = _open_backend(self.path)
            self._backend_pid = os.getpid()
        return self._backend

    # -- metadata ---------------------------------------------------------------------------
    @property
    def dimensions(self) -> tuple[int, int]:
        return self.backend.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self.backend.level_dimensions)

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return self.backend.level_dimensions

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return self.backend.level_downsamples

    @property
    def vendor(self) -> str:
        return self.backend.vendor

    @cached_property
    def mpp(self) -> MPP:
        """Level-0 pixel size: user override, else what the file states (if plausible), else an error."""
        stated = self.backend.stated_mpp()
        if stated is not None and not (_plausible(stated[0]) and _plausible(stated[1])):
            implausible = stated
            stated = None
        else:
            implausible = None
        if self.mpp_override is not None:
            if stated is not None and abs(stated[0] - self.mpp_override) / stated[0] > 0.1:
                warnings.warn(
                    f"{self.path}: --mpp {self.mpp_override} overrides the file's {stated[0]:.4f} µm/px ({stated[2]})",
                    stacklevel=2,
                )
            return MPP(self.mpp_override, self.mpp_override, "user override (--mpp)")
        if stated is not None:
            return MPP(stated[0], stated[1], stated[2])
        hint = ""
        if implausible is not None:
            hint = (
                f" The file states {implausible[0]:.4g} µm/px ({implausible[2]}), which is not a microscope "
                "scan (likely a 72-dpi default)."
            )
        raise MPPMissingError(
            f"{self.path}: the slide has no pixel size.{hint} Pass --mpp with the scan's µm per pixel "
            "(e.g. --mpp 0.5 for 20x, 0.25 for 40x)."
        )

    @cached_property
    def fingerprint(self) -> str:
        """Content fingerprint: size plus the first and last MiB (fast on multi-GB files); for a DICOM folder,
        the same over each of its .dcm files (sorted by name, names included)."""
        h = hashlib.blake2b(digest_size=16)
        if self.path.is_dir():
            files = sorted(f for f in self.path.iterdir() if f.suffix.lower() == ".dcm" and f.is_file())
            h.update(f"dicom-folder:{len(files)}".encode())
            for f in files:
                h.update(f.name.encode() + b"\0")
                _hash_ends(h, f)
        else:
            _hash_ends(h, self.path)
        return h.hexdigest()

    def level_mpp(self, level: int) -> float:
        return self.mpp.mean * self.level_downsamples[level]

    def best_level_for_mpp(self, target_mpp: float, *, verified: bool = True) -> int:
        """The coarsest level whose pixels are at least as fine as ``target_mpp`` (1% tolerance).

        With ``verified`` (the default), a level other than 0 is first compared with level 0 (see
        :meth:`level_check`); a level that fails is skipped for the next finer good one."""
        best = 0
        for level in range(self.level_count):
            if self.level_mpp(level) <= target_mpp * 1.01:
                best = level
        while verified and best > 0 and not self._check_level(best)[0]:
            best -= 1
        return best

    # -- pyramid level checks ------------------------------------------------------------------
    def _check_level(self, level: int) -> tuple[bool, str, float | None]:
        """Verdict on ``level`` against level 0, computed once per level (lazily) and cached."""
        if level == 0:
            return True, "reference", None
        verdict = self._level_verdicts.get(level)
        if verdict is None:
            verdict = self._compare_level(level)
            self._level_verdicts[level] = verdict
        return verdict

    def _probes(self, level: int) -> list[tuple[int, int, int, int]]:
        """Probe rectangles (x, y, w, h) in level px: the centre, four points around it, and the far corner
        (partial edge tiles are where broken levels fail to read)."""
        lw, lh = self.level_dimensions[level]
        ds = self.level_downsamples[level]
        side = max(4, min(LEVEL_CHECK_PROBE_PX, int(LEVEL_CHECK_MAX_LEVEL0_PX / ds)))
        pw, ph = min(side, lw), min(side, lh)
        rects = []
        for fx, fy in [(0.5, 0.5), (0.3, 0.3), (0.7, 0.3), (0.3, 0.7), (0.7, 0.7), (1.0, 1.0)]:
            x = min(max(0, round(fx * lw) - pw // 2), lw - pw)
            y = min(max(0, round(fy * lh) - ph // 2), lh - ph)
            if (x, y, pw, ph) not in rects:
                rects.append((x, y, pw, ph))
        return rects

    def _compare_level(self, level: int) -> tuple[bool, str, float | None]:
        from PIL import Image

        w0, h0 = self.dimensions
        lw, lh = self.level_dimensions[level]
        ds = self.level_downsamples[level]
        sx, sy = w0 / lw, h0 / lh  # per-axis downsample (level sizes are rounded)
        ref_cells: list[np.ndarray] = []
        lvl_cells: list[np.ndarray] = []
        for x, y, pw, ph in self._probes(level):
            try:
                patch = self.backend.read_region((int(np.ceil(x * ds)), int(np.ceil(y * ds))), level, (pw, ph))
            except Exception as exc:
                msg = str(exc).replace(str(self.path), "").strip(": ")[:160]
                return False, f"read failed at level px ({x}, {y}): {type(exc).__name__}: {msg}", None
            x0, y0 = round(x * sx), round(y * sy)
            size0 = (max(1, min(w0 - x0, round(pw * sx))), max(1, min(h0 - y0, round(ph * sy))))
            try:
                ref = self.backend.read_region((x0, y0), 0, size0)
            except Exception:
                continue  # level 0 is the reference: where it cannot be read, this probe says nothing
            grid = (max(1, pw // LEVEL_CHECK_CELL_PX), max(1, ph // LEVEL_CHECK_CELL_PX))
            box = Image.Resampling.BOX
            ref_cells.append(np.asarray(Image.fromarray(ref).resize(grid, box), np.float32).reshape(-1, 3))
            lvl_cells.append(np.asarray(Image.fromarray(patch).resize(grid, box), np.float32).reshape(-1, 3))
        if not ref_cells:
            return True, "not checked: level 0 could not be read at the probes", None
        ref_all, lvl_all = np.concatenate(ref_cells), np.concatenate(lvl_cells)
        diff = np.abs(ref_all - lvl_all)
        score = float(diff.mean(axis=0).max())
        tissue = (255.0 - ref_all.min(axis=1)) > 40  # glass shows no colour error: judge tissue on its own too
        if tissue.sum() >= 4:
            score = max(score, float(diff[tissue].mean(axis=0).max()))
        if score > LEVEL_CHECK_MAX_DIFF:
            channel = "RGB"[int(np.argmax(diff.mean(axis=0)))]
            return (
                False,
                f"pixels differ from level 0 by {score:.1f} (mean abs, channel {channel}; limit "
                f"{LEVEL_CHECK_MAX_DIFF:g}): wrong colours or content",
                round(score, 2),
            )
        return True, f"matches level 0 (difference {score:.1f} <= {LEVEL_CHECK_MAX_DIFF:g})", round(score, 2)

    def level_check(self) -> list[dict[str, Any]]:
        """Every level checked against level 0 (runs the checks not made yet): level, ok, reason, difference."""
        out = []
        for level in range(self.level_count):
            ok, reason, difference = self._check_level(level)
            out.append({"level": level, "ok": ok, "reason": reason, "difference": difference})
        return out

    @property
    def skipped_levels(self) -> dict[int, str]:
        """Levels found bad so far (by a check or a failed read), with the reason: reads use finer levels."""
        return {level: reason for level, (ok, reason, _) in sorted(self._level_verdicts.items()) if not ok}

    # -- pixels -----------------------------------------------------------------------------
    def read_region(
        self,
        location: tuple[int, int],
        level: int,
        size: tuple[int, int],
        bad: list[tuple[int, int, int, int]] | None = None,
    ) -> np.ndarray:
        """RGB uint8 (h, w, 3) of ``size`` at ``level``, top-left at level-0 ``location``.

        ``bad``: see :meth:`_TiledLevel.read` (skip policy for corrupt tiles)."""
        if bad is None and self.skip_bad_tiles:
            bad = []  # corrupt tiles come back white (glass): never counted as tissue
        try:
            return self.backend.read_region(location, level, size, bad)
        except SlideFormatError as exc:
            msg = str(exc)
            if str(self.path) in msg and f"level {level}" in msg:
                raise
            # every read error names the file and the level (a few low-level messages know neither)
            named = msg if str(self.path) in msg else f"{self.path}: {msg}"
            raise type(exc)(f"{named} (reading level {level})") from exc
        except Exception as exc:
            raise CorruptTileError(
                f"{self.path}: failed to decode the region at level-0 {location}, level {level}, size {size} "
                f"({type(exc).__name__}: {exc}); the slide is corrupt or truncated"
            ) from exc

    def thumbnail_shape(self, mpp: float) -> tuple[int, int]:
        """(rows, cols) of the thumbnail at ``mpp`` µm/px."""
        w0, h0 = self.dimensions
        return max(1, round(h0 * self.mpp.y / mpp)), max(1, round(w0 * self.mpp.x / mpp))

    def thumbnail(self, mpp: float) -> tuple[np.ndarray, float]:
        """An RGB thumbnail at about ``mpp`` µm/px; returns (array, its actual µm/px along x).

        Read in horizontal strips from the coarsest adequate level that matches level 0 (a level that
        fails its check, or fails to read here, is recorded in :attr:`skipped_levels` and a finer one is
        used), so memory stays bounded on single-level gigapixel files.
        """
        w0, _h0 = self.dimensions
        level = self.best_level_for_mpp(mpp)
        while True:
            try:
                return self._thumbnail_from(level, mpp), self.mpp.x * w0 / self.thumbnail_shape(mpp)[1]
            except SlideFormatError as exc:  # CorruptTileError included
                if level == 0:
                    raise
                # a level that passed the probes but fails elsewhere (e.g. an edge frame): use a finer one
                msg = str(exc).replace(str(self.path), "").strip(": ")[:160]
                self._level_verdicts[level] = (False, f"read failed while making a thumbnail: {msg}", None)
                level = self.best_level_for_mpp(mpp)

    def _thumbnail_from(self, level: int, mpp: float) -> np.ndarray:
        from PIL import Image

        th, tw = self.thumbnail_shape(mpp)
        lw, lh = self.level_dimensions[level]
        ds = self.level_downsamples[level]
        out = np.empty((th, tw, 3), dtype=np.uint8)
        rows_per_strip = max(1, min(th, (64 << 20) // max(1, 3 * lw) * th // max(1, lh)))
        for ty0 in range(0, th, rows_per_strip):
            ty1 = min(th, ty0 + rows_per_strip)
            ly0 = int(np.floor(ty0 * lh / th))
            ly1 = max(ly0 + 1, min(lh, int(np.ceil(ty1 * lh / th))))
            strip = self.read_region((0, int(ly0 * ds)), level, (lw, ly1 - ly0))
            out[ty0:ty1] = np.asarray(Image.fromarray(strip).resize((tw, ty1 - ty0), Image.Resampling.BOX))
        return out

    def info(self) -> dict[str, Any]:
        """Everything `wsi-histosge info` shows, JSON-serialisable."""
        try:
            mpp: dict[str, Any] = {"x": self.mpp.x, "y": self.mpp.y, "source": self.mpp.source}
        except MPPMissingError as exc:
            mpp = {"x": None, "y": None, "source": None, "error": str(exc)}
        return {
            "path": str(self.path),
            "backend": self.backend.name,
            "vendor": self.vendor,
            "dimensions": list(self.dimensions),
            "levels": [
                {"level": i, "dimensions": list(d), "downsample": ds}
                for i, (d, ds) in enumerate(zip(self.level_dimensions, self.level_downsamples, strict=True))
            ],
            "mpp": mpp,
            "associated_images": sorted(self.backend.associated_images),
            "fingerprint": self.fingerprint,
            "level_check": self.level_check(),
        }

    def close(self) -> None:
        if self._backend is not None:
            self._backend.close()
            self._backend = None

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_slide(path: str | os.PathLike[str], mpp: float | None = None, *, skip_bad_tiles: bool = False) -> Slide:
    """Open ``path`` as a :class:`Slide` (see the module docstring for supported formats)."""
    return Slide(Path(path), mpp_override=mpp, skip_bad_tiles=skip_bad_tiles)
