"""A cube whose trust arrays (novelty, uncertainty, qc) or trust attribute are damaged, through the CLI:
`verify` reports what it can see without decoding (arrays and chunk objects), and `to-anndata`, `plot` and
`to-spatialdata` refuse with one line naming the array, never reading a lost or impossible value as "no
flag" or NaN, and write nothing.

One real cube is written per module by `infer` with default flags on the packaged sample slide (the
built-in model, which has a trust part); each case damages a copy.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr

from tests.conftest import synthetic_tissue, write_pyramid
from wsi_histosge.store import ATTR_KEY, CELL_CHUNKS_KEY, CubeStore, verify_cube

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "wsi_histosge" / "samples" / "cmu1-skin-crop.tif"


def _cli(*args: Any) -> tuple[int, str]:
    """`python -m wsi_histosge.cli.app ARGS`: (exit code, stdout + stderr)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run(
        [sys.executable, "-m", "wsi_histosge.cli.app", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env=env,
    )
    return proc.returncode, proc.stdout + proc.stderr


def _one_line(output: str, *names: str) -> str:
    lines = [ln for ln in output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, output
    assert "Traceback" not in output and "internal error" not in output, output
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("trust-damage") / "c.zarr"
    code, output = _cli("infer", SAMPLE, "--out", out)
    assert code == 0, output
    for name in ("expression", "novelty", "uncertainty", "qc"):  # what the cases rely on: one chunk, in each array
        assert len([p for p in (out / name / "c").rglob("*") if p.is_file()]) == 1, name
    code, output = _cli("verify", out)
    assert code == 0 and "ok (1/1 chunks)" in output, output
    return out


@pytest.fixture
def cube(pristine: Path, tmp_path: Path) -> Path:
    """A fresh copy of the complete real cube, free to damage."""
    return Path(shutil.copytree(pristine, tmp_path / "c.zarr"))


def _gene(cube: Path) -> str:
    return str(json.loads((cube / "zarr.json").read_text())["attributes"]["genes"][0])


def _readers(cube: Path, tmp_path: Path, *, plot: bool = True) -> list[tuple[str, list[Any], Path]]:
    """(command, arguments, output) of the three readers; plot draws a gene map, which reads the expression,
    the uncertainty (its reliability panel) and qc (the flags), but not novelty."""
    cases = [
        ("to-anndata", ["to-anndata", cube, "--out", tmp_path / "a.h5ad"], tmp_path / "a.h5ad"),
        ("to-spatialdata", ["to-spatialdata", cube, "--out", tmp_path / "s.zarr"], tmp_path / "s.zarr"),
    ]
    if plot:
        cases.append(("plot", ["plot", cube, "--out", tmp_path / "maps", "--genes", _gene(cube)], tmp_path / "maps"))
    return cases


def _all_refuse(cube: Path, tmp_path: Path, code: int, *names: str, plot: bool = True) -> None:
    for command, args, out in _readers(cube, tmp_path, plot=plot):
        got, output = _cli(*args)
        assert got == code, (command, got, output)
        line = _one_line(output, *names)
        assert line.startswith("error:"), (command, line)
        assert not out.exists(), (command, out)


def _write_value(cube: Path, name: str, value: float) -> None:
    """Set one cell with expression (the first tissue cell) of the per-cell array ``name`` to ``value``."""
    g = zarr.open_group(str(cube), mode="r+")
    arr = g[name]
    values = np.asarray(arr[:])
    cell = tuple(np.argwhere(np.asarray(g["tissue"][:], dtype=bool))[0])
    values[cell] = value
    arr[:] = values  # type: ignore[index]


def _edit_attrs(cube: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    doc = json.loads((cube / "zarr.json").read_text())
    edit(doc["attributes"])
    (cube / "zarr.json").write_text(json.dumps(doc))


# 1 verify sees the trust arrays -------------------------------------------------------------------
@pytest.mark.parametrize("name", ["novelty", "uncertainty", "qc"])
def test_a_deleted_trust_array_is_damage_for_verify_and_every_reader(name: str, cube: Path, tmp_path: Path) -> None:
    shutil.rmtree(cube / name)  # before: verify said ok (exit 0) while to-anndata refused (exit 9)
    code, output = _cli("verify", cube)
    assert code == 9, output
    _one_line(output, f"{cube}/{name}", "missing", "--overwrite")
    _all_refuse(cube, tmp_path, 9, f"{cube}/{name}", "missing", "--overwrite")


@pytest.mark.parametrize("name", ["novelty", "uncertainty", "qc"])
def test_a_deleted_trust_chunk_is_a_missing_chunk(name: str, cube: Path, tmp_path: Path) -> None:
    """A done chunk whose novelty/uncertainty/qc object is gone is treated like one whose expression is
    gone: verify exit 13, readers exit 13 (before: read as NaN / no flags, exit 0, not marked partial)."""
    (cube / name / "c" / "0" / "0").unlink()
    code, output = _cli("verify", cube)
    assert code == 13, output
    _one_line(output, str(cube), f"1 {name} chunk(s)", "[(0, 0)]", "recompute")
    _all_refuse(cube, tmp_path, 13, str(cube), f"1 of 1 {name} chunks are missing", "[0, 0]", "--allow-incomplete")


def test_a_wrong_trust_array_dtype_is_damage_for_verify(cube: Path, tmp_path: Path) -> None:
    meta = json.loads((cube / "novelty" / "zarr.json").read_text())
    meta["data_type"], meta["fill_value"] = "int32", 0
    (cube / "novelty" / "zarr.json").write_text(json.dumps(meta))
    code, output = _cli("verify", cube)
    assert code == 9, output  # before: ok
    _one_line(output, "novelty", "int32", "--overwrite")
    _all_refuse(cube, tmp_path, 9, "novelty", "int32", plot=False)


# 2 corrupt chunk bytes ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["novelty", "uncertainty", "qc"])
def test_a_corrupt_trust_chunk_is_a_data_format_error(name: str, cube: Path, tmp_path: Path) -> None:
    """Before: exit 1, "internal error: RuntimeError: Zstd decompression error"."""
    (cube / name / "c" / "0" / "0").write_bytes(b"garbage!")
    code, output = _cli("verify", cube)
    assert code == 0, output  # verify reads metadata and listings only: the readers decode
    _all_refuse(cube, tmp_path, 9, f"{cube}/{name}", "cannot be decoded", "--overwrite", plot=name != "novelty")


# 3 the trust attribute ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("edit", "attribute"),
    [
        (lambda a: a.update(trust="garbage"), "'trust'"),
        (lambda a: a["trust"].update(novelty=["garbage"]), "'trust.novelty'"),
        (lambda a: a["trust"].update(qc=7), "'trust.qc'"),
    ],
    ids=["trust", "trust.novelty", "trust.qc"],
)
def test_a_trust_attribute_that_is_not_an_object_is_refused(
    edit: Callable[[dict[str, Any]], None], attribute: str, cube: Path, tmp_path: Path
) -> None:
    """Before: AttributeError (exit 1) in to-anndata; verify said ok."""
    _edit_attrs(cube, edit)
    code, output = _cli("verify", cube)
    assert code == 9, output
    _one_line(output, f"attribute {attribute} must be an object", "--overwrite")
    _all_refuse(cube, tmp_path, 9, f"attribute {attribute} must be an object")


# 4 values infer never writes ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "value", "what"),
    [
        ("uncertainty", -1.0, "outside [0, 1e+07]"),  # before: squared, then its root read as +1
        ("uncertainty", 3e38, "outside [0, 1e+07]"),  # before: inf in the .h5ad (float32 overflow of the square)
        ("uncertainty", np.nan, "NaN on 1 cell(s) that have expression"),
        ("novelty", 5.0, "outside [0, 2]"),
        ("novelty", -0.5, "outside [0, 2]"),
        ("novelty", np.nan, "NaN on 1 cell(s) that have expression"),
        ("qc", 255, "undefined quality flag bits"),
        ("qc", 8, "undefined quality flag bits"),
    ],
)
def test_impossible_trust_values_are_refused(name: str, value: float, what: str, cube: Path, tmp_path: Path) -> None:
    _write_value(cube, name, value)
    code, output = _cli("verify", cube)
    assert code == 0, output  # verify does not decode values
    _all_refuse(cube, tmp_path, 9, f"{cube}/{name}", what, "--overwrite", plot=name != "novelty")


# 5 the fixes the messages give --------------------------------------------------------------------
def test_rerunning_infer_recomputes_a_deleted_trust_chunk(pristine: Path, cube: Path) -> None:
    (cube / "novelty" / "c" / "0" / "0").unlink()
    code, output = _cli("infer", SAMPLE, "--out", cube)
    assert code == 0, output
    code, output = _cli("verify", cube)
    assert code == 0, output
    before, after = zarr.open_group(str(pristine), mode="r"), zarr.open_group(str(cube), mode="r")
    np.testing.assert_array_equal(np.asarray(after["novelty"][:]), np.asarray(before["novelty"][:]))


# synthetic cubes: several chunks, chunks without flags ---------------------------------------------
NY, NX, GENES, STRIDE = 80, 80, 3, 10.0


def _synthetic(path: Path, slide: Path, trust: dict[str, Any], qc: np.ndarray) -> Path:
    """An 80 x 80-cell cube in 2 x 2 chunks with the per-cell arrays infer writes, through the real store."""
    yy, xx = np.mgrid[0:NY, 0:NX]
    tissue = ((yy - NY / 2) / (NY * 0.46)) ** 2 + ((xx - NX / 2) / (NX * 0.46)) ** 2 < 1
    expr = np.where(tissue[None], 1.0 + np.arange(GENES)[:, None, None] + 0 * yy, np.nan).astype(np.float16)
    cells = {
        "novelty": np.where(tissue, 0.1 + yy / 1000, np.nan).astype(np.float32),
        "uncertainty": np.where(tissue, 0.5 + xx / 1000, np.nan).astype(np.float32),
        "qc": np.where(tissue, qc, 0).astype(np.uint8),
    }
    mpp = 0.5
    attrs = {
        ATTR_KEY: {"slide": {"path": str(slide), "dimensions": [800, 800]}, "mpp": {"x": mpp, "y": mpp}},
        "genes": [f"G{i}" for i in range(GENES)],
        "units": "log1p(counts per 10k)",
        "stride_um": STRIDE,
        "spot_um": 2 * STRIDE,
        "context_um": 56.0,
        "origin_um": [STRIDE / 2, STRIDE / 2],
        "affine_level0": [[STRIDE / mpp, 0.0, STRIDE / 2 / mpp], [0.0, STRIDE / mpp, STRIDE / 2 / mpp], [0, 0, 1]],
        "trust": trust,
    }
    store, _ = CubeStore.open_for_run(
        path,
        fingerprint="synthetic",
        shape=(GENES, NY, NX),
        attrs=attrs,
        tissue=tissue,
        tissue_fraction=tissue.astype(np.float32),
        cell_arrays=(("novelty", "float32"), ("uncertainty", "float32"), ("qc", "uint8")),
    )
    for cy in range(2):
        for cx in range(2):
            part = (slice(cy * 64, (cy + 1) * 64), slice(cx * 64, (cx + 1) * 64))
            store.write_chunk(cy, cx, expr[(slice(None), *part)], {k: v[part] for k, v in cells.items()})
    store.mark_complete("synthetic", {})
    return path


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_pyramid(tmp_path_factory.mktemp("slide") / "s.tif", synthetic_tissue(800, 800), levels=1)


def test_a_chunk_without_flags_is_stored_so_its_loss_is_seen(pristine: Path, slide: Path, tmp_path: Path) -> None:
    """zarr skips a chunk holding only its fill value (qc 0 everywhere): the store writes it anyway, so a
    lost one is damage; a cube written before (no such guarantee) still reads an absent qc chunk as no flags."""
    import anndata as ad

    trust = json.loads((pristine / "zarr.json").read_text())["attributes"]["trust"]
    cube = _synthetic(tmp_path / "c.zarr", slide, trust, np.zeros((NY, NX)))
    assert (cube / "qc" / "c" / "1" / "1").is_file()  # before: never written
    assert verify_cube(cube)["ok"]
    (cube / "qc" / "c" / "1" / "1").unlink()
    report = verify_cube(cube)
    assert not report["ok"] and report["missing_in"] == {"qc": [(1, 1)]}

    # a cube from before the guarantee: the absent qc chunk is what zarr did with a chunk without flags
    _edit_attrs(cube, lambda a: a[ATTR_KEY].pop(CELL_CHUNKS_KEY))
    assert verify_cube(cube)["ok"]
    code, output = _cli("to-anndata", cube, "--out", tmp_path / "a.h5ad")
    assert code == 0, output
    obs = ad.read_h5ad(tmp_path / "a.h5ad").obs
    assert (obs["pen_ink_fraction"] == 0).all() and np.isfinite(obs["novelty"]).all()


def test_allow_incomplete_leaves_out_the_cells_of_a_chunk_without_novelty(
    pristine: Path, slide: Path, tmp_path: Path
) -> None:
    """As for a lost expression chunk: its cells are not converted (never a NaN novelty), marked partial."""
    import anndata as ad

    trust = json.loads((pristine / "zarr.json").read_text())["attributes"]["trust"]
    cube = _synthetic(tmp_path / "c.zarr", slide, trust, np.full((NY, NX), 4))
    (cube / "novelty" / "c" / "1" / "0").unlink()  # rows 64-79, cols 0-63: has tissue
    code, output = _cli("to-anndata", cube, "--out", tmp_path / "a.h5ad")
    assert code == 13, output
    _one_line(output, "1 of 4 novelty chunks are missing", "[1, 0]", "not predicted", "--allow-incomplete")
    code, output = _cli("to-anndata", cube, "--out", tmp_path / "a.h5ad", "--allow-incomplete")
    assert code == 0, output
    a = ad.read_h5ad(tmp_path / "a.h5ad")
    rows, cols = a.obs["array_row"].to_numpy(), a.obs["array_col"].to_numpy()
    assert a.n_obs > 0 and not ((rows >= 64) & (cols < 64)).any()
    assert np.isfinite(a.obs["novelty"]).all() and (a.obs["unlike_training_fraction"] == 1).all()
    uns = a.uns["wsi_histosge"]
    assert bool(uns["partial"]) and np.asarray(uns["missing_chunks"]).tolist() == [[1, 0]]
