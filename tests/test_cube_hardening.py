"""Cubes given to verify / to-anndata / plot: missing, foreign, malformed, incomplete, unsafe; creation
that fails on a full disk; bin sizes; the .h5ad written atomically.

Most cases use a small cube written through the real store (known values, 80 x 80 cells in 2 x 2 chunks);
the resume cases run the tiny test model through `infer`.
"""

from __future__ import annotations

import errno
import json
import math
import shutil
import subprocess
import sys
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from tests.conftest import synthetic_tissue, write_pyramid
from wsi_histosge.cli.app import app
from wsi_histosge.convert import bin_factor, to_anndata
from wsi_histosge.errors import (
    CubeIncompleteError,
    DataFormatError,
    InputNotFoundError,
    OutputExistsError,
    UsageError,
)
from wsi_histosge.plot import plot_genes, plot_qc
from wsi_histosge.store import ATTR_KEY, CubeStore, read_cube, verify_cube

runner = CliRunner()
NY, NX, GENES, STRIDE = 80, 80, 4, 10.0


def _values(ny: int = NY, nx: int = NX, genes: int = GENES) -> tuple[np.ndarray, np.ndarray]:
    """Known float16 expression (NaN off tissue) and the tissue mask of the synthetic cube."""
    yy, xx = np.mgrid[0:ny, 0:nx]
    tissue = ((yy - ny / 2) / (ny * 0.46)) ** 2 + ((xx - nx / 2) / (nx * 0.46)) ** 2 < 1
    g = np.arange(genes, dtype=np.float32)[:, None, None]
    vals = 1.5 + np.sin(yy / 7.0 + g) * np.cos(xx / 11.0 - g / 2)
    return np.where(tissue[None], vals, np.nan).astype(np.float16), tissue


def _attrs(slide: Path) -> dict[str, Any]:
    mpp = 0.5
    return {
        ATTR_KEY: {
            "slide": {"path": str(slide), "dimensions": [800, 800], "fingerprint": "synthetic"},
            "mpp": {"x": mpp, "y": mpp, "source": "test"},
        },
        "genes": [f"G{i}" for i in range(GENES)],
        "units": "log1p(counts per 10k)",
        "stride_um": STRIDE,
        "spot_um": 2 * STRIDE,
        "context_um": 56.0,
        "origin_um": [STRIDE / 2, STRIDE / 2],
        "affine_level0": [[STRIDE / mpp, 0.0, STRIDE / 2 / mpp], [0.0, STRIDE / mpp, STRIDE / 2 / mpp], [0, 0, 1]],
    }


def _write_cube(path: Path, slide: Path, *, complete: bool = True) -> Path:
    values, tissue = _values()
    store, state = CubeStore.open_for_run(
        path,
        fingerprint="synthetic",
        shape=(GENES, NY, NX),
        attrs=_attrs(slide),
        tissue=tissue,
        tissue_fraction=tissue.astype(np.float32),
    )
    assert state.status == "new"
    for cy in range(2):
        for cx in range(2):
            store.write_chunk(cy, cx, values[:, cy * 64 : (cy + 1) * 64, cx * 64 : (cx + 1) * 64])
    if complete:
        store.mark_complete("synthetic", {"spots": int(tissue.sum())})
    return path


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_pyramid(tmp_path_factory.mktemp("hs") / "s.tif", synthetic_tissue(800, 800), levels=1)


@pytest.fixture(scope="module")
def pristine(slide: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_cube(tmp_path_factory.mktemp("hc") / "cube.zarr", slide)


@pytest.fixture
def cube(pristine: Path, tmp_path: Path) -> Path:
    """A fresh copy of the complete synthetic cube, free to damage."""
    return Path(shutil.copytree(pristine, tmp_path / "cube.zarr"))


def _one_line(output: str, *names: str) -> str:
    lines = [ln for ln in output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, output
    assert "Traceback" not in output
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


def _expected_bins(f: int) -> tuple[np.ndarray, np.ndarray]:
    """(bins, genes) log1p(mean(expm1)) over the tissue cells of each f x f bin, and the bins' (row, col)."""
    values, tissue = _values()
    lin = np.expm1(values.astype(np.float64))
    nby, nbx = -(-NY // f), -(-NX // f)
    rows, out = [], []
    for r in range(nby):
        for c in range(nbx):
            t = tissue[r * f : (r + 1) * f, c * f : (c + 1) * f]
            if t.any():
                cells = lin[:, r * f : (r + 1) * f, c * f : (c + 1) * f][:, t]
                out.append(np.log1p(cells.mean(axis=1)))
                rows.append((r, c))
    return np.asarray(out), np.asarray(rows)


# 1 missing -> exit 3; not a cube / malformed -> exit 9 -----------------------------------------------
@pytest.mark.parametrize("where", ["local", "file-url", "memory-url"])
def test_missing_cube_is_input_not_found(where: str, tmp_path: Path) -> None:
    path = {
        "local": str(tmp_path / "nope.zarr"),
        "file-url": f"file://{tmp_path}/nope.zarr",
        "memory-url": "memory://wsi-histosge-test/nope.zarr",
    }[where]
    for call in (
        lambda: verify_cube(path),
        lambda: to_anndata(path, tmp_path / "a.h5ad"),
        lambda: plot_genes(path, ["G0"], tmp_path / "maps"),
        lambda: plot_qc(path, tmp_path / "qc.png"),
    ):
        with pytest.raises(InputNotFoundError, match=r"nope\.zarr"):
            call()
    for args in (
        ["verify", path],
        ["to-anndata", path, "--out", str(tmp_path / "a.h5ad")],
        ["plot", path, "--out", str(tmp_path / "m")],
    ):
        res = runner.invoke(app, args)
        assert res.exit_code == 3, res.output
        _one_line(res.output, "nope.zarr")
    assert not (tmp_path / "a.h5ad").exists()


def _damage(cube: Path, case: str) -> Path:
    """Damage ``cube`` as named; returns the file the error must name."""
    root = cube / "zarr.json"
    doc = json.loads(root.read_text())
    attrs = doc["attributes"]
    expr = cube / "expression" / "zarr.json"
    if case == "empty-folder":
        shutil.rmtree(cube)
        cube.mkdir()
        return cube
    if case == "a-file":
        shutil.rmtree(cube)
        cube.write_bytes(b"\x89HDF\r\n\x1a\n not a cube")
        return cube
    if case == "foreign-zarr":
        shutil.rmtree(cube)
        zarr.open_group(str(cube), mode="w").create_array("x", shape=(4,), dtype="float32")
        return root
    if case == "bad-json":
        root.write_text(root.read_text()[:-40])
    elif case == "json-list":
        root.write_text("[1, 2, 3]")
    elif case == "binary":
        root.write_bytes(b"\xff\xfe\x00garbage")
    elif case == "no-genes":
        del attrs["genes"]
        root.write_text(json.dumps(doc))
    elif case == "stride-string":
        attrs["stride_um"] = "ten"
        root.write_text(json.dumps(doc))
    elif case == "stride-nan":
        root.write_text(json.dumps(doc).replace('"stride_um": 10.0', '"stride_um": NaN'))
    elif case == "meta-not-object":
        attrs[ATTR_KEY] = "yes"
        root.write_text(json.dumps(doc))
    elif case == "no-mpp":
        del attrs[ATTR_KEY]["mpp"]
        root.write_text(json.dumps(doc))
    elif case == "affine-2x2":
        attrs["affine_level0"] = [[1, 0], [0, 1]]
        root.write_text(json.dumps(doc))
    elif case == "truncated-array-meta":
        expr.write_text(expr.read_text()[: len(expr.read_text()) // 2])
        return expr
    elif case == "array-meta-missing":
        expr.unlink()
        return expr
    elif case == "array-shape-wrong":
        meta = json.loads(expr.read_text())
        meta["shape"] = [GENES + 1, NY, NX]
        expr.write_text(json.dumps(meta))
        return cube
    elif case == "array-shape-not-list":
        meta = json.loads(expr.read_text())
        meta["shape"] = "big"
        expr.write_text(json.dumps(meta))
        return expr
    else:
        raise AssertionError(case)
    return root


NOT_A_CUBE = [
    "empty-folder",
    "a-file",
    "foreign-zarr",
    "bad-json",
    "json-list",
    "binary",
    "no-genes",
    "stride-string",
    "stride-nan",
    "meta-not-object",
    "no-mpp",
    "affine-2x2",
    "truncated-array-meta",
    "array-meta-missing",
    "array-shape-wrong",
    "array-shape-not-list",
]


@pytest.mark.parametrize("case", NOT_A_CUBE)
def test_not_a_cube_or_malformed_is_data_format_error(case: str, cube: Path, tmp_path: Path) -> None:
    named = _damage(cube, case)
    for call in (
        lambda: verify_cube(cube),
        lambda: to_anndata(cube, tmp_path / "a.h5ad"),
        lambda: plot_genes(cube, ["G0"], tmp_path / "maps"),
    ):
        with pytest.raises(DataFormatError) as info:
            call()
        assert str(named) in str(info.value) and "\n" not in str(info.value)
    for args in (["verify", str(cube)], ["to-anndata", str(cube), "--out", str(tmp_path / "a.h5ad")]):
        res = runner.invoke(app, args)
        assert res.exit_code == 9, res.output
        _one_line(res.output, str(named))
    assert not (tmp_path / "a.h5ad").exists()


# 2 incomplete -> exit 13; --allow-incomplete converts what is there ----------------------------------
def test_cube_without_completion_marker_is_refused(cube: Path, tmp_path: Path) -> None:
    doc = json.loads((cube / "zarr.json").read_text())
    del doc["attributes"]["completed"]
    (cube / "zarr.json").write_text(json.dumps(doc))
    with pytest.raises(CubeIncompleteError, match="completion marker"):
        to_anndata(cube, tmp_path / "a.h5ad")
    with pytest.raises(CubeIncompleteError):
        plot_qc(cube, tmp_path / "qc.png")
    res = runner.invoke(app, ["to-anndata", str(cube), "--out", str(tmp_path / "a.h5ad")])
    assert res.exit_code == 13, res.output
    line = _one_line(res.output, str(cube), "infer", "--allow-incomplete")
    assert "0 of 4" in line  # every chunk is written, only the marker is absent
    assert runner.invoke(app, ["plot", str(cube), "--out", str(tmp_path / "m")]).exit_code == 13
    assert runner.invoke(app, ["verify", str(cube)]).exit_code == 13
    assert not (tmp_path / "a.h5ad").exists() and not (tmp_path / "m" / "qc.png").exists()


def test_deleted_chunk_is_refused_then_converted_partially(cube: Path, tmp_path: Path) -> None:
    import anndata as ad

    full = ad.read_h5ad(to_anndata(cube, tmp_path / "full.h5ad"))
    (cube / "expression" / "c" / "0" / "1" / "0").unlink()  # rows 64-79, cols 0-63: has tissue
    with pytest.raises(CubeIncompleteError, match=r"1 of 4 expression chunks are missing"):
        to_anndata(cube, tmp_path / "a.h5ad")
    res = runner.invoke(app, ["to-anndata", str(cube), "--out", str(tmp_path / "a.h5ad")])
    assert res.exit_code == 13, res.output  # before: exit 0 and an .h5ad of NaN rows
    _one_line(res.output, str(cube), "1 of 4", "--allow-incomplete")
    assert not (tmp_path / "a.h5ad").exists()
    with pytest.raises(CubeIncompleteError):
        plot_genes(cube, ["G0"], tmp_path / "maps")

    res = runner.invoke(app, ["to-anndata", str(cube), "--out", str(tmp_path / "a.h5ad"), "--allow-incomplete"])
    assert res.exit_code == 0, res.output
    part = ad.read_h5ad(tmp_path / "a.h5ad")
    rows = part.obs["array_row"].to_numpy()
    cols = part.obs["array_col"].to_numpy()
    assert not ((rows >= 64) & (cols < 64)).any()  # no cell of the lost chunk is in obs
    assert np.isfinite(part.X).all()
    uns = part.uns["wsi_histosge"]
    assert bool(uns["partial"]) and np.asarray(uns["missing_chunks"]).tolist() == [[1, 0]]
    # the cells that are there hold exactly what the complete conversion holds
    kept = full.obs_names.isin(part.obs_names)
    assert part.n_obs == int(kept.sum()) < full.n_obs
    np.testing.assert_array_equal(part.X, full.X[kept])
    # the partial picture: test_partial_map_leaves_lost_chunks_showing_the_slide


def test_incomplete_cube_with_allow_incomplete_never_writes_nan_bins(slide: Path, tmp_path: Path) -> None:
    """A run that stopped after one chunk: only that chunk's cells are converted, none as NaN."""
    import anndata as ad

    values, tissue = _values()
    store, _ = CubeStore.open_for_run(
        tmp_path / "c.zarr",
        fingerprint="x",
        shape=(GENES, NY, NX),
        attrs=_attrs(slide),
        tissue=tissue,
        tissue_fraction=tissue.astype(np.float32),
    )
    store.write_chunk(0, 1, values[:, :64, 64:])
    with pytest.raises(CubeIncompleteError, match="3 of 4"):
        to_anndata(tmp_path / "c.zarr", tmp_path / "a.h5ad")
    a = ad.read_h5ad(to_anndata(tmp_path / "c.zarr", tmp_path / "a.h5ad", resolution=20.0, allow_incomplete=True))
    assert np.isfinite(a.X).all() and a.n_obs > 0
    assert (a.obs["array_row"] < 32).all() and (a.obs["array_col"] >= 32).all()
    assert sorted(map(tuple, np.asarray(a.uns["wsi_histosge"]["missing_chunks"]).tolist())) == [(0, 0), (1, 0), (1, 1)]
    assert not bool(a.uns["wsi_histosge"]["cube_completed"])


def test_complete_cube_conversion_is_unchanged_by_the_window_size(cube: Path, tmp_path: Path) -> None:
    """Binned values equal log1p(mean(expm1)) over tissue cells, whatever band/window sizes stream them."""
    import anndata as ad

    for f in (1, 3, 8):
        want, rc = _expected_bins(f)
        for mb in (128.0, 0.002):
            a = ad.read_h5ad(to_anndata(cube, tmp_path / f"b{f}-{mb}.h5ad", resolution=f * STRIDE, band_mb=mb))
            assert not bool(a.uns["wsi_histosge"]["partial"])
            np.testing.assert_array_equal(np.c_[a.obs["array_row"], a.obs["array_col"]], rc)
            np.testing.assert_allclose(a.X, want, rtol=2e-6, atol=2e-6)


# 3 creation fails on a full disk ---------------------------------------------------------------------
def _creation_args(slide: Path) -> dict[str, Any]:
    _, tissue = _values()
    return dict(shape=(GENES, NY, NX), attrs=_attrs(slide), tissue=tissue, tissue_fraction=tissue.astype(np.float32))


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    disk = tmp_path / "disk"
    disk.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)], capture_output=True)
    if res.returncode != 0:
        pytest.skip("needs a tmpfs mount (root): a real full disk cannot be produced here")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def _fill(disk: Path, leave_pages: int) -> Path:
    """Fill ``disk`` completely, then free ``leave_pages`` pages of 4 KiB."""
    ballast = disk / "ballast"
    with ballast.open("wb", buffering=0) as fh:
        try:
            while True:
                fh.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    size = ballast.stat().st_size
    with ballast.open("r+b") as fh:
        fh.truncate(max(0, size - leave_pages * 4096))
    return ballast


def test_creation_on_a_full_disk_is_ours_and_a_rerun_recreates_it(tiny_disk: Path, slide: Path) -> None:
    """Every point where creation can run out of space: the folder is ours or empty, never complete,
    and a rerun with the same parameters (or --overwrite with others) replaces it."""
    out = tiny_disk / "c.zarr"
    half_created = 0
    for pages in range(0, 12):
        ballast = _fill(tiny_disk, pages)
        try:
            store, _ = CubeStore.open_for_run(out, fingerprint="fp", **_creation_args(slide))
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
            attrs = CubeStore.inspect(out)  # ours (or nothing): never "not a wsi-histosge output"
            if attrs is not None:
                half_created += 1
                assert attrs[ATTR_KEY]["state"] == "creating" and "completed" not in attrs
                assert verify_cube(out)["ok"] is False
                with pytest.raises(CubeIncompleteError, match="creation was interrupted"):
                    to_anndata(out, tiny_disk.parent / "a.h5ad")
                res = runner.invoke(app, ["verify", str(out)])
                assert res.exit_code == 13, res.output
                with pytest.raises(OutputExistsError, match="--overwrite"):
                    CubeStore.open_for_run(out, fingerprint="other", **_creation_args(slide))
            ballast.unlink()
            if pages % 2:  # a rerun with the same parameters, or --overwrite with other ones
                store, state = CubeStore.open_for_run(out, fingerprint="fp", **_creation_args(slide))
            else:
                store, state = CubeStore.open_for_run(out, fingerprint="fp2", overwrite=True, **_creation_args(slide))
            assert state.status == "new"
        else:
            ballast.unlink()
        assert "state" not in CubeStore.inspect(out)[ATTR_KEY]  # type: ignore[index]
        assert store.chunk_grid() == (2, 2)
        shutil.rmtree(out)
    assert half_created, "no case failed after the marker: the disk sizes above no longer cover creation"


def _fail_writes(monkeypatch: pytest.MonkeyPatch, failing: str) -> None:
    """The file system refuses (ENOSPC) writes of keys starting with ``failing``; all others go through."""
    from zarr.storage import LocalStore

    real = LocalStore._set

    async def _set(self: LocalStore, key: str, value: Any, exclusive: bool = False) -> None:
        if key.startswith(failing):
            raise OSError(errno.ENOSPC, "No space left on device", key)
        await real(self, key, value, exclusive=exclusive)

    monkeypatch.setattr(LocalStore, "_set", _set)


@pytest.fixture(scope="module")
def infer_case(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> tuple[list[str], Path]:
    """The tiny model through `infer` on a small slide (2 x 2 chunks): the options and the finished cube."""
    base = tmp_path_factory.mktemp("hi")
    slide = write_pyramid(base / "s.tif", synthetic_tissue(1600, 1600, seed=4), levels=2)
    opts = [str(slide), "--model", str(tiny_model), "--stride-um", "10", "--workers", "0"]
    ref = base / "ref.zarr"
    res = runner.invoke(app, ["infer", *opts, "--out", str(ref)])
    assert res.exit_code == 0, res.output
    return opts, ref


def _expression(path: Path) -> np.ndarray:
    return np.asarray(zarr.open_group(str(path), mode="r")["expression"][:])


@pytest.mark.parametrize("failing", ["tissue/", "chunk_done/zarr.json"])
def test_infer_disk_full_during_creation_then_rerun(
    failing: str, infer_case: tuple[list[str], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opts, ref = infer_case
    out = tmp_path / "s.zarr"
    with monkeypatch.context() as m:
        _fail_writes(m, failing)
        res = runner.invoke(app, ["infer", *opts, "--out", str(out)])
    assert res.exit_code == 14, res.output
    assert "free space" in res.output and "Traceback" not in res.output
    assert CubeStore.inspect(out)[ATTR_KEY]["state"] == "creating"  # type: ignore[index]
    res = runner.invoke(app, ["verify", str(out)])
    assert res.exit_code == 13 and "creation was interrupted" in res.output
    res = runner.invoke(app, ["to-anndata", str(out), "--out", str(tmp_path / "a.h5ad")])
    assert res.exit_code == 13, res.output
    _one_line(res.output, str(out), "infer")
    res = runner.invoke(app, ["infer", *opts, "--out", str(out)])  # the same command, as the message says
    assert res.exit_code == 0, res.output
    assert runner.invoke(app, ["verify", str(out)]).exit_code == 0
    np.testing.assert_array_equal(_expression(out), _expression(ref))


def test_rerun_recomputes_a_deleted_chunk_bit_identically(infer_case: tuple[list[str], Path], tmp_path: Path) -> None:
    opts, ref = infer_case
    out = Path(shutil.copytree(ref, tmp_path / "s.zarr"))
    (out / "expression" / "c" / "0" / "0" / "1").unlink()
    res = runner.invoke(app, ["verify", str(out)])
    assert res.exit_code == 13 and "same options" in res.output
    res = runner.invoke(app, ["infer", *opts, "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    assert '"resumed"' in res.stdout
    assert runner.invoke(app, ["verify", str(out)]).exit_code == 0
    np.testing.assert_array_equal(_expression(out), _expression(ref))


# 4 bin sizes -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, -20.0, 0.0, "abc"])
def test_bin_size_must_be_positive_and_finite(bad: Any, cube: Path, tmp_path: Path) -> None:
    attrs = read_cube(cube).attrs
    with pytest.raises(UsageError, match=r"--bin-um|--resolution"):
        bin_factor(attrs, bad)
    if isinstance(bad, float):
        res = runner.invoke(app, ["to-anndata", str(cube), "--bin-um", str(bad), "--out", str(tmp_path / "a.h5ad")])
        assert res.exit_code == 2, res.output
        _one_line(res.output, "--bin-um")
    assert not (tmp_path / "a.h5ad").exists()


def test_bin_larger_than_the_cube_is_refused_without_allocating(cube: Path, tmp_path: Path) -> None:
    tracemalloc.start()
    try:
        with pytest.raises(UsageError, match="larger than the whole cube"):
            to_anndata(cube, tmp_path / "a.h5ad", resolution=100000.0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20  # before: GENES x 10000^2 float32 (1.6 GB) for the first bin
    res = runner.invoke(app, ["to-anndata", str(cube), "--bin-um", "100000", "--out", str(tmp_path / "a.h5ad")])
    assert res.exit_code == 2, res.output
    _one_line(res.output, "--bin-um", "800")  # names the largest bin that makes sense (one bin)


def _peak_mb(fn: Any) -> float:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def test_one_bin_over_the_whole_cube_streams_in_bounded_memory(cube: Path, slide: Path, tmp_path: Path) -> None:
    """A bin as big as the cube: memory does not grow with the cube (one window at a time), values exact."""
    import anndata as ad

    want, _ = _expected_bins(NY)
    small = _peak_mb(lambda: to_anndata(cube, tmp_path / "one.h5ad", resolution=NY * STRIDE, band_mb=0.25))
    a = ad.read_h5ad(tmp_path / "one.h5ad")
    assert a.n_obs == 1 and int(a.obs["n_cells"].iloc[0]) == int(_values()[1].sum())
    np.testing.assert_allclose(a.X, want, rtol=2e-6)

    n = 640  # 100 chunks, 6.25 MiB as float32
    big = tmp_path / "big.zarr"
    tissue = np.ones((n, n), dtype=bool)
    store, _ = CubeStore.open_for_run(
        big, fingerprint="big", shape=(GENES, n, n), attrs=_attrs(slide), tissue=tissue, tissue_fraction=tissue
    )
    ones = np.ones((GENES, 64, 64), dtype=np.float16)
    for cy in range(n // 64):
        for cx in range(n // 64):
            store.write_chunk(cy, cx, ones)
    store.mark_complete("big", {})
    peak = _peak_mb(lambda: to_anndata(big, tmp_path / "big.h5ad", resolution=n * STRIDE, band_mb=0.25))
    np.testing.assert_allclose(ad.read_h5ad(tmp_path / "big.h5ad").X, 1.0)
    # before: the whole cube padded to the bin, as float32, plus temporaries (~10 MiB more than the small one)
    assert peak - small < 0.5 * GENES * n * n * 4 / 2**20


# 5 codec allow-list inside sharding --------------------------------------------------------------------
def _sharded_meta(inner: list[dict[str, Any]], index: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "zarr_format": 3,
        "node_type": "array",
        "shape": [GENES, NY, NX],
        "data_type": "float16",
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [GENES, 128, 128]}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "fill_value": "NaN",
        "codecs": [
            {
                "name": "sharding_indexed",
                "configuration": {
                    "chunk_shape": [GENES, 64, 64],
                    "codecs": inner,
                    "index_codecs": index,
                    "index_location": "end",
                },
            }
        ],
        "attributes": {},
        "dimension_names": ["gene", "y", "x"],
    }


BYTES = {"name": "bytes", "configuration": {"endian": "little"}}
PICKLE = {"name": "numcodecs.pickle", "configuration": {"protocol": 5}}


@pytest.mark.parametrize(
    "inner,index",
    [
        ([PICKLE, BYTES], [BYTES, {"name": "crc32c"}]),  # inside the shard's codecs
        ([BYTES], [BYTES, PICKLE]),  # in its index codecs
        (
            [
                {
                    "name": "sharding_indexed",
                    "configuration": {"chunk_shape": [1, 8, 8], "codecs": [PICKLE], "index_codecs": []},
                }
            ],
            [BYTES],
        ),
    ],
    ids=["inner", "index", "nested-shard"],
)
def test_unsafe_codec_inside_a_shard_is_refused(inner: Any, index: Any, cube: Path, tmp_path: Path) -> None:
    meta = cube / "expression" / "zarr.json"
    meta.write_text(json.dumps(_sharded_meta(inner, index)))
    shutil.rmtree(cube / "expression" / "c")
    poison = cube / "expression" / "c" / "0" / "0" / "0"
    poison.parent.mkdir(parents=True)
    poison.write_bytes(b"\x80\x05cos\nsystem\n.")  # a pickle stream: never handed to a decoder
    for call in (lambda: verify_cube(cube), lambda: to_anndata(cube, tmp_path / "a.h5ad")):
        with pytest.raises(DataFormatError, match="pickle"):
            call()
    for args in (
        ["verify", str(cube)],
        ["to-anndata", str(cube), "--out", str(tmp_path / "a.h5ad")],
        ["plot", str(cube), "--out", str(tmp_path / "m")],
    ):
        res = runner.invoke(app, args)
        assert res.exit_code == 9, res.output
        _one_line(res.output, str(meta), "numcodecs.pickle")
    assert not (tmp_path / "a.h5ad").exists()


def test_safe_sharded_cube_still_verifies(cube: Path) -> None:
    meta = cube / "expression" / "zarr.json"
    meta.write_text(json.dumps(_sharded_meta([BYTES, {"name": "zstd", "configuration": {"level": 1}}], [BYTES])))
    shutil.rmtree(cube / "expression" / "c")
    report = verify_cube(cube)  # allowed codecs: no error; the deleted shards are reported missing
    assert report["ok"] is False and report["missing_chunks"] == [(0, 0), (0, 1), (1, 0), (1, 1)]


def test_unsafe_codec_in_consolidated_metadata_is_refused(cube: Path) -> None:
    root = cube / "zarr.json"
    doc = json.loads(root.read_text())
    expr = json.loads((cube / "expression" / "zarr.json").read_text())
    expr["codecs"] = [PICKLE, *expr["codecs"]]
    doc["consolidated_metadata"] = {"kind": "inline", "must_understand": False, "metadata": {"expression": expr}}
    root.write_text(json.dumps(doc))
    with pytest.raises(DataFormatError, match="pickle"):
        verify_cube(cube)


# 6 the .h5ad appears whole or not at all ------------------------------------------------------------
def test_failed_conversion_leaves_no_h5ad_and_the_corrected_command_works(cube: Path, tmp_path: Path) -> None:
    import anndata as ad

    chunk = cube / "expression" / "c" / "0" / "1" / "1"
    good = chunk.read_bytes()
    chunk.write_bytes(good[:-9])  # a truncated chunk: conversion fails midway through X
    out = tmp_path / "a.h5ad"
    res = runner.invoke(app, ["to-anndata", str(cube), "--out", str(out)])
    assert res.exit_code == 9, res.output
    _one_line(res.output, "expression")
    assert not out.exists() and not list(tmp_path.glob("*.partial"))
    chunk.write_bytes(good)
    res = runner.invoke(app, ["to-anndata", str(cube), "--out", str(out)])
    assert res.exit_code == 0, res.output
    a = ad.read_h5ad(out)  # the whole cube, cell for cell
    want, rc = _expected_bins(1)
    np.testing.assert_array_equal(np.c_[a.obs["array_row"], a.obs["array_col"]], rc)
    np.testing.assert_allclose(a.X, want, rtol=2e-6, atol=2e-6)


def test_h5ad_on_a_full_disk_fails_cleanly_then_succeeds(tiny_disk: Path, cube: Path) -> None:
    out = tiny_disk / "a.h5ad"
    ballast = _fill(tiny_disk, 8)
    res = runner.invoke(app, ["to-anndata", str(cube), "--out", str(out)])
    assert res.exit_code == 14, res.output
    _one_line(res.output, str(out), "free space")
    # the real process, to its end: the exit code is 14, not a crash of HDF5 at exit
    proc = subprocess.run(
        [sys.executable, "-m", "wsi_histosge.cli.app", "to-anndata", str(cube), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 14, (proc.returncode, proc.stderr)
    assert not out.exists() and not list(tiny_disk.glob("*.partial"))
    ballast.unlink()
    res = runner.invoke(app, ["to-anndata", str(cube), "--out", str(out)])
    assert res.exit_code == 0, res.output


def test_output_exists_is_refused_and_left_alone(cube: Path, tmp_path: Path) -> None:
    out = tmp_path / "a.h5ad"
    out.write_bytes(b"mine")
    with pytest.raises(OutputExistsError):
        to_anndata(cube, out)
    assert out.read_bytes() == b"mine"
    with pytest.raises(UsageError, match="folder"):
        to_anndata(cube, tmp_path, overwrite=True)


# 7 gene maps as a user sees them: a cube with a known pattern, drawn by `plot`, read back from the PNG ----
BAND_MPP, BAND_STRIDE = 0.5, 10.0
# slide px: 1.2 x 0.8 mm, more than `plot` draws (1600 px long side), a lattice of 80 x 120 cells in 2 x 2 chunks
BAND_W, BAND_H = 2400, 1600
BAND_ROWS, BAND_COLS = (8, 48), (8, 80)  # tissue cells = slide px 160-960 (y) x 160-1600 (x), upper left
BAND_VALUES = (3.0, 1.75, 0.5)  # HIGHLEFT on the left, middle and right third of the tissue columns
MAP_CMAP, MAP_ALPHA = "magma", 0.75  # what `plot` draws with by default


def _band_values(gene: str) -> np.ndarray:
    """(y, x) values of HIGHLEFT (high, middle, low from left to right) or LOWLEFT (the reverse); NaN off
    tissue. The 1st and 99th percentiles, the ends of the colour scale, are the high and low values."""
    ny, nx = round(BAND_H * BAND_MPP / BAND_STRIDE), round(BAND_W * BAND_MPP / BAND_STRIDE)
    v = np.full((ny, nx), np.nan)
    third = (BAND_COLS[1] - BAND_COLS[0]) // 3
    for k, value in enumerate(BAND_VALUES if gene == "HIGHLEFT" else BAND_VALUES[::-1]):
        v[slice(*BAND_ROWS), BAND_COLS[0] + k * third : BAND_COLS[0] + (k + 1) * third] = value
    return v


@pytest.fixture(scope="module")
def bands(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Glass with one uniformly stained rectangle, and a complete cube of HIGHLEFT and LOWLEFT over it."""
    folder = tmp_path_factory.mktemp("bands")
    img = np.full((BAND_H, BAND_W, 3), 242, np.uint8)
    px = round(BAND_STRIDE / BAND_MPP)
    img[BAND_ROWS[0] * px : BAND_ROWS[1] * px, BAND_COLS[0] * px : BAND_COLS[1] * px] = (200, 120, 170)
    slide = write_pyramid(folder / "bands.tif", img, mpp=BAND_MPP, levels=2)
    expr = np.stack([_band_values("HIGHLEFT"), _band_values("LOWLEFT")]).astype(np.float16)
    tissue = np.isfinite(expr[0])
    s = BAND_STRIDE
    attrs = {
        **_attrs(slide),
        ATTR_KEY: {
            "slide": {"path": str(slide), "dimensions": [BAND_W, BAND_H], "fingerprint": "bands"},
            "mpp": {"x": BAND_MPP, "y": BAND_MPP, "source": "test"},
        },
        "genes": ["HIGHLEFT", "LOWLEFT"],
        "stride_um": s,
        "spot_um": 2 * s,
        "origin_um": [s / 2, s / 2],
        "affine_level0": [[s / BAND_MPP, 0.0, s / 2 / BAND_MPP], [0.0, s / BAND_MPP, s / 2 / BAND_MPP], [0, 0, 1]],
    }
    cube = folder / "bands.zarr"
    store, _ = CubeStore.open_for_run(
        cube, fingerprint="bands", shape=expr.shape, attrs=attrs, tissue=tissue, tissue_fraction=tissue * 1.0
    )
    for cy, cx in np.ndindex(store.chunk_grid()):
        store.write_chunk(cy, cx, expr[:, cy * 64 : (cy + 1) * 64, cx * 64 : (cx + 1) * 64])
    store.mark_complete("bands", {"spots": int(tissue.sum())})
    return slide, cube


def _read_png(path: Path) -> np.ndarray:
    from PIL import Image

    rgba = np.asarray(Image.open(path).convert("RGBA"))
    assert (rgba[..., 3] == 255).all(), f"{path.name}: has transparent pixels"
    return rgba[..., :3].astype(np.int16)


def _slide_colours(slide: Path) -> tuple[np.ndarray, np.ndarray]:
    """(glass, stain) RGB as the slide's pixels decode, i.e. what the thumbnail under the map shows."""
    from wsi_histosge.slide import open_slide

    s = open_slide(slide)
    glass = s.read_region((2000, 1200), 0, (32, 32)).reshape(-1, 3)
    stain = s.read_region((600, 400), 0, (32, 32)).reshape(-1, 3)
    return np.median(glass, axis=0), np.median(stain, axis=0)


def _cell_colours(values: np.ndarray, under: np.ndarray) -> np.ndarray:
    """(..., 3) colour a user should see for each value: its colour on the scale (low value -> 0, high -> 1)
    blended over the colour ``under`` it; NaN (nothing drawn) stays NaN."""
    from matplotlib import colormaps

    t = (values - BAND_VALUES[-1]) / (BAND_VALUES[0] - BAND_VALUES[-1])
    blended = MAP_ALPHA * colormaps[MAP_CMAP](np.nan_to_num(t))[..., :3] * 255 + (1 - MAP_ALPHA) * under
    return np.where(np.isnan(values)[..., None], np.nan, blended)


def _check_map(png: np.ndarray, cells: np.ndarray, glass: np.ndarray) -> tuple[int, int, int, int]:
    """Find the slide in ``png`` (the box of rows and columns that are largely glass; the figure around it is
    white) and compare it pixel by pixel with ``cells`` (ny, nx, 3), NaN where the slide itself should show
    (glass elsewhere). Skips pixels within 4 px of a band or chunk edge and the scale bar's corner.
    Returns the box (top, bottom, left, right)."""
    is_glass = np.abs(png - glass).max(axis=2) <= 3
    rows = np.nonzero(is_glass.mean(axis=1) > 0.2)[0]
    cols = np.nonzero(is_glass.mean(axis=0) > 0.2)[0]
    assert rows.size and cols.size, "no glass in the picture: the slide does not show anywhere"
    top, bottom, left, right = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    h, w = bottom - top, right - left
    assert w / h == pytest.approx(BAND_W / BAND_H, rel=0.01)  # the slide, undistorted
    yy, xx = np.mgrid[0:h, 0:w]
    um_y, um_x = (yy + 0.5) / h * BAND_H * BAND_MPP, (xx + 0.5) / w * BAND_W * BAND_MPP
    want = cells[(um_y // BAND_STRIDE).astype(int), (um_x // BAND_STRIDE).astype(int)]
    want = np.where(np.isnan(want), glass, want)
    margin_um = 4 * BAND_W * BAND_MPP / w
    keep = ~((um_x > 0.6 * BAND_W * BAND_MPP) & (um_y > 0.7 * BAND_H * BAND_MPP))
    for col in (BAND_COLS[0], 32, 56, 64, BAND_COLS[1]):
        keep &= np.abs(um_x - col * BAND_STRIDE) >= margin_um
    for row in BAND_ROWS:
        keep &= np.abs(um_y - row * BAND_STRIDE) >= margin_um
    err = np.abs(png[top:bottom, left:right] - want).max(axis=2)
    assert err[keep].max() <= 4, f"{(err[keep] > 4).sum()} px differ, e.g. at {np.argwhere(keep & (err > 4))[:3]}"
    return top, bottom, left, right


def _scalebar_um(png: np.ndarray, box: tuple[int, int, int, int]) -> float:
    """Length in µm of the scale bar drawn in the map's lower-right corner, measured in PNG pixels."""
    from scipy import ndimage

    top, bottom, left, right = box
    corner = png[top + (bottom - top) * 3 // 4 : bottom, left + (right - left) // 2 : right]
    thick = ndimage.binary_opening(corner.max(axis=2) < 80, structure=np.ones((3, 1)))  # not the thin frame
    labels, _ = ndimage.label(thick)
    widths = [sl[1].stop - sl[1].start for sl in ndimage.find_objects(labels)]
    return max(widths) / (right - left) * BAND_W * BAND_MPP


def _colour_bar_positions(png: np.ndarray) -> np.ndarray:
    """Down one column through the colour bar in ``png``: the position (0-1) on the colormap of each pixel that
    shows the colormap (drawn at the map's alpha over white), top to bottom."""
    from matplotlib import colormaps

    lut = MAP_ALPHA * colormaps[MAP_CMAP](np.linspace(0, 1, 256))[:, :3] * 255 + (1 - MAP_ALPHA) * 255
    saturated = (png.max(axis=2) - png.min(axis=2)) > 40  # the bar's colours; text and frame are grey
    column = png[:, int(np.argmax(saturated.sum(axis=0)))]
    dist = np.abs(column[:, None, :] - lut[None]).max(axis=2)
    return np.asarray(dist[dist.min(axis=1) <= 4].argmin(axis=1) / 255.0)


def test_gene_map_shows_the_cube_where_it_is(bands: tuple[Path, Path], tmp_path: Path) -> None:
    """`plot --genes` with default options, read back from the PNGs: every lattice cell has the colour of its
    value on the colour scale, blended over the slide; cells without tissue show the slide; the scale bar is
    as long as it says; the colour bar runs from the high colour (top) to the low one (bottom)."""
    slide, cube = bands
    res = runner.invoke(app, ["plot", str(cube), "--genes", "HIGHLEFT,LOWLEFT", "--out", str(tmp_path / "maps")])
    assert res.exit_code == 0, res.output
    names = ["HIGHLEFT.png", "LOWLEFT.png", "genes_grid.png", "qc.png"]
    assert sorted(p.name for p in (tmp_path / "maps").iterdir()) == names
    glass, stain = _slide_colours(slide)
    grid = np.array_split(_read_png(tmp_path / "maps" / "genes_grid.png"), 2, axis=1)  # one map per half
    for gene, in_grid in zip(("HIGHLEFT", "LOWLEFT"), grid, strict=True):
        cells = _cell_colours(_band_values(gene), stain)
        png = _read_png(tmp_path / "maps" / f"{gene}.png")
        box = _check_map(png, cells, glass)
        assert box[3] - box[2] > 600  # legible: most of an 8-inch figure at 150 dpi
        # 200 µm (the largest round length up to a quarter of the width); its edge line adds ~2 px
        assert _scalebar_um(png, box) == pytest.approx(200.0, rel=0.03)
        scale = _colour_bar_positions(png[:, box[3] :])
        assert scale.size > 0.8 * (box[1] - box[0]), "no colour bar in the map's colours"
        assert scale[0] > 0.98 and scale[-1] < 0.02 and (np.diff(scale) <= 0.01).all()
        _check_map(in_grid, cells, glass)


def test_partial_map_leaves_lost_chunks_showing_the_slide(bands: tuple[Path, Path], tmp_path: Path) -> None:
    """A lost chunk is drawn as nothing (the slide shows), never as expression; the other cells keep their
    colours on the same scale."""
    slide, pristine_cube = bands
    cube = Path(shutil.copytree(pristine_cube, tmp_path / "bands.zarr"))
    (cube / "expression" / "c" / "0" / "0" / "1").unlink()  # rows 0-63, cols 64-119: tissue columns 64-79
    out = tmp_path / "maps"
    res = runner.invoke(app, ["plot", str(cube), "--genes", "HIGHLEFT", "--out", str(out)])
    assert res.exit_code == 13, res.output
    res = runner.invoke(app, ["plot", str(cube), "--genes", "HIGHLEFT", "--out", str(out), "--allow-incomplete"])
    assert res.exit_code == 0, res.output
    glass, stain = _slide_colours(slide)
    cells = _cell_colours(_band_values("HIGHLEFT"), stain)
    cells[slice(*BAND_ROWS), 64:80] = stain  # the slide's stained pixels, not blended with anything
    _check_map(_read_png(out / "HIGHLEFT.png"), cells, glass)
