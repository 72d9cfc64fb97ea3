"""The README's first command, as a new user runs it: a fresh clone, nothing beside it, default flags."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from typer.testing import CliRunner

from wsi_histosge.cli.app import app

ROOT = Path(__file__).resolve().parents[1]


def _first_command() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", readme, re.S)
    assert block, "the README has no bash block"
    parts = [p.strip() for p in block.group(1).split("&&")]
    infer = [p for p in parts if p.startswith("wsi-histosge ")]
    assert infer, f"the first command runs no wsi-histosge command: {block.group(1)}"
    return shlex.split(infer[0])[1:]


def test_first_command_needs_nothing_beside_the_clone() -> None:
    args = _first_command()
    assert all("../" not in a and not a.startswith("/") for a in args), args
    slide = ROOT / args[1]
    assert slide.is_file() and slide.stat().st_size < 1_000_000, slide  # provided, and small
    assert (ROOT / "wsi_histosge" / "samples" / "README.md").read_text().count("CMU-1") >= 1  # source documented


def test_first_command_runs_with_its_own_flags(tmp_path: Path, monkeypatch) -> None:
    args = _first_command()
    monkeypatch.chdir(tmp_path)
    args = [str(ROOT / a) if i == 1 else a for i, a in enumerate(args)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    out = tmp_path / args[args.index("--out") + 1]
    res = CliRunner().invoke(app, ["verify", str(out)])
    assert res.exit_code == 0, res.output
    import zarr

    g = zarr.open_group(out, mode="r")
    assert g.attrs["wsi_histosge"]["mpp"]["source"] == "TIFF resolution tags"
    assert int(g["tissue"][:].sum()) > 100  # real tissue, predicted


def test_version() -> None:
    from wsi_histosge import __version__

    res = CliRunner().invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.strip() == f"wsi-histosge {__version__}"
