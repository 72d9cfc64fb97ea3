"""Cube -> QuPath: predicted bins as GeoJSON detections whose measurements are genes.

QuPath (0.4 or later) opens the file with File > Import objects (or drag and drop onto the slide); each bin
becomes a detection, and Measure > Show measurement maps colours the detections by any gene. What QuPath's
importer reads (qupath-core ``PathIO.readObjects``, ``PathObjectTypeAdapters``, ``GsonTools``,
``ROITypeAdapters``), and so what is written:

- a file ending ``.geojson`` or ``.json``, or a ``.zip`` holding one (QuPath reads no ``.gz``);
- a ``FeatureCollection`` of ``Feature`` objects; members it does not know (our ``wsi_histosge`` block with
  units and provenance) are ignored;
- ``properties.objectType: "detection"`` (a missing or unknown type would make annotations);
- ``properties.measurements`` as an object ``{name: number}`` (the form QuPath writes since 0.4): one entry per
  gene, plus ``Spots predicted`` (lattice cells averaged into the bin). JSON has no NaN: a gene without a
  value in a bin is left out of that bin (QuPath shows it as missing);
- ``properties.classification`` as ``{"name": ..., "color": [r, g, b]}``; QuPath's object form needs both;
- ``geometry``: a closed ``Polygon`` ring in level-0 pixels of the slide (the full-resolution image QuPath
  opens), the bin's square clipped to the slide, coordinates to 2 decimals as QuPath writes them.

Binning is :mod:`.convert`'s: ``f x f`` lattice cells per bin, averaged in linear space
(``log1p(mean(expm1(x)))``); bins without a predicted value are not written. The file is streamed: bins are
computed in rectangles whose per-bin sums fit a memory budget, the cube is read in chunk-aligned windows,
and each feature is written as soon as its rectangle is done, so memory does not grow with the number of
bins. It is written under a temporary name and renamed when complete: a failed or interrupted export leaves
no file that looks whole.
"""

from __future__ import annotations

import io
import json
import math
import os
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from .convert import _bin_sum, _bins_to_write, _spans, bin_factor, write_failed
from .errors import OutputExistsError, UsageError
from .store import ATTR_KEY, Cube, read_cube

#: Endings of the files QuPath's File > Import objects reads.
QUPATH_SUFFIXES = (".geojson", ".json", ".zip")
#: Every detection's classification (QuPath needs a name and a colour in the object form).
CLASSIFICATION = {"name": "HisToSGE bin", "color": [0, 150, 136]}
#: The measurement holding how many lattice cells with a prediction a bin averages.
SPOTS_MEASUREMENT = "Spots predicted"
#: How an export of ours begins (how --overwrite tells our files from others).
HEADER_PREFIX = '{"type":"FeatureCollection","wsi_histosge":'


@dataclass(frozen=True)
class QuPathExport:
    """What :func:`to_qupath` wrote."""

    path: Path
    detections: int
    genes: list[str]
    bin_um: float
    partial: bool


def select_genes(available: list[str], genes: list[str] | None, all_genes: bool) -> list[str]:
    """The genes to export, in the order asked (duplicates dropped); UsageError naming what is wrong."""
    if all_genes and genes:
        raise UsageError("give --genes or --all-genes, not both")
    if all_genes:
        return list(available)
    if not genes:
        raise UsageError(
            f"choose the genes to export: --genes A,B (the model predicts {len(available)} genes, e.g. "
            f"{', '.join(available[:5])}) or --all-genes"
        )
    known = set(available)
    for gene in genes:
        if gene not in known:
            close = [g for g in available if g.upper().startswith(gene.upper()[:3])][:5]
            raise UsageError(
                f"gene {gene!r} is not in the model's {len(available)} genes"
                + (f" (similar: {', '.join(close)})" if close else "")
            )
    return list(dict.fromkeys(genes))


def _is_our_export(path: Path) -> bool:
    """True if ``path`` is a file this module wrote (plain or zipped): only those --overwrite replaces."""
    try:
        if path.suffix.lower() == ".zip":
            if not zipfile.is_zipfile(path):
                return False
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
                if len(names) != 1:
                    return False
                with zf.open(names[0]) as fh:
                    head = fh.read(len(HEADER_PREFIX))
        else:
            with open(path, "rb") as fh:
                head = fh.read(len(HEADER_PREFIX))
    except (OSError, zipfile.BadZipFile):
        return False
    return head == HEADER_PREFIX.encode()


def _check_out(out: Path, overwrite: bool) -> None:
    suffix = out.suffix.lower()
    if suffix not in QUPATH_SUFFIXES:
        hint = "; QuPath does not read .gz, use .zip for a compressed file" if suffix == ".gz" else ""
        raise UsageError(
            f"{out}: --out must end in .geojson, .json or .zip, the files QuPath's File > Import objects reads{hint}"
        )
    if out.is_dir():
        raise UsageError(f"{out}: is a folder; --out takes the path of the file to write")
    if out.exists():
        if not overwrite:
            raise OutputExistsError(f"{out}: exists; pass --overwrite or choose another --out")
        if not _is_our_export(out):
            raise OutputExistsError(
                f"{out}: exists and is not a QuPath export of wsi-histosge; choose another --out (nothing was changed)"
            )


def _header(c: Cube, cube: str | Path, genes: list[str], f: int, partial: bool) -> dict[str, Any]:
    """The FeatureCollection's ``wsi_histosge`` member: what the numbers are and where they come from."""
    meta = c.attrs[ATTR_KEY]
    stride = float(c.attrs["stride_um"])
    return {
        "software": "wsi-histosge",
        "version": meta.get("version", ""),
        "cube": str(cube) if "://" in str(cube) else str(Path(cube).resolve()),
        "slide": meta["slide"]["path"],
        "slide_dimensions": meta["slide"]["dimensions"],
        "coordinates": "level-0 pixels of the slide",
        "units": c.attrs["units"],
        "aggregation": "log1p(mean(expm1(x))) over predicted cells of each bin",
        "bin_um": f * stride,
        "bin_cells": f,
        "stride_um": stride,
        "model": (meta.get("model") or {}).get("name", ""),
        "measurements": [*genes, SPOTS_MEASUREMENT],
        "partial": partial,
    }


@dataclass(frozen=True)
class _Geometry:
    """Bin (row, col) -> its square in level-0 px, clipped to the slide."""

    f: int
    affine: np.ndarray
    width: float
    height: float

    def edges(self, bins: np.ndarray, axis: int, size: float) -> tuple[np.ndarray, np.ndarray]:
        scale, offset = self.affine[axis, axis], self.affine[axis, 2]
        lo = (bins * self.f - 0.5) * scale + offset
        hi = ((bins + 1) * self.f - 0.5) * scale + offset
        return np.clip(lo, 0.0, size).round(2), np.clip(hi, 0.0, size).round(2)


def _rectangles(c: Cube, f: int, n_genes: int, budget_mb: float) -> Iterator[tuple[int, int, int, int]]:
    """Rectangles of bins [b0, b1) x [c0, c1), row bands of about one chunk, whose per-bin sums (float64 +
    int32 per gene) stay within a quarter of the budget."""
    ny, nx = c.tissue.shape
    ch = c.chunk_cells[0]
    nby, nbx = -(-ny // f), -(-nx // f)
    band_bins = max(1, ch // f)
    tile_bins = max(1, min(nbx, int(budget_mb * 2**20 / 4 // max(1, band_bins * n_genes * 12))))
    for b0 in range(0, nby, band_bins):
        for c0 in range(0, nbx, tile_bins):
            yield b0, min(nby, b0 + band_bins), c0, min(nbx, c0 + tile_bins)


def _bin_means(
    c: Cube, f: int, gene_idx: np.ndarray, by: np.ndarray, bx: np.ndarray, budget_mb: float
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """(rows, cols, means (bins, genes) float32 with NaN where a gene has no value, spots per bin) for the
    candidate bins ``by``, ``bx`` (raster order) that hold a value, rectangle by rectangle."""
    n_all = len(c.genes)
    n_sel = len(gene_idx)
    subset = n_sel != n_all or not np.array_equal(gene_idx, np.arange(n_all))
    cells = c.usable_cells()
    ny, nx = cells.shape
    ch, cw = c.chunk_cells
    # one read window: every gene of the cube (its chunks hold them all) as float32, its expm1 and masks
    window_cols = max(cw, int(budget_mb * 2**20 / 4 // (n_all * 16 * ch)) // cw * cw)
    for b0, b1, c0, c1 in _rectangles(c, f, n_sel, budget_mb):
        lo, hi = np.searchsorted(by, b0), np.searchsorted(by, b1)
        sel = lo + np.flatnonzero((bx[lo:hi] >= c0) & (bx[lo:hi] < c1))
        if not len(sel):
            continue  # no predicted cell here: never decoded
        sums = np.zeros((n_sel, b1 - b0, c1 - c0), dtype=np.float64)
        counts = np.zeros((n_sel, b1 - b0, c1 - c0), dtype=np.int32)
        valued = np.zeros((b1 - b0, c1 - c0), dtype=np.int32)
        for ys, ye in _spans(b0 * f, min(ny, b1 * f), ch, ch):
            for xs, xe in _spans(c0 * f, min(nx, c1 * f), cw, window_cols):
                if not cells[ys:ye, xs:xe].any():
                    continue
                window = c.read_expression(ys, ye, xs, xe)
                lin = np.expm1(window[gene_idx] if subset else window)
                del window
                finite = np.isfinite(lin)
                lin[~finite] = 0.0
                r = slice(ys // f - b0, (ye - 1) // f - b0 + 1)
                cc = slice(xs // f - c0, (xe - 1) // f - c0 + 1)
                sums[:, r, cc] += _bin_sum(lin, (ys, xs), f, np.float64)
                counts[:, r, cc] += _bin_sum(finite, (ys, xs), f, np.int32)
                valued[r, cc] += _bin_sum(finite.any(axis=0), (ys, xs), f, np.int32)
                del lin, finite
        with np.errstate(invalid="ignore", divide="ignore"):
            means = np.log1p(sums / counts).astype(np.float32)  # 0/0: NaN, a gene without a value
        rows, cols = by[sel], bx[sel]
        spots = valued[rows - b0, cols - c0]
        keep = spots > 0
        yield rows[keep], cols[keep], means[:, rows[keep] - b0, cols[keep] - c0].T, spots[keep]


def _features(
    rows: np.ndarray, cols: np.ndarray, means: np.ndarray, spots: np.ndarray, genes: list[str], geom: _Geometry
) -> Iterator[str]:
    """One GeoJSON Feature (compact JSON text) per bin."""
    x0, x1 = geom.edges(cols, 0, geom.width)
    y0, y1 = geom.edges(rows, 1, geom.height)
    values = np.round(means.astype(np.float64), 4)  # float64 first: float32 digits would print as noise
    classification = json.dumps(CLASSIFICATION, separators=(",", ":"))
    for i in range(len(rows)):
        a, b, c_, d = float(x0[i]), float(x1[i]), float(y0[i]), float(y1[i])
        ring = [[a, c_], [b, c_], [b, d], [a, d], [a, c_]]
        measurements = {g: v for g, v in zip(genes, values[i].tolist(), strict=True) if math.isfinite(v)}
        measurements[SPOTS_MEASUREMENT] = int(spots[i])
        yield (
            '{"type":"Feature","geometry":{"type":"Polygon","coordinates":'
            + json.dumps([ring], separators=(",", ":"))
            + '},"properties":{"objectType":"detection","classification":'
            + classification
            + ',"measurements":'
            + json.dumps(measurements, separators=(",", ":"), allow_nan=False)
            + "}}"
        )


def _open_text(tmp: Path, entry: str | None) -> tuple[IO[str], zipfile.ZipFile | None]:
    """A text stream writing ``tmp``: the file itself, or (given an ``entry`` name) the one member of a zip."""
    if entry is not None:
        zf = zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6)
        raw = zf.open(entry, "w", force_zip64=True)
        return io.TextIOWrapper(raw, encoding="utf-8", newline="\n"), zf
    return open(tmp, "w", encoding="utf-8", newline="\n"), None


def to_qupath(
    cube: str | Path,
    out: str | Path,
    *,
    genes: list[str] | None = None,
    all_genes: bool = False,
    resolution: str | float = "native",
    overwrite: bool = False,
    allow_incomplete: bool = False,
    budget_mb: float = 128.0,
) -> QuPathExport:
    """Write ``out`` (.geojson, .json or .zip) with one QuPath detection per bin of the cube; see the module
    docstring.

    Raises UsageError (bad ``out`` ending, unknown gene, no genes chosen, bad ``resolution``),
    InputNotFoundError / DataFormatError (no cube, not a cube of this tool), CubeIncompleteError (an incomplete
    cube and not ``allow_incomplete``), OutputExistsError (``out`` exists and not ``overwrite``, or it is not an
    export of ours) and OutputWriteError (disk full, read-only): ``out`` is then left as it was."""
    out = Path(out)
    _check_out(out, overwrite)
    c = read_cube(cube)
    if not allow_incomplete:
        c.require_complete()
    names = select_genes(c.genes, genes, all_genes)
    f = bin_factor(c.attrs, resolution)
    lacking = c.lacking()
    by, bx = _bins_to_write(c, cube, f, 64, lacking)
    partial = bool(lacking) or not c.completed
    index = {g: i for i, g in enumerate(c.genes)}
    gene_idx = np.array([index[g] for g in names], dtype=np.int64)
    w0, h0 = c.attrs[ATTR_KEY]["slide"]["dimensions"]
    geom = _Geometry(f, np.asarray(c.attrs["affine_level0"], dtype=np.float64), float(w0), float(h0))

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.partial")
    entry = out.name[: -len(".zip")] + ".geojson" if out.suffix.lower() == ".zip" else None
    n = 0
    try:
        fh, zf = _open_text(tmp, entry)
        try:
            header = json.dumps(_header(c, cube, names, f, partial), separators=(",", ":"))
            fh.write(HEADER_PREFIX + header + ',"features":[')
            for rows, cols, means, spots in _bin_means(c, f, gene_idx, by, bx, budget_mb):
                for feature in _features(rows, cols, means, spots, names, geom):
                    fh.write(("\n" if n == 0 else ",\n") + feature)
                    n += 1
            fh.write("\n]}\n")
        finally:
            fh.close()
            if zf is not None:
                zf.close()
        if n == 0:
            raise UsageError(f"{cube}: every predicted cell is NaN (all tiles skipped?); nothing to export")
        os.replace(tmp, out)
    except OSError as exc:
        raise write_failed(exc, out) from None
    finally:
        tmp.unlink(missing_ok=True)
    return QuPathExport(out, n, names, f * float(c.attrs["stride_um"]), partial)


__all__ = ["CLASSIFICATION", "SPOTS_MEASUREMENT", "QuPathExport", "select_genes", "to_qupath"]
