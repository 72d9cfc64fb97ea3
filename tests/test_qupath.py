"""`to-qupath`: bins as QuPath detections, checked against what QuPath's GeoJSON importer reads.

QuPath itself (a Java desktop application) is not installable from the package registries here, so
:func:`qupath_objects` restates, rule by rule, what its importer accepts (qupath-core ``PathIO.readObjects``,
``PathObjectTypeAdapters.PathObjectTypeAdapter.read``, ``MeasurementListTypeAdapter.read``,
``GsonTools.PathClassTypeAdapter.read``, ``ROITypeAdapters.parseGeometry``) and what it makes of each feature,
and every file the command writes is read through it.
"""

from __future__ import annotations

import json
import math
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from wsi_histosge.cli.app import app
from wsi_histosge.infer import InferOptions, infer_slide
from wsi_histosge.qupath import SPOTS_MEASUREMENT, to_qupath

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "wsi_histosge" / "samples" / "cmu1-skin-crop.tif"
runner = CliRunner()


# -- what QuPath's importer reads ---------------------------------------------------------------------
def _reject_constant(name: str) -> Any:
    raise AssertionError(f"{name} in the file: not JSON, QuPath's strict readers refuse it")


def _read_qupath_file(path: Path) -> dict[str, Any]:
    """The JSON QuPath would parse: .geojson/.json as is, .zip through its entries (PathIO.readObjects)."""
    name = path.name.lower()
    if name.endswith(".zip"):
        with zipfile.ZipFile(path) as zf:
            entries = [n for n in zf.namelist() if not n.endswith("/")]
            assert len(entries) == 1 and entries[0].endswith(".geojson"), entries
            text = zf.read(entries[0]).decode("utf-8")
    else:
        assert name.endswith((".geojson", ".json")), "QuPath reads objects only from .geojson, .json, .zip"
        text = path.read_text(encoding="utf-8")
    return json.loads(text, parse_constant=_reject_constant)


def _ring(ring: Any) -> list[tuple[float, float]]:
    assert isinstance(ring, list) and len(ring) >= 4, "a linear ring needs 4 or more positions"
    pts = []
    for pos in ring:
        assert isinstance(pos, list) and len(pos) in (2, 3), pos
        assert all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in pos), pos
        pts.append((float(pos[0]), float(pos[1])))
    assert pts[0] == pts[-1], "rings must be closed (JTS createLinearRing refuses open ones)"
    return pts


def _classification(value: Any) -> str:
    """GsonTools.PathClassTypeAdapter.read: a string, or an object with name/names AND color."""
    if isinstance(value, str):
        return value
    assert isinstance(value, dict), value
    assert ("name" in value or "names" in value) and "color" in value, (
        f"{value}: the object form needs a name and a color, else QuPath throws 'Unable to parse PathClass'"
    )
    color = value["color"]
    assert isinstance(color, list) and len(color) in (3, 4), color
    assert all(isinstance(v, int) and 0 <= v <= 255 for v in color), color
    return str(value["name"])


def qupath_objects(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """What QuPath makes of each feature: {type, classification, measurements, polygon}; fails on what its
    importer would refuse or turn into something else."""
    assert doc.get("type") == "FeatureCollection", "PathIO.addPathObjects reads features of a FeatureCollection"
    features = doc.get("features")
    assert isinstance(features, list)
    objects = []
    for feature in features:
        assert feature.get("type") == "Feature"
        geometry = feature["geometry"]
        assert geometry["type"] == "Polygon", geometry["type"]
        rings = [_ring(r) for r in geometry["coordinates"]]
        props = feature["properties"]
        # objectType decides the kind of object; absent or unknown means an annotation, not a detection
        object_type = props.get("objectType", props.get("object_type", props.get("type", "unknown")))
        measurements = props.get("measurements")
        # since 0.4 an object {name: number}; QuPath reads each value as a double
        assert isinstance(measurements, dict), "measurements must be a JSON object (QuPath >= 0.4)"
        for key, value in measurements.items():
            assert isinstance(key, str) and key
            assert isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value), value
        objects.append(
            {
                "type": object_type,
                "classification": _classification(props["classification"]) if "classification" in props else None,
                "measurements": measurements,
                "polygon": rings[0],
            }
        )
    return objects


def _main(args: list[str]) -> tuple[int, str]:
    """The installed entry point in-process (option errors as one line, as a user sees them): code, output."""
    import contextlib
    import io

    from wsi_histosge.cli.app import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        try:
            main(args)
        except SystemExit as exc:
            return (exc.code if isinstance(exc.code, int) else int(exc.code is not None)), buf.getvalue()
    return 0, buf.getvalue()


# -- fixtures -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sample_cube(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The packaged sample slide through the tiny test model (12 genes G0..G11), stride 10 µm: 2 chunk rows."""
    out = tmp_path_factory.mktemp("qupath") / "sample.zarr"
    infer_slide(SAMPLE, out, InferOptions(model=tiny_model, num_workers=0, stride_um=10.0))
    return out


def _cube_arrays(cube: Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    g = zarr.open_group(str(cube), mode="r")
    return np.asarray(g["expression"][:], dtype=np.float64), np.asarray(g["tissue"][:]).astype(bool), dict(g.attrs)


def _expected_bins(expr: np.ndarray, tissue: np.ndarray, f: int) -> dict[tuple[int, int], tuple[np.ndarray, int]]:
    """Independently of the module: linear-space mean of each f x f bin's predicted cells."""
    out = {}
    for r in range(-(-tissue.shape[0] // f)):
        for c in range(-(-tissue.shape[1] // f)):
            keep = tissue[r * f : (r + 1) * f, c * f : (c + 1) * f]
            if keep.any():
                cells = expr[:, r * f : (r + 1) * f, c * f : (c + 1) * f][:, keep]
                out[(r, c)] = (np.log1p(np.expm1(cells).mean(axis=1)), int(keep.sum()))
    return out


# -- tests --------------------------------------------------------------------------------------------
def test_cli_export_is_what_qupath_imports_as_detections(sample_cube: Path, tmp_path: Path) -> None:
    out = tmp_path / "sample.geojson"
    res = runner.invoke(app, ["to-qupath", str(sample_cube), "--genes", "G3,G7", "--out", str(out)])
    assert res.exit_code == 0, res.output
    objects = qupath_objects(_read_qupath_file(out))
    expr, tissue, attrs = _cube_arrays(sample_cube)
    assert len(objects) == tissue.sum() > 100  # native: one detection per predicted cell
    assert {o["type"] for o in objects} == {"detection"}
    assert {o["classification"] for o in objects} == {"HisToSGE bin"}
    assert all(set(o["measurements"]) == {"G3", "G7", SPOTS_MEASUREMENT} for o in objects)
    assert f"{len(objects)} detections" in res.output

    # each square sits on its cell: centre from the cube's affine (level-0 px), side = stride in px
    affine = np.asarray(attrs["affine_level0"])
    stride_px = affine[0, 0]
    w0, h0 = attrs["wsi_histosge"]["slide"]["dimensions"]
    expected = _expected_bins(expr, tissue, 1)
    seen = set()
    for o in objects:
        xs, ys = zip(*o["polygon"], strict=True)
        x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
        assert 0 <= x0 < x1 <= w0 and 0 <= y0 < y1 <= h0
        ix = round(((x0 + x1) / 2 - affine[0, 2]) / stride_px)
        iy = round(((y0 + y1) / 2 - affine[1, 2]) / affine[1, 1])
        if x0 > 0 and x1 < w0:
            assert x1 - x0 == pytest.approx(stride_px, abs=0.02)
            assert (x0 + x1) / 2 == pytest.approx(affine[0, 2] + ix * stride_px, abs=0.02)
        values, n = expected[(iy, ix)]
        assert o["measurements"]["G3"] == pytest.approx(values[3], abs=6e-5)
        assert o["measurements"]["G7"] == pytest.approx(values[7], abs=6e-5)
        assert o["measurements"][SPOTS_MEASUREMENT] == n == 1
        seen.add((iy, ix))
    assert seen == set(expected)  # every predicted cell once, nothing else


def test_bins_and_zip_and_all_genes(sample_cube: Path, tmp_path: Path) -> None:
    out = tmp_path / "bins.zip"
    res = runner.invoke(app, ["to-qupath", str(sample_cube), "--all-genes", "--bin-um", "60", "--out", str(out)])
    assert res.exit_code == 0, res.output
    doc = _read_qupath_file(out)
    objects = qupath_objects(doc)
    expr, tissue, attrs = _cube_arrays(sample_cube)
    genes = list(attrs["genes"])
    f = 6  # 60 µm bins of the 10 µm lattice
    expected = _expected_bins(expr, tissue, f)
    assert len(objects) == len(expected)
    affine = np.asarray(attrs["affine_level0"])
    for o in objects:
        assert list(o["measurements"]) == [*genes, SPOTS_MEASUREMENT]
        xs, ys = zip(*o["polygon"], strict=True)
        # the bin's first cell: its square's left/top edge is half a cell before that cell's centre
        bx = round((max(min(xs), 0.0) + affine[0, 0] / 2 - affine[0, 2]) / affine[0, 0]) // f
        by = round((max(min(ys), 0.0) + affine[1, 1] / 2 - affine[1, 2]) / affine[1, 1]) // f
        values, n = expected[(by, bx)]
        got = np.array([o["measurements"][g] for g in genes])
        np.testing.assert_allclose(got, values, atol=6e-5)
        assert o["measurements"][SPOTS_MEASUREMENT] == n
    assert any(o["measurements"][SPOTS_MEASUREMENT] == f * f for o in objects)
    head = doc["wsi_histosge"]
    assert head["bin_um"] == 60.0 and head["units"] == attrs["units"] and head["partial"] is False


def test_small_memory_budget_gives_the_same_file(sample_cube: Path, tmp_path: Path) -> None:
    """Rectangles of a few bins and one-chunk windows (the streaming path of a huge cube) change nothing."""
    a = to_qupath(sample_cube, tmp_path / "a.geojson", all_genes=True, resolution=40.0)
    b = to_qupath(sample_cube, tmp_path / "b.geojson", all_genes=True, resolution=40.0, budget_mb=0.001)
    objects_a = qupath_objects(_read_qupath_file(a.path))
    objects_b = qupath_objects(_read_qupath_file(b.path))
    assert a.detections == b.detections == len(objects_a) > 50

    def key(o: dict[str, Any]) -> tuple[float, float]:
        return o["polygon"][0]

    assert sorted(objects_a, key=key) == sorted(objects_b, key=key)


def test_refusals_leave_files_alone(sample_cube: Path, tmp_path: Path) -> None:
    out = tmp_path / "x.geojson"
    assert runner.invoke(app, ["to-qupath", str(sample_cube), "--genes", "G1", "--out", str(out)]).exit_code == 0
    before = out.read_bytes()
    res = runner.invoke(app, ["to-qupath", str(sample_cube), "--genes", "G2", "--out", str(out)])
    assert res.exit_code == 7 and "--overwrite" in res.output and out.read_bytes() == before
    res = runner.invoke(app, ["to-qupath", str(sample_cube), "--genes", "G2", "--out", str(out), "--overwrite"])
    assert res.exit_code == 0 and "G2" in qupath_objects(_read_qupath_file(out))[0]["measurements"]

    foreign = tmp_path / "annotations.geojson"
    foreign.write_text('{"type":"FeatureCollection","features":[]}')
    res = runner.invoke(app, ["to-qupath", str(sample_cube), "--genes", "G1", "--out", str(foreign), "--overwrite"])
    assert res.exit_code == 7 and "not a QuPath export of wsi-histosge" in res.output
    assert foreign.read_text() == '{"type":"FeatureCollection","features":[]}'

    for args, code, words in [
        (["--out", str(tmp_path / "y.geojson")], 2, "--all-genes"),  # no genes chosen
        (["--genes", "NOPE", "--out", str(tmp_path / "y.geojson")], 2, "'NOPE'"),
        (["--genes", "G1", "--all-genes", "--out", str(tmp_path / "y.geojson")], 2, "not both"),
        (["--genes", "G1", "--out", str(tmp_path / "y.geojson.gz")], 2, ".zip"),
        (["--genes", "G1", "--bin-um", "25", "--out", str(tmp_path / "y.geojson")], 2, "multiple"),
    ]:
        res = runner.invoke(app, ["to-qupath", str(sample_cube), *args])
        assert res.exit_code == code and words in res.output, (args, res.output)
        assert len(res.output.strip().splitlines()) == 1, res.output
    res = runner.invoke(
        app, ["to-qupath", str(tmp_path / "none.zarr"), "--genes", "G1", "--out", str(tmp_path / "z.json")]
    )
    assert res.exit_code == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["annotations.geojson", "x.geojson"]


def test_incomplete_cube_and_a_failure_mid_write(sample_cube: Path, tmp_path: Path) -> None:
    cube = tmp_path / "c.zarr"
    shutil.copytree(sample_cube, cube)
    chunks = sorted(p for p in (cube / "expression" / "c").rglob("*") if p.is_file())
    assert len(chunks) >= 2
    chunks[0].unlink()
    out = tmp_path / "c.geojson"
    res = runner.invoke(app, ["to-qupath", str(cube), "--genes", "G1", "--out", str(out)])
    assert res.exit_code == 13 and "--allow-incomplete" in res.output and not out.exists()
    res = runner.invoke(app, ["to-qupath", str(cube), "--genes", "G1", "--out", str(out), "--allow-incomplete"])
    assert res.exit_code == 0 and "partial" in res.output
    assert _read_qupath_file(out)["wsi_histosge"]["partial"] is True
    out.unlink()

    # a chunk that does not decode is met after the header and some features were written: no file at all
    shutil.rmtree(cube)
    shutil.copytree(sample_cube, cube)
    chunks = sorted(p for p in (cube / "expression" / "c").rglob("*") if p.is_file())
    chunks[-1].write_bytes(b"\x00garbage" * 100)
    res = runner.invoke(app, ["to-qupath", str(cube), "--genes", "G1", "--out", str(out)])
    assert res.exit_code == 9 and "cannot be decoded" in res.output, res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.zarr"]  # neither the file nor a .partial


def test_every_bin_size_gets_a_file_or_a_one_line_refusal(sample_cube: Path, tmp_path: Path) -> None:
    """--bin-um from hypothesis: a file (exit 0) or one `error:` line naming the option (exit 2) and no file;
    never a traceback."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    out = tmp_path / "x.geojson"

    @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        st.floats(allow_nan=True, allow_infinity=True) | st.integers(-(10**9), 10**9) | st.text(min_size=1, max_size=8)
    )
    def run(value: object) -> None:
        text_value = repr(value) if isinstance(value, float) else str(value)
        if text_value.startswith("-"):
            text_value = " " + text_value
        code, text = _main(["to-qupath", str(sample_cube), "--genes", "G1", "--bin-um", text_value, "--out", str(out)])
        assert code in (0, 2) and "Traceback" not in text and "internal error" not in text, (value, text)
        if isinstance(value, (int, float)) and not (math.isfinite(value) and value > 0):
            assert code == 2 and "--bin-um" in text, (value, text)
        if code == 2:
            lines = [ln for ln in text.strip().splitlines() if ln.strip()]
            assert len(lines) == 1 and lines[0].startswith("error:"), (value, text)
            assert not out.exists()
        else:
            assert qupath_objects(_read_qupath_file(out))
            out.unlink()
        assert list(tmp_path.iterdir()) == []

    run()


def test_the_tissue_outline_geojson_has_a_classification_qupath_parses() -> None:
    """`infer` writes <out>.tissue.geojson for QuPath: its classification object needs a colour, or QuPath's
    PathClass reader throws on import."""
    import numpy as np

    from wsi_histosge.tissue import TissueMask, mask_to_geojson

    mask = np.zeros((20, 20), bool)
    mask[5:15, 4:12] = True
    doc = mask_to_geojson(TissueMask(mask, 8.0, 16.0, "test"))
    assert doc["features"]
    for feature in doc["features"]:
        assert feature["properties"]["objectType"] == "annotation"
        assert _classification(feature["properties"]["classification"]) == "Tissue"
