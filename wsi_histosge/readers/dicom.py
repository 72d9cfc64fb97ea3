"""DICOM VL whole-slide images: single files through pydicom, and a folder holding the .dcm files of one
series (one slide), opened with OpenSlide (all levels) or pydicom (level 0)."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from .. import config
from ..errors import CorruptTileError, SlideFormatError
from .base import Backend, BadRect, ReopensWhenUnpickled, _blank, _check_segment, _paste, _rgb
from .cache import _TileCache
from .openslide import OpenSlideBackend


class DicomBackend(ReopensWhenUnpickled):
    """Single-file DICOM VL whole-slide images (TILED_FULL frames) through pydicom, for files OpenSlide
    refuses (e.g. minimal metadata). One level; frames decoded on demand and cached."""

    name = "pydicom"
    path: Path  # local files only
    WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"

    def __init__(self, path: Path) -> None:
        ds, declared = self._read_header(path)
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
        self._mpp: tuple[float, float] | None = _pixel_spacing_mpp(ds)
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

    @classmethod
    def _read_header(cls, path: Path) -> tuple[Any, Any]:
        """The header of a VL whole-slide image with TILED_FULL frames, and its declared organisation (or None)."""
        import pydicom

        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as exc:
            raise SlideFormatError(f"{path}: not a DICOM file ({type(exc).__name__})") from exc
        if str(ds.get("SOPClassUID", "")) != cls.WSI_SOP_CLASS:
            raise SlideFormatError(f"{path}: DICOM, but not a VL whole-slide image (SOP class {ds.get('SOPClassUID')})")
        declared = ds.get("DimensionOrganizationType")
        org = str(declared or "TILED_FULL")
        if org != "TILED_FULL":
            raise SlideFormatError(f"{path}: DICOM frames are {org}; only TILED_FULL is read here")
        return ds, declared

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
        bad: list[BadRect] | None = None,
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


def _pixel_spacing_mpp(ds: Any) -> tuple[float, float] | None:
    """(x, y) µm/px from the shared PixelSpacing (mm, row then column), or None when absent."""
    try:
        spacing = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
        return (float(spacing[1]) * 1000.0, float(spacing[0]) * 1000.0)
    except (AttributeError, IndexError, KeyError, TypeError):
        return None


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


#: The header elements a folder scan reads from each .dcm file.
_SCAN_TAGS = ["SOPClassUID", "SeriesInstanceUID", "ImageType", "TotalPixelMatrixColumns", "TotalPixelMatrixRows"]


def _dicom_instance(path: Path) -> _DicomInstance | str:
    """The instance a .dcm file holds (headers only), or a line saying why it is not a VL whole-slide image."""
    import pydicom

    # pydicom warns (lazily, as values are read) about third-party headers that bend the standard, e.g.
    # 65-character UIDs: such files are still read, and the warnings would only be noise in a header scan.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_SCAN_TAGS)
            sop = str(ds.get("SOPClassUID", ""))
            image_type = [str(v) for v in (ds.get("ImageType") or [])]
            uid = str(ds.get("SeriesInstanceUID", "")) or f"(no SeriesInstanceUID: {path.name})"
            pixels = int(ds.get("TotalPixelMatrixColumns", 0) or 0) * int(ds.get("TotalPixelMatrixRows", 0) or 0)
        except Exception as exc:
            return f"{path.name} (not readable as DICOM: {type(exc).__name__})"
    if sop != DicomBackend.WSI_SOP_CLASS:
        return f"{path.name} (SOP class {sop or 'missing'}, not a VL whole-slide image)"
    flavour = image_type[2].upper() if len(image_type) > 2 else ""
    return _DicomInstance(path, uid, flavour, pixels)


def _dicom_instances(folder: Path, *, stop_at_second_series: bool = False) -> tuple[list[_DicomInstance], list[str]]:
    """The DICOM VL whole-slide instances among the .dcm files of ``folder`` (headers only, no pixels), and
    one line per .dcm file that is not one. With ``stop_at_second_series``, stops once a second pyramid series
    shows up (enough to tell that the folder is not one slide)."""
    found: list[_DicomInstance] = []
    others: list[str] = []
    series: set[str] = set()
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() != ".dcm" or not path.is_file():
            continue
        instance = _dicom_instance(path)
        if isinstance(instance, str):
            others.append(instance)
            continue
        found.append(instance)
        if instance.flavour not in _DICOM_SIDE_IMAGES:
            series.add(instance.series)
            if stop_at_second_series and len(series) > 1:
                break
    return found, others


def _refuse_other_slide_files(folder: Path) -> None:
    others = sorted(f.name for f in folder.iterdir() if f.suffix.lower() in _OTHER_SLIDE_SUFFIXES and f.is_file())
    if others:
        listed = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        raise SlideFormatError(
            f"{folder}: is a directory holding slide files ({listed}); "
            "a folder is read as one slide only when it holds the .dcm files of one DICOM WSI: pass each slide file "
            "on its own (MRXS: pass the .mrxs file)"
        )


def _refuse_no_instances(folder: Path, not_wsi: list[str]) -> NoReturn:
    what = f"its .dcm files are not DICOM whole-slide images ({'; '.join(not_wsi[:2])})" if not_wsi else "no .dcm files"
    raise SlideFormatError(
        f"{folder}: is a directory with {what}; a folder may hold only the .dcm files of one DICOM WSI series "
        "(one file per pyramid level); for other formats pass the slide file itself (MRXS: the .mrxs file)"
    )


def _pyramid_series(folder: Path, found: list[_DicomInstance]) -> str:
    """The SeriesInstanceUID of the one pyramid series among ``found``; else SlideFormatError."""
    series = sorted({d.series for d in found if d.flavour not in _DICOM_SIDE_IMAGES})
    if len(series) > 1:
        raise SlideFormatError(
            f"{folder}: holds the .dcm files of {len(series)} DICOM WSI series "
            f"({', '.join('...' + u[-12:] for u in series[:4])}{', ...' if len(series) > 4 else ''}); "
            "a folder must hold one slide: split them into one folder per slide (series), by SeriesInstanceUID"
        )
    if not series:
        raise SlideFormatError(
            f"{folder}: its DICOM files hold only label/overview images, no pyramid level; pass the slide's series"
        )
    return series[0]


def _dicom_series_files(folder: Path) -> list[_DicomInstance]:
    """The instances of the one DICOM WSI series in ``folder``, level 0 (largest) first; else SlideFormatError."""
    _refuse_other_slide_files(folder)
    found, not_wsi = _dicom_instances(folder)
    if not found:
        _refuse_no_instances(folder, not_wsi)
    uid = _pyramid_series(folder, found)
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
