"""Bins of any size and the Visium layout (`to-anndata --bin-um 75`, `--layout visium`), checked against overlaps
computed by hand, and read by anndata, scanpy and squidpy."""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from wsi_histosge.bins import VISIUM_ROW_UM, Layout, disc_rect_area, square_bins, stream_means, visium_spots
from wsi_histosge.cli.app import app
from wsi_histosge.convert import to_anndata
from wsi_histosge.infer import InferOptions, infer_slide
from wsi_histosge.store import read_cube

runner = CliRunner()
R = 27.5  # Visium spot radius, µm


def _segment(d: float, r: float = R) -> float:
    """Area of the part of a disc of radius r beyond a chord at distance d from its centre (textbook formula)."""
    return r * r * math.acos(d / r) - d * math.sqrt(r * r - d * d)


@pytest.fixture(scope="module")
def cube(tiny_model: Path, pyramid_slide: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic slide (2 x 1.5 mm, an elliptical blob of tissue) at a 50 µm stride: 40 x 30 cells."""
    out = tmp_path_factory.mktemp("bins") / "c.zarr"
    infer_slide(pyramid_slide, out, InferOptions(model=tiny_model, num_workers=0, stride_um=50.0))
    return out


def _cells(cube: Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(linear-space expression (genes, y, x) float64 with NaN off tissue, tissue, attrs) straight from the Zarr."""
    g = zarr.open_group(str(cube), mode="r")
    tissue = np.asarray(g["tissue"][:]).astype(bool)
    lin = np.expm1(np.asarray(g["expression"][:], dtype=np.float64))
    lin[:, ~tissue] = np.nan
    return lin, tissue, dict(g.attrs)


def _convert(cube: Path, out: Path, *args: str) -> Any:
    import anndata as ad

    res = runner.invoke(app, ["to-anndata", str(cube), *args, "--out", str(out)])
    assert res.exit_code == 0, res.output
    return ad.read_h5ad(out)


def _row(a: Any, name: str) -> int:
    return int(np.flatnonzero(a.obs_names == name)[0])


# -- square bins of 1.5 strides ------------------------------------------------------------------------------
def test_a_bin_of_one_and_a_half_strides_weights_the_cells_it_overlaps(cube: Path, tmp_path: Path) -> None:
    """75 µm bins on a 50 µm lattice: bin c spans cells [1.5 c - 0.5, 1.5 c + 1] along x (likewise r along y).
    Bin 2m starts on a cell edge (cell 3m whole, 3m + 1 half); bin 2m + 1 starts mid-cell (3m + 1 half, 3m + 2
    whole)."""
    a = _convert(cube, tmp_path / "b.h5ad", "--bin-um", "75")
    lin, tissue, attrs = _cells(cube)
    by_hand = {
        (10, 12): {(15, 18): 1.0, (15, 19): 0.5, (16, 18): 0.5, (16, 19): 0.25},  # bin on the cell edges
        (11, 13): {(16, 19): 0.25, (16, 20): 0.5, (17, 19): 0.5, (17, 20): 1.0},  # offset bin: starts mid-cell
    }
    for (r, c), weights in by_hand.items():
        assert all(tissue[cell] for cell in weights)
        i = _row(a, f"bin_{r}_{c}")
        w = np.array(list(weights.values()))
        values = np.stack([lin[:, iy, ix] for iy, ix in weights], axis=1)
        expected = np.log1p(values @ w / w.sum())
        np.testing.assert_allclose(a.X[i], expected, rtol=1e-5, atol=1e-6)
        assert not np.allclose(a.X[i], np.log1p(values.mean(axis=1)), atol=1e-4)  # not the unweighted mean
        assert not np.allclose(a.X[i], np.log1p(values).mean(axis=1), atol=1e-4)  # nor the log-space mean
        assert a.obs["n_cells"].iloc[i] == 4 and a.obs["tissue_fraction"].iloc[i] == pytest.approx(1.0)
        assert (a.obs["array_row"].iloc[i], a.obs["array_col"].iloc[i]) == (r, c)
        # centre: the bin's middle, in µm from the slide's corner and in level-0 px (0.5 µm/px)
        assert a.obs["x_um"].iloc[i] == pytest.approx(75.0 * c + 37.5)
        assert a.obs["y_um"].iloc[i] == pytest.approx(75.0 * r + 37.5)
        np.testing.assert_allclose(a.obsm["spatial"][i], [(75.0 * c + 37.5) / 0.5, (75.0 * r + 37.5) / 0.5])
    sf = a.uns["spatial"][next(iter(a.uns["spatial"]))]["scalefactors"]
    assert sf["spot_diameter_fullres"] == pytest.approx(150.0) and sf["bin_size_um"] == 75.0
    assert a.uns["wsi_histosge"]["layout"] == "grid" and a.uns["wsi_histosge"]["bin_cells"] == 1.5
    assert attrs["stride_um"] == 50.0


def test_a_bin_at_the_tissue_edge_averages_only_the_predicted_cells(cube: Path, tmp_path: Path) -> None:
    a = _convert(cube, tmp_path / "b.h5ad", "--bin-um", "75")
    lin, tissue, _ = _cells(cube)
    k = 1.5
    found = 0
    for i in range(a.n_obs):
        r, c = int(a.obs["array_row"].iloc[i]), int(a.obs["array_col"].iloc[i])
        # overlaps by hand along each axis: cell j gets |[j - .5, j + .5] n [k c - .5, k (c + 1) - .5]|
        wy = {j: min(j + 0.5, k * (r + 1) - 0.5) - max(j - 0.5, k * r - 0.5) for j in range(30)}
        wx = {j: min(j + 0.5, k * (c + 1) - 0.5) - max(j - 0.5, k * c - 0.5) for j in range(40)}
        cells = {(y, x): wy[y] * wx[x] for y in wy for x in wx if wy[y] > 0 and wx[x] > 0}
        inside = {cell: w for cell, w in cells.items() if tissue[cell]}
        if len(inside) == len(cells):
            continue
        found += 1
        w = np.array(list(inside.values()))
        values = np.stack([lin[:, y, x] for y, x in inside], axis=1)
        np.testing.assert_allclose(a.X[i], np.log1p(values @ w / w.sum()), rtol=1e-5, atol=1e-6)
        assert a.obs["n_cells"].iloc[i] == len(inside)
        assert a.obs["tissue_fraction"].iloc[i] == pytest.approx(w.sum() / k**2, rel=1e-6)
    assert found > 10
    assert np.isfinite(a.X).all()


def test_whole_multiples_keep_the_integer_path_and_the_weighted_path_agrees(cube: Path, tmp_path: Path) -> None:
    a = _convert(cube, tmp_path / "b.h5ad", "--bin-um", "100")
    assert a.uns["wsi_histosge"]["bin_cells"] == 2 and "layout" not in a.uns["wsi_histosge"]  # as before
    c = read_cube(cube)
    layout = square_bins(c.tissue.shape, 2.0)
    index = {(int(r), int(col)): i for i, (r, col) in enumerate(zip(layout.array_row, layout.array_col, strict=True))}
    rows = [index[int(r), int(col)] for r, col in zip(a.obs["array_row"], a.obs["array_col"], strict=True)]
    bands = list(stream_means(c, layout, np.asarray(rows), band_mb=0.01))  # many small bands
    assert len(bands) > 5
    np.testing.assert_allclose(np.concatenate([b.means for b in bands]), a.X, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.concatenate([b.valued_cells for b in bands]), a.obs["n_cells"])


def test_small_bands_give_the_same_file(cube: Path, tmp_path: Path) -> None:
    import anndata as ad

    a = _convert(cube, tmp_path / "a.h5ad", "--bin-um", "75")
    b = ad.read_h5ad(to_anndata(cube, tmp_path / "b.h5ad", resolution=75.0, band_mb=0.005))
    np.testing.assert_array_equal(a.X, b.X)
    assert list(a.obs_names) == list(b.obs_names)


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--bin-um", "30"], ["--bin-um 30", "finer", "50"]),
        (["--layout", "visium", "--bin-um", "100"], ["--layout visium", "--bin-um"]),
        (["--layout", "hex"], ["--layout", "grid or visium"]),
    ],
)
def test_bins_that_make_no_sense_are_refused(cube: Path, tmp_path: Path, args: list[str], words: list[str]) -> None:
    res = runner.invoke(app, ["to-anndata", str(cube), *args, "--out", str(tmp_path / "x.h5ad")])
    assert res.exit_code == 2, res.output
    assert all(w in res.output for w in words), res.output
    assert not (tmp_path / "x.h5ad").exists()


# -- Visium ----------------------------------------------------------------------------------------------------
def _one_spot(cx: float, cy: float, stride_um: float) -> Layout:
    """One 55 µm spot centred at (cx, cy) in cell units on a 20 x 20 lattice of ``stride_um`` cells."""
    zero = np.zeros(1, np.int32)
    return Layout("circle", 2 * R / stride_um, np.array([cx]), np.array([cy]), zero, zero, (20, 20))


def _areas(layout: Layout, spot: int, stride_um: float) -> dict[tuple[int, int], float]:
    _pos, iy, ix, w = layout.overlaps(np.array([spot]))
    return {(int(y), int(x)): float(a) * stride_um**2 for y, x, a in zip(iy, ix, w, strict=True)}


def test_disc_cell_overlaps_by_hand() -> None:
    """Which cells a 55 µm spot covers, and how much of each, at hand-computable positions."""
    big = 1e3
    assert disc_rect_area(np.array(0.0), np.array(0.0), R, -big, big, -big, big) == pytest.approx(math.pi * R * R)
    # 50 µm cells, spot on a cell's centre: the centre cell holds the disc but four segments beyond its edges
    # (25 µm from the centre), each edge neighbour one segment, the corner cells nothing
    got = _areas(_one_spot(5.0, 5.0, 50.0), 0, 50.0)
    seg = _segment(25.0)
    expected = {(5, 5): math.pi * R * R - 4 * seg, (4, 5): seg, (6, 5): seg, (5, 4): seg, (5, 6): seg}
    assert got.keys() == expected.keys()
    for cell, area in expected.items():
        assert got[cell] == pytest.approx(area, rel=1e-9)
    # on a cell corner: a quarter of the disc in each of the four cells around it
    got = _areas(_one_spot(5.5, 5.5, 50.0), 0, 50.0)
    assert sorted(got) == [(5, 5), (5, 6), (6, 5), (6, 6)]
    np.testing.assert_allclose(list(got.values()), math.pi * R * R / 4)
    # on the middle of a cell's right edge: half the disc each side, less the segments beyond the cells' top
    # and bottom edges (25 µm away), which fall in the four cells above and below
    got = _areas(_one_spot(5.5, 5.0, 50.0), 0, 50.0)
    half_seg = seg / 2
    assert got[(5, 5)] == pytest.approx(math.pi * R * R / 2 - 2 * half_seg) == got[(5, 6)]
    for cell in [(4, 5), (4, 6), (6, 5), (6, 6)]:
        assert got[cell] == pytest.approx(half_seg)
    assert len(got) == 6
    # spot (0, 0) of the layout sits on the lattice's top-left corner: one cell inside the lattice, a quarter disc
    layout = visium_spots((20, 20), 50.0)
    spot = int(np.flatnonzero((layout.array_row == 0) & (layout.array_col == 0))[0])
    assert _areas(layout, spot, 50.0) == pytest.approx({(0, 0): math.pi * R * R / 4})
    # 100 µm cells: a spot on a cell's centre lies inside it
    assert _areas(_one_spot(3.0, 4.0, 100.0), 0, 100.0) == pytest.approx({(4, 3): math.pi * R * R})


def test_visium_lattice_geometry() -> None:
    layout = visium_spots((30, 40), 50.0)
    assert ((layout.array_row % 2) == (layout.array_col % 2)).all()  # Space Ranger: even rows, even columns
    x_um, y_um = (layout.cx + 0.5) * 50, (layout.cy + 0.5) * 50  # from the lattice's top-left corner
    np.testing.assert_allclose(x_um, 50.0 * layout.array_col)
    np.testing.assert_allclose(y_um, 100 * math.sqrt(3) / 2 * layout.array_row)
    assert round(VISIUM_ROW_UM, 4) == 86.6025
    xy = np.stack([x_um, y_um], axis=1)
    d = np.linalg.norm(xy[:, None] - xy[None], axis=2)
    np.fill_diagonal(d, np.inf)
    assert d.min() == pytest.approx(100.0)  # centre to centre
    interior = (x_um > 150) & (x_um < 1850) & (y_um > 150) & (y_um < 1350)
    assert ((np.abs(d[interior] - 100.0) < 1e-6).sum(axis=1) == 6).all()  # a hexagonal lattice
    # the layout covers the extent: every point of the 2000 x 1500 µm lattice is within 100 / sqrt(3) of a centre
    pts = np.stack(np.meshgrid(np.linspace(0, 2000, 81), np.linspace(0, 1500, 61)), axis=-1).reshape(-1, 2)
    assert np.linalg.norm(pts[:, None] - xy[None], axis=2).min(axis=1).max() <= 100 / math.sqrt(3) + 1e-6


def _disc_weights_by_sampling(x_um: float, y_um: float, stride: float, n: int = 600) -> dict[tuple[int, int], float]:
    """Areas (µm^2) a spot shares with each cell, by counting sample points: independent of bins.py's formula."""
    s = (np.arange(n) + 0.5) / n * 2 * R - R
    px, py = np.meshgrid(x_um + s, y_um + s)
    inside = (px - x_um) ** 2 + (py - y_um) ** 2 <= R * R
    ix, iy = np.floor(px[inside] / stride).astype(int), np.floor(py[inside] / stride).astype(int)
    cells, counts = np.unique(np.stack([iy, ix], axis=1), axis=0, return_counts=True)
    return {(int(a), int(b)): float(k) * (2 * R / n) ** 2 for (a, b), k in zip(cells, counts, strict=True)}


@pytest.fixture(scope="module")
def visium_h5ad(cube: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("visium") / "v.h5ad"
    res = runner.invoke(app, ["to-anndata", str(cube), "--layout", "visium", "--out", str(out)])
    assert res.exit_code == 0, res.output
    return out


def test_visium_spots_average_the_cells_under_their_disc(visium_h5ad: Path, cube: Path) -> None:
    import anndata as ad

    a = ad.read_h5ad(visium_h5ad)
    lin, tissue, _ = _cells(cube)
    assert a.obs_names.name == "barcode" and a.obs_names[0].startswith("spot_")
    assert ((a.obs["array_row"] % 2) == (a.obs["array_col"] % 2)).all()
    np.testing.assert_allclose(a.obs["x_um"], 50.0 * a.obs["array_col"], atol=1e-3)
    np.testing.assert_allclose(a.obs["y_um"], VISIUM_ROW_UM * a.obs["array_row"], atol=1e-3)
    np.testing.assert_allclose(a.obsm["spatial"], a.obs[["x_um", "y_um"]].to_numpy() / 0.5, atol=1e-2)
    checked = 0
    for i in np.random.default_rng(0).choice(a.n_obs, 25, replace=False):
        x, y = float(a.obs["x_um"].iloc[i]), float(a.obs["y_um"].iloc[i])
        weights = {c: w for c, w in _disc_weights_by_sampling(x, y, 50.0).items() if tissue[c]}
        w = np.array(list(weights.values()))
        values = np.stack([lin[:, cy, cx] for cy, cx in weights], axis=1)
        np.testing.assert_allclose(a.X[i], np.log1p(values @ w / w.sum()), rtol=2e-3, atol=2e-3)
        assert a.obs["n_cells"].iloc[i] == len(weights)
        assert a.obs["tissue_fraction"].iloc[i] == pytest.approx(w.sum() / (math.pi * R * R), abs=5e-3)
        checked += 1
    assert checked == 25
    sf = a.uns["spatial"][next(iter(a.uns["spatial"]))]["scalefactors"]
    # Space Ranger's convention: spot_diameter_fullres spans a theoretical 65 µm spot
    assert sf["spot_diameter_fullres"] == pytest.approx(65.0 / 0.5)
    assert sf["spot_diameter_um"] == 55.0 and sf["spot_pitch_um"] == 100.0
    assert a.uns["wsi_histosge"]["layout"] == "visium"


def test_scanpy_and_squidpy_read_the_visium_layout(visium_h5ad: Path, tmp_path: Path) -> None:
    import anndata as ad
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import scanpy as sc
    import squidpy as sq

    a = ad.read_h5ad(visium_h5ad)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        sq.gr.spatial_neighbors(a, coord_type="grid", n_neighs=6)
    degrees = np.asarray(a.obsp["spatial_connectivities"].sum(axis=1)).ravel()
    xy = a.obsm["spatial"]
    d = np.linalg.norm(xy[:, None] - xy[None], axis=2)
    surrounded = (np.abs(d - 200.0) < 0.5).sum(axis=1) == 6  # all six lattice neighbours (100 µm = 200 px) kept
    assert surrounded.sum() > 20
    assert (degrees[surrounded] == 6).all()  # interior spots: 6 neighbours, as on Visium
    np.testing.assert_array_equal(a.obsp["spatial_distances"][surrounded].data, 1.0)  # one ring out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        sq.gr.spatial_neighbors(a, coord_type="generic", radius=1.05 * 200.0)  # radius: the pitch, in px
    assert (np.asarray(a.obsp["spatial_connectivities"].sum(axis=1)).ravel()[surrounded] == 6).all()
    np.testing.assert_allclose(a.obsp["spatial_distances"][surrounded].data, 200.0, rtol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        (ax,) = sc.pl.spatial(a, color="G1", show=False)
    lib = next(iter(a.uns["spatial"]))
    sf = a.uns["spatial"][lib]["scalefactors"]
    (spots,) = ax.collections
    boxes = np.array([[p.vertices.min(axis=0), p.vertices.max(axis=0)] for p in spots.get_paths()])
    centres, want = boxes.mean(axis=1), xy * sf["tissue_hires_scalef"]
    nearest = np.linalg.norm(centres[:, None] - want[None], axis=2).argmin(axis=1)
    assert sorted(nearest) == list(range(a.n_obs))  # every spot drawn once, where it is
    np.testing.assert_allclose(centres, want[nearest], atol=0.01)
    radii = (boxes[:, 1] - boxes[:, 0]) / 2
    np.testing.assert_allclose(radii, sf["spot_diameter_fullres"] * sf["tissue_hires_scalef"] / 2, rtol=1e-3)
    np.testing.assert_array_equal(spots.get_array(), np.asarray(a[:, "G1"].X).ravel()[nearest])
    ax.figure.savefig(Path(os.environ.get("WSI_HISTOSGE_TEST_PNG_DIR", tmp_path)) / "visium_scanpy.png", dpi=80)
    plt.close("all")


def test_the_spots_of_a_real_run_line_up(cube: Path, tmp_path: Path) -> None:
    """--visium-positions: a Space Ranger run's tissue_positions.csv (pixels of the slide's level 0) gives the
    spots, barcodes and indices; values are the same area-weighted means at those centres."""
    import json

    import pandas as pd

    rng = np.random.default_rng(1)
    rows, cols = np.meshgrid(np.arange(16), np.arange(38), indexing="ij")
    on = (rows % 2) == (cols % 2)
    rows, cols = rows[on], cols[on]
    x_um, y_um = 17.0 + 50.0 * cols, 23.0 + VISIUM_ROW_UM * rows  # not on the generated lattice
    frame = pd.DataFrame(
        {
            "barcode": [f"AC{r:03d}{c:03d}-1" for r, c in zip(rows, cols, strict=True)],
            "in_tissue": rng.integers(0, 2, len(rows)),
            "array_row": rows,
            "array_col": cols,
            "pxl_row_in_fullres": y_um / 0.5,
            "pxl_col_in_fullres": x_um / 0.5,
        }
    ).sample(frac=1.0, random_state=0)  # any row order
    spatial = tmp_path / "outs" / "spatial"
    spatial.mkdir(parents=True)
    frame.to_csv(spatial / "tissue_positions.csv", index=False)
    (spatial / "scalefactors_json.json").write_text(json.dumps({"spot_diameter_fullres": 65.0 / 0.5}))
    a = _convert(cube, tmp_path / "run.h5ad", "--visium-positions", str(spatial / "tissue_positions.csv"))
    lin, tissue, _ = _cells(cube)
    by_barcode = frame.set_index("barcode")
    assert 20 < a.n_obs < len(frame) and a.obs_names.name == "barcode"
    assert list(a.obs_names) == sorted(a.obs_names)  # raster order: by row, then column
    got = by_barcode.loc[list(a.obs_names)]
    np.testing.assert_array_equal(a.obs["array_row"], got["array_row"])
    np.testing.assert_array_equal(a.obs["array_col"], got["array_col"])
    np.testing.assert_array_equal(a.obs["in_tissue"], got["in_tissue"])
    np.testing.assert_allclose(a.obsm["spatial"], got[["pxl_col_in_fullres", "pxl_row_in_fullres"]], atol=1e-6)
    for i in rng.choice(a.n_obs, 10, replace=False):
        x, y = float(a.obs["x_um"].iloc[i]), float(a.obs["y_um"].iloc[i])
        weights = {c: w for c, w in _disc_weights_by_sampling(x, y, 50.0).items() if tissue[c]}
        w = np.array(list(weights.values()))
        values = np.stack([lin[:, cy, cx] for cy, cx in weights], axis=1)
        np.testing.assert_allclose(a.X[i], np.log1p(values @ w / w.sum()), rtol=2e-3, atol=2e-3)
    # positions of another image (twice the pixels per µm) are refused, naming the reason
    (spatial / "scalefactors_json.json").write_text(json.dumps({"spot_diameter_fullres": 65.0 / 0.25}))
    res = runner.invoke(
        app,
        [
            "to-anndata",
            str(cube),
            "--visium-positions",
            str(spatial / "tissue_positions.csv"),
            "--out",
            str(tmp_path / "x.h5ad"),
        ],
    )
    assert res.exit_code == 2 and "another image" in res.output, res.output
    assert not (tmp_path / "x.h5ad").exists()


# -- memory ----------------------------------------------------------------------------------------------------
def _flat_cube(path: Path, slide: Path, n: int, genes: int) -> Path:
    """An n x n lattice (10 µm stride), every cell tissue, every value 1.0 (log1p): every bin's mean is 1.0."""
    from wsi_histosge.store import ATTR_KEY, CubeStore

    stride, mpp = 10.0, 0.5
    attrs = {
        ATTR_KEY: {
            "slide": {"path": str(slide), "dimensions": [800, 800], "fingerprint": "synthetic"},
            "mpp": {"x": mpp, "y": mpp, "source": "test"},
        },
        "genes": [f"G{i}" for i in range(genes)],
        "units": "log1p(counts per 10k)",
        "stride_um": stride,
        "spot_um": 2 * stride,
        "context_um": 56.0,
        "origin_um": [stride / 2, stride / 2],
        "affine_level0": [[stride / mpp, 0.0, stride / 2 / mpp], [0.0, stride / mpp, stride / 2 / mpp], [0, 0, 1]],
    }
    tissue = np.ones((n, n), dtype=bool)
    store, _ = CubeStore.open_for_run(
        path, fingerprint="flat", shape=(genes, n, n), attrs=attrs, tissue=tissue, tissue_fraction=tissue
    )
    ones = np.ones((genes, 64, 64), dtype=np.float16)
    for cy in range(-(-n // 64)):
        for cx in range(-(-n // 64)):
            store.write_chunk(cy, cx, ones[:, : min(64, n - cy * 64), : min(64, n - cx * 64)])
    store.mark_complete("flat", {})
    return path


@pytest.mark.parametrize("layout", ["grid", "visium"])
def test_area_weighted_bins_stream_in_bounded_memory(tmp_path: Path, layout: str) -> None:
    """Memory does not follow the cube: a 640 x 640 x 16-gene cube (25 MiB as float32) converts within a small
    margin of a 64 x 64 one."""
    import tracemalloc

    import anndata as ad

    from tests.conftest import synthetic_tissue, write_pyramid

    slide = write_pyramid(tmp_path / "s.tif", synthetic_tissue(800, 800), levels=1)
    genes = 16
    peaks = {}
    for n in (64, 640):
        cube = _flat_cube(tmp_path / f"c{n}.zarr", slide, n, genes)
        out = tmp_path / f"c{n}.h5ad"
        tracemalloc.start()
        try:
            if layout == "grid":
                to_anndata(cube, out, resolution=105.0, band_mb=0.25)  # 10.5 strides: area weights
            else:
                to_anndata(cube, out, layout="visium", band_mb=0.25)
            peaks[n] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        a = ad.read_h5ad(out)
        np.testing.assert_allclose(a.X, 1.0, rtol=1e-6)
        assert a.n_obs > (30 if n == 640 else 0)
    assert peaks[640] - peaks[64] < 0.2 * genes * 640 * 640 * 4, peaks
