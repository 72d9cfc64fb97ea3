"""Where the output cannot be written (a full or read-only file system, an --out under a file) every command
says so in one line with the documented exit code, and leaves nothing that looks like a result."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import synthetic_tissue, write_pyramid
from wsi_histosge.errors import EXIT_CODES


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "wsi_histosge.cli.app", *args], capture_output=True, text=True)


@pytest.fixture(scope="module")
def cube(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Path:
    base = tmp_path_factory.mktemp("wf")
    slide = write_pyramid(base / "s.tif", synthetic_tissue(1200, 1200, seed=3), levels=2)
    out = base / "s.zarr"
    res = _cli("infer", str(slide), "--model", str(tiny_model), "--out", str(out))
    assert res.returncode == 0, res.stderr
    return out


def _mount(where: Path, options: str) -> None:
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True)
    if res.returncode != 0:
        pytest.skip("needs a tmpfs mount (root): a real full or read-only file system cannot be made here")


@pytest.fixture(params=["full", "read-only"])
def bad_fs(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    disk = tmp_path / request.param
    disk.mkdir()
    _mount(disk, "size=64k" if request.param == "full" else "ro")
    try:
        if request.param == "full":
            ballast = disk / "ballast"
            with ballast.open("wb", buffering=0) as fh:
                try:
                    while True:
                        fh.write(b"\0" * 4096)
                except OSError:
                    pass
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=False)


EXPORTS = {
    "to-anndata": ["--out", "{d}/a.h5ad"],
    "to-spatialdata": ["--out", "{d}/s.zarr"],
    "to-qupath": ["--genes", "G3", "--out", "{d}/q.geojson"],
    "plot": ["--out", "{d}/maps"],
}


@pytest.mark.parametrize("command", sorted(EXPORTS))
def test_exports_on_a_full_or_read_only_fs_exit_14_and_leave_nothing(cube: Path, bad_fs: Path, command: str) -> None:
    before = sorted(p.name for p in bad_fs.iterdir())
    res = _cli(command, str(cube), *(a.format(d=bad_fs) for a in EXPORTS[command]))
    assert res.returncode == 14, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    out = EXPORTS[command][-1].format(d=bad_fs)
    assert f"{out}: writing failed" in lines[0] and ".partial" not in lines[0] and "internal error" not in lines[0]
    assert sorted(p.name for p in bad_fs.iterdir()) == before  # no temporary, no empty folder left


@pytest.mark.parametrize("command", ["infer", *sorted(EXPORTS)])
def test_an_out_under_a_file_is_a_usage_error(cube: Path, tmp_path: Path, tiny_model: Path, command: str) -> None:
    afile = tmp_path / "notes.txt"
    afile.write_text("mine\n")
    if command == "infer":
        args = ["infer", str(cube.parent / "s.tif"), "--model", str(tiny_model), "--out", f"{afile}/x.zarr"]
    else:
        args = [command, str(cube), *(a.format(d=afile) for a in EXPORTS[command])]
    res = _cli(*args)
    assert res.returncode == 2, res.stderr
    assert f"{afile} is a file, not a folder; choose another --out" in res.stderr
    assert afile.read_text() == "mine\n"


def test_usage_errors_of_the_export_options(cube: Path, tmp_path: Path) -> None:
    res = _cli("plot", str(cube), "--out", str(tmp_path / "maps"), "--no-qc")
    assert res.returncode == 2 and "nothing to draw" in res.stderr, res.stderr
    assert not (tmp_path / "maps").exists()
    res = _cli("to-anndata", str(cube), "--out", str(tmp_path / "a.h5ad"), "--layout", "")
    assert res.returncode == 2 and "--layout must be grid or visium" in res.stderr, res.stderr
    assert "internal error" not in res.stderr and not (tmp_path / "a.h5ad").exists()


def test_exit_14_is_documented() -> None:
    assert "writing the output failed" in EXIT_CODES[14]


def test_to_anndata_overwrite_replaces_only_its_own_files(cube: Path, tmp_path: Path) -> None:
    """--overwrite replaces an .h5ad written by to-anndata; a user's own file of that name is never deleted."""
    import anndata
    import numpy as np

    theirs = tmp_path / "theirs.h5ad"
    anndata.AnnData(np.ones((3, 2), dtype=np.float32)).write_h5ad(theirs)
    notes = tmp_path / "notes.h5ad"
    notes.write_text("my notes\n")
    for target in (theirs, notes):
        before = target.read_bytes()
        res = _cli("to-anndata", str(cube), "--out", str(target), "--overwrite")
        assert res.returncode == 7, res.stderr
        assert "not an .h5ad written by `wsi-histosge to-anndata`" in res.stderr
        assert target.read_bytes() == before
    ours = tmp_path / "ours.h5ad"
    assert _cli("to-anndata", str(cube), "--out", str(ours)).returncode == 0
    res = _cli("to-anndata", str(cube), "--out", str(ours), "--resolution", "spot", "--overwrite")
    assert res.returncode == 0, res.stderr
    assert anndata.read_h5ad(ours).uns["wsi_histosge"]["bin_um"] > 0


def test_files_beside_the_cube_are_replaced_only_when_ours(cube: Path, tmp_path: Path, tiny_model: Path) -> None:
    """infer writes OUT.report.json and OUT.tissue.geojson: a user's files of those names (even the mask given
    with --tissue-mask) are refused, exit 7, and kept; its own are replaced on a rerun."""
    slide = str(cube.parent / "s.tif")
    out = tmp_path / "x.zarr"
    mine = '{"note": "mine"}\n'
    for suffix in (".report.json", ".tissue.geojson"):
        side = tmp_path / f"x.zarr{suffix}"
        side.write_text(mine)
        res = _cli("infer", slide, "--model", str(tiny_model), "--out", str(out))
        assert res.returncode == 7, res.stderr
        assert f"{side}: exists and was not written by wsi-histosge" in res.stderr
        assert side.read_text() == mine and not out.exists()
        side.unlink()
    # a pathologist's outline given as the mask, where infer writes its own outline
    res = _cli("infer", slide, "--model", str(tiny_model), "--out", str(out))
    assert res.returncode == 0, res.stderr
    outline = tmp_path / "x.zarr.tissue.geojson"
    doc = json.loads(outline.read_text())
    doc["features"][0]["properties"] = {"objectType": "annotation", "classification": {"name": "Tumor"}, "name": "PI"}
    del doc["generator"]
    outline.write_text(json.dumps(doc))
    kept = outline.read_text()
    res = _cli(
        "infer", slide, "--model", str(tiny_model), "--out", str(tmp_path / "y.zarr"), "--tissue-mask", str(outline)
    )
    assert res.returncode == 0, res.stderr  # another --out: fine
    res = _cli(
        "infer", slide, "--model", str(tiny_model), "--out", str(out), "--tissue-mask", str(outline), "--overwrite"
    )
    assert res.returncode == 7 and "exists and was not written by wsi-histosge" in res.stderr, res.stderr
    assert outline.read_text() == kept
    # its own files: a rerun replaces them
    outline.unlink()
    assert _cli("infer", slide, "--model", str(tiny_model), "--out", str(out)).returncode == 0
    assert _cli("infer", slide, "--model", str(tiny_model), "--out", str(out), "--overwrite").returncode == 0


def test_plot_replaces_only_its_own_pictures(cube: Path, tmp_path: Path) -> None:
    maps = tmp_path / "maps"
    maps.mkdir()
    for name in ("qc.png", "G3.png"):
        (maps / name).write_bytes(b"my picture")
        res = _cli("plot", str(cube), "--genes", "G3,G4", "--out", str(maps))
        assert res.returncode == 7 and f"{maps / name}: exists and was not written" in res.stderr, res.stderr
        assert (maps / name).read_bytes() == b"my picture"
        assert not (maps / "G4.png").exists()  # refused before anything was drawn
        (maps / name).unlink()
    for _ in range(2):  # its own pictures are replaced
        res = _cli("plot", str(cube), "--genes", "G3,G4", "--out", str(maps))
        assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in maps.iterdir()) == ["G3.png", "G4.png", "genes_grid.png", "qc.png"]


def test_batch_replaces_only_its_own_summaries(cube: Path, tmp_path: Path, tiny_model: Path) -> None:
    out = tmp_path / "results"
    out.mkdir()
    slide = str(cube.parent / "s.tif")
    for name in ("report.html", "summary.csv", "summary.json"):
        (out / name).write_text("mine\n")
        res = _cli("batch", slide, "--model", str(tiny_model), "--out", str(out))
        assert res.returncode == 7 and f"{out / name}: exists and was not written" in res.stderr, res.stderr
        assert (out / name).read_text() == "mine\n"
        (out / name).unlink()
    for _ in range(2):
        res = _cli("batch", slide, "--model", str(tiny_model), "--out", str(out))
        assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("command", ["plot", "to-anndata", "to-spatialdata"])
def test_slide_option_must_be_the_cubes_slide(cube: Path, tmp_path: Path, command: str) -> None:
    """--slide (the slide moved) is checked against the fingerprint the cube recorded: another slide is refused
    instead of being drawn under or packed with the cube's predictions."""
    import shutil

    other = write_pyramid(tmp_path / "other.tif", synthetic_tissue(1600, 1400, seed=9), levels=2)
    moved = tmp_path / "moved.tif"
    shutil.copy(cube.parent / "s.tif", moved)
    out = {"plot": "maps", "to-anndata": "a.h5ad", "to-spatialdata": "s.zarr"}[command]
    res = _cli(command, str(cube), "--out", str(tmp_path / out), "--slide", str(other))
    assert res.returncode == 2, res.stderr
    assert f"--slide {other}: not the slide this cube was made from" in res.stderr
    assert not (tmp_path / out).exists()
    res = _cli(command, str(cube), "--out", str(tmp_path / out), "--slide", str(moved))
    assert res.returncode == 0, res.stderr
