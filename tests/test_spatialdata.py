"""`to-spatialdata`: the store opened by spatialdata.read_zarr and drawn by spatialdata-plot."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from wsi_histosge import sdata as sdata_module
from wsi_histosge.cli.app import app
from wsi_histosge.convert import to_anndata
from wsi_histosge.infer import InferOptions, infer_slide
from wsi_histosge.slide import open_slide

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "wsi_histosge" / "samples" / "cmu1-skin-crop.tif"  # real H&E, 2 pyramid levels, 0.499 µm/px
runner = CliRunner()
PNG_DIR = os.environ.get("WSI_HISTOSGE_TEST_PNG_DIR")  # set it to keep the rendered pictures for a look


@pytest.fixture(scope="module")
def cube(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sd") / "sample.zarr"
    infer_slide(SAMPLE, out, InferOptions(model=tiny_model, num_workers=0))
    return out


def _cli(*args: str) -> Any:
    return runner.invoke(app, list(args))


@pytest.fixture(scope="module")
def store(cube: Path) -> Path:
    out = cube.parent / "sample.sdata.zarr"
    res = _cli("to-spatialdata", str(cube), "--out", str(out))
    assert res.exit_code == 0, res.output
    return out


def _read(path: Path) -> Any:
    import spatialdata as sd

    return sd.read_zarr(path)


def test_read_zarr_finds_image_shapes_and_table(store: Path, cube: Path, tmp_path: Path) -> None:
    import anndata as ad
    import geopandas as gpd
    import xarray as xr
    from spatialdata.models import get_table_keys

    data = _read(store)
    assert set(data.images) == {"slide"} and set(data.shapes) == {"bins"} and set(data.tables) == {"table"}
    image, shapes, table = data.images["slide"], data.shapes["bins"], data.tables["table"]
    assert isinstance(image, xr.DataTree) and isinstance(shapes, gpd.GeoDataFrame)
    # the table annotates the shapes, one row per square
    region, region_key, instance_key = get_table_keys(table)
    assert (region, region_key, instance_key) == ("bins", "region", "instance_id")
    assert (shapes.geom_type == "Polygon").all() and len(shapes) == table.n_obs
    assert sorted(shapes.index) == sorted(table.obs["instance_id"])
    # ... and holds what `to-anndata` writes for the same cube
    ref = ad.read_h5ad(to_anndata(cube, tmp_path / "ref.h5ad"))
    np.testing.assert_array_equal(np.asarray(table.X), ref.X)
    assert list(table.obs_names) == list(ref.obs_names) and list(table.var_names) == list(ref.var_names)
    np.testing.assert_array_equal(table.obsm["spatial"], ref.obsm["spatial"])
    lib = next(iter(table.uns["spatial"]))
    assert (
        "images" not in table.uns["spatial"][lib]
        and "spot_diameter_fullres" in table.uns["spatial"][lib]["scalefactors"]
    )
    assert data.attrs["wsi_histosge_spatialdata"]["layout"] == "grid"


def test_the_image_is_the_slide_pyramid_level_by_level(store: Path) -> None:
    from spatialdata.transformations import Identity, get_transformation

    image = _read(store).images["slide"]
    slide = open_slide(SAMPLE)
    assert list(image.keys()) == ["scale0", "scale1"]
    for level, key in enumerate(["scale0", "scale1"]):
        arr = image[key]["image"]
        w, h = slide.level_dimensions[level]
        assert arr.shape == (3, h, w) and arr.dtype == np.uint8
        ds = slide.level_downsamples[level]
        y, x = h // 3, w // 2
        patch = np.asarray(arr[:, y : y + 40, x : x + 50]).transpose(1, 2, 0)
        np.testing.assert_array_equal(patch, slide.read_region((int(x * ds), int(y * ds)), level, (50, 40)))
    assert isinstance(get_transformation(image, "global"), Identity)
    um = get_transformation(image, "micrometers").to_affine_matrix(("x", "y"), ("x", "y"))
    np.testing.assert_allclose(np.diag(um)[:2], [slide.mpp.x, slide.mpp.y])


def test_transformations_put_a_known_bin_at_its_micrometres(store: Path) -> None:
    import spatialdata as sd
    from spatialdata.transformations import get_transformation

    data = _read(store)
    shapes, table = data.shapes["bins"], data.tables["table"]
    i = table.n_obs // 2
    row = table.obs.iloc[i]
    square = shapes.loc[int(row["instance_id"])].geometry
    # global: level-0 px, where obsm['spatial'] puts the bin; a square of the bin's side (20 µm / 0.499 µm/px)
    np.testing.assert_allclose([square.centroid.x, square.centroid.y], table.obsm["spatial"][i], atol=1e-6)
    side_px = 20.0 / 0.499
    np.testing.assert_allclose(np.ptp(np.asarray(square.exterior.coords), axis=0), [side_px, side_px], rtol=1e-9)
    # micrometers: the obs centre in µm, a 20 µm square
    um = sd.transform(shapes, to_coordinate_system="micrometers").loc[int(row["instance_id"])].geometry
    np.testing.assert_allclose([um.centroid.x, um.centroid.y], [row["x_um"], row["y_um"]], atol=1e-3)
    np.testing.assert_allclose(np.ptp(np.asarray(um.exterior.coords), axis=0), [20.0, 20.0], rtol=1e-6)
    # the image's pixel under the bin goes to the same µm
    image = data.images["slide"]
    to_um = get_transformation(image, "micrometers").to_affine_matrix(("x", "y"), ("x", "y"))
    np.testing.assert_allclose((to_um @ [*table.obsm["spatial"][i], 1.0])[:2], [row["x_um"], row["y_um"]], atol=1e-3)
    to_px = get_transformation(image, "global").to_affine_matrix(("x", "y"), ("x", "y"))
    np.testing.assert_allclose(to_px, np.eye(3))


def _render(data: Any, element: str | None, gene: str, path: Path) -> tuple[np.ndarray, Any]:
    """What spatialdata-plot draws (RGBA array) and the axes, for the image alone or with ``element`` coloured by
    ``gene``."""
    import matplotlib

    matplotlib.use("Agg")
    import spatialdata_plot  # noqa: F401  (registers the .pl accessor)

    pl = data.pl.render_images("slide")
    if element is not None:
        pl = pl.pl.render_shapes(element, color=gene, fill_alpha=1.0, cmap="viridis")
    ax = pl.pl.show(coordinate_systems="global", return_ax=True, figsize=(5, 6), dpi=100)
    fig = ax.figure
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba()).copy()
    fig.savefig(path)
    return rgba, ax


@pytest.mark.parametrize(("layout", "element"), [("grid", "bins"), ("visium", "spots")])
def test_spatialdata_plot_draws_a_gene_over_the_slide(cube: Path, tmp_path: Path, layout: str, element: str) -> None:
    import matplotlib.pyplot as plt
    from matplotlib import colormaps
    from scipy.stats import spearmanr

    out = tmp_path / f"{layout}.zarr"
    res = _cli("to-spatialdata", str(cube), "--layout", layout, "--out", str(out))
    assert res.exit_code == 0, res.output
    data = _read(out)
    png_dir = Path(PNG_DIR) if PNG_DIR else tmp_path
    base, _ = _render(data, None, "G3", png_dir / f"sdata_{layout}_image.png")
    drawn, ax = _render(data, element, "G3", png_dir / f"sdata_{layout}_G3.png")
    plt.close("all")
    # the slide is there: H&E, not a blank canvas
    rgb = base[..., :3].astype(np.float64)
    tissue = (rgb.max(axis=2) - rgb.min(axis=2) > 40) & (rgb[..., 0] > rgb[..., 1])  # pink-purple pixels
    assert tissue.mean() > 0.2, "the slide image is not drawn"
    # each shape's centre shows the viridis colour of its G3 value (fill_alpha 1): read them back, by rank
    table = data.tables["table"]
    values = np.asarray(table[:, "G3"].X).ravel()
    px = ax.transData.transform(table.obsm["spatial"])
    height = drawn.shape[0]
    lut = colormaps["viridis"](np.linspace(0, 1, 256))[:, :3] * 255
    found = []
    for x, y in px:
        colour = drawn[round(height - y), round(x), :3].astype(np.float64)
        found.append(np.abs(lut - colour).max(axis=1).argmin())
        assert np.abs(lut[found[-1]] - colour).max() < 12, "a shape is not coloured from the colour map"
    assert spearmanr(found, values)[0] > 0.97
    assert min(found) <= 10 and max(found) >= 245  # the scale is used end to end
    changed = np.abs(drawn[..., :3].astype(int) - base[..., :3].astype(int)).max(axis=2) > 30
    assert 0.05 < changed.mean() < 0.9  # colour over the bins, the slide elsewhere


def test_visium_spots_are_55_um_circles(cube: Path, tmp_path: Path) -> None:
    import spatialdata as sd

    out = tmp_path / "v.zarr"
    assert _cli("to-spatialdata", str(cube), "--layout", "visium", "--out", str(out)).exit_code == 0
    data = _read(out)
    spots, table = data.shapes["spots"], data.tables["table"]
    assert (spots.geom_type == "Point").all()
    np.testing.assert_allclose(spots["radius"], 27.5 / 0.499)
    um = sd.transform(spots, to_coordinate_system="micrometers")
    np.testing.assert_allclose(um["radius"], 27.5, rtol=1e-6)
    first = table.obs.iloc[0]
    point = um.loc[int(first["instance_id"])].geometry
    np.testing.assert_allclose([point.x, point.y], [first["x_um"], first["y_um"]], atol=1e-3)
    assert ((table.obs["array_row"] % 2) == (table.obs["array_col"] % 2)).all()


def test_the_image_levels_follow_the_slide_and_the_cap(
    tiny_model: Path, pyramid_slide: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 3-level slide (4000 x 3000 px at 0.5 µm/px): every level; from level 1 with --image-mpp 1; and an extra
    thumbnail level when the coarsest level is longer than THUMB_MAX_PX."""
    from spatialdata.transformations import get_transformation

    cube = tmp_path / "p.zarr"
    infer_slide(pyramid_slide, cube, InferOptions(model=tiny_model, num_workers=0, stride_um=100.0))
    assert _cli("to-spatialdata", str(cube), "--out", str(tmp_path / "a.zarr")).exit_code == 0
    image = _read(tmp_path / "a.zarr").images["slide"]
    assert [image[k]["image"].shape for k in image] == [(3, 3000, 4000), (3, 1500, 2000), (3, 750, 1000)]
    res = _cli("to-spatialdata", str(cube), "--image-mpp", "1", "--out", str(tmp_path / "b.zarr"))
    assert res.exit_code == 0, res.output
    data = _read(tmp_path / "b.zarr")
    image = data.images["slide"]
    assert [image[k]["image"].shape for k in image] == [(3, 1500, 2000), (3, 750, 1000)]
    to_global = get_transformation(image, "global").to_affine_matrix(("x", "y"), ("x", "y"))
    np.testing.assert_allclose(np.diag(to_global)[:2], [2.0, 2.0])  # scale0 is level 1: 2 level-0 px per px
    to_um = get_transformation(image, "micrometers").to_affine_matrix(("x", "y"), ("x", "y"))
    np.testing.assert_allclose(np.diag(to_um)[:2], [1.0, 1.0])
    monkeypatch.setattr(sdata_module, "THUMB_MAX_PX", 500)
    assert _cli("to-spatialdata", str(cube), "--out", str(tmp_path / "c.zarr")).exit_code == 0
    image = _read(tmp_path / "c.zarr").images["slide"]
    assert [image[k]["image"].shape for k in image][-1] == (3, 375, 500)


def test_outputs_are_never_replaced_unless_ours_and_asked(store: Path, cube: Path, tmp_path: Path) -> None:
    res = _cli("to-spatialdata", str(cube), "--out", str(store))
    assert res.exit_code == 7 and "--overwrite" in res.output
    res = _cli("to-spatialdata", str(cube), "--out", str(store), "--overwrite")
    assert res.exit_code == 0, res.output
    _read(store)
    foreign = tmp_path / "mine.zarr"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    res = _cli("to-spatialdata", str(cube), "--out", str(foreign), "--overwrite")
    assert res.exit_code == 7 and "not a SpatialData store written by wsi-histosge" in res.output
    assert (foreign / "keep.txt").read_text() == "x"
    res = _cli("to-spatialdata", str(cube), "--out", str(cube), "--overwrite")  # the cube itself
    assert res.exit_code == 2, res.output
    assert _cli("verify", str(cube)).exit_code == 0
    res = _cli("to-spatialdata", str(cube), "--out", str(tmp_path / "x.zarr"), "--image-mpp", "-1")
    assert res.exit_code == 2 and "--image-mpp" in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.zarr"]  # no temporary left behind


def test_without_spatialdata_the_error_names_the_install(cube: Path, tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['spatialdata'] = None\n"
        "from wsi_histosge.cli.app import main\n"
        f"sys.argv = ['wsi-histosge', 'to-spatialdata', {str(cube)!r}, '--out', {str(tmp_path / 'x.zarr')!r}]\n"
        "main()\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 2, res.stderr + res.stdout
    assert "pip install 'wsi-histosge[spatialdata]'" in res.stdout + res.stderr
    assert not (tmp_path / "x.zarr").exists()
