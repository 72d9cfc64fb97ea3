"""Outputs read by the real libraries people use: anndata, scanpy, squidpy, xarray, ome-zarr."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import zarr

from tests.conftest import need_shared
from wsi_histosge.convert import to_anndata
from wsi_histosge.errors import UsageError
from wsi_histosge.slide import open_slide


@pytest.fixture(scope="module")
def cmu_h5ad(cmu_cube: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return to_anndata(cmu_cube, tmp_path_factory.mktemp("h5ad") / "cmu.h5ad")


@pytest.mark.realdata
def test_anndata_layout(cmu_h5ad: Path, cmu_cube: Path) -> None:
    import anndata as ad

    a = ad.read_h5ad(cmu_h5ad)
    g = zarr.open_group(str(cmu_cube), mode="r")
    tissue = np.asarray(g["tissue"][:]).astype(bool)
    assert a.n_obs == tissue.sum() and a.n_vars == len(g.attrs["genes"])
    assert a.X.dtype == np.float32 and np.isfinite(a.X).all()
    assert list(a.var_names) == list(g.attrs["genes"])
    lib = next(iter(a.uns["spatial"]))
    sf = a.uns["spatial"][lib]["scalefactors"]
    assert {"tissue_hires_scalef", "tissue_lowres_scalef", "spot_diameter_fullres"} <= set(sf)
    assert sf["spot_diameter_fullres"] == pytest.approx(50.0 / 0.499)
    # native resolution: X equals the cube's cells exactly (up to float16 storage)
    expr = np.asarray(g["expression"][:], dtype=np.float32)
    r, c = a.obs["array_row"].to_numpy(), a.obs["array_col"].to_numpy()
    np.testing.assert_allclose(a.X, expr[:, r, c].T, rtol=1e-3, atol=1e-3)
    assert "provenance_json" in a.uns["wsi_histosge"]


@pytest.mark.realdata
def test_binning_averages_in_linear_space(cmu_cube: Path, tmp_path: Path) -> None:
    import anndata as ad

    a = ad.read_h5ad(to_anndata(cmu_cube, tmp_path / "b.h5ad", resolution=100.0))
    g = zarr.open_group(str(cmu_cube), mode="r")
    expr = np.asarray(g["expression"][:], dtype=np.float64)
    tissue = np.asarray(g["tissue"][:]).astype(bool)
    i = int(np.argmax(a.obs["n_cells"].to_numpy() == 4))
    r, c = int(a.obs["array_row"].iloc[i]), int(a.obs["array_col"].iloc[i])
    cells = expr[:, 2 * r : 2 * r + 2, 2 * c : 2 * c + 2].reshape(expr.shape[0], -1)
    keep = tissue[2 * r : 2 * r + 2, 2 * c : 2 * c + 2].ravel()
    expected = np.log1p(np.expm1(cells[:, keep]).mean(axis=1))
    np.testing.assert_allclose(a.X[i], expected, rtol=1e-5, atol=1e-5)
    assert not np.allclose(expected, cells[:, keep].mean(axis=1))  # not the log-space mean
    assert a.uns["spatial"][next(iter(a.uns["spatial"]))]["scalefactors"]["bin_size_um"] == 100.0
    with pytest.raises(UsageError, match="finer"):  # 75 µm (1.5 strides) is area-weighted now: tests/test_bins.py
        to_anndata(cmu_cube, tmp_path / "c.h5ad", resolution=25.0)


@pytest.mark.realdata
def test_spatial_coordinates_land_on_the_right_hires_pixels(cmu_h5ad: Path) -> None:
    """obsm['spatial'] x tissue_hires_scalef indexes the hires image where the slide shows the same pixels."""
    import anndata as ad

    a = ad.read_h5ad(cmu_h5ad)
    lib = next(iter(a.uns["spatial"]))
    hires = a.uns["spatial"][lib]["images"]["hires"].astype(np.float64)
    sf = a.uns["spatial"][lib]["scalefactors"]["tissue_hires_scalef"]
    slide = open_slide(need_shared("wsi-samples", "CMU-1-Small-Region.svs"))
    rng = np.random.default_rng(0)
    diffs, shuffled = [], []
    r = 4
    for i in rng.choice(a.n_obs, 40, replace=False):
        x, y = a.obsm["spatial"][i]
        hx, hy = round(x * sf), round(y * sf)
        hpatch = hires[hy - r : hy + r + 1, hx - r : hx + r + 1].mean(axis=(0, 1))
        half = int((r + 0.5) / sf)
        spatch = slide.read_region((int(x) - half, int(y) - half), 0, (2 * half, 2 * half)).mean(axis=(0, 1))
        diffs.append(np.abs(hpatch - spatch).mean())
        j = rng.integers(a.n_obs)
        x2, y2 = a.obsm["spatial"][j]
        far = slide.read_region((int(x2) - half + 300, int(y2) - half), 0, (2 * half, 2 * half)).mean(axis=(0, 1))
        shuffled.append(np.abs(hpatch - far).mean())
    assert np.median(diffs) < 6.0
    assert np.median(diffs) < 0.5 * np.median(shuffled)


@pytest.mark.realdata
def test_scanpy_and_squidpy_work(cmu_h5ad: Path) -> None:
    import anndata as ad
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import scanpy as sc
    import squidpy as sq

    a = ad.read_h5ad(cmu_h5ad)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        sq.gr.spatial_neighbors(a, coord_type="grid", n_neighs=4)
    degrees = np.asarray(a.obsp["spatial_connectivities"].sum(axis=1)).ravel()
    assert np.median(degrees) == 4  # a square lattice: interior spots have 4 grid neighbours
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        (ax,) = sc.pl.spatial(a, color="FN1", show=False)
    # what scanpy drew: our hires image, and one circle per spot at obsm['spatial'] x tissue_hires_scalef, of the
    # spot's diameter, coloured by its FN1 value
    lib = next(iter(a.uns["spatial"]))
    hires = a.uns["spatial"][lib]["images"]["hires"]
    sf = a.uns["spatial"][lib]["scalefactors"]
    (image,) = ax.images
    np.testing.assert_array_equal(image.get_array(), hires)
    (spots,) = ax.collections
    boxes = np.array([[p.vertices.min(axis=0), p.vertices.max(axis=0)] for p in spots.get_paths()])
    centres, radii = boxes.mean(axis=1), (boxes[:, 1] - boxes[:, 0]) / 2
    want = a.obsm["spatial"] * sf["tissue_hires_scalef"]
    nearest = np.linalg.norm(centres[:, None] - want[None], axis=2).argmin(axis=1)
    assert sorted(nearest) == list(range(a.n_obs))  # every spot drawn once
    np.testing.assert_allclose(centres, want[nearest], atol=0.01)
    np.testing.assert_allclose(radii, sf["spot_diameter_fullres"] * sf["tissue_hires_scalef"] / 2, rtol=1e-3)
    np.testing.assert_array_equal(spots.get_array(), np.asarray(a[:, "FN1"].X).ravel()[nearest])
    assert ((centres >= 0) & (centres < [hires.shape[1], hires.shape[0]])).all()  # on the picture
    plt.close("all")


@pytest.mark.realdata
def test_xarray_and_ome_zarr_read_the_cube(cmu_cube: Path) -> None:
    import xarray as xr
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader
    from ome_zarr_models.v05 import Image

    # the OME-NGFF 0.5 spec as pydantic models: raises on any departure (e.g. axes not named as the array's dims)
    image = Image.from_zarr(zarr.open_group(str(cmu_cube), mode="r"))
    assert [ax.name for ax in image.ome_attributes.multiscales[0].axes] == ["gene", "y", "x"]

    ds = xr.open_zarr(cmu_cube, consolidated=False)
    assert ds["expression"].dims == ("gene", "y", "x")
    assert ds["tissue"].dims == ("y", "x")
    nodes = list(Reader(parse_url(str(cmu_cube)))())
    ms = nodes[0].metadata
    assert [ax["name"] for ax in ms["axes"]] == ["gene", "y", "x"]
    scale = ms["coordinateTransformations"][0][0]["scale"]
    assert scale == [1.0, 50.0, 50.0]
    assert nodes[0].data[0].shape == ds["expression"].shape


MAP_CMAP, MAP_ALPHA, MAX_PX = "magma", 0.75, 1600  # what `plot` draws with by default


def _check_map_on_the_slide(png_path: Path, cube: Path, gene: str) -> None:
    """A gene map as a user sees it: the slide, undistorted; colour drawn over the cells the cube predicted and
    nowhere else (elsewhere the slide shows unchanged); each cell's colour, with the slide under it taken out,
    sits on the colour scale in the order of the cube's values for ``gene``, and the scale is used end to end."""
    from matplotlib import colormaps
    from PIL import Image
    from scipy.stats import spearmanr

    png = np.asarray(Image.open(png_path).convert("RGB")).astype(np.float64)
    g = zarr.open_group(str(cube), mode="r")
    if "qc" in g or "uncertainty" in g:  # the reliability panel sits to the right: the gene map is the left half
        png = png[:, : png.shape[1] // 2]
    meta = g.attrs["wsi_histosge"]
    slide = open_slide(meta["slide"]["path"], mpp=float(meta["mpp"]["x"]))
    w0, h0 = slide.dimensions
    w_um, h_um = w0 * slide.mpp.x, h0 * slide.mpp.y
    values = np.asarray(g["expression"][list(g.attrs["genes"]).index(gene)], dtype=np.float64)
    ny, nx = values.shape
    stride = float(g.attrs["stride_um"])
    ox, oy = g.attrs["origin_um"]
    # the map in the picture: from the first row that is mostly not figure-white, as wide as the coloured run
    # along its top rows and as tall as the run down its left columns: the slide, or the part of it within the
    # lattice's extent (the lattice's cells, squares centred on their spots, need not end where the slide does)
    coloured = png.min(axis=2) < 253
    top = int(np.argmax(coloured.mean(axis=1) > 0.3))
    left = int(np.argmax(coloured[top + 2]))

    def run(line: np.ndarray) -> int:
        return int(np.argmin(line)) if not line.all() else line.size

    w = int(np.median([run(coloured[top + k, left:]) for k in range(2, 12)]))
    h = int(np.median([run(coloured[top:, left + k]) for k in range(2, 12)]))
    lattice = (ox - stride / 2, ox + (nx - 0.5) * stride, oy - stride / 2, oy + (ny - 0.5) * stride)
    extents = [
        (0.0, w_um, 0.0, h_um),
        (max(0.0, lattice[0]), min(w_um, lattice[1]), max(0.0, lattice[2]), min(h_um, lattice[3])),
    ]
    x0, x1, y0, y1 = min(extents, key=lambda e: abs(np.log(w / h * (e[3] - e[2]) / (e[1] - e[0]))))
    assert w / h == pytest.approx((x1 - x0) / (y1 - y0), rel=0.003), f"{png_path.name}: the slide is distorted"
    thumb, thumb_mpp = slide.thumbnail(max(slide.mpp.x, max(w0, h0) * slide.mpp.x / MAX_PX))
    crop = thumb[round(y0 / thumb_mpp) : round(y1 / thumb_mpp), round(x0 / thumb_mpp) : round(x1 / thumb_mpp)]
    under = np.asarray(Image.fromarray(crop).resize((w, h), Image.Resampling.BILINEAR)).astype(np.float64)
    seen = png[top : top + h, left : left + w]
    yy, xx = np.mgrid[0:h, 0:w]
    ix = np.floor((x0 + (xx + 0.5) / w * (x1 - x0) - ox) / stride + 0.5).astype(int)
    iy = np.floor((y0 + (yy + 0.5) / h * (y1 - y0) - oy) / stride + 0.5).astype(int)
    on_lattice = (ix >= 0) & (ix < nx) & (iy >= 0) & (iy < ny)
    cell = np.where(on_lattice, iy.clip(0, ny - 1) * nx + ix.clip(0, nx - 1), -1)
    drawn = on_lattice & np.isfinite(values.ravel()[cell])
    changed = np.abs(seen - under).max(axis=2) > 25
    assert (drawn & changed).sum() / (drawn | changed).sum() > 0.9, f"{png_path.name}: colour off the predicted cells"
    lut = colormaps[MAP_CMAP](np.linspace(0, 1, 256))[:, :3] * 255
    found, truth = [], []
    for k in np.unique(cell[drawn]):
        px = cell == k
        if px.sum() >= 9:  # cells cut by the box edge are too small to read
            rgb = (np.median(seen[px], axis=0) - (1 - MAP_ALPHA) * np.median(under[px], axis=0)) / MAP_ALPHA
            found.append(np.abs(lut - rgb).max(axis=1).argmin())
            truth.append(values.ravel()[k])
    assert len(found) > 100
    assert spearmanr(found, truth)[0] > 0.98, f"{png_path.name}: cell colours do not follow the values of {gene}"
    assert min(found) <= 8 and max(found) >= 247, f"{png_path.name}: the colour scale is not used end to end"


@pytest.mark.realdata
def test_plots_and_cli(cmu_cube: Path, tmp_path: Path) -> None:
    from PIL import Image
    from typer.testing import CliRunner

    from wsi_histosge.cli.app import app

    res = CliRunner().invoke(app, ["plot", str(cmu_cube), "--genes", "FN1,CD74", "--out", str(tmp_path / "maps")])
    assert res.exit_code == 0, res.output
    for gene in ("FN1", "CD74"):
        _check_map_on_the_slide(tmp_path / "maps" / f"{gene}.png", cmu_cube, gene)
    for name in ("genes_grid.png", "qc.png"):
        img = Image.open(tmp_path / "maps" / name)
        assert min(img.size) > 300
    res = CliRunner().invoke(app, ["plot", str(cmu_cube), "--genes", "NOT_A_GENE", "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "NOT_A_GENE" in res.output
    res = CliRunner().invoke(app, ["to-anndata", str(cmu_cube), "--bin-um", "100", "--out", str(tmp_path / "a.h5ad")])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, ["to-anndata", str(cmu_cube), "--bin-um", "100", "--out", str(tmp_path / "a.h5ad")])
    assert res.exit_code == 7  # never silently replaced


@pytest.mark.realdata
def test_run_report_json(cmu_cube: Path) -> None:
    report = json.loads(Path(str(cmu_cube) + ".report.json").read_text())
    assert report["status"] == "complete" and report["spots"] > 100
    assert {"loader_wait", "encoder", "head", "write", "total"} <= set(report["timings_s"])
    assert report["mpp_source"] == "aperio image description (MPP)"


@pytest.mark.realdata
def test_her2st_section_to_h5ad_to_png(tmp_path: Path) -> None:
    """A legacy-ST H&E (plain JPEG, --mpp) through inference, conversion and a plot."""
    import anndata as ad

    from wsi_histosge.infer import InferOptions, infer_slide
    from wsi_histosge.plot import plot_genes

    jpg = need_shared("her2st", "ST-imgs", "C", "C6", "5714_HE_BT_E2.jpg")
    cube = tmp_path / "c6.zarr"
    infer_slide(jpg, cube, InferOptions(mpp=0.6877, stride_um=100.0, num_workers=1))
    a = ad.read_h5ad(to_anndata(cube, tmp_path / "c6.h5ad", resolution="spot"))
    assert a.n_obs > 200
    pngs = plot_genes(cube, ["FN1", "CD74"], tmp_path / "maps")
    assert [p.name for p in pngs] == ["FN1.png", "CD74.png", "genes_grid.png"]
    for gene in ("FN1", "CD74"):
        _check_map_on_the_slide(tmp_path / "maps" / f"{gene}.png", cube, gene)
