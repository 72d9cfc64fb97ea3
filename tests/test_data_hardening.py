"""Hostile and malformed user data, through the CLI: tissue masks, training sections, model folders.

Each case checks the documented exit code (README "Failure behaviour"), a one-line message that names the
file, and that no output was written. Positive controls next to the refusals show the same inputs, made
valid, still work (so a refusal is not just "everything fails").
"""

from __future__ import annotations

import gzip
import json
import math
import shutil
import struct
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from tests.conftest import synthetic_tissue, write_pyramid
from wsi_histosge.cli.app import app

runner = CliRunner()
N_SPOTS = 30  # a 6 x 5 legacy-ST lattice


def _run(*args: str) -> tuple[int, str]:
    res = runner.invoke(app, list(args))
    return res.exit_code, res.output


def _refused(code: int, output: str, expected: int, *names: str) -> str:
    """Exit code, no traceback, exactly one `error:` line naming every one of ``names``; returns that line."""
    assert code == expected, output
    assert "Traceback" not in output and "internal error" not in output, output
    lines = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, output
    for name in names:
        assert name in lines[0], output
    return lines[0]


def _not_complete(out: Path) -> bool:
    marker = out / "zarr.json"
    return not marker.exists() or "completed" not in json.loads(marker.read_text()).get("attributes", {})


# -- tissue masks -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def wide_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """900 x 600 level-0 px at 0.5 µm/px (aspect 1.5), tissue blob in the middle."""
    return write_pyramid(tmp_path_factory.mktemp("mask-slide") / "wide.tif", synthetic_tissue(600, 900), levels=1)


def _infer_with_mask(slide: Path, mask: Path, out: Path, model: Path) -> tuple[int, str]:
    return _run(
        "infer", str(slide), "--tissue-mask", str(mask), "--out", str(out), "--model", str(model), "--workers", "0"
    )


def _polygon(ring: list[list[Any]]) -> dict[str, Any]:
    return {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]}, "properties": {}}


_SQUARE = [[100, 100], [700, 100], [700, 500], [100, 500], [100, 100]]
GEOJSON_CASES: dict[str, tuple[str, int, str]] = {
    "not-json": ('{"type": "FeatureCollection", "features": [', 9, "not valid GeoJSON"),
    "empty-file": ("", 9, "not valid GeoJSON"),
    "not-utf8": ("\udcff", 9, "not valid GeoJSON"),
    "a-number": ("42", 9, "JSON number, not a GeoJSON object"),
    "features-not-a-list": (json.dumps({"type": "FeatureCollection", "features": {"a": 1}}), 9, "a list 'features'"),
    "no-type": (json.dumps({"coordinates": [_SQUARE]}), 9, "no GeoJSON 'type'"),
    "points-only": (
        json.dumps({"type": "Feature", "geometry": {"type": "Point", "coordinates": [10, 10]}}),
        9,
        "found only Point",
    ),
    "no-features": (json.dumps({"type": "FeatureCollection", "features": []}), 9, "no Polygon"),
    "text-coordinates": (
        json.dumps(_polygon([["a", "b"], [700, 100], [700, 500], [100, 100]])),
        9,
        'position 0 is ["a", "b"], not an (x, y) pair',
    ),
    "nan-coordinates": (json.dumps(_polygon([[math.nan, 100], [700, 100], [700, 500], [100, 100]])), 9, "NaN"),
    "infinite-coordinates": (json.dumps(_polygon([[math.inf, 100], [700, 100], [700, 500]])), 9, "infinite"),
    "huge-coordinates": (json.dumps(_polygon([[1e300, 100], [700, 100], [700, 500]])), 9, "beyond any slide"),
    "two-point-ring": (json.dumps(_polygon([[100, 100], [700, 100]])), 9, "at least 3 (x, y) positions"),
    "ring-not-a-list": (
        json.dumps({"type": "Polygon", "coordinates": "0,0 10,0 10,10"}),
        9,
        "non-empty list of rings",
    ),
    "deep-nesting": ('{"type": "GeometryCollection", "geometries": [' * 40 + "]}" * 40, 9, "nested deeper"),
    # all in µm of another slide, or another level's pixels: entirely outside this 900 x 600 px slide
    "outside-the-slide": (
        json.dumps(_polygon([[5000, 4000], [6000, 4000], [6000, 4500], [5000, 4500], [5000, 4000]])),
        2,
        "x 5000..6000, y 4000..4500",
    ),
    "sub-pixel-polygon": (json.dumps(_polygon([[100.1, 100.1], [100.4, 100.1], [100.4, 100.4]])), 6, "no pixel"),
}


@pytest.mark.parametrize("case", list(GEOJSON_CASES))
def test_malformed_or_misplaced_geojson_mask_is_refused(
    case: str, wide_slide: Path, tiny_model: Path, tmp_path: Path
) -> None:
    text, expected, snippet = GEOJSON_CASES[case]
    mask = tmp_path / f"{case}.geojson"
    mask.write_bytes(text.encode("utf-8", "surrogateescape"))
    out = tmp_path / "out.zarr"
    line = _refused(*_infer_with_mask(wide_slide, mask, out, tiny_model), expected, mask.name, snippet)
    if case == "outside-the-slide":
        assert "900x600 level-0 px" in line
    assert not out.exists()


def test_geojson_partly_outside_the_slide_is_clipped(wide_slide: Path, tiny_model: Path, tmp_path: Path) -> None:
    import zarr

    mask = tmp_path / "left-half.geojson"
    ring = [[-500, -500], [450, -500], [450, 1100], [-500, 1100], [-500, -500]]
    mask.write_text(json.dumps([_polygon(ring)]))  # a bare list of Features, as QuPath writes
    out = tmp_path / "out.zarr"
    code, output = _infer_with_mask(wide_slide, mask, out, tiny_model)
    assert code == 0, output
    group = zarr.open_group(str(out), mode="r")
    tissue = np.asarray(group["tissue"][:])
    affine = np.asarray(group.attrs["affine_level0"])
    x = affine[0, 0] * np.arange(tissue.shape[1]) + affine[0, 2]
    assert tissue[:, x < 400].any() and not tissue[:, x > 500].any()


def test_missing_mask_and_folder_mask(wide_slide: Path, tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.zarr"
    missing = tmp_path / "nope.geojson"
    _refused(*_infer_with_mask(wide_slide, missing, out, tiny_model), 3, "nope.geojson")
    folder = tmp_path / "folder.png"
    folder.mkdir()
    _refused(*_infer_with_mask(wide_slide, folder, out, tiny_model), 9, "folder.png")
    assert not out.exists()


def _png(path: Path, array: np.ndarray) -> Path:
    import imagecodecs

    path.write_bytes(imagecodecs.png_encode(array))
    return path


def _png_header(path: Path, width: int, height: int) -> Path:
    """A PNG that claims ``width`` x ``height`` px in its header and holds no pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk)))
    return path


def test_mask_image_cases(wide_slide: Path, tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.zarr"
    tissue = np.zeros((60, 90), np.uint8)
    tissue[10:50, 20:70] = 255
    # positive control: a mask at the slide's aspect ratio (within 2%: 91 x 60 is 1.1% wider)
    good = _png(tmp_path / "good.png", np.pad(tissue, ((0, 0), (0, 1))))
    code, output = _infer_with_mask(wide_slide, good, out, tiny_model)
    assert code == 0, output
    shutil.rmtree(out)

    square = _png(tmp_path / "square.png", tissue[:, :60])
    line = _refused(*_infer_with_mask(wide_slide, square, out, tiny_model), 2, "square.png", "60x60", "900x600")
    assert "aspect" in line and "GeoJSON" in line

    text = tmp_path / "notes.png"
    text.write_text("not an image\n" * 20)
    _refused(*_infer_with_mask(wide_slide, text, out, tiny_model), 9, "notes.png")

    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:60])
    _refused(*_infer_with_mask(wide_slide, truncated, out, tiny_model), 9, "truncated.png")

    black = _png(tmp_path / "black.png", np.zeros((60, 90), np.uint8))
    _refused(*_infer_with_mask(wide_slide, black, out, tiny_model), 6, "black.png", "no non-zero")

    # the header is read before anything is decoded: 1e10 px claimed, refused at once
    huge = _png_header(tmp_path / "huge.png", 100_000, 100_000)
    t0 = time.time()
    _refused(*_infer_with_mask(wide_slide, huge, out, tiny_model), 9, "huge.png", "100000x100000")
    assert time.time() - t0 < 30
    empty = _png_header(tmp_path / "zero.png", 0, 60)
    _refused(*_infer_with_mask(wide_slide, empty, out, tiny_model), 9, "zero.png", "0x60")
    assert not out.exists()


def test_mask_image_formats_and_colours(wide_slide: Path, tmp_path: Path) -> None:
    """PNG (grey or colour: any non-zero colour channel is tissue), JPEG and TIFF masks read the same."""
    import imagecodecs
    import tifffile

    from wsi_histosge.slide import open_slide
    from wsi_histosge.tissue import load_tissue_mask

    slide = open_slide(wide_slide)
    grey = np.zeros((120, 180), np.uint8)
    grey[20:100, 40:140] = 255
    green = np.zeros((120, 180, 3), np.uint8)
    green[..., 1] = grey  # a mask painted in pure green: red channel all zero
    paths = [_png(tmp_path / "grey.png", grey), _png(tmp_path / "green.png", green)]
    paths.append(tmp_path / "grey.jpg")
    paths[-1].write_bytes(imagecodecs.jpeg8_encode(grey, level=95))
    paths.append(tmp_path / "grey.tif")
    tifffile.imwrite(paths[-1], grey, compression="zlib")
    masks = [load_tissue_mask(p, slide).mask for p in paths]
    h, w = masks[0].shape
    assert masks[0][h // 2, w // 2] and not masks[0][2, 2]
    for other in masks[1:]:
        assert (other == masks[0]).mean() > 0.98


def test_tiff_mask_claiming_a_huge_size_is_refused_before_decoding(wide_slide: Path, tmp_path: Path) -> None:
    import tifffile

    path = tmp_path / "huge.tif"
    tifffile.imwrite(path, np.zeros((60, 90), np.uint8))
    data = bytearray(path.read_bytes())
    with tifffile.TiffFile(path) as tf:
        for tag in ("ImageWidth", "ImageLength"):
            t = tf.pages.first.tags[tag]
            fmt = "<H" if int(t.dtype) == 3 else "<I"
            data[t.valueoffset : t.valueoffset + struct.calcsize(fmt)] = struct.pack(fmt, 65535)
    path.write_bytes(bytes(data))
    out = tmp_path / "out.zarr"
    code, output = _run("infer", str(wide_slide), "--tissue-mask", str(path), "--out", str(out), "--workers", "0")
    _refused(code, output, 9, "huge.tif", "65535x65535")
    assert not out.exists()


def test_many_vertex_outline_rasterises_quickly(pyramid_slide: Path) -> None:
    """A 20k-vertex QuPath-style outline on a 1000 x 750 px mask: point-in-polygon per pixel took minutes,
    scanline filling takes milliseconds."""
    from wsi_histosge.slide import open_slide
    from wsi_histosge.tissue import load_tissue_mask

    t = np.linspace(0, 2 * np.pi, 20_000)
    ring = np.stack([2000 + 1400 * np.cos(t), 1500 + 1000 * np.sin(t)], axis=1).round(2).tolist()
    path = Path(pyramid_slide).with_name("outline.geojson")
    path.write_text(json.dumps(_polygon(ring)))
    t0 = time.time()
    mask = load_tissue_mask(path, open_slide(pyramid_slide), mpp=2.0)
    assert time.time() - t0 < 10 and mask.mask.shape == (750, 1000)
    assert mask.area_um2 == pytest.approx(np.pi * 1400 * 1000 * 0.25, rel=0.03)


# -- training sections (legacy ST) ---------------------------------------------------------------
def _lattice(n: int = N_SPOTS) -> tuple[np.ndarray, np.ndarray]:
    return 1 + np.arange(n) % 6, 1 + np.arange(n) // 6


def _image(folder: Path) -> Path:
    path = folder / "he.tif"
    if not path.exists():  # spots every 100 px (200 µm at 2 µm/px) from (100, 100)
        write_pyramid(path, synthetic_tissue(600, 700), mpp=2.0, levels=1)
    return path


def _section(
    folder: Path, name: str, counts: np.ndarray, genes: list[str], *, gz: bool = False, pixel_scale: float = 1.0
) -> str:
    """Write a legacy-ST section (HER2ST layout) and return its COUNTS:SPOTS:IMAGE spec."""
    folder.mkdir(parents=True, exist_ok=True)
    ax, ay = _lattice(len(counts))
    rows = [f"{x}x{y}" for x, y in zip(ax, ay, strict=True)]
    counts_path = folder / f"{name}.tsv{'.gz' if gz else ''}"
    pd.DataFrame(counts, index=rows, columns=genes).to_csv(counts_path, sep="\t")
    spots = pd.DataFrame(
        {
            "x": ax,
            "y": ay,
            "pixel_x": (100.0 + (ax - 1) * 100) * pixel_scale,
            "pixel_y": (100.0 + (ay - 1) * 100) * pixel_scale,
            "selected": 1,
        }
    )
    spots_path = folder / f"{name}_selection.tsv"
    spots.to_csv(spots_path, sep="\t", index=False)
    return f"{counts_path}:{spots_path}:{_image(folder)}"


def _counts(seed: int = 0, genes: int = 12) -> np.ndarray:
    return np.random.default_rng(seed).poisson(4.0, (N_SPOTS, genes)).astype(np.int64)


GENES = [f"G{i}" for i in range(12)]


def _train(*args: str) -> tuple[int, str]:
    return _run("train", *args)


def _set_first_count(text: str, value: str) -> str:
    """Replace the first count of spot 1x1 (the column count stays the same)."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("1x1\t"):
            parts = line.split("\t")
            parts[1] = value
            lines[i] = "\t".join(parts)
    return "\n".join(lines) + "\n"


COUNTS_CASES: dict[str, tuple[Any, str]] = {
    "text-cell": (lambda t: _set_first_count(t, "abc"), "non-numeric count 'abc' at spot 1x1, gene G0"),
    "empty-cell": (lambda t: _set_first_count(t, ""), "missing or non-finite count at spot 1x1"),
    "negative-count": (lambda t: _set_first_count(t, "-3"), "negative count at spot 1x1, gene G0: -3"),
    "normalised-values": (lambda t: _set_first_count(t, "0.25"), "non-integer count"),
    "infinite-count": (lambda t: _set_first_count(t, "inf"), "non-finite count"),
    "duplicate-spot": (lambda t: t + t.splitlines()[1] + "\n", "appears twice"),
    "no-gene-columns": (lambda t: "\n".join(ln.split("\t")[0] for ln in t.splitlines()) + "\n", "no gene columns"),
    "header-only": (lambda t: t.splitlines()[0] + "\n", "no data rows"),
    "empty-file": (lambda t: "", "cannot parse the counts table"),
    "binary-garbage": (lambda t: "\x00\x01\x02" * 50, "counts table"),
}


@pytest.mark.parametrize("case", list(COUNTS_CASES))
def test_malformed_counts_table_is_refused(case: str, tmp_path: Path) -> None:
    edit, snippet = COUNTS_CASES[case]
    spec = _section(tmp_path / "d", "S1", _counts(), GENES)
    counts_path = Path(spec.split(":")[0])
    counts_path.write_text(edit(counts_path.read_text()))
    out = tmp_path / "model"
    _refused(*_train(spec, "--out", str(out)), 9, counts_path.name, snippet)
    assert not out.exists()


def test_truncated_gzip_counts_are_refused(tmp_path: Path) -> None:
    spec = _section(tmp_path / "d", "S1", _counts(), GENES, gz=True)
    counts_path = Path(spec.split(":")[0])
    assert gzip.decompress(counts_path.read_bytes())  # a valid gzip first
    counts_path.write_bytes(counts_path.read_bytes()[: len(counts_path.read_bytes()) // 2])
    out = tmp_path / "model"
    _refused(*_train(spec, "--out", str(out)), 9, counts_path.name)
    assert not out.exists()


SPOT_CASES: dict[str, tuple[Any, str]] = {
    "missing-column": (lambda df: df.drop(columns=["pixel_y"]), "needs columns"),
    "text-pixel": (
        lambda df: df.assign(pixel_x=df["pixel_x"].astype(object).where(df.index != 3, "left")),
        "column 'pixel_x' at data row 4 is 'left'",
    ),
    "nan-pixel": (lambda df: df.assign(pixel_y=df["pixel_y"].where(df.index != 2, np.nan)), "'pixel_y' at data row 3"),
    "fractional-array-x": (
        lambda df: df.assign(x=df["x"].astype(float).where(df.index != 1, 1.5)),
        "column 'x' at data row 2 is 1.5, not an integer",
    ),
    "one-column-only": (lambda df: df.assign(x=1), "one array row or column"),
    "no-rows": (lambda df: df.iloc[:0], "no data rows"),
}


@pytest.mark.parametrize("case", list(SPOT_CASES))
def test_malformed_spot_file_is_refused(case: str, tmp_path: Path) -> None:
    edit, snippet = SPOT_CASES[case]
    spec = _section(tmp_path / "d", "S1", _counts(), GENES)
    spots_path = Path(spec.split(":")[1])
    edit(pd.read_csv(spots_path, sep="\t")).to_csv(spots_path, sep="\t", index=False)
    out = tmp_path / "model"
    _refused(*_train(spec, "--out", str(out)), 9, spots_path.name, snippet)
    assert not out.exists()


def test_missing_section_files(tmp_path: Path) -> None:
    spec = _section(tmp_path / "d", "S1", _counts(), GENES)
    counts, spots, image = spec.split(":")
    out = tmp_path / "model"
    for i in range(3):
        parts = [counts, spots, image]
        parts[i] = str(tmp_path / f"missing-{i}.tsv")
        _refused(*_train(":".join(parts), "--out", str(out)), 3, f"missing-{i}.tsv")
    _refused(*_train(f"{tmp_path / 'no-outs'}:{image}", "--out", str(out)), 3, "no-outs")
    assert not out.exists()


def test_spots_outside_the_image_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WSI_HISTOSGE_CACHE", str(tmp_path / "cache"))
    spec = _section(tmp_path / "d", "S1", _counts(), GENES, pixel_scale=10.0)  # coordinates of a 10x larger image
    out = tmp_path / "model"
    _refused(*_train(spec, "--out", str(out), "--encoder", "tiny-test"), 9, "S1", "he.tif", "outside")
    assert not out.exists()


# -- zero variation, gene selection -----------------------------------------------------------
def test_all_zero_or_constant_counts_refuse_to_train(tmp_path: Path) -> None:
    out = tmp_path / "model"
    zero = _section(tmp_path / "z", "ZERO", np.zeros((N_SPOTS, 12), np.int64), GENES)
    _refused(*_train(zero, "--out", str(out)), 9, "ZERO", "all zero")
    constant = _section(tmp_path / "c", "FLAT", np.tile(np.arange(1, 13), (N_SPOTS, 1)), GENES)
    _refused(*_train(constant, "--out", str(out)), 9, "FLAT", "no variation")
    # one good section does not hide a dead one
    good = _section(tmp_path / "g", "GOOD", _counts(), GENES)
    _refused(*_train(good, zero, "--out", str(out)), 9, "ZERO")
    _refused(*_train(good, "--val", zero, "--out", str(out)), 9, "ZERO")
    assert not out.exists()


def test_top_genes_are_never_picked_among_genes_that_do_not_vary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from wsi_histosge.model import load_model

    monkeypatch.setenv("WSI_HISTOSGE_CACHE", str(tmp_path / "cache"))
    counts = np.zeros((N_SPOTS, 12), np.int64)
    varying = ["G7", "G2", "G9"]  # not the alphabetical first
    rng = np.random.default_rng(1)
    for g in varying:
        counts[:, GENES.index(g)] = rng.poisson(6.0, N_SPOTS) + 1
    spec = _section(tmp_path / "d", "S1", counts, GENES)
    out = tmp_path / "model"
    code, output = _train(spec, "--out", str(out), "--encoder", "tiny-test", "--epochs", "2", "--n-genes", "10")
    assert code == 0, output
    assert "only 3 of the 12 genes" in output
    model = load_model(out)
    assert sorted(model.meta.genes) == sorted(varying)
    assert "top 3 by variance" in model.meta.training["gene_selection"]


def test_gene_list_against_the_sections(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from wsi_histosge.model import load_model

    monkeypatch.setenv("WSI_HISTOSGE_CACHE", str(tmp_path / "cache"))
    spec = _section(tmp_path / "d", "S1", _counts(), GENES)
    listed = tmp_path / "genes.txt"
    listed.write_text("G3\nNOT_MEASURED\nG1\nG3\n")
    out = tmp_path / "model"
    code, output = _train(spec, "--out", str(out), "--genes", str(listed), "--encoder", "tiny-test", "--epochs", "2")
    assert code == 0, output
    assert "NOT_MEASURED" in output and "dropped" in output
    assert load_model(out).meta.genes == ["G3", "G1"]  # never a column of zeros for the missing gene
    shutil.rmtree(out)
    listed.write_text("X1\nX2\n")
    _refused(*_train(spec, "--out", str(out), "--genes", str(listed)), 9, "genes.txt", "none of the 2")
    _refused(*_train(spec, "--out", str(out), "--genes", str(tmp_path / "no.txt")), 3, "no.txt")
    bad_npy = tmp_path / "genes.npy"
    np.save(bad_npy, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    _refused(*_train(spec, "--out", str(out), "--genes", str(bad_npy)), 9, "genes.npy")
    listed.write_text("\n\n")
    _refused(*_train(spec, "--out", str(out), "--genes", str(listed)), 9, "genes.txt", "empty")
    _refused(*_train(spec, "--out", str(out), "--n-genes", "0"), 2, "--n-genes", "got 0")
    _refused(*_train(spec, "--out", str(out), "--epochs", "-1"), 2, "--epochs", "got -1")
    assert not out.exists()


# -- evaluate: the overlap of the data's genes with the model's -------------------------------------
def _evaluate(model: Path, spec: str, tmp_path: Path) -> tuple[int, str, Path]:
    report = tmp_path / "r.json"
    code, output = _run("evaluate", str(model), "--data", spec, "--json", str(report))
    return code, output, report


def test_evaluate_refuses_data_sharing_too_few_genes(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WSI_HISTOSGE_CACHE", str(tmp_path / "cache"))
    none = _section(tmp_path / "a", "OTHER", _counts(), [f"X{i}" for i in range(12)])
    code, output, report = _evaluate(tiny_model, none, tmp_path)
    _refused(code, output, 9, "OTHER", "only 0 of the 12")
    assert not report.exists()
    half = _section(tmp_path / "b", "HALF", _counts(), GENES[:6] + [f"X{i}" for i in range(6)])
    code, output, report = _evaluate(tiny_model, half, tmp_path)
    _refused(code, output, 9, "HALF", "only 6 of the 12", "at least 10")
    assert not report.exists()
    dead = _section(tmp_path / "c", "DEAD", np.zeros((N_SPOTS, 12), np.int64), GENES)
    code, output, report = _evaluate(tiny_model, dead, tmp_path)
    _refused(code, output, 9, "DEAD", "all zero")
    assert not report.exists()


def test_evaluate_scores_only_the_measured_genes_and_reports_the_overlap(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WSI_HISTOSGE_CACHE", str(tmp_path / "cache"))
    spec = _section(tmp_path / "a", "MOST", _counts(), [*GENES[:11], "X11"])
    code, output, report = _evaluate(tiny_model, spec, tmp_path)
    assert code == 0, output
    assert "measures 11 of the model's 12 genes" in output
    result = json.loads(report.read_text())
    assert result["gene_overlap"]["scored"] == 11 and result["gene_overlap"]["per_section"] == {"MOST": 11}
    assert result["gene_overlap"]["model_genes"] == 12 and "G11" not in result["genes"]
    scores = result["folds"][0]["scores"]["model"]["all_genes"]
    assert scores["n_genes"] == 11 and math.isfinite(scores["mean_r"]) and math.isfinite(scores["mse"])


# -- Space Ranger and AnnData sections --------------------------------------------------------------
def _spaceranger(folder: Path, counts: np.ndarray | None = None) -> tuple[Path, Path]:
    """A small Space Ranger outs/ folder (hexagonal lattice, 2 µm/px full-resolution image)."""
    import h5py
    from scipy import sparse

    counts = _counts() if counts is None else counts
    spatial = folder / "outs" / "spatial"
    spatial.mkdir(parents=True)
    matrix = sparse.csc_matrix(counts.T)  # genes x spots
    barcodes = [f"B{i:03d}-1" for i in range(len(counts))]
    with h5py.File(folder / "outs" / "filtered_feature_bc_matrix.h5", "w") as f:
        m = f.create_group("matrix")
        m["data"], m["indices"], m["indptr"] = matrix.data, matrix.indices, matrix.indptr
        m["shape"] = np.array(matrix.shape)
        m["barcodes"] = np.array([b.encode() for b in barcodes])
        m.create_group("features")["name"] = np.array([g.encode() for g in GENES])
    index = np.arange(len(counts))
    rows, cols = index // 6, 2 * (index % 6) + (index // 6) % 2
    px_row, px_col = 100 + rows * 43.3, 100 + cols * 25.0
    lines = [
        f"{b},1,{r},{c},{pr:.1f},{pc:.1f}" for b, r, c, pr, pc in zip(barcodes, rows, cols, px_row, px_col, strict=True)
    ]
    (spatial / "tissue_positions_list.csv").write_text("\n".join(lines) + "\n")
    (spatial / "scalefactors_json.json").write_text(
        json.dumps({"spot_diameter_fullres": 32.5, "tissue_hires_scalef": 0.5, "tissue_lowres_scalef": 0.1})
    )
    return folder / "outs", _image(folder)


SPACERANGER_CASES: dict[str, tuple[str, Any]] = {
    "scalefactors-not-json": ("scalefactors_json.json", lambda p: p.write_text("{spot_diameter_fullres: 1")),
    "scalefactors-a-list": ("scalefactors_json.json", lambda p: p.write_text("[1, 2]")),
    "scalefactors-missing-key": ("scalefactors_json.json", lambda p: p.write_text('{"tissue_hires_scalef": 0.5}')),
    "scalefactors-negative": ("scalefactors_json.json", lambda p: p.write_text('{"spot_diameter_fullres": -3}')),
    "scalefactors-nan": ("scalefactors_json.json", lambda p: p.write_text('{"spot_diameter_fullres": NaN}')),
    "positions-four-columns": (
        "tissue_positions_list.csv",
        lambda p: p.write_text("\n".join(",".join(x.split(",")[:4]) for x in p.read_text().splitlines())),
    ),
    "positions-text-row": (
        "tissue_positions_list.csv",
        lambda p: p.write_text(p.read_text().replace(",1,0,0,", ",1,top,0,", 1)),
    ),
    "positions-empty": ("tissue_positions_list.csv", lambda p: p.write_text("")),
    "matrix-garbage": ("filtered_feature_bc_matrix.h5", lambda p: p.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 64)),
    "matrix-truncated": (
        "filtered_feature_bc_matrix.h5",
        lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]),
    ),
}


def test_spaceranger_control_reads(tmp_path: Path) -> None:
    from wsi_histosge.stdata import read_section

    outs, image = _spaceranger(tmp_path)
    sec = read_section(f"{outs}:{image}")
    assert sec.counts.shape == (N_SPOTS, 12) and sec.mpp == pytest.approx(2.0)


@pytest.mark.parametrize("case", list(SPACERANGER_CASES))
def test_malformed_spaceranger_folder_is_refused(case: str, tmp_path: Path) -> None:
    outs, image = _spaceranger(tmp_path / "run")
    name, damage = SPACERANGER_CASES[case]
    target = outs / name if name.endswith(".h5") else outs / "spatial" / name
    damage(target)
    out = tmp_path / "model"
    _refused(*_train(f"{outs}:{image}", "--out", str(out)), 9, name)
    assert not out.exists()


@pytest.mark.parametrize("case", ["nan-count", "normalised", "spatial-nan", "no-scalefactors"])
def test_malformed_h5ad_section_is_refused(case: str, tmp_path: Path) -> None:
    import anndata as ad

    x = _counts().astype(np.float32)
    ax, ay = _lattice()
    spatial = np.stack([100.0 + (ax - 1) * 50, 100.0 + (ay - 1) * 43.3], axis=1)
    uns: dict[str, Any] = {"spatial": {"lib": {"scalefactors": {"spot_diameter_fullres": 32.5}}}}
    if case == "nan-count":
        x[3, 4] = np.nan
    elif case == "normalised":
        x = np.log1p(x)
    elif case == "spatial-nan":
        spatial[5, 0] = np.nan
    else:
        uns = {"spatial": {"lib": {"images": {}}}}
    adata = ad.AnnData(X=x, obsm={"spatial": spatial}, uns=uns)
    adata.var_names = GENES
    path = tmp_path / "section.h5ad"
    adata.write_h5ad(path)
    out = tmp_path / "model"
    _refused(*_train(f"{path}:{_image(tmp_path)}", "--out", str(out)), 9, "section.h5ad")
    assert not out.exists()


# -- model folders ------------------------------------------------------------------------------------
def _edit_json(key: str, value: Any) -> Any:
    def edit(meta: dict[str, Any]) -> dict[str, Any]:
        target = meta
        *parents, leaf = key.split(".")
        for p in parents:
            target = target[p]
        if value is _DROP:
            target.pop(leaf)
        else:
            target[leaf] = value
        return meta

    return edit


_DROP = object()
MODEL_JSON_CASES: dict[str, tuple[Any, int, str]] = {
    "not-json": ("{not json", 9, "not valid JSON"),
    "empty": ("", 9, "not valid JSON"),
    "a-list": ("[1, 2, 3]", 9, "not a model description"),
    "lacks-genes": (_edit_json("genes", _DROP), 9, "genes"),
    "lacks-head": (_edit_json("head", _DROP), 9, "head"),
    "genes-not-strings": (_edit_json("genes", list(range(12))), 9, "'genes'"),
    "genes-a-string": (_edit_json("genes", "G0,G1"), 9, "'genes'"),
    "duplicate-gene": (_edit_json("genes", ["G0"] * 12), 9, "twice"),
    "nan-spot-um": (_edit_json("spot_um", math.nan), 9, "'spot_um'"),
    "negative-context": (_edit_json("context_um", -112.0), 9, "'context_um'"),
    "spot-um-text": (_edit_json("spot_um", "55"), 9, "'spot_um'"),
    "offsets-text": (_edit_json("neighbour_offsets_um", [[0, 0], ["a", 1]]), 9, "neighbour_offsets_um"),
    "offsets-not-centred": (_edit_json("neighbour_offsets_um", [[80, 0], [0, 0]]), 9, "[0, 0]"),
    "head-unknown-field": (_edit_json("head.colour", "blue"), 9, "unknown fields"),
    "head-negative-dim": (_edit_json("head.dim", -4), 9, "head.dim"),
    "head-float-depth": (_edit_json("head.depth", 1.5), 9, "head.depth"),
    "n-genes-disagree": (_edit_json("head.n_genes", 11), 9, "head.n_genes"),
    "gene-means-nan": (_edit_json("training", {"gene_means": [math.nan] * 12}), 9, "gene_means"),
    "encoder-a-number": (_edit_json("encoder", 7), 9, "'encoder'"),
    "bad-position-mode": (_edit_json("head.position_mode", "spiral"), 9, "position_mode"),
    "other-format": (_edit_json("format", "someone-else/3"), 8, "unknown checkpoint format"),
    # weights that do not fit a valid JSON: a model error, and no gigantic head is allocated first
    "wider-head": (_edit_json("head.hidden", 65), 8, "model.safetensors"),
    "huge-head": (_edit_json("head.dim", 2**20), 8, "model.safetensors"),  # 4 TB if it were allocated
    "absurd-head": (_edit_json("head.dim", 2**40), 9, "head.dim"),
}


@pytest.mark.parametrize("case", list(MODEL_JSON_CASES))
def test_malformed_model_folder_is_refused(case: str, tiny_model: Path, wide_slide: Path, tmp_path: Path) -> None:
    edit, expected, snippet = MODEL_JSON_CASES[case]
    model = tmp_path / "bad-model"
    shutil.copytree(tiny_model, model)
    meta_path = model / "model.json"
    if isinstance(edit, str):
        meta_path.write_text(edit)
    else:
        meta_path.write_text(json.dumps(edit(json.loads(meta_path.read_text()))))
    out = tmp_path / "out.zarr"
    code, output = _run("infer", str(wide_slide), "--model", str(model), "--out", str(out), "--workers", "0")
    _refused(code, output, expected, "bad-model", snippet)
    assert not out.exists()


def test_model_weights_with_nan_are_refused(tiny_model: Path, wide_slide: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    model = tmp_path / "nan-model"
    shutil.copytree(tiny_model, model)
    tensors = load_file(str(model / "model.safetensors"))
    key = next(k for k in tensors if k.startswith("gene_head"))
    tensors[key].view(-1)[0] = float("nan")
    save_file(tensors, str(model / "model.safetensors"))
    meta = json.loads((model / "model.json").read_text())
    meta.pop("weights_sha256")
    (model / "model.json").write_text(json.dumps(meta))
    out = tmp_path / "out.zarr"
    code, output = _run("infer", str(wide_slide), "--model", str(model), "--out", str(out), "--workers", "0")
    _refused(code, output, 8, "model.safetensors", "NaN")
    assert not out.exists()


def test_missing_model_folder_is_input_not_found(wide_slide: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.zarr"
    code, output = _run("infer", str(wide_slide), "--model", str(tmp_path / "no-model"), "--out", str(out))
    _refused(code, output, 3, "no-model")
    assert not out.exists()
    spec = _section(tmp_path / "d", "S1", _counts(), GENES)
    code, output = _run("evaluate", str(tmp_path / "no-model"), "--data", spec)
    _refused(code, output, 3, "no-model")


def test_shipped_model_still_loads_with_the_same_identity() -> None:
    from wsi_histosge.model import default_model_path, load_model

    model = load_model(default_model_path())
    assert model.n_genes == 795 and model.head.cfg.in_dim == 3968
    # the identity as defined before these checks existed: sha256(weights file digest + sorted model.json
    # without its weights digest), recomputed here from the files
    import hashlib
    import json

    folder = default_model_path()
    raw = json.loads((folder / "model.json").read_text())
    weights = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    assert raw.pop("weights_sha256") == weights
    assert model.sha256 == hashlib.sha256((weights + json.dumps(raw, sort_keys=True)).encode()).hexdigest()
