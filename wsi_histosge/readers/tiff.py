"""SVS, pyramidal and OME-TIFF, generic tiled TIFF: tiffslide for the structure and metadata, and a direct
reader of tiled 8-bit pages that fetches and decodes only the tiles a region touches.

A slide in an object store (:class:`~wsi_histosge.remote.SlideURL`) is read in place through a
:class:`~wsi_histosge.remote.RangeFile`: its structure is parsed from a few coalesced range requests, and a
region's tiles are fetched one run of neighbouring tiles per request (:func:`_read_runs`)."""

from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np

from .. import config
from ..errors import CorruptTileError, HistoSGEError, SlideFormatError
from ..remote import RangeFile, SlideURL
from .base import BadRect, ReopensWhenUnpickled, _blank, _check_segment, _paste, _rgb
from .cache import _decode_pool, _TileCache

#: Neighbouring super-tiles overlap only near their edges: the tiles of an outer ring this many tiles wide
#: (> halo + context at usual settings) are cached, so the cache is not flushed by interior tiles.
CACHED_RING_TILES = 2

#: Remote reads: tiles whose data lie at most this many bytes apart in the file are fetched in one range
#: request (a row of tiles is usually contiguous), up to ``MAX_RUN_BYTES`` per request.
RUN_GAP_BYTES = 4 << 10
MAX_RUN_BYTES = 32 << 20


def _read_runs(fh: Any, offsets: list[int], counts: list[int], indices: list[int]) -> list[tuple[bytes | None, int]]:
    """(data, index) of each segment, read as runs of segments that lie next to each other in the file: one
    seek + read per run (one range request on an object store) instead of one per tile. A short read leaves
    the segments past the end short, which the decoder's checks report as truncated."""
    order = sorted(range(len(offsets)), key=offsets.__getitem__)
    out: list[tuple[bytes | None, int]] = [(None, indices[k]) for k in order if offsets[k] <= 0]
    order = [k for k in order if offsets[k] > 0]
    i = 0
    while i < len(order):
        start = offsets[order[i]]
        end = start + counts[order[i]]
        j = i
        while j + 1 < len(order):
            nxt = order[j + 1]
            if offsets[nxt] - end > RUN_GAP_BYTES or offsets[nxt] + counts[nxt] - start > MAX_RUN_BYTES:
                break
            end = max(end, offsets[nxt] + counts[nxt])
            j += 1
        fh.seek(start)
        data = fh.read(end - start)
        for k in order[i : j + 1]:
            a = offsets[k] - start
            out.append((data[a : a + counts[k]], indices[k]))
        i = j + 1
    return out


class _TiledLevel:
    """Direct reads of one tiled, chunky, 8-bit TIFF page: fetch and decode only the tiles a region
    touches. Skips tiffslide's zarr layer (a ~2x saving on JPEG tiles) and names the tile that fails."""

    def __init__(self, page: Any, level: int, cache: _TileCache, *, runs: bool = False) -> None:
        self.page = page
        self.level = level
        self.cache = cache
        self.runs = runs  # read neighbouring tiles in one request (object stores)
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
        path: Path | SlideURL,
        downsample: float,
        bad: list[BadRect] | None = None,
    ) -> np.ndarray:
        """Pixels [y, y+h) x [x, x+w) of this level, white outside the image.

        A tile that is missing or fails to decode raises :class:`CorruptTileError`, or, when ``bad`` is a
        list (the ``--on-bad-tile skip`` policy), is left white and its rectangle (level px, relative to
        the region) appended to ``bad`` so callers can drop the spots it touches."""
        out = _blank(w, h)
        clip = (max(0, x), max(0, y), min(self.width, x + w), min(self.height, y + h))
        if clip[2] <= clip[0] or clip[3] <= clip[1]:
            return out
        decoded: dict[int, np.ndarray] = {}
        to_read: list[int] = []
        for index in self._tiles_in(clip):
            hit = self.cache.get((self.level, index))
            if hit is None:
                to_read.append(index)
            else:
                decoded[index] = hit
        to_read = self._drop_missing(to_read, (x, y), path, downsample, bad)
        for index, result in self._fetch_and_decode(fh, to_read):
            if isinstance(result, Exception):
                self._undecodable(index, result, (x, y), path, downsample, bad)
                continue
            if not self._interior(index, clip):
                self.cache.put((self.level, index), result)
            decoded[index] = result
        for index, tile in decoded.items():
            tx, ty = self._col_row(index)
            _paste(out, x, y, clip, tile, tx * self.tw, ty * self.th)
        return out

    # -- tile geometry -------------------------------------------------------------------------------
    def _tiles_in(self, clip: tuple[int, int, int, int]) -> list[int]:
        """Indices of the tiles that ``clip`` (x0, y0, x1, y1; level px, inside the level) touches, row-major."""
        x0, y0, x1, y1 = clip
        return [
            ty * self.ntx + tx
            for ty in range(y0 // self.th, (y1 - 1) // self.th + 1)
            for tx in range(x0 // self.tw, (x1 - 1) // self.tw + 1)
        ]

    def _col_row(self, index: int) -> tuple[int, int]:
        return index % self.ntx, index // self.ntx

    def _interior(self, index: int, clip: tuple[int, int, int, int]) -> bool:
        """Whether tile ``index`` lies inside the ring of :data:`CACHED_RING_TILES` along the edges of ``clip``."""
        x0, y0, x1, y1 = clip
        tx, ty = self._col_row(index)
        ring = CACHED_RING_TILES
        return (
            x0 // self.tw + ring <= tx <= (x1 - 1) // self.tw - ring
            and y0 // self.th + ring <= ty <= (y1 - 1) // self.th - ring
        )

    def _rect(self, index: int, origin: tuple[int, int]) -> BadRect:
        """Tile ``index`` as (x0, y0, x1, y1) in level px relative to a region whose top-left is ``origin``."""
        tx, ty = self._col_row(index)
        x, y = origin
        return tx * self.tw - x, ty * self.th - y, (tx + 1) * self.tw - x, (ty + 1) * self.th - y

    def _where(self, index: int, downsample: float) -> str:
        tx, ty = self._col_row(index)
        return f"near level-0 x={int(tx * self.tw * downsample)}, y={int(ty * self.th * downsample)}"

    # -- fetching and decoding -----------------------------------------------------------------------
    def _drop_missing(
        self,
        indices: list[int],
        origin: tuple[int, int],
        path: Path | SlideURL,
        downsample: float,
        bad: list[BadRect] | None,
    ) -> list[int]:
        """``indices`` without the tiles the file has no data for (zero byte count): those are recorded in
        ``bad`` when it is a list, else the first one raises :class:`CorruptTileError`."""
        kept = []
        for index in indices:
            if int(self.page.databytecounts[index]) > 0:
                kept.append(index)
                continue
            if bad is None:
                tx, ty = self._col_row(index)
                raise CorruptTileError(
                    f"{path}: tile (col {tx}, row {ty}) of level {self.level} is missing (zero byte count, "
                    f"{self._where(index, downsample)}); the slide is truncated or was written incompletely"
                )
            bad.append(self._rect(index, origin))
        return kept

    def _fetch_and_decode(self, fh: Any, indices: list[int]) -> list[tuple[int, np.ndarray | Exception]]:
        """(index, RGB tile or the exception that decoding it raised) for each tile, in file order."""
        if not indices:
            return []
        page = self.page
        offsets = [int(page.dataoffsets[i]) for i in indices]
        counts = [int(page.databytecounts[i]) for i in indices]
        expected = dict(zip(indices, counts, strict=True))
        with fh.lock:
            if self.runs:
                segments = _read_runs(fh, offsets, counts, indices)
            else:
                segments = list(fh.read_segments(offsets, counts, indices, sort=True))

        def decode(item: tuple[bytes | None, int]) -> tuple[int, np.ndarray | Exception]:
            data, index = item
            return index, self._decode(data, index, expected[index])

        # Codecs release the GIL: decode a super-tile's tiles on a few threads (JPEG 2000 above all).
        if len(segments) >= 4 and config.DECODE_THREADS > 1:
            return list(_decode_pool().map(decode, segments))
        return [decode(item) for item in segments]

    def _decode(self, data: bytes | None, index: int, expected_bytes: int) -> np.ndarray | Exception:
        try:
            _check_segment(data, expected_bytes, self.compression)
            tile, _, _ = self.page.decode(data, index, jpegtables=self.page.jpegtables)
            if tile is None:
                raise ValueError("no data")
            return _rgb(np.asarray(tile).reshape(self.th, self.tw, self.spp))
        except Exception as exc:  # codecs raise their own types (RuntimeError, zlib.error, ...)
            return exc

    def _undecodable(
        self,
        index: int,
        error: Exception,
        origin: tuple[int, int],
        path: Path | SlideURL,
        downsample: float,
        bad: list[BadRect] | None,
    ) -> None:
        """Record a tile that failed to decode in ``bad``, or raise :class:`CorruptTileError` when it is None."""
        if bad is not None:
            bad.append(self._rect(index, origin))
            return
        tx, ty = self._col_row(index)
        raise CorruptTileError(
            f"{path}: tile (col {tx}, row {ty}) of level {self.level} failed to decode "
            f"({type(error).__name__}: {str(error)[:120]}; {self._where(index, downsample)}); the slide is corrupt"
        ) from error


def _open_tiffslide(path: Path | RangeFile) -> Any:
    """A tiffslide handle whose whole IFD chain has been walked; a loop or an invalid offset is refused
    (tifffile only logs those, and would read on from a wrong page)."""
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
        slide = tiffslide.TiffSlide(path)
        _ = slide.level_dimensions
        _ = slide.ts_tifffile.pages  # walks the IFD chain now, inside the handler
    finally:
        tlog.removeHandler(handler)
    if problems:
        slide.close()
        where = path.url if isinstance(path, RangeFile) else path
        raise SlideFormatError(f"{where}: malformed TIFF structure ({problems[0]}); the file is corrupt")
    return slide


class TiffSlideBackend(ReopensWhenUnpickled):
    """Levels read directly where the page is tiled, chunky and 8-bit (:class:`_TiledLevel`), through
    tiffslide otherwise. ``direct=False`` reads every level through tiffslide."""

    name = "tiffslide"

    def __init__(self, path: Path | SlideURL, *, direct: bool = True) -> None:
        self.path: Path | SlideURL
        self._file: RangeFile | None = None
        source: Path | RangeFile
        if isinstance(path, SlideURL):
            self.path = path
            self._file = source = RangeFile(path)
        else:
            self.path = source = Path(path)
        try:
            # the structure (header, IFDs, tags) from a few coalesced range requests on an object store
            with self._file.coalesced() if self._file is not None else nullcontext():
                self._slide = _open_tiffslide(source)
                self.level_dimensions = tuple((int(d[0]), int(d[1])) for d in self._slide.level_dimensions)
                self.level_downsamples = tuple(float(d) for d in self._slide.level_downsamples)
                self.properties = {k: str(v) for k, v in self._slide.properties.items() if v is not None}
                self.vendor = self.properties.get("tiffslide.vendor") or self._guess_vendor()
                self.associated_images = {k: (0, 0) for k in self._slide.associated_images}
                self.direct = direct
                self._direct: list[_TiledLevel | None] = self._direct_levels() if direct else []
        except BaseException:
            if self._file is not None:
                self._file.close()
            raise

    def _open_options(self) -> dict[str, Any]:
        return {"direct": self.direct}

    def _direct_levels(self) -> list[_TiledLevel | None]:
        """A direct reader per level whose single page can be read directly, else None for that level."""
        out: list[_TiledLevel | None] = []
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
                raise SlideFormatError(f"{self.path}: {exc}") from None
            out.append(_TiledLevel(page, i, cache, runs=self._file is not None) if usable else None)
        return out

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
        bad: list[BadRect] | None = None,
    ) -> np.ndarray:
        ds = self.level_downsamples[level]
        x, y = int(np.floor(location[0] / ds)), int(np.floor(location[1] / ds))
        direct = self._direct[level] if level < len(self._direct) else None
        if direct is not None:
            return direct.read(self._slide.ts_tifffile.filehandle, x, y, size[0], size[1], self.path, ds, bad)
        return self._read_via_tiffslide(x, y, level, size)

    def _read_via_tiffslide(self, x: int, y: int, level: int, size: tuple[int, int]) -> np.ndarray:
        # tiffslide pads with black; read the part inside the level and put it on glass instead
        ds = self.level_downsamples[level]
        lw, lh = self.level_dimensions[level]
        out = _blank(*size)
        x0, y0, x1, y1 = max(0, x), max(0, y), min(lw, x + size[0]), min(lh, y + size[1])
        if x1 > x0 and y1 > y0:
            # ceil: tiffslide floors location / ds, which must land exactly on x0, y0
            loc = (int(np.ceil(x0 * ds)), int(np.ceil(y0 * ds)))
            try:
                arr = self._slide.read_region(loc, level, (x1 - x0, y1 - y0), as_array=True, padding=False)
            except HistoSGEError:
                raise  # an object store that refused the read: not a corrupt slide
            except Exception as exc:
                raise CorruptTileError(
                    f"{self.path}: tiffslide failed to read level {level} at level px ({x0}, {y0}), size "
                    f"{(x1 - x0, y1 - y0)} ({type(exc).__name__}: {str(exc)[:160]}); the slide is corrupt or truncated"
                ) from exc
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
        if self._file is not None:
            self._file.close()
