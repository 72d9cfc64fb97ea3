"""Cube -> SpatialData Zarr store: the slide image, the bins as shapes, and the AnnData table annotating them.

The store (``spatialdata.read_zarr`` opens it; napari-spatialdata and spatialdata-plot draw it) holds:

- ``images/slide``: the slide as a multiscale image (c, y, x uint8) built from the slide's own pyramid levels,
  read lazily tile by tile (memory stays bounded whatever the slide). Levels that fail the reader's check
  against level 0 are left out. ``image_mpp`` caps the finest level written (the coarsest level at least as fine
  as it; default level 0, the full slide); when the slide's coarsest usable level is still longer than
  ``THUMB_MAX_PX``, one more level is added from the slide's thumbnail so viewers have an overview.
- ``shapes/bins`` (squares, as polygons) or ``shapes/spots`` (Visium: circles of the spot's 55 µm diameter),
  in level-0 px of the slide.
- ``tables/table``: what `to-anndata` writes for the same options (X log1p CP10k, obs with array indices,
  µm centres and the trust columns, ``obsm['spatial']`` in level-0 px, ``uns['spatial'][library_id]``'s
  scale factors), annotating the shapes through ``region`` / ``instance_id``; the hires/lowres pictures of
  ``uns['spatial']`` are left out (the image is its own element).

Coordinate systems: ``global`` is level-0 px of the slide (identity for the shapes and for the level-0
image; a coarser first level scales by its downsample); ``micrometers`` scales by the slide's µm per pixel.
The store is written under a temporary name next to ``out`` and renamed when complete; an existing ``out`` is
refused unless ``overwrite``, which replaces only a store this command wrote.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .errors import OutputExistsError, OutputWriteError, UsageError
from .slide import Slide, open_slide, recorded_slide

THUMB_MAX_PX = 2048
IMAGE_CHUNK_PX = 1024
#: Root attribute of the stores this command writes (a cube's own attributes are under "wsi_histosge").
MARKER = "wsi_histosge_spatialdata"
INSTALL_HINT = "pip install 'wsi-histosge[spatialdata]' (spatialdata>=0.7)"


def _spatialdata() -> Any:
    import warnings

    try:
        with warnings.catch_warnings():
            # spatialdata -> xarray-schema imports pkg_resources, which setuptools deprecates: nothing a user of
            # this command can act on
            warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
            import spatialdata
    except ImportError as exc:
        raise UsageError(f"to-spatialdata needs the spatialdata package ({exc}); {INSTALL_HINT}") from None
    return spatialdata


class _LevelArray:
    """One pyramid level as a (c, y, x) uint8 array-like for ``dask.array.from_array`` (reads on indexing)."""

    def __init__(self, slide: Slide, level: int, lock: threading.Lock) -> None:
        self.slide, self.level, self.lock = slide, level, lock
        w, h = slide.level_dimensions[level]
        self.shape = (3, h, w)
        self.dtype = np.dtype(np.uint8)
        self.ndim = 3
        self.downsample = float(slide.level_downsamples[level])

    def __getitem__(self, key: tuple[slice, slice, slice]) -> np.ndarray:
        c, ys, xs = key
        y0, y1, _ = ys.indices(self.shape[1])
        x0, x1, _ = xs.indices(self.shape[2])
        if y1 <= y0 or x1 <= x0:
            return np.zeros((3, max(0, y1 - y0), max(0, x1 - x0)), np.uint8)[c]
        location = (int(x0 * self.downsample), int(y0 * self.downsample))
        with self.lock:  # one reader handle per slide: reads one at a time, compression runs in parallel
            region = self.slide.read_region(location, self.level, (x1 - x0, y1 - y0))
        return np.ascontiguousarray(np.moveaxis(region[..., :3], 2, 0)[c])


def image_levels(slide: Slide, image_mpp: float | None = None) -> list[int]:
    """The slide's levels written to the store: from the finest allowed by ``image_mpp`` down, each one that
    passes the reader's check against level 0 and is smaller than the one before."""
    first = 0 if image_mpp is None else slide.best_level_for_mpp(image_mpp)
    good = {row["level"] for row in slide.level_check() if row["ok"]}
    levels: list[int] = []
    for level in range(first, slide.level_count):
        if level not in good:
            continue
        w, h = slide.level_dimensions[level]
        if levels:
            pw, ph = slide.level_dimensions[levels[-1]]
            if w >= pw or h >= ph:
                continue
        levels.append(level)
    return levels


def _image_tree(slide: Slide, levels: list[int]) -> tuple[Any, dict[str, Any]]:
    """The multiscale image (DataTree of scale0, scale1, ...) and a summary of what each scale is."""
    import dask.array as da
    import xarray as xr

    lock = threading.Lock()
    arrays = []
    summary: list[dict[str, Any]] = []
    for level in levels:
        arrays.append(
            da.from_array(
                _LevelArray(slide, level, lock), chunks=(3, IMAGE_CHUNK_PX, IMAGE_CHUNK_PX), asarray=False, lock=False
            )
        )
        summary.append({"level": level, "dimensions": list(slide.level_dimensions[level])})
    w, h = slide.level_dimensions[levels[-1]]
    if max(w, h) > THUMB_MAX_PX:
        w0, h0 = slide.dimensions
        thumb, _ = slide.thumbnail(max(w0 * slide.mpp.x, h0 * slide.mpp.y) / THUMB_MAX_PX)
        arrays.append(da.from_array(np.moveaxis(thumb, 2, 0), chunks=(3, IMAGE_CHUNK_PX, IMAGE_CHUNK_PX)))
        summary.append({"level": "thumbnail", "dimensions": [thumb.shape[1], thumb.shape[0]]})
    scales = {
        f"scale{i}": xr.Dataset({"image": xr.DataArray(a, dims=("c", "y", "x"), coords={"c": ["r", "g", "b"]})})
        for i, a in enumerate(arrays)
    }
    return xr.DataTree.from_dict(scales), {"levels": summary}


@contextlib.contextmanager
def _flat_chunk_sizes() -> Iterator[None]:
    """spatialdata 0.7.0-0.7.1 hands ome-zarr each level's dask chunk grid (((3,), (1024, ...), ...)), which
    ome-zarr >= 0.14 passes on to zarr as the chunk shape, and zarr refuses (scverse/spatialdata#1090): every
    multiscale image write fails. Later spatialdata releases give a flat chunk shape themselves (they have
    ``_prepare_storage_options``); for the earlier ones the grid is flattened here, for the duration of one
    write only."""
    import spatialdata._io.io_raster as io_raster

    if hasattr(io_raster, "_prepare_storage_options") or not hasattr(io_raster, "write_multiscale_ngff"):
        yield
        return
    original = io_raster.write_multiscale_ngff

    def flat(chunks: Any) -> Any:
        if isinstance(chunks, tuple | list):
            return tuple(max(c) if isinstance(c, tuple | list) else c for c in chunks)
        return chunks

    def write(*args: Any, storage_options: Any = None, **kwargs: Any) -> Any:
        if isinstance(storage_options, list):
            storage_options = [{**o, "chunks": flat(o["chunks"])} if "chunks" in o else o for o in storage_options]
        elif isinstance(storage_options, dict) and "chunks" in storage_options:
            storage_options = {**storage_options, "chunks": flat(storage_options["chunks"])}
        return original(*args, storage_options=storage_options, **kwargs)

    io_raster.write_multiscale_ngff = write
    try:
        yield
    finally:
        io_raster.write_multiscale_ngff = original


@contextlib.contextmanager
def _no_table_sharding() -> Iterator[None]:
    """anndata >= 0.12 warns on every zarr v3 table write that it will shard by default; the table is written
    unsharded, as now, and without the warning."""
    import anndata as ad

    if hasattr(ad.settings, "auto_shard_zarr_v3") and hasattr(ad.settings, "override"):
        with ad.settings.override(auto_shard_zarr_v3=False):
            yield
    else:
        yield


def _written_by_us(path: Path) -> bool:
    import json

    try:
        doc = json.loads((path / "zarr.json").read_text())
    except (OSError, ValueError):
        return False
    attributes = doc.get("attributes") if isinstance(doc, dict) else None
    return isinstance(attributes, dict) and MARKER in attributes and "spatialdata_attrs" in attributes


def _check_out(out: Path, overwrite: bool, cube: str | Path) -> None:
    if "://" not in str(cube) and (
        out.resolve() == Path(cube).resolve() or Path(cube).resolve().is_relative_to(out.resolve())
    ):
        raise UsageError(f"{out}: is the cube (or holds it); choose another --out for the SpatialData store")
    if not out.exists():
        return
    if not overwrite:
        raise OutputExistsError(f"{out}: exists; pass --overwrite or choose another --out")
    if not out.is_dir() or not _written_by_us(out):
        raise OutputExistsError(
            f"{out}: exists and is not a SpatialData store written by wsi-histosge; --overwrite replaces only "
            "those; choose another --out"
        )


def _shapes(table: Any, layout: str, bin_um: float, mpp: tuple[float, float], transformations: dict[str, Any]) -> Any:
    """Bins as squares (polygons) or Visium spots as circles, in level-0 px, indexed like the table's instances."""
    import geopandas as gpd
    import shapely
    from spatialdata.models import ShapesModel

    from .bins import VISIUM_SPOT_UM

    xy = np.asarray(table.obsm["spatial"], dtype=np.float64)
    index = np.arange(len(xy))
    if layout == "visium":
        radius = np.full(len(xy), VISIUM_SPOT_UM / 2.0 / mpp[0])
        return ShapesModel.parse(xy, geometry=0, radius=radius, index=index, transformations=transformations)
    hx, hy = bin_um / mpp[0] / 2.0, bin_um / mpp[1] / 2.0
    squares = shapely.box(xy[:, 0] - hx, xy[:, 1] - hy, xy[:, 0] + hx, xy[:, 1] + hy)
    return ShapesModel.parse(gpd.GeoDataFrame(geometry=squares, index=index), transformations=transformations)


def _table(h5: Any, region: str) -> Any:
    """The .h5ad written by `to-anndata` as an AnnData whose X reads lazily from the file (dask)."""
    import anndata as ad
    import dask.array as da
    import pandas as pd

    try:
        from anndata.io import read_elem
    except ImportError:  # anndata < 0.11
        from anndata.experimental import read_elem  # type: ignore[no-redef]

    x = h5["X"]
    rows = max(1, min(x.shape[0], (64 << 20) // max(1, 4 * x.shape[1])))
    obs = read_elem(h5["obs"])
    uns = read_elem(h5["uns"])
    for entry in uns.get("spatial", {}).values():
        entry.pop("images", None)  # the pictures duplicate the image element; the scale factors stay
    obs["region"] = pd.Categorical([region] * len(obs))
    obs["instance_id"] = np.arange(len(obs), dtype=np.int64)
    return ad.AnnData(
        X=da.from_array(x, chunks=(rows, x.shape[1]), lock=True),
        obs=obs,
        var=read_elem(h5["var"]),
        obsm=read_elem(h5["obsm"]),
        uns=uns,
    )


def to_spatialdata(
    cube: str | Path,
    out: str | Path,
    *,
    resolution: str | float = "native",
    layout: str = "grid",
    library_id: str | None = None,
    slide: str | Path | None = None,
    overwrite: bool = False,
    allow_incomplete: bool = False,
    image_mpp: float | None = None,
    visium_positions: str | Path | None = None,
) -> Path:
    """Write the SpatialData Zarr store ``out`` from the cube at ``cube``; see the module docstring.

    ``resolution``, ``layout``, ``visium_positions``, ``library_id``, ``slide`` and ``allow_incomplete`` are
    `to-anndata`'s (:func:`wsi_histosge.convert.to_anndata`); ``image_mpp`` caps the finest image level written (µm/px).
    Raises what `to-anndata` raises, UsageError when spatialdata is not installed or ``image_mpp`` is not a
    positive number, OutputExistsError (``out`` exists and not ``overwrite``, or is not a store this command
    wrote) and OutputWriteError (disk full, read-only): ``out`` is then left as it was."""
    import json

    import h5py

    from . import __version__
    from .convert import to_anndata, write_failed
    from .store import ATTR_KEY, read_cube

    out = Path(out)
    _check_out(out, overwrite, cube)
    if image_mpp is not None and (
        isinstance(image_mpp, bool)
        or not isinstance(image_mpp, int | float)
        or not math.isfinite(image_mpp)
        or image_mpp <= 0
    ):
        raise UsageError(f"--image-mpp must be a positive number of µm per pixel; got {image_mpp!r}")
    if visium_positions is not None:
        layout = "visium"
    sd = _spatialdata()
    from spatialdata.models import Image2DModel, TableModel
    from spatialdata.transformations import Identity, Scale, set_transformation

    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        h5ad = to_anndata(
            cube,
            work / "table.h5ad",
            resolution=resolution,
            layout=layout,
            visium_positions=visium_positions,
            library_id=library_id,
            slide=slide,
            allow_incomplete=allow_incomplete,
        )
        meta = read_cube(cube).attrs[ATTR_KEY]
        slide_path = recorded_slide(meta["slide"]["path"], slide, meta["slide"].get("fingerprint"))  # a URL stays a URL
        mpp = (float(meta["mpp"]["x"]), float(meta["mpp"]["y"]))
        to_um = Scale([mpp[0], mpp[1]], axes=("x", "y"))
        with h5py.File(h5ad, "r") as h5, open_slide(slide_path, mpp=mpp[0]) as s:
            region = "spots" if layout == "visium" else "bins"
            adata = _table(h5, region)
            info = adata.uns["wsi_histosge"]
            bin_um = float(info.get("bin_um", info.get("spot_diameter_um", 0.0)))
            shapes = _shapes(adata, layout, bin_um, mpp, {"global": Identity(), "micrometers": to_um})
            table = TableModel.parse(adata, region=region, region_key="region", instance_key="instance_id")
            levels = image_levels(s, image_mpp)
            tree, image_summary = _image_tree(s, levels)
            w0, h0 = s.dimensions
            lw, lh = s.level_dimensions[levels[0]]
            first = Scale([w0 / lw, h0 / lh], axes=("x", "y"))
            set_transformation(
                tree,
                {
                    "global": Identity() if levels[0] == 0 else first,
                    "micrometers": Scale([mpp[0] * w0 / lw, mpp[1] * h0 / lh], axes=("x", "y")),
                },
                set_all=True,
            )
            Image2DModel().validate(tree)
            attrs = {
                MARKER: {
                    "version": __version__,
                    "cube": str(info.get("cube")),
                    "layout": layout,
                    "resolution": str(resolution),
                    "library_id": next(iter(adata.uns.get("spatial", {})), None),
                    "units": info.get("units"),
                    "image": image_summary,
                    "coordinate_systems": {"global": "level-0 px of the slide", "micrometers": "µm"},
                    "slide": json.loads(json.dumps(meta["slide"])),
                }
            }
            data = sd.SpatialData(images={"slide": tree}, shapes={region: shapes}, tables={"table": table}, attrs=attrs)
            with _flat_chunk_sizes(), _no_table_sharding():
                data.write(work / "store.zarr")
        if out.exists():  # --overwrite, checked above: a store this command wrote
            os.replace(out, work / "replaced")
        os.replace(work / "store.zarr", out)
    except OutputWriteError as exc:  # the table, written in the temporary folder: name what the user asked for
        message = str(exc).replace(str(work / "table.h5ad"), str(out)).replace(str(work), str(out.parent))
        raise OutputWriteError(message) from None
    except OSError as exc:
        raise write_failed(exc, out) from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out
