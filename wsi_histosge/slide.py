"""Whole-slide images behind one small interface.

``Slide`` opens a file with the first backend that can read it: tiffslide (SVS, pyramidal and
OME-TIFF, generic tiled TIFF), OpenSlide (DICOM, MRXS, NDPI, ... via openslide-bin), or a plain RGB
image (JPEG, PNG, untiled TIFF: e.g. the full-resolution H&E of a Visium or legacy ST run; large PNGs
are read in row strips). A folder holding the .dcm files of one DICOM WSI series is one slide
(:func:`dicom_series_folder`). A URL (``s3://bucket/slide.svs``, ``gs://...``) of a TIFF-based slide is read
in place with byte-range requests (:mod:`wsi_histosge.remote`). All coordinates are level-0 pixels. A lower
pyramid level is compared with level 0 before it is used, and skipped when its pixels are wrong
(:meth:`Slide.level_check`). A ``Slide`` is picklable: it keeps the path and reopens its backend lazily in each
DataLoader worker.
"""

from __future__ import annotations

import hashlib
import os
import sys
import types
import warnings
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from . import config, remote
from .errors import (
    CorruptTileError,
    HistoSGEError,
    MPPMissingError,
    SlideFormatError,
    SlideNotFoundError,
    UsageError,
    check_range,
)
from .readers import (
    Backend,
    DicomBackend,
    OpenSlideBackend,
    PlainImageBackend,
    TiffSlideBackend,
    dicom_series_folder,
    open_backend,
)
from .readers import plain as _plain
from .readers.base import _rgb as _rgb
from .readers.dicom import _dicom_series_files
from .readers.plain import PLAIN_DECODE_MAX_PIXELS, PLAIN_SUFFIXES, PNG_STRIPS_ABOVE_PIXELS
from .readers.plain import _image_size as _image_size
from .readers.plain import _PngStrips as _PngStrips
from .remote import SlideURL

# `X as X` above: private helpers that moved to wsi_histosge.readers, still imported from here by other
# modules and tests.
__all__ = [
    "LEVEL_CHECK_MAX_DIFF",
    "MPP",
    "PLAIN_DECODE_MAX_PIXELS",
    "PLAIN_SUFFIXES",
    "PNG_STRIPS_ABOVE_PIXELS",
    "Backend",
    "DicomBackend",
    "OpenSlideBackend",
    "PlainImageBackend",
    "Slide",
    "SlideURL",
    "TiffSlideBackend",
    "default_output",
    "dicom_series_folder",
    "open_slide",
    "recorded_slide",
    "slide_location",
]

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


@dataclass(frozen=True)
class MPP:
    """Pixel size of level 0 in µm/px, and where it came from."""

    x: float
    y: float
    source: str

    @property
    def mean(self) -> float:
        return (self.x + self.y) / 2.0


def _plausible(mpp: float) -> bool:
    lo, hi = config.MPP_PLAUSIBLE
    return lo <= mpp <= hi


def _hash_ends(h: Any, path: Path) -> None:
    """Feed the size and the first and last MiB of ``path`` into ``h``."""
    size = path.stat().st_size
    h.update(str(size).encode())
    with open(path, "rb") as fh:
        h.update(fh.read(1 << 20))
        if size > 2 << 20:
            fh.seek(-(1 << 20), os.SEEK_END)
            h.update(fh.read(1 << 20))


def slide_location(value: str | os.PathLike[str] | SlideURL) -> Path | SlideURL:
    """A local path as a ``Path``; a URL checked (:func:`wsi_histosge.remote.parse_slide_url`: UsageError for
    credentials in it, an unknown protocol or a missing backend) as a :class:`SlideURL`; ``file://`` is local."""
    if isinstance(value, SlideURL):
        return value
    text = os.fspath(value)
    if text.lower().startswith("file://"):
        return Path(text[len("file://") :])
    return remote.parse_slide_url(text) if remote.is_url(text) else Path(text)


def recorded_slide(
    recorded: str, given: str | os.PathLike[str] | None = None, fingerprint: str | None = None
) -> Path | SlideURL:
    """The slide a cube was made from: ``given`` (``--slide``, when it moved) or the location `infer` recorded.
    A local one that is not there raises SlideNotFoundError naming ``--slide``; a URL is checked when opened.
    A ``given`` slide whose contents differ from the recorded ``fingerprint`` is another slide: UsageError."""
    where = slide_location(given if given is not None else recorded)
    if isinstance(where, Path) and not where.exists():  # a file, or a DICOM series folder
        hint = "give the cube's slide" if given is not None else "pass --slide PATH"
        raise SlideNotFoundError(f"{where}: the cube's slide is not there (moved?); {hint}")
    if given is not None and isinstance(fingerprint, str) and Slide(where).fingerprint != fingerprint:
        raise UsageError(
            f"--slide {given}: not the slide this cube was made from (its contents differ from {recorded}, "
            "whose size and first and last MiB the cube recorded); give that slide, moved or copied"
        )
    return where


def default_output(where: Path | SlideURL) -> Path:
    """Where `infer` writes without ``--out``: ``<slide>.zarr`` beside a local slide; for a URL, in the current
    folder (named after the object), never into the slide's bucket."""
    if isinstance(where, SlideURL):
        return Path(where.name + ".zarr")
    return where.with_name(where.name + ".zarr")


@dataclass
class Slide:
    """A whole-slide image. Open with ``Slide(path, mpp=None)``; ``path`` may be an object-store URL."""

    path: Path | SlideURL
    mpp_override: float | None = None
    skip_bad_tiles: bool = False  # the `--on-bad-tile skip` policy for reads that do not collect bad tiles
    _backend: Backend | None = field(default=None, init=False, repr=False, compare=False)
    _backend_pid: int = field(default=0, init=False, repr=False, compare=False)
    #: level -> (ok, reason, difference) of the checks made so far (see :meth:`level_check`)
    _level_verdicts: dict[int, tuple[bool, str, float | None]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        self.path = slide_location(self.path)
        if isinstance(self.path, Path):  # a URL's object is checked when it is opened, below
            if not self.path.exists():
                raise SlideNotFoundError(f"{self.path}: no such file; check the path")
            if self.path.is_dir():
                _dicom_series_files(self.path)  # one DICOM WSI series, or an error that says what a folder may hold
            elif self.path.stat().st_size == 0:
                raise SlideFormatError(f"{self.path}: file is empty (0 bytes); re-copy the slide")
        if self.mpp_override is not None:
            check_range("--mpp", self.mpp_override, *config.MPP_PLAUSIBLE)
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
            self._backend = open_backend(self.path)
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
        if isinstance(self.path, SlideURL):
            remote.hash_ends(h, self.path)  # two range reads: the same fingerprint as a local copy's
        elif self.path.is_dir():
            files = sorted(f for f in self.path.iterdir() if f.suffix.lower() == ".dcm" and f.is_file())
            h.update(f"dicom-folder:{len(files)}".encode())
            for f in files:
                h.update(f.name.encode() + b"\0")
                _hash_ends(h, f)
        else:
            _hash_ends(h, self.path)
        return h.hexdigest()

    @property
    def bytes_read(self) -> int:
        """Bytes this process has fetched from the slide's object so far (every reader and the fingerprint);
        0 for a local slide."""
        return remote.read_stats(self.path).bytes if isinstance(self.path, SlideURL) else 0

    @property
    def file_size(self) -> int | None:
        """Size of the slide's object in bytes (URLs; None for a local slide)."""
        return remote.read_stats(self.path).size if isinstance(self.path, SlideURL) else None

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
                if isinstance(exc, HistoSGEError) and not isinstance(exc, SlideFormatError):
                    raise  # an object store that refused the read or lost the object: not the level's fault
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

        ``bad``: see :meth:`wsi_histosge.readers.tiff._TiledLevel.read` (skip policy for corrupt tiles)."""
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
        except HistoSGEError:
            raise  # an object store that refused or failed the read: not a corrupt tile
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


def open_slide(
    path: str | os.PathLike[str] | SlideURL, mpp: float | None = None, *, skip_bad_tiles: bool = False
) -> Slide:
    """Open ``path`` (a local path, or an s3:// / gs:// URL) as a :class:`Slide` (see the module docstring for
    supported formats)."""
    return Slide(slide_location(path), mpp_override=mpp, skip_bad_tiles=skip_bad_tiles)


class _SlideModule(types.ModuleType):
    """The plain-image limits live in :mod:`wsi_histosge.readers.plain`; set here (as tests and site code do,
    e.g. ``monkeypatch.setattr(slide, "PNG_STRIPS_ABOVE_PIXELS", 0)``), they change the reader's value."""

    PNG_STRIPS_ABOVE_PIXELS = property(
        lambda _: _plain.PNG_STRIPS_ABOVE_PIXELS, lambda _, v: setattr(_plain, "PNG_STRIPS_ABOVE_PIXELS", v)
    )
    PLAIN_DECODE_MAX_PIXELS = property(
        lambda _: _plain.PLAIN_DECODE_MAX_PIXELS, lambda _, v: setattr(_plain, "PLAIN_DECODE_MAX_PIXELS", v)
    )


sys.modules[__name__].__class__ = _SlideModule
