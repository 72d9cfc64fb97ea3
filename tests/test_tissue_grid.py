from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from wsi_histosge.grid import make_grid
from wsi_histosge.slide import open_slide
from wsi_histosge.tissue import detect_tissue, load_tissue_mask, mask_to_geojson, write_geojson


def test_detects_the_blob(pyramid_slide: Path) -> None:
    slide = open_slide(pyramid_slide)
    mask = detect_tissue(slide)
    h, w = mask.mask.shape
    assert mask.mask[h // 2, w // 2]  # centre of the blob
    assert not mask.mask[2, 2]  # glass corner
    # blob is an ellipse with semi-axes 1000 x ~1428 px at 0.5 µm/px
    expected_um2 = np.pi * 1000 * (4000 / 2.8) * 0.25
    assert mask.area_um2 == pytest.approx(expected_um2, rel=0.1)


def test_geojson_round_trip_in_level0_px(pyramid_slide: Path, tmp_path: Path) -> None:
    slide = open_slide(pyramid_slide)
    mask = detect_tissue(slide)
    path = write_geojson(mask, tmp_path / "t.geojson")
    gj = json.loads(path.read_text())
    ring = np.asarray(gj["features"][0]["geometry"]["coordinates"][0])
    # polygon spans the blob in level-0 px
    assert ring[:, 0].min() == pytest.approx(2000 - 4000 / 2.8, abs=60)
    assert ring[:, 1].max() == pytest.approx(1500 + 1000, abs=60)
    back = load_tissue_mask(path, slide)
    assert (back.mask == mask.mask).mean() > 0.99


def test_geojson_hole_is_honoured(pyramid_slide: Path, tmp_path: Path) -> None:
    slide = open_slide(pyramid_slide)
    shell = [[0, 0], [4000, 0], [4000, 3000], [0, 3000], [0, 0]]
    hole = [[1000, 1000], [3000, 1000], [3000, 2000], [1000, 2000], [1000, 1000]]
    path = tmp_path / "hole.geojson"
    path.write_text(json.dumps({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [shell, hole]}}))
    mask = load_tissue_mask(path, slide)
    h, w = mask.mask.shape
    assert mask.mask[5, 5] and not mask.mask[h // 2, w // 2]


def test_grid_geometry_and_tissue_filter(pyramid_slide: Path) -> None:
    slide = open_slide(pyramid_slide)
    mask = detect_tissue(slide)
    grid = make_grid(slide, mask, stride_um=50, spot_um=100, context_um=112)
    # 4000 px * 0.5 = 2000 µm wide, first centre at 25 µm -> 40 cells
    assert grid.shape == (30, 40)
    c = grid.centres_level0(np.array([0, 29]), np.array([0, 39]))
    np.testing.assert_allclose(c, [[50, 50], [50 + 39 * 100, 50 + 29 * 100]])
    a = np.asarray(grid.affine_level0())
    np.testing.assert_allclose(a @ [39, 29, 1], [3950, 2950, 1])
    assert grid.keep[15, 20] and not grid.keep[0, 0]
    assert 0 < grid.n_spots < 30 * 40
    # every kept spot lies on the blob
    iy, ix = np.nonzero(grid.keep)
    xy = grid.centres_level0(iy, ix)
    inside = ((xy[:, 1] - 1500) / 1000) ** 2 + ((xy[:, 0] - 2000) / (4000 / 2.8)) ** 2
    assert inside.max() < 1.15


def test_geojson_is_a_featurecollection(pyramid_slide: Path) -> None:
    gj = mask_to_geojson(detect_tissue(open_slide(pyramid_slide)))
    assert gj["type"] == "FeatureCollection" and gj["features"][0]["geometry"]["type"] == "Polygon"
