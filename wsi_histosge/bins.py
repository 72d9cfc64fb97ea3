"""Bins that are not whole multiples of the stride, and the Visium spot layout, on a cube's lattice.

A bin's value is the area-weighted mean, in linear space, of the lattice cells it overlaps:
``log1p(sum_i a_i expm1(x_i) / sum_i a_i)`` where ``a_i`` is the area the bin shares with cell ``i`` (a cell is
the ``stride x stride`` square centred on its spot), over the cells that hold a value for the gene. A cell the
bin only grazes counts for what it covers, so a bin's value is what a spot of that footprint would measure if
expression were uniform within each cell. For square bins that are whole multiples of the stride every weight
is 1 and this is the plain mean of ``to-anndata``'s integer binning (``convert._write_x``), which stays the path
for those sizes.

Layouts (:func:`square_bins`, :func:`visium_spots`) are given in *cell units*: cell ``(iy, ix)`` has its
centre at ``(ix, iy)`` and spans ``[ix - 0.5, ix + 0.5] x [iy - 0.5, iy + 0.5]``; the cube's affine maps
these to level-0 px and its ``origin_um`` / ``stride_um`` to µm.

- Square bins of side ``bin_um`` tile the lattice's extent from its top-left corner (the outer corner of cell
  (0, 0)), as the integer bins do: bin ``(r, c)`` spans cells ``[c k - 0.5, (c + 1) k - 0.5]`` with
  ``k = bin_um / stride_um``.
- Visium: spots of 55 µm diameter on a 100 µm centre-to-centre hexagonal pitch (rows 100 sqrt(3) / 2 µm apart,
  odd rows shifted by half a pitch). Space Ranger's indices: ``array_row`` counts rows from the top,
  ``array_col`` counts half-pitches (50 µm) from the left, so it is even on even rows and odd on odd rows (a
  capture area's 78 rows give ``array_row`` 0..77, ``array_col`` 0..127). Spot ``(0, 0)`` sits on the top-left
  corner of the lattice's extent; the layout covers every spot whose disc reaches the extent. A spot's weights
  are the exact areas its disc shares with each cell (:func:`disc_rect_area`), not a count of the cell centres
  inside it: at a 50 µm stride a 55 µm disc holds 0 to 2 cell centres depending on where it falls, while its
  area overlaps are never all zero over predicted tissue.

Memory stays bounded whatever the cube: bins are processed in bands (:meth:`Layout.bands`), each band's cells
are read window by window (chunk-aligned), and the weights of one band are a sparse matrix.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .convert import _spans

VISIUM_SPOT_UM = 55.0
VISIUM_PITCH_UM = 100.0
VISIUM_ROW_UM = VISIUM_PITCH_UM * math.sqrt(3.0) / 2.0
VISIUM_COL_UM = VISIUM_PITCH_UM / 2.0  # one array_col step


def _disc_corner_area(x: np.ndarray, y: np.ndarray, r: float) -> np.ndarray:
    """Area of the disc of radius ``r`` at the origin within ``{X <= x, Y <= y}``."""
    x = np.clip(x, -r, r)
    y = np.clip(y, -r, r)

    def prim(t: np.ndarray) -> np.ndarray:  # an antiderivative of sqrt(r^2 - t^2)
        t = np.clip(t, -r, r)
        return 0.5 * (t * np.sqrt(np.maximum(r * r - t * t, 0.0)) + r * r * np.arcsin(t / r))

    c = np.sqrt(np.maximum(r * r - y * y, 0.0))  # the line Y = y meets the circle at X = -c, c
    low = prim(np.asarray(-r))
    # y >= 0: for |t| > c the whole chord (length 2h) is below y, for |t| <= c the part from -h to y
    upper = (
        (prim(x) - low)
        + (prim(np.minimum(x, -c)) - low)
        + y * np.maximum(0.0, np.minimum(x, c) + c)
        + np.where(x > c, prim(x) - prim(c), 0.0)
    )
    # y < 0: only |t| < c reaches below y, from -h to y
    lower = np.where(x > -c, y * (np.minimum(x, c) + c) + prim(np.minimum(x, c)) - prim(-c), 0.0)
    return np.where(y >= 0, upper, lower)


def disc_rect_area(
    cx: np.ndarray, cy: np.ndarray, r: float, x0: np.ndarray, x1: np.ndarray, y0: np.ndarray, y1: np.ndarray
) -> np.ndarray:
    """Exact area shared by the disc (centre ``cx, cy``, radius ``r``) and the rectangle ``[x0, x1] x [y0, y1]``."""
    ax0, ax1, ay0, ay1 = x0 - cx, x1 - cx, y0 - cy, y1 - cy
    area = (
        _disc_corner_area(ax1, ay1, r)
        - _disc_corner_area(ax0, ay1, r)
        - _disc_corner_area(ax1, ay0, r)
        + _disc_corner_area(ax0, ay0, r)
    )
    return np.maximum(area, 0.0)


def _interval_overlap(c: np.ndarray, half: float, i: np.ndarray) -> np.ndarray:
    """Length shared by ``[c - half, c + half]`` and the cell ``[i - 0.5, i + 0.5]``."""
    return np.maximum(0.0, np.minimum(c + half, i + 0.5) - np.maximum(c - half, i - 0.5))


@dataclass(frozen=True)
class Layout:
    """Bins on a lattice of ``shape`` cells, in raster order (by ``array_row``, then ``array_col``).

    ``cx``, ``cy``: bin centres in cell units; ``size``: a square's side or a circle's diameter, in cells."""

    kind: str  # "square" or "circle"
    size: float
    cx: np.ndarray
    cy: np.ndarray
    array_row: np.ndarray
    array_col: np.ndarray
    shape: tuple[int, int]
    names: np.ndarray | None = None  # ids given with the layout (a Space Ranger run's barcodes)
    in_tissue: np.ndarray | None = None  # Space Ranger's in_tissue flags, when the spots come from a run

    def __len__(self) -> int:
        return len(self.cx)

    @property
    def area(self) -> float:
        """One bin's area in cell units (cells of the lattice)."""
        return self.size * self.size if self.kind == "square" else math.pi * self.size * self.size / 4.0

    @property
    def reach(self) -> int:
        """Cells a bin can touch along one axis (the candidates :meth:`overlaps` examines are its square)."""
        return math.ceil(self.size) + 2

    def band_limit(self, budget_bytes: float) -> int:
        """Bins per band whose overlap arrays (about 64 bytes per candidate cell) fit ``budget_bytes``."""
        return max(1, int(budget_bytes // (64 * self.reach**2)))

    def ids(self, prefix: str, bins: np.ndarray) -> list[str]:
        """``PREFIX_ROW_COL`` of ``bins`` (from ``array_row``, ``array_col``), or the layout's own names."""
        if self.names is not None:
            return [str(v) for v in self.names[bins]]
        rows, cols = self.array_row[bins].tolist(), self.array_col[bins].tolist()
        return [f"{prefix}_{r}_{c}" for r, c in zip(rows, cols, strict=True)]

    def overlaps(self, bins: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(bin position in ``bins``, iy, ix, area) for every cell of the lattice each bin overlaps."""
        half = self.size / 2.0
        k = self.reach
        cx, cy = self.cx[bins][:, None], self.cy[bins][:, None]
        ix = np.floor(cx - half + 0.5).astype(np.int64) + np.arange(k)[None, :]  # (n, k)
        iy = np.floor(cy - half + 0.5).astype(np.int64) + np.arange(k)[None, :]
        if self.kind == "square":
            wx = _interval_overlap(cx, half, ix.astype(np.float64))
            wy = _interval_overlap(cy, half, iy.astype(np.float64))
            area = wy[:, :, None] * wx[:, None, :]
        else:
            fx, fy = ix[:, None, :].astype(np.float64), iy[:, :, None].astype(np.float64)
            area = disc_rect_area(cx[:, :, None], cy[:, :, None], half, fx - 0.5, fx + 0.5, fy - 0.5, fy + 0.5)
        n = len(bins)
        iy3 = np.broadcast_to(iy[:, :, None], (n, k, k))
        ix3 = np.broadcast_to(ix[:, None, :], (n, k, k))
        ny, nx = self.shape
        keep = (area > 1e-12) & (iy3 >= 0) & (iy3 < ny) & (ix3 >= 0) & (ix3 < nx)
        pos = np.broadcast_to(np.arange(n)[:, None, None], (n, k, k))
        return pos[keep], iy3[keep], ix3[keep], area[keep]

    def bands(self, bins: np.ndarray, max_bins: int) -> Iterator[np.ndarray]:
        """``bins`` (raster order) in groups of whole rows of at most ``max_bins`` (a longer row is cut)."""
        if not len(bins):
            return
        rows = self.array_row[bins]
        starts = np.flatnonzero(np.diff(rows, prepend=rows[0] - 1))
        ends = np.append(starts[1:], len(bins))
        a = 0
        for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
            if e - a > max_bins and s > a:
                yield bins[a:s]
                a = s
            while e - a > max_bins:
                yield bins[a : a + max_bins]
                a += max_bins
        if a < len(bins):
            yield bins[a:]


def square_bins(shape: tuple[int, int], bin_cells: float) -> Layout:
    """Squares of side ``bin_cells`` (in strides) tiling the lattice from its top-left corner."""
    ny, nx = shape
    nby = max(1, math.ceil(ny / bin_cells - 1e-9))
    nbx = max(1, math.ceil(nx / bin_cells - 1e-9))
    r, c = np.divmod(np.arange(nby * nbx, dtype=np.int64), nbx)
    return Layout(
        "square",
        float(bin_cells),
        (c + 0.5) * bin_cells - 0.5,
        (r + 0.5) * bin_cells - 0.5,
        r.astype(np.int32),
        c.astype(np.int32),
        shape,
    )


def visium_spots(shape: tuple[int, int], stride_um: float) -> Layout:
    """Visium spots (55 µm on a 100 µm hexagonal pitch) over the lattice's extent; see the module docstring."""
    ny, nx = shape
    col_cells, row_cells = VISIUM_COL_UM / stride_um, VISIUM_ROW_UM / stride_um
    radius = VISIUM_SPOT_UM / 2.0 / stride_um
    n_rows = math.floor((ny + radius) / row_cells) + 1
    n_cols = math.floor((nx + radius) / col_cells) + 1
    rr, cc = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")
    on = (rr % 2) == (cc % 2)
    r, c = rr[on].astype(np.int64), cc[on].astype(np.int64)
    return Layout(
        "circle",
        2.0 * radius,
        c * col_cells - 0.5,
        r * row_cells - 0.5,
        r.astype(np.int32),
        c.astype(np.int32),
        shape,
    )


def visium_from_positions(path: str | Path, attrs: dict[str, Any], shape: tuple[int, int]) -> Layout:
    """The spots of a real Visium run of the same section, from Space Ranger's ``spatial/tissue_positions.csv``
    (or ``tissue_positions_list.csv``): barcodes, ``array_row``/``array_col``, ``in_tissue`` and the spot centres
    in px of the full-resolution image given to Space Ranger, which must be the slide (its level 0). When
    ``scalefactors_json.json`` sits next to the file, its ``spot_diameter_fullres`` (a theoretical 65 µm spot)
    must give the slide's pixel size within 10%, or the positions are of another image and are refused."""
    import json

    from .errors import DataFormatError, InputNotFoundError, UsageError
    from .stdata import _POSITION_COLUMNS, SPACERANGER_DIAMETER_UM, _numeric_column, _read_table
    from .store import ATTR_KEY

    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"{path}: no such file; give Space Ranger's spatial/tissue_positions.csv")
    with open(path, encoding="utf-8", errors="replace") as fh:
        header = 0 if fh.readline().strip().lower().startswith("barcode") else None
    pos = _read_table(path, "spot positions", header=header)
    if pos.shape[1] != len(_POSITION_COLUMNS):
        raise DataFormatError(f"{path}: {pos.shape[1]} columns, expected {len(_POSITION_COLUMNS)}: {_POSITION_COLUMNS}")
    pos.columns = _POSITION_COLUMNS
    barcodes = pos["barcode"].astype(str)
    if barcodes.duplicated().any():
        raise DataFormatError(f"{path}: barcode {barcodes[barcodes.duplicated()].iloc[0]} repeats; fix the file")
    row, col, in_tissue = (_numeric_column(pos, c, path, integer=True) for c in ("array_row", "array_col", "in_tissue"))
    x_px = _numeric_column(pos, "pxl_col_in_fullres", path)
    y_px = _numeric_column(pos, "pxl_row_in_fullres", path)
    meta = attrs[ATTR_KEY]
    mpp = float(meta["mpp"]["x"])
    scalefactors = path.with_name("scalefactors_json.json")
    if scalefactors.is_file():
        try:
            spot_px = float(json.loads(scalefactors.read_text())["spot_diameter_fullres"])
        except (ValueError, KeyError, TypeError) as exc:
            raise DataFormatError(f"{scalefactors}: no readable spot_diameter_fullres ({exc}); fix the file") from None
        run_mpp = SPACERANGER_DIAMETER_UM / spot_px
        if not math.isfinite(run_mpp) or abs(run_mpp - mpp) > 0.1 * mpp:
            raise UsageError(
                f"{path}: the run's image has {run_mpp:.4g} µm/px ({scalefactors.name}), the slide {mpp:.4g}: the "
                "positions are of another image; give the positions of a run on this slide's full-resolution image"
            )
    w0, h0 = meta["slide"]["dimensions"]
    outside = (x_px < 0) | (x_px > w0) | (y_px < 0) | (y_px > h0)
    if outside.all():
        raise UsageError(
            f"{path}: every spot lies outside the slide ({w0} x {h0} px); the positions are of another image; give "
            "those of a run on this slide's full-resolution image"
        )
    if outside.any():
        import warnings

        warnings.warn(
            f"{path}: {int(outside.sum())} of {len(outside)} spots lie outside the slide ({w0} x {h0} px) and get no "
            "prediction (they are left out of the output)",
            stacklevel=2,
        )
    cells = np.linalg.inv(np.asarray(attrs["affine_level0"], dtype=np.float64)) @ np.stack(
        [x_px, y_px, np.ones(len(x_px))]
    )
    order = np.lexsort((col, row))
    return Layout(
        "circle",
        VISIUM_SPOT_UM / float(attrs["stride_um"]),
        cells[0][order],
        cells[1][order],
        row[order].astype(np.int32),
        col[order].astype(np.int32),
        shape,
        names=barcodes.to_numpy()[order],
        in_tissue=in_tissue[order].astype(np.int8),
    )


def _sparse(pos: np.ndarray, col: np.ndarray, w: np.ndarray, n_rows: int, n_cols: int) -> Any:
    from scipy import sparse

    return sparse.csr_matrix((w, (pos, col)), shape=(n_rows, n_cols))


#: Memory for one band's overlap arrays where no other budget is given.
OVERLAP_BUDGET_BYTES = 32 * 2**20


def weighted_mean(
    layout: Layout, values: np.ndarray, bins: np.ndarray, budget_bytes: float = OVERLAP_BUDGET_BYTES
) -> np.ndarray:
    """Area-weighted mean of ``values`` (y, x; NaN = no value) over each bin of ``bins``; NaN where none."""
    out = np.full(len(bins), np.nan, dtype=np.float64)
    finite = np.isfinite(values)
    clean = np.where(finite, values, 0.0)
    done = 0
    for band in layout.bands(bins, layout.band_limit(budget_bytes)):
        pos, iy, ix, w = layout.overlaps(band)
        total = np.bincount(pos, w * clean[iy, ix], minlength=len(band))
        weight = np.bincount(pos, w * finite[iy, ix], minlength=len(band))
        with np.errstate(invalid="ignore", divide="ignore"):
            out[done : done + len(band)] = total / weight
        done += len(band)
    return out


def covered(layout: Layout, usable: np.ndarray, budget_bytes: float = OVERLAP_BUDGET_BYTES) -> np.ndarray:
    """Bins (raster order) that overlap at least one usable cell."""
    keep = np.zeros(len(layout), dtype=bool)
    for band in layout.bands(np.arange(len(layout)), layout.band_limit(budget_bytes)):
        pos, iy, ix, _w = layout.overlaps(band)
        keep[band] = np.bincount(pos, usable[iy, ix], minlength=len(band)) > 0
    return np.flatnonzero(keep)


@dataclass
class BandResult:
    bins: np.ndarray  # indices into the layout
    means: np.ndarray  # (n, genes) float32 log1p of the weighted linear mean; NaN for a gene without a value
    valued_area: np.ndarray  # (n,) overlap area (cell units) of the cells holding a value for some gene
    valued_cells: np.ndarray  # (n,) how many such cells the bin overlaps


def stream_means(
    cube: Any, layout: Layout, bins: np.ndarray, *, band_mb: float = 128.0, window_cols: int | None = None
) -> Iterator[BandResult]:
    """Area-weighted linear-space means of the cube's expression over ``bins``, band by band (raster order).

    Memory: per band, sums of (bins x genes) float64 twice, the band's overlaps, and one window of the cube
    (float32 values, their expm1 and masks), each held to about a quarter of ``band_mb``."""
    n_genes = len(cube.genes)
    usable = cube.usable_cells()
    ch, cw = cube.chunk_cells
    budget = band_mb * 2**20
    max_bins = max(1, min(int(budget / 4 // (n_genes * 16)), layout.band_limit(budget / 4)))
    if window_cols is None:
        window_cols = max(cw, int(budget / 4 // (n_genes * 16 * ch)) // cw * cw)
    for band in layout.bands(bins, max_bins):
        pos, iy, ix, w = layout.overlaps(band)
        n = len(band)
        sums = np.zeros((n, n_genes), dtype=np.float64)
        weights = np.zeros((n, n_genes), dtype=np.float64)
        area = np.zeros(n, dtype=np.float64)
        cells = np.zeros(n, dtype=np.int64)
        if len(pos):
            y0, y1, x0, x1 = int(iy.min()), int(iy.max()) + 1, int(ix.min()), int(ix.max()) + 1
            for ys, ye in _spans(y0, y1, ch, ch):
                for xs, xe in _spans(x0, x1, cw, window_cols):
                    if not usable[ys:ye, xs:xe].any():
                        continue  # nothing readable here: never decoded
                    inside = (iy >= ys) & (iy < ye) & (ix >= xs) & (ix < xe)
                    if not inside.any():
                        continue
                    h, wd = ye - ys, xe - xs
                    flat = (iy[inside] - ys) * wd + (ix[inside] - xs)
                    mat = _sparse(pos[inside], flat, w[inside], n, h * wd)
                    lin = np.expm1(cube.read_expression(ys, ye, xs, xe)).reshape(n_genes, h * wd).T
                    finite = np.isfinite(lin)
                    lin[~finite] = 0.0
                    sums += mat @ lin
                    weights += mat @ finite.astype(np.float64)
                    valued = finite.any(axis=1).astype(np.float64)
                    area += mat @ valued
                    cells += (mat > 0).astype(np.int64) @ valued.astype(np.int64)
                    del lin, finite
        with np.errstate(invalid="ignore", divide="ignore"):
            means = np.log1p(sums / weights).astype(np.float32)  # 0/0: NaN, a gene without a value
        yield BandResult(band, means, area, cells)
