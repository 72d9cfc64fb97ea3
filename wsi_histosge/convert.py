"""Cube -> AnnData (.h5ad) at a chosen resolution, for scanpy and squidpy.

Binning: ``f x f`` lattice cells per bin (``f = bin_um / stride_um``, an integer), averaged in linear
space: ``log1p(mean(expm1(x)))`` over the predicted cells of the bin, so a bin's value is the log of the
expression a bigger spot would have measured. Only bins holding at least one predicted cell are kept.
Conversion streams the cube band by band and writes ``X`` into the HDF5 file as it goes: peak memory
is one band of cells (about 64 rows of the lattice) plus the obs table, whatever the cube's size.

The result follows the Space Ranger / scanpy conventions: ``obsm['spatial']`` in level-0 px of the
slide, ``uns['spatial'][library_id]`` with 'hires'/'lowres' images and their scale factors, and
``spot_diameter_fullres`` = the bin's side in level-0 px.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .errors import OutputExistsError, SlideNotFoundError, UsageError
from .slide import open_slide
from .store import ATTR_KEY, open_cube

HIRES_MAX_PX = 2000
LOWRES_MAX_PX = 600


def bin_factor(attrs: dict[str, Any], resolution: str | float) -> int:
    """Cells per bin side for ``resolution``: "native", "spot", or a bin size in µm."""
    stride = float(attrs["stride_um"])
    if resolution == "native":
        return 1
    bin_um = float(attrs["spot_um"]) if resolution == "spot" else float(resolution)
    f = bin_um / stride
    if f < 1 - 1e-6 or abs(f - round(f)) > 1e-3:
        lo, hi = max(1, math.floor(f)), max(1, math.ceil(f))
        raise UsageError(
            f"bin size {bin_um:g} µm is not a whole multiple of the cube's {stride:g} µm stride; "
            f"use {lo * stride:g} or {hi * stride:g} µm"
        )
    return round(f)


def _slide_images(
    slide_path: Path, mpp: float | None, level0_size: tuple[int, int]
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


def to_anndata(
    cube: str | Path,
    out: str | Path,
    *,
    resolution: str | float = "native",
    library_id: str | None = None,
    slide: str | Path | None = None,
    overwrite: bool = False,
    band_cells: int = 64,
    band_mb: float = 128.0,
) -> Path:
    """Write ``out`` (.h5ad) from the cube at ``cube``; see the module docstring."""
    import anndata as ad
    import h5py

    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out}: exists; pass --overwrite or choose another --out")
    group: Any = open_cube(cube)
    attrs: dict[str, Any] = dict(group.attrs)
    meta: dict[str, Any] = attrs[ATTR_KEY]
    f = bin_factor(attrs, resolution)
    stride = float(attrs["stride_um"])
    affine = np.asarray(attrs["affine_level0"], dtype=np.float64)
    genes = list(attrs["genes"])
    expr = group["expression"]
    tissue = np.asarray(group["tissue"][:]).astype(bool)
    ny, nx = tissue.shape
    nby, nbx = -(-ny // f), -(-nx // f)
    padded = np.zeros((nby * f, nbx * f), dtype=np.int32)
    padded[:ny, :nx] = tissue
    counts = padded.reshape(nby, f, nbx, f).sum(axis=(1, 3))
    by, bx = np.nonzero(counts)
    n_bins = len(by)
    if n_bins == 0:
        raise UsageError(f"{cube}: no predicted cells in the cube")

    centre_ix = bx * f + (f - 1) / 2.0
    centre_iy = by * f + (f - 1) / 2.0
    xy = (affine @ np.stack([centre_ix, centre_iy, np.ones(n_bins)]))[:2].T
    mpp_x = float(meta["mpp"]["x"])
    origin = attrs["origin_um"]
    obs = pd.DataFrame(
        {
            "in_tissue": np.ones(n_bins, dtype=np.int8),
            "array_row": by.astype(np.int32),
            "array_col": bx.astype(np.int32),
            "n_cells": counts[by, bx].astype(np.int32),
            "tissue_fraction": (counts[by, bx] / float(f * f)).astype(np.float32),
            "x_um": (origin[0] + centre_ix * stride).astype(np.float32),
            "y_um": (origin[1] + centre_iy * stride).astype(np.float32),
        },
        index=pd.Index([f"bin_{r}_{c}" for r, c in zip(by, bx, strict=True)], name="bin"),
    )
    var = pd.DataFrame({"gene_ids": genes}, index=pd.Index(genes, name="gene"))
    library_id = library_id or Path(meta["slide"]["path"]).stem
    slide_path = Path(slide) if slide is not None else Path(meta["slide"]["path"])
    if not slide_path.is_file():
        raise SlideNotFoundError(f"{slide_path}: the cube's slide is not there (moved?); pass --slide PATH")
    images, scales = _slide_images(slide_path, mpp_x, tuple(meta["slide"]["dimensions"]))
    bin_um = f * stride
    scalefactors = {
        **scales,
        "spot_diameter_fullres": bin_um / mpp_x,
        "bin_size_um": bin_um,
        "fiducial_diameter_fullres": bin_um / mpp_x,
    }
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
            "bin_um": bin_um,
            "bin_cells": f,
            "aggregation": "log1p(mean(expm1(x))) over predicted cells of each bin",
            "units": attrs["units"],
            "stride_um": stride,
            "spot_um": attrs["spot_um"],
            "context_um": attrs["context_um"],
            "provenance_json": json.dumps(meta),
        },
    }
    adata = ad.AnnData(obs=obs, var=var, obsm={"spatial": xy.astype(np.float64)}, uns=uns)
    tmp = out.with_name(out.name + ".partial")
    adata.write_h5ad(tmp)
    del adata

    # X, band by band (rows of bins, raster order = obs order), each band in column tiles, so that
    # memory is bounded by ``band_mb`` whatever the cube's width and height.
    n_genes = len(genes)
    band_bins = max(1, min(band_cells // f, int(band_mb * 2**20 // max(1, nbx * n_genes * 4))))
    tile_bins = max(1, int(band_mb * 2**20 // max(1, band_bins * f * f * n_genes * 4 * 3)))
    with h5py.File(tmp, "a") as h5:
        if "X" in h5:
            del h5["X"]
        x = h5.create_dataset(
            "X", shape=(n_bins, n_genes), dtype="float32", chunks=(min(n_bins, 1024), n_genes), compression="lzf"
        )
        x.attrs["encoding-type"] = "array"
        x.attrs["encoding-version"] = "0.2.0"
        for b0 in range(0, nby, band_bins):
            b1 = min(nby, b0 + band_bins)
            idx = np.nonzero((by >= b0) & (by < b1))[0]
            if not len(idx):
                continue
            out_band = np.empty((len(idx), n_genes), dtype=np.float32)
            y0, y1 = b0 * f, min(ny, b1 * f)
            for c0 in range(0, nbx, tile_bins):
                c1 = min(nbx, c0 + tile_bins)
                sel = (bx[idx] >= c0) & (bx[idx] < c1)
                if not sel.any():
                    continue
                x0, x1 = c0 * f, min(nx, c1 * f)
                lin = np.expm1(np.asarray(expr[:, y0:y1, x0:x1], dtype=np.float32))
                g, h, w = lin.shape
                pad = np.full((g, (b1 - b0) * f, (c1 - c0) * f), np.nan, dtype=np.float32)
                pad[:, :h, :w] = lin
                del lin
                with warnings.catch_warnings():  # empty bins (not in obs) average to NaN
                    warnings.simplefilter("ignore", RuntimeWarning)
                    means = np.log1p(np.nanmean(pad.reshape(g, b1 - b0, f, c1 - c0, f), axis=(2, 4)))
                rows = idx[sel]
                out_band[sel] = means[:, by[rows] - b0, bx[rows] - c0].T
            x[idx[0] : idx[-1] + 1] = out_band
    os.replace(tmp, out)
    return out
