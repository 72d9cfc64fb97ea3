from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from matplotlib.path import Path as MplPath

from tests.conftest import write_pyramid
from wsi_histosge.errors import CubeIncompleteError, NoTissueError, OutputExistsError
from wsi_histosge.grid import block_cells_for
from wsi_histosge.infer import InferOptions, infer_slide
from wsi_histosge.store import open_cube


def _opts(model: Path, **kw: object) -> InferOptions:
    base = {"model": model, "num_workers": 0, "stride_um": 20.0}
    base.update(kw)
    return InferOptions(**base)  # type: ignore[arg-type]


def _cube(path: Path) -> tuple[np.ndarray, dict]:
    g = zarr.open_group(str(path), mode="r")
    return np.asarray(g["expression"][:]), dict(g.attrs)


def test_end_to_end_cube(pyramid_slide: Path, tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "a.zarr"
    res = infer_slide(pyramid_slide, out, _opts(tiny_model))
    assert res.status == "complete" and res.spots > 100
    g = open_cube(out)
    expr = np.asarray(g["expression"][:])
    tissue = np.asarray(g["tissue"][:]).astype(bool)
    assert expr.shape[0] == 12 and expr.shape[1:] == tissue.shape
    assert np.isfinite(expr[:, tissue]).all()
    assert np.isnan(expr[:, ~tissue]).all()  # nothing predicted off tissue, and it reads as missing
    assert expr[:, tissue].std(axis=1).min() > 0  # predictions vary with the image
    attrs = dict(g.attrs)
    assert attrs["genes"] == [f"G{i}" for i in range(12)]
    assert attrs["stride_um"] == 20.0 and attrs["completed"]["spots"] == res.spots
    assert attrs["ome"]["multiscales"][0]["axes"][1]["unit"] == "micrometer"
    assert attrs["wsi_histosge"]["mpp"]["source"] == "TIFF resolution tags"
    assert g["expression"].metadata.dimension_names == ("gene", "y", "x")
    # the tissue outline for QuPath: level-0 px, around the synthetic blob (an ellipse of semi-axes 1429 x 1000 px
    # centred at 2000, 1500) and around every predicted cell
    gj = json.loads(Path(str(out) + ".tissue.geojson").read_text())
    assert gj["type"] == "FeatureCollection"
    rings = [np.asarray(f["geometry"]["coordinates"][0]) for f in gj["features"]]
    ring = max(rings, key=len)
    x, y = ring[:, 0], ring[:, 1]
    area = 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))
    assert area == pytest.approx(np.pi * 1000 * 4000 / 2.8, rel=0.05)
    assert x.min() == pytest.approx(2000 - 4000 / 2.8, abs=40) and y.max() == pytest.approx(2500, abs=40)
    iy, ix = np.nonzero(tissue)
    centres = (np.asarray(attrs["affine_level0"]) @ np.stack([ix, iy, np.ones_like(ix)]))[:2].T
    outside = centres[~MplPath(ring).contains_points(centres)]
    assert len(outside) < 0.01 * len(centres)
    # those only by the outline's simplification (under one tissue-mask px, 16 level-0 px at 8 µm/px)
    a, b = ring[:-1], ring[1:]
    for pt in outside:
        t = np.clip(((pt - a) * (b - a)).sum(axis=1) / ((b - a) ** 2).sum(axis=1).clip(1e-9), 0, 1)
        assert np.linalg.norm(a + t[:, None] * (b - a) - pt, axis=1).min() < 16


def test_rerun_is_a_no_op_and_other_params_refuse(pyramid_slide: Path, tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "b.zarr"
    infer_slide(pyramid_slide, out, _opts(tiny_model))
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    again = infer_slide(pyramid_slide, out, _opts(tiny_model))
    assert again.status == "already-complete"
    assert before == {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    with pytest.raises(OutputExistsError, match="--overwrite"):
        infer_slide(pyramid_slide, out, _opts(tiny_model, stride_um=25.0))
    res = infer_slide(pyramid_slide, out, _opts(tiny_model, stride_um=25.0, overwrite=True))
    assert res.status == "complete" and _cube(out)[1]["stride_um"] == 25.0


def test_refuses_to_replace_foreign_output(pyramid_slide: Path, tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    with pytest.raises(OutputExistsError, match="not a wsi-histosge output"):
        infer_slide(pyramid_slide, out, _opts(tiny_model, overwrite=True))
    assert (out / "notes.txt").read_text() == "precious"


def test_no_seams_when_block_boundaries_move(pyramid_slide: Path, tiny_model: Path, tmp_path: Path) -> None:
    """Shift the lattice origin by half a block: the same spots must get the same predictions."""
    stride = 10.0
    a = infer_slide(pyramid_slide, tmp_path / "o1.zarr", _opts(tiny_model, stride_um=stride, origin_um=(5.0, 5.0)))
    block = block_cells_for(stride, 2.0)  # the tiny encoder reads level 2 (2 µm/px) of the synthetic slide
    shift = block // 2  # half a block
    origin2 = (5.0 + shift * stride, 5.0 + shift * stride)
    infer_slide(pyramid_slide, tmp_path / "o2.zarr", _opts(tiny_model, stride_um=stride, origin_um=origin2))
    e1, _ = _cube(tmp_path / "o1.zarr")
    e2, _ = _cube(tmp_path / "o2.zarr")
    common = e1[:, shift:, shift:][:, : e2.shape[1], : e2.shape[2]]
    both = np.isfinite(common[0]) & np.isfinite(e2[0])
    # spots whose neighbourhood is cut off by the new lattice edge are excluded
    both[:8, :] = False
    both[:, :8] = False
    assert both.sum() > 0.25 * a.spots
    # the compared spots straddle a block boundary of run 1 (where run 2 has the middle of a block)
    cols = np.nonzero(both.any(axis=0))[0] + shift  # in run 1's cell coordinates
    assert any(c % block == 0 for c in cols)
    np.testing.assert_allclose(common[:, both].astype(np.float32), e2[:, both].astype(np.float32), atol=2e-3)


def test_coordinates_map_back_to_slide_pixels(tiny_model: Path, tmp_path: Path) -> None:
    """Tissue only in the left 40% of the slide: predicted cells must sit over those pixels."""
    img = np.full((1200, 2000, 3), 243, np.uint8)
    rng = np.random.default_rng(1)
    img[:, :800] = np.clip(np.array([185, 95, 160]) - rng.integers(0, 60, (1200, 800, 1)), 0, 255)
    path = write_pyramid(tmp_path / "left.tif", img, mpp=0.5, levels=2)
    out = tmp_path / "left.zarr"
    infer_slide(path, out, _opts(tiny_model, stride_um=20.0, min_tissue_fraction=0.99))
    g = open_cube(out)
    tissue = np.asarray(g["tissue"][:]).astype(bool)
    affine = np.asarray(g.attrs["affine_level0"])
    iy, ix = np.nonzero(tissue)
    xy = (affine @ np.stack([ix, iy, np.ones_like(ix)]))[:2].T
    # spot half-width is 20 µm = 40 px: every kept centre is at least that far inside the tissue
    assert xy[:, 0].max() <= 800 - 40 + 1
    assert xy[:, 0].min() <= 100
    # and the pixels under each centre are tissue-coloured
    pix = img[xy[:, 1].astype(int), xy[:, 0].astype(int)]
    assert (pix[:, 1] < 200).all()


def test_blank_slide_has_no_tissue(tiny_model: Path, tmp_path: Path) -> None:
    path = write_pyramid(tmp_path / "blank.tif", np.full((512, 512, 3), 245, np.uint8), levels=1)
    with pytest.raises(NoTissueError, match="no tissue"):
        infer_slide(path, tmp_path / "blank.zarr", _opts(tiny_model))
    assert not (tmp_path / "blank.zarr").exists()


def _run_cli(args: list[str], **kw: object) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "wsi_histosge.cli.app", "infer", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **kw,
    )  # type: ignore[call-overload]


def test_kill_then_resume_gives_the_identical_cube(tiny_model: Path, tmp_path: Path) -> None:
    from tests.conftest import synthetic_tissue

    slide = write_pyramid(tmp_path / "big.tif", synthetic_tissue(4000, 5000, seed=3), levels=3)
    args = [str(slide), "--model", str(tiny_model), "--stride-um", "10", "--workers", "0"]
    ref = tmp_path / "ref.zarr"
    p = _run_cli([*args, "--out", str(ref)])
    assert p.wait(timeout=300) == 0, p.stderr.read().decode() if p.stderr else ""
    out = tmp_path / "killed.zarr"
    p = _run_cli([*args, "--out", str(out)])
    deadline = time.time() + 240
    done_dir = out / "chunk_done" / "c"
    while time.time() < deadline and not (done_dir.exists() and sum(1 for _ in done_dir.rglob("*")) >= 3):
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    marks = np.asarray(zarr.open_group(str(out), mode="r")["chunk_done"][:])
    assert 0 < marks.sum() < marks.size, "the kill should land mid-slide"
    assert "completed" not in json.loads((out / "zarr.json").read_text())["attributes"]
    with pytest.raises(CubeIncompleteError, match="incomplete"):
        open_cube(out)
    p = _run_cli([*args, "--out", str(out), "--json"])
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == 0, stderr.decode()
    report = json.loads(stdout)
    assert report["status"] == "resumed" and report["chunks_written"] < marks.size
    e_ref, _ = _cube(ref)
    e_out, _ = _cube(out)
    np.testing.assert_array_equal(e_ref, e_out)
    leftovers = [p for p in out.rglob("*") if p.name.endswith((".tmp", ".partial"))]
    assert not leftovers


def test_a_rerun_removes_temporary_files_a_killed_write_left(
    pyramid_slide: Path, tiny_model: Path, tmp_path: Path
) -> None:
    """A SIGKILL between zarr's write of ``<key>.<uuid>.partial`` and its rename leaves the temporary file; the
    run that resumes (it holds the lock) removes it, and the cube's values are untouched."""
    out = tmp_path / "a.zarr"
    infer_slide(pyramid_slide, out, _opts(tiny_model))
    before, _ = _cube(out)
    stray = out / "chunk_done" / "c" / "0" / "1.31eaf1c3e04f45aa83de708e59763bcd.partial"
    stray.parent.mkdir(parents=True, exist_ok=True)
    stray.write_bytes(b"\x01")
    infer_slide(pyramid_slide, out, _opts(tiny_model))
    assert not stray.exists()
    after, _ = _cube(out)
    np.testing.assert_array_equal(before, after)
