"""Cube -> AnnData (.h5ad) at a chosen resolution, for scanpy and squidpy.

Binning: ``f x f`` lattice cells per bin (``f = bin_um / stride_um``, an integer), averaged in linear
space: ``log1p(mean(expm1(x)))`` over the predicted cells of the bin, so a bin's value is the log of the
expression a bigger spot would have measured. Only bins holding at least one predicted value are kept:
a bin that would be all NaN (its cells unreadable or skipped) is never written as data.
Bin sizes that are not a multiple of the stride, and the Visium layout (``layout="visium"``), weight each
cell by the area the bin shares with it (:mod:`wsi_histosge.bins`), streamed the same way.
Conversion streams the cube window by window (chunk-aligned reads, per-bin running sums) and writes
``X`` into the HDF5 file as it goes: peak memory is bounded by ``band_mb`` plus one chunk and the obs
table, whatever the cube's size and whatever the bin size.

An incomplete cube (no completion marker, or chunks missing on disk) is refused unless
``allow_incomplete``; then only cells of readable chunks are converted and ``uns['wsi_histosge']``
says the result is partial and which chunks were lacking. The .h5ad appears only when complete
(written as ``OUT.partial``, then renamed).

The result follows the Space Ranger / scanpy conventions: ``obsm['spatial']`` in level-0 px of the
slide, ``uns['spatial'][library_id]`` with 'hires'/'lowres' images and their scale factors, and
``spot_diameter_fullres`` = the bin's side in level-0 px (for Visium spots, Space Ranger's theoretical 65 µm
spot, as Space Ranger writes it).
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import math
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .cube_checks import declared_trust
from .errors import (
    CubeIncompleteError,
    DataFormatError,
    HistoSGEError,
    OutputExistsError,
    OutputWriteError,
    UsageError,
)
from .owned import is_our_h5ad
from .qc import QC_BLUR, QC_PEN
from .slide import SlideURL, open_slide, recorded_slide
from .store import ATTR_KEY, Cube, read_cells, read_cube

HIRES_MAX_PX = 2000
LOWRES_MAX_PX = 600


def _requested_bin_um(attrs: dict[str, Any], resolution: str | float) -> float:
    """The bin size ``resolution`` asks for, in µm: "native" (the stride), "spot", or a finite size > 0."""
    if resolution == "native":
        return float(attrs["stride_um"])
    if resolution == "spot":
        return float(attrs["spot_um"])
    try:
        bin_um = float(resolution)
    except (TypeError, ValueError):
        raise UsageError(f"--resolution must be native or spot, or give --bin-um in µm; got {resolution!r}") from None
    if isinstance(resolution, bool) or not math.isfinite(bin_um) or bin_um <= 0:
        raise UsageError(f"--bin-um must be a positive, finite size in µm; got {resolution!r}")
    return bin_um


def _whole_factor(f: float) -> int | None:
    """``f`` (bin size in strides) as a whole number of cells, or None when it is not one."""
    if f < 1 - 1e-6 or abs(f - round(f)) > 1e-3:
        return None
    return round(f)


def bin_factor(attrs: dict[str, Any], resolution: str | float) -> int:
    """Cells per bin side for ``resolution``: "native", "spot", or a bin size in µm (finite, > 0), a whole
    multiple of the stride (`to-qupath`; `to-anndata` also takes other sizes, see :func:`bin_plan`)."""
    stride = float(attrs["stride_um"])
    if resolution == "native":
        return 1
    bin_um = _requested_bin_um(attrs, resolution)
    f = bin_um / stride
    whole = _whole_factor(f)
    if whole is None:
        sizes = sorted({max(1, math.floor(f)) * stride, max(1, math.ceil(f)) * stride})
        what = f"the spot size ({bin_um:g} µm)" if resolution == "spot" else f"--bin-um {bin_um:g}"
        raise UsageError(
            f"{what} is not a whole multiple of the cube's {stride:g} µm stride; use --bin-um "
            + " or ".join(f"{v:g}" for v in sizes)
        )
    return whole


LAYOUTS = ("grid", "visium")


def bin_plan(attrs: dict[str, Any], resolution: str | float, layout: str = "grid") -> tuple[int | None, float]:
    """(cells per bin side, bin size in µm) for `to-anndata`.

    The cell count is None where the bins are not whole blocks of cells: a ``grid`` bin size that is not a
    multiple of the stride, or the ``visium`` layout (its spot diameter is returned); those bins are averaged
    with area weights (:mod:`wsi_histosge.bins`). A bin finer than the stride is refused: the cube holds
    nothing finer than its cells."""
    if layout not in LAYOUTS:
        raise UsageError(f"--layout must be grid or visium; got {layout!r}")
    if layout == "visium":
        if resolution != "native":
            raise UsageError(
                "--layout visium places its own spots (55 µm on a 100 µm pitch); leave out --bin-um and --resolution"
            )
        from .bins import VISIUM_SPOT_UM

        return None, VISIUM_SPOT_UM
    stride = float(attrs["stride_um"])
    bin_um = _requested_bin_um(attrs, resolution)
    whole = _whole_factor(bin_um / stride)
    if whole is not None:
        return whole, whole * stride
    if bin_um < stride:
        what = f"the spot size ({bin_um:g} µm)" if resolution == "spot" else f"--bin-um {bin_um:g}"
        raise UsageError(
            f"{what} is finer than the cube's {stride:g} µm stride, which is the finest it holds; use --bin-um "
            f"{stride:g} or more (or rerun `wsi-histosge infer` with a smaller --stride-um)"
        )
    return None, bin_um


def _slide_images(
    slide_path: Path | SlideURL, mpp: float | None, level0_size: tuple[int, int]
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    slide = open_slide(slide_path, mpp=mpp)
    w0 = level0_size[0]
    images, scales = {}, {}
    for key, max_px in (("hires", HIRES_MAX_PX), ("lowres", LOWRES_MAX_PX)):
        target_mpp = max(level0_size) * slide.mpp.x / max_px
        img, _ = slide.thumbnail(max(target_mpp, slide.mpp.x))
        images[key] = img
        scales[f"tissue_{key}_scalef"] = img.shape[1] / w0
    return images, scales


#: errno values that mean "the output cannot be written here" (disk full, quota, file too big, read-only).
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EROFS}


def _spans(a: int, b: int, align: int, size: int) -> Iterator[tuple[int, int]]:
    """[a, b) cut into pieces of at most ``size`` whose ends fall on multiples of ``align`` (chunk edges)."""
    s = a
    while s < b:
        e = min(b, (s // align) * align + size)
        yield s, e
        s = e


def _bin_sum(values: np.ndarray, lo: tuple[int, int], f: int, dtype: Any) -> np.ndarray:
    """Sum of ``values`` (..., h, w), whose first cell is lattice cell ``lo``, over each f x f bin it touches."""
    if f == 1:
        return values  # callers add it into their sums, which casts
    h, w = values.shape[-2:]
    rows = np.flatnonzero(np.diff((np.arange(lo[0], lo[0] + h) // f), prepend=-1))
    cols = np.flatnonzero(np.diff((np.arange(lo[1], lo[1] + w) // f), prepend=-1))
    by_rows = np.add.reduceat(values, rows, axis=-2, dtype=dtype)
    return np.add.reduceat(by_rows, cols, axis=-1, dtype=dtype)


def _candidate_counts(cells: np.ndarray, f: int, band_rows: int) -> np.ndarray:
    """(bin rows, bin cols): how many readable predicted cells each bin holds."""
    ny, nx = cells.shape
    counts = np.zeros((-(-ny // f), -(-nx // f)), dtype=np.int32)
    step = max(1, band_rows // f)
    for b0 in range(0, counts.shape[0], step):
        part = _bin_sum(cells[b0 * f : (b0 + step) * f], (b0 * f, 0), f, np.int32)
        counts[b0 : b0 + part.shape[0]] = part
    return counts


def _create_x(h5: Any, n_rows: int, n_genes: int) -> Any:
    """The AnnData ``X`` dataset (float32, resizable rows, lzf) with its encoding attributes."""
    x = h5.create_dataset(
        "X",
        shape=(n_rows, n_genes),
        maxshape=(None, n_genes),
        dtype="float32",
        chunks=(min(n_rows, 1024), n_genes),
        compression="lzf",
    )
    x.attrs["encoding-type"] = "array"
    x.attrs["encoding-version"] = "0.2.0"
    return x


def write_failed(exc: OSError, out: Path) -> BaseException:
    """What an export raises for an OSError while writing ``out``: the error itself when it is not a write
    failure (or already ours), else a one-line OutputWriteError (exit 14)."""
    if isinstance(exc, HistoSGEError) or exc.errno not in _WRITE_ERRNOS:
        return exc
    return OutputWriteError(
        f"{out}: writing failed ({os.strerror(exc.errno)}); free space or fix permissions, then rerun the "
        f"command (nothing was written to {out.name})"
    )


def _write_x(
    h5: Any, cube: Cube, f: int, by: np.ndarray, bx: np.ndarray, *, band_cells: int, band_mb: float
) -> np.ndarray:
    """Stream the binned means into ``h5['X']`` (rows: the candidate bins that get a value, raster order).

    Returns, per candidate bin, how many cells with a value it averaged (0: all NaN, not written)."""
    n_genes = len(cube.genes)
    cells = cube.usable_cells()
    ny, nx = cells.shape
    ch, cw = cube.chunk_cells
    nby, nbx = -(-ny // f), -(-nx // f)
    budget = band_mb * 2**20
    # memory: band output (float32 per bin and gene), per-bin sums (float64 + int32 counts) for one
    # rectangle of bins, one read window (float32 values, their expm1, masks): each about a quarter.
    band_bins = max(1, min(nby, band_cells // f, int(budget / 4 // max(1, nbx * n_genes * 4))))
    tile_bins = max(1, min(nbx, int(budget / 4 // max(1, band_bins * n_genes * 12))))
    window_cols = max(cw, int(budget / 4 // (n_genes * 16 * ch)) // cw * cw)
    n_cand = len(by)
    x = _create_x(h5, n_cand, n_genes)
    n_valued = np.zeros(n_cand, dtype=np.int64)
    written = 0
    for b0 in range(0, nby, band_bins):
        b1 = min(nby, b0 + band_bins)
        lo, hi = np.searchsorted(by, b0), np.searchsorted(by, b1)
        if lo == hi:
            continue
        band = np.full((hi - lo, n_genes), np.nan, dtype=np.float32)
        y0, y1 = b0 * f, min(ny, b1 * f)
        for c0 in range(0, nbx, tile_bins):
            c1 = min(nbx, c0 + tile_bins)
            sel = lo + np.flatnonzero((bx[lo:hi] >= c0) & (bx[lo:hi] < c1))
            if not len(sel):
                continue
            x0, x1 = c0 * f, min(nx, c1 * f)
            sums = np.zeros((n_genes, b1 - b0, c1 - c0), dtype=np.float64)
            counts = np.zeros((n_genes, b1 - b0, c1 - c0), dtype=np.int32)
            valued = np.zeros((b1 - b0, c1 - c0), dtype=np.int32)
            for ys, ye in _spans(y0, y1, ch, ch):
                for xs, xe in _spans(x0, x1, cw, window_cols):
                    if not cells[ys:ye, xs:xe].any():
                        continue  # nothing readable here: never decoded
                    lin = np.expm1(cube.read_expression(ys, ye, xs, xe))
                    finite = np.isfinite(lin)
                    lin[~finite] = 0.0
                    r = slice(ys // f - b0, (ye - 1) // f - b0 + 1)
                    c = slice(xs // f - c0, (xe - 1) // f - c0 + 1)
                    sums[:, r, c] += _bin_sum(lin, (ys, xs), f, np.float64)
                    counts[:, r, c] += _bin_sum(finite, (ys, xs), f, np.int32)
                    valued[r, c] += _bin_sum(finite.any(axis=0), (ys, xs), f, np.int32)
                    del lin, finite
            with np.errstate(invalid="ignore", divide="ignore"):
                means = np.log1p(sums / counts).astype(np.float32)  # 0/0: NaN, a gene without a value
            band[sel - lo] = means[:, by[sel] - b0, bx[sel] - c0].T
            n_valued[sel] = valued[by[sel] - b0, bx[sel] - c0]
        keep = n_valued[lo:hi] > 0
        n_keep = int(keep.sum())
        if n_keep:
            x[written : written + n_keep] = band[keep]
            written += n_keep
    if written < n_cand:
        x.resize((written, n_genes))
    return n_valued


@contextlib.contextmanager
def _h5_handle_errors() -> Iterator[list[OSError]]:
    """Collect the write errors h5py meets while releasing a handle (a full disk found when a dataset or
    attribute is closed): Python can only report those as ignored exceptions, with a traceback printed to
    stderr, and the file is then not whole. The caller fails on them; their tracebacks are not printed
    (whatever else reaches stderr meanwhile is passed on)."""
    seen: list[OSError] = []
    previous = sys.unraisablehook

    def hook(info: Any) -> None:
        if isinstance(info.exc_value, OSError) and "h5py" in repr(info.object):
            seen.append(info.exc_value)
        else:
            previous(info)

    captured = io.StringIO()
    sys.unraisablehook = hook
    try:
        with contextlib.redirect_stderr(captured):
            yield seen
    finally:
        sys.unraisablehook = previous
        marker = "Traceback (most recent call last):"
        for i, part in enumerate(captured.getvalue().split(marker)):
            if part and not (i and "h5py/_objects.pyx" in part and "_dealloc" in part):
                sys.stderr.write(part if i == 0 else marker + part)


def _read_only(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _require_space(out: Path, nbytes: int) -> None:
    """OutputWriteError before HDF5 is involved when the disk cannot hold the file uncompressed (plus a
    margin): a full disk met inside HDF5 can leave the library in a state that crashes the process at
    exit, after the error was reported."""
    import shutil

    if not os.access(out.parent, os.W_OK):  # read-only file system or no permission: say that, not "no space"
        why = "Read-only file system" if _read_only(out.parent) else "Permission denied"
        raise OutputWriteError(
            f"{out}: writing failed ({why}); fix permissions or choose another --out, then rerun the command "
            "(nothing was written)"
        )
    need = int(nbytes * 1.05) + (1 << 20)
    free = shutil.disk_usage(out.parent).free
    if free < need:
        raise OutputWriteError(
            f"{out}: writing failed (No space left on device: {free / 2**20:.0f} MiB free in {out.parent}, "
            f"up to {need / 2**20:.0f} MiB needed); free space, then rerun the command (nothing was written)"
        )


def _abandon(h5: Any, tmp: Path) -> None:
    """Close a half-written HDF5 file that is about to be deleted. Closing flushes; on a full disk that
    fails, and would fail again (printed as an ignored exception) when the handle is collected: emptying
    the file first frees the space the flush needs."""
    with contextlib.suppress(OSError):
        os.truncate(tmp, 0)
    with contextlib.suppress(Exception):
        h5.close()
    tmp.unlink(missing_ok=True)


def _write_elements(h5: Any, adata: Any) -> None:
    """Everything of an .h5ad but X (already written), as ``anndata.write_h5ad`` lays it out."""
    try:
        from anndata.io import write_elem
    except ImportError:  # anndata < 0.11
        from anndata.experimental import write_elem  # type: ignore[no-redef]

    h5.attrs.setdefault("encoding-type", "anndata")
    h5.attrs.setdefault("encoding-version", "0.1.0")
    write_elem(h5, "obs", adata.obs)
    write_elem(h5, "var", adata.var)
    write_elem(h5, "obsm", dict(adata.obsm))
    for key in ("varm", "obsp", "varp", "layers"):
        write_elem(h5, key, {})
    write_elem(h5, "uns", dict(adata.uns))


def to_anndata(
    cube: str | Path,
    out: str | Path,
    *,
    resolution: str | float = "native",
    library_id: str | None = None,
    slide: str | Path | None = None,
    overwrite: bool = False,
    allow_incomplete: bool = False,
    layout: str = "grid",
    visium_positions: str | Path | None = None,
    band_cells: int = 64,
    band_mb: float = 128.0,
) -> Path:
    """Write ``out`` (.h5ad) from the cube at ``cube``; see the module docstring.

    ``layout``: "grid" (square bins of ``resolution``) or "visium" (55 µm spots on a 100 µm hexagonal pitch,
    Space Ranger's indices and scale factors; ``resolution`` stays "native"). ``visium_positions``: Space
    Ranger's ``tissue_positions.csv`` of a run on this slide's full-resolution image: its spots, barcodes and
    indices instead of a generated lattice (implies the visium layout). Bins that are not whole blocks of cells
    are averaged with area weights (:mod:`wsi_histosge.bins`).

    Raises InputNotFoundError (no cube, or its slide moved: pass ``slide``), DataFormatError (not a cube
    of this tool, malformed or unsafe), CubeIncompleteError (incomplete cube and not ``allow_incomplete``),
    UsageError (bad ``resolution`` or ``layout``), OutputExistsError (``out`` exists and not ``overwrite``) and
    OutputWriteError (disk full, read-only): ``out`` is then left as it was."""
    import anndata as ad
    import h5py

    out = Path(out)
    if out.is_dir():
        raise UsageError(f"{out}: is a folder; --out takes the path of the .h5ad file to write")
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out}: exists; pass --overwrite or choose another --out")
    if out.exists() and not is_our_h5ad(out):
        raise OutputExistsError(
            f"{out}: exists and is not an .h5ad written by `wsi-histosge to-anndata`; --overwrite replaces only "
            "those (nothing else is deleted): move it or choose another --out"
        )
    c = read_cube(cube)
    if not allow_incomplete:
        c.require_complete()
    meta = c.attrs[ATTR_KEY]
    if visium_positions is not None:
        layout = "visium"
    f, bin_um = bin_plan(c.attrs, resolution, layout)
    lacking = c.lacking()
    if f is not None:
        by, bx = _bins_to_write(c, cube, f, band_cells, lacking)
        n_candidates = len(by)
    else:
        shaped, candidates = _layout_to_write(c, cube, layout, bin_um, lacking, band_mb, visium_positions)
        n_candidates = len(candidates)
    slide_path = recorded_slide(meta["slide"]["path"], slide, meta["slide"].get("fingerprint"))  # a URL stays a URL
    images, scales = _slide_images(slide_path, float(meta["mpp"]["x"]), tuple(meta["slide"]["dimensions"]))

    out.parent.mkdir(parents=True, exist_ok=True)
    _require_space(out, n_candidates * len(c.genes) * 4 + sum(int(im.nbytes) for im in images.values()))
    tmp = out.with_name(out.name + ".partial")
    try:
        with _h5_handle_errors() as late_errors:
            h5 = h5py.File(tmp, "w")
            try:
                if f is not None:
                    n_valued = _write_x(h5, c, f, by, bx, band_cells=band_cells, band_mb=band_mb)
                else:
                    n_valued, area = _write_x_weighted(h5, c, shaped, candidates, band_mb=band_mb)
                keep = n_valued > 0
                if not keep.any():
                    raise UsageError(f"{cube}: every predicted cell is NaN (all tiles skipped?); nothing to convert")
                if f is not None:
                    adata = _anndata_without_x(
                        ad,
                        c,
                        cube,
                        f,
                        by[keep],
                        bx[keep],
                        n_valued[keep],
                        images,
                        scales,
                        library_id,
                        resolution,
                        lacking,
                    )
                else:
                    bins = _weighted_bins(
                        c, shaped, layout, bin_um, candidates[keep], n_valued[keep], area[keep], band_mb
                    )
                    adata = _bins_anndata(ad, c, cube, bins, images, scales, library_id, resolution, lacking)
                adata.uns["wsi_histosge"]["bins_without_values"] = int((~keep).sum())
                _write_elements(h5, adata)
                h5.close()
                if late_errors:  # a write h5py could report only while releasing a handle: the file is not whole
                    raise late_errors[0]
            except BaseException:
                _abandon(h5, tmp)
                raise
        os.replace(tmp, out)
    except OSError as exc:
        raise write_failed(exc, out) from None
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _bins_to_write(
    c: Any, cube: str | Path, f: int, band_cells: int, lacking: list[Any]
) -> tuple[np.ndarray, np.ndarray]:
    """(row, col) of the ``f`` x ``f`` bins holding at least one usable cell; refuses a bin larger than the
    cube and a cube with nothing to convert."""
    stride = float(c.attrs["stride_um"])
    ny, nx = c.tissue.shape
    if f > max(ny, nx):
        raise UsageError(
            f"--bin-um {f * stride:g} is larger than the whole cube ({nx * stride:g} x {ny * stride:g} µm); use at "
            f"most --bin-um {max(ny, nx) * stride:g} (one bin)"
        )
    by, bx = np.nonzero(_candidate_counts(c.usable_cells(), f, band_cells))
    if len(by) == 0:
        if lacking:
            raise CubeIncompleteError(
                f"{cube}: no chunk with tissue is written yet ({len(lacking)} lacking); rerun `wsi-histosge infer` "
                "with the same options to finish the cube"
            )
        raise UsageError(f"{cube}: no predicted cells in the cube")
    return by, bx


def _bin_mean(values: np.ndarray, f: int, by: np.ndarray, bx: np.ndarray) -> np.ndarray:
    """float64 mean over the finite cells of each ``f`` x ``f`` bin (by, bx); NaN where a bin has none."""
    ny, nx = values.shape
    pad = np.full((-(-ny // f) * f, -(-nx // f) * f), np.nan, dtype=np.float64)
    pad[:ny, :nx] = values
    blocks = pad.reshape(pad.shape[0] // f, f, pad.shape[1] // f, f)
    finite = np.isfinite(blocks)
    total = np.where(finite, blocks, 0.0).sum(axis=(1, 3))
    count = finite.sum(axis=(1, 3))
    with np.errstate(invalid="ignore", divide="ignore"):
        return (total / count)[by, bx]


def _is_calibration(values: Any) -> bool:
    """The novelty calibration as infer stores it: one finite number per percentile, non-decreasing."""
    from .trust import CALIBRATION_PERCENTILES

    if not isinstance(values, list) or len(values) != len(CALIBRATION_PERCENTILES):
        return False
    if not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in values):
        return False
    return bool(np.all(np.diff(np.asarray(values, dtype=np.float64)) >= 0))


def _cell_columns(c: Cube, mean: Callable[[np.ndarray], np.ndarray]) -> dict[str, np.ndarray]:
    """obs columns from the cube's per-cell arrays: mean novelty and its training percentile, uncertainty (root
    of the mean squared cell RMSE), and the fraction of each bin's cells carrying each quality flag.

    ``mean``: a per-cell array (y, x; NaN where a cell has no value) -> its float64 mean over each bin; the
    columns are float32, rounded only once the means (and the root of the squared errors) are taken."""
    from .trust import CALIBRATION_PERCENTILES, QC_NOVEL, percentile_of

    out: dict[str, np.ndarray] = {}
    novelty = read_cells(c, "novelty")
    if novelty is not None:
        out["novelty"] = mean(novelty).astype(np.float32)
        calibration = declared_trust(c.attrs).get("novelty", {}).get("calibration")
        if not _is_calibration(calibration):
            raise DataFormatError(
                f"{c.path}: attribute trust.novelty.calibration is not the {len(CALIBRATION_PERCENTILES)} "
                "non-decreasing finite numbers infer writes; the cube is damaged, rerun `wsi-histosge infer` with "
                "--overwrite"
            )
        out["novelty_percentile"] = percentile_of(out["novelty"], np.asarray(calibration, dtype=np.float64))
    uncertainty = read_cells(c, "uncertainty")
    if uncertainty is not None:
        out["uncertainty"] = np.sqrt(mean(uncertainty.astype(np.float64) ** 2)).astype(np.float32)
    qc = read_cells(c, "qc")
    if qc is not None:
        usable = c.usable_cells()
        for name, bit in (("pen_ink", QC_PEN), ("out_of_focus", QC_BLUR), ("unlike_training", QC_NOVEL)):
            if bit == QC_NOVEL and novelty is None:
                continue
            if bit == QC_BLUR and declared_trust(c.attrs).get("qc", {}).get("focus_judged") is False:
                out[f"{name}_fraction"] = mean(np.full(usable.shape, np.nan, np.float32)).astype(np.float32)
                continue  # a slide read coarser than 1 µm/px: focus not judged, never "0% out of focus"
            flagged = np.where(usable, ((qc & bit) > 0).astype(np.float32), np.nan)
            out[f"{name}_fraction"] = mean(flagged).astype(np.float32)
    return out


@dataclass
class _Bins:
    """The kept bins of a conversion, for obs, obsm and uns (X is streamed separately)."""

    centre_ix: np.ndarray  # bin centres in cell units (cell (0, 0)'s centre is (0, 0))
    centre_iy: np.ndarray
    array_row: np.ndarray
    array_col: np.ndarray
    index: list[str]
    index_name: str
    n_cells: np.ndarray  # cells with a value the bin averaged (overlapped, for area weights)
    tissue_fraction: np.ndarray  # area of those cells (within the bin) / the bin's area
    cell_columns: dict[str, np.ndarray]
    scalefactors: dict[str, float]  # besides the images': spot_diameter_fullres, ...
    uns: dict[str, Any]  # extra uns['wsi_histosge'] entries
    in_tissue: np.ndarray | None = None  # Space Ranger's flags, for spots of a run; else 1 (bins with predictions)


def _anndata_without_x(
    ad: Any,
    c: Cube,
    cube: str | Path,
    f: int,
    by: np.ndarray,
    bx: np.ndarray,
    n_cells: np.ndarray,
    images: dict[str, np.ndarray],
    scales: dict[str, float],
    library_id: str | None,
    resolution: str | float,
    lacking: list[tuple[int, int]],
) -> Any:
    """obs, var, obsm and uns of the kept ``f`` x ``f`` bins (X is streamed separately)."""
    bin_um = f * float(c.attrs["stride_um"])
    bins = _Bins(
        centre_ix=bx * f + (f - 1) / 2.0,
        centre_iy=by * f + (f - 1) / 2.0,
        array_row=by,
        array_col=bx,
        index=[f"bin_{r}_{col}" for r, col in zip(by, bx, strict=True)],
        index_name="bin",
        n_cells=n_cells,
        tissue_fraction=n_cells / float(f * f),
        cell_columns=_cell_columns(c, lambda values: _bin_mean(values, f, by, bx)),
        scalefactors=_square_scalefactors(c, bin_um),
        uns={
            "bin_um": bin_um,
            "bin_cells": f,
            "aggregation": "log1p(mean(expm1(x))) over predicted cells of each bin",
        },
    )
    return _bins_anndata(ad, c, cube, bins, images, scales, library_id, resolution, lacking)


def _square_scalefactors(c: Cube, bin_um: float) -> dict[str, float]:
    """Scale factors of square bins: scanpy draws each as a circle of the bin's side."""
    side_px = bin_um / float(c.attrs[ATTR_KEY]["mpp"]["x"])
    return {"spot_diameter_fullres": side_px, "bin_size_um": bin_um, "fiducial_diameter_fullres": side_px}


def _bins_anndata(
    ad: Any,
    c: Cube,
    cube: str | Path,
    bins: _Bins,
    images: dict[str, np.ndarray],
    scales: dict[str, float],
    library_id: str | None,
    resolution: str | float,
    lacking: list[tuple[int, int]],
) -> Any:
    """obs, var, obsm and uns of the kept bins (X is streamed separately)."""
    attrs, meta = c.attrs, c.attrs[ATTR_KEY]
    stride = float(attrs["stride_um"])
    affine = np.asarray(attrs["affine_level0"], dtype=np.float64)
    n_bins = len(bins.index)
    xy = (affine @ np.stack([bins.centre_ix, bins.centre_iy, np.ones(n_bins)]))[:2].T
    origin = attrs["origin_um"]
    obs = pd.DataFrame(
        {
            "in_tissue": np.ones(n_bins, dtype=np.int8) if bins.in_tissue is None else bins.in_tissue,
            "array_row": np.asarray(bins.array_row).astype(np.int32),
            "array_col": np.asarray(bins.array_col).astype(np.int32),
            "n_cells": np.asarray(bins.n_cells).astype(np.int32),
            "tissue_fraction": np.asarray(bins.tissue_fraction).astype(np.float32),
            "x_um": (origin[0] + bins.centre_ix * stride).astype(np.float32),
            "y_um": (origin[1] + bins.centre_iy * stride).astype(np.float32),
        },
        index=pd.Index(bins.index, name=bins.index_name),
    )
    for column, values in bins.cell_columns.items():
        obs[column] = values
    genes = c.genes
    var = pd.DataFrame({"gene_ids": genes}, index=pd.Index(genes, name="gene"))
    library_id = library_id or Path(meta["slide"]["path"]).stem
    scalefactors = {**scales, **bins.scalefactors}
    partial = bool(lacking) or not c.completed
    uns = {
        "spatial": {
            library_id: {
                "images": images,
                "scalefactors": scalefactors,
                "metadata": {"source": "wsi-histosge", "units": attrs["units"]},
            }
        },
        "wsi_histosge": {
            "cube": str(cube) if "://" in str(cube) else str(Path(cube).resolve()),
            "resolution": str(resolution),
            **bins.uns,
            "units": attrs["units"],
            "stride_um": stride,
            "spot_um": attrs["spot_um"],
            "context_um": attrs["context_um"],
            "provenance_json": json.dumps(meta),
            # an incomplete cube converted with allow_incomplete: which expression chunks (cy, cx) of
            # the cube were lacking; their cells are absent from obs
            "partial": partial,
            "cube_completed": c.completed,
            "chunks_total": int(c.marks.size),
            "missing_chunks": np.asarray(lacking, dtype=np.int32).reshape(-1, 2),
        },
    }
    return ad.AnnData(obs=obs, var=var, obsm={"spatial": xy.astype(np.float64)}, uns=uns)


# -- bins that are not whole blocks of cells: area weights (bins.py) ---------------------------------------
def _layout_to_write(
    c: Cube,
    cube: str | Path,
    layout: str,
    bin_um: float,
    lacking: list[Any],
    band_mb: float,
    positions: str | Path | None = None,
) -> tuple[Any, np.ndarray]:
    """The layout's bins and which of them overlap a usable cell; refuses a bin larger than the cube and a cube
    with nothing to convert."""
    from .bins import covered, square_bins, visium_from_positions, visium_spots

    stride = float(c.attrs["stride_um"])
    ny, nx = c.tissue.shape
    if positions is not None:
        shaped = visium_from_positions(positions, c.attrs, (ny, nx))
    elif layout == "visium":
        shaped = visium_spots((ny, nx), stride)
    else:
        if bin_um > max(ny, nx) * stride:
            raise UsageError(
                f"--bin-um {bin_um:g} is larger than the whole cube ({nx * stride:g} x {ny * stride:g} µm); use at "
                f"most --bin-um {max(ny, nx) * stride:g} (one bin)"
            )
        shaped = square_bins((ny, nx), bin_um / stride)
    candidates = covered(shaped, c.usable_cells(), band_mb * 2**20 / 4)
    if len(candidates) == 0:
        if lacking:
            raise CubeIncompleteError(
                f"{cube}: no chunk with tissue is written yet ({len(lacking)} lacking); rerun `wsi-histosge infer` "
                "with the same options to finish the cube"
            )
        if positions is not None:
            raise UsageError(f"{positions}: no spot of the run overlaps a predicted cell of {cube}")
        raise UsageError(f"{cube}: no predicted cells in the cube")
    return shaped, candidates


def _write_x_weighted(
    h5: Any, c: Cube, shaped: Any, candidates: np.ndarray, *, band_mb: float
) -> tuple[np.ndarray, np.ndarray]:
    """Stream the area-weighted means of ``candidates`` into ``h5['X']`` (rows: the bins that get a value, in
    raster order). Returns, per candidate, how many cells with a value it overlaps and their overlap area."""
    from .bins import stream_means

    n_genes = len(c.genes)
    n_cand = len(candidates)
    x = _create_x(h5, n_cand, n_genes)
    n_valued = np.zeros(n_cand, dtype=np.int64)
    area = np.zeros(n_cand, dtype=np.float64)
    written = done = 0
    for band in stream_means(c, shaped, candidates, band_mb=band_mb):
        n = len(band.bins)
        n_valued[done : done + n] = band.valued_cells
        area[done : done + n] = band.valued_area
        keep = band.valued_cells > 0
        n_keep = int(keep.sum())
        if n_keep:
            x[written : written + n_keep] = band.means[keep]
            written += n_keep
        done += n
    if written < n_cand:
        x.resize((written, n_genes))
    return n_valued, area


def _weighted_bins(
    c: Cube,
    shaped: Any,
    layout: str,
    bin_um: float,
    kept: np.ndarray,
    n_cells: np.ndarray,
    area: np.ndarray,
    band_mb: float,
) -> _Bins:
    from .bins import VISIUM_PITCH_UM, VISIUM_SPOT_UM, weighted_mean

    stride = float(c.attrs["stride_um"])
    visium = layout == "visium"
    uns: dict[str, Any] = {
        "layout": layout,
        "bin_cells": bin_um / stride,
        "aggregation": (
            "log1p(sum(a * expm1(x)) / sum(a)) over the cells holding a value, a = the area the "
            + ("spot's disc" if visium else "bin")
            + " shares with each cell"
        ),
    }
    if visium:
        uns |= {"spot_diameter_um": VISIUM_SPOT_UM, "spot_pitch_um": VISIUM_PITCH_UM}
        if shaped.names is not None:
            uns["spots"] = "a Space Ranger run's tissue positions (barcodes, array_row/col, in_tissue as given)"
        # Space Ranger's spot_diameter_fullres spans a theoretical 65 µm spot (stdata.SPACERANGER_DIAMETER_UM):
        # written the same way, scanpy draws these spots as it draws a real run, and readers that take a pixel
        # size from it (this tool's FILE.h5ad sections) get the slide's.
        from .stdata import SPACERANGER_DIAMETER_UM

        mpp_x = float(c.attrs[ATTR_KEY]["mpp"]["x"])
        scalefactors = {
            "spot_diameter_fullres": SPACERANGER_DIAMETER_UM / mpp_x,
            "spot_diameter_um": VISIUM_SPOT_UM,
            "spot_pitch_um": VISIUM_PITCH_UM,
        }
    else:
        uns["bin_um"] = bin_um
        scalefactors = _square_scalefactors(c, bin_um)
    return _Bins(
        centre_ix=shaped.cx[kept],
        centre_iy=shaped.cy[kept],
        array_row=shaped.array_row[kept],
        array_col=shaped.array_col[kept],
        index=shaped.ids("spot" if visium else "bin", kept),
        index_name="barcode" if visium else "bin",
        n_cells=n_cells,
        tissue_fraction=area / shaped.area,
        in_tissue=None if shaped.in_tissue is None else shaped.in_tissue[kept],
        cell_columns=_cell_columns(c, lambda values: weighted_mean(shaped, values, kept, band_mb * 2**20 / 4)),
        scalefactors=scalefactors,
        uns=uns,
    )
