"""The legacy-ST reader refuses spot coordinates whose geometry it would get wrong."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from tests.conftest import need_shared
from wsi_histosge.errors import DataFormatError
from wsi_histosge.stdata import read_legacy_st


def _her2st_c3(tmp_path: Path, scale_y: float = 1.0) -> tuple[Path, Path, Path]:
    root = need_shared("her2st")
    spots = pd.read_csv(root / "ST-spotfiles" / "C3_selection.tsv", sep="\t")
    spots["pixel_y"] *= scale_y
    edited = tmp_path / "C3_selection.tsv"
    spots.to_csv(edited, sep="\t", index=False)
    image = sorted((root / "ST-imgs" / "C" / "C3").glob("*.jpg"))[0]
    return root / "ST-cnts" / "C3.tsv.gz", edited, image


@pytest.mark.realdata
def test_the_mouse_olfactory_bulb_checkerboard_is_refused_by_name() -> None:
    """Its spots sit on (odd, odd) and (even, even) array positions only: reading one array step as the 200 µm
    pitch gave 8.8 µm/px for a ~3.5 µm/px image, and no spot had a lattice neighbour."""
    root = need_shared("st-mob-stutility")
    with pytest.raises(DataFormatError, match="checkerboard") as err:
        read_legacy_st(root / "MOB1.tsv", root / "alignment_table_MOB1.tsv", root / "MOB1.jpg")
    assert "alignment_table_MOB1.tsv" in str(err.value) and "0% of the spots" in str(err.value)


@pytest.mark.realdata
@pytest.mark.parametrize(("scale_y", "ok"), [(1.0, True), (1.03, True), (1.1, False), (0.9, False)])
def test_unevenly_scaled_pixel_coordinates_are_refused(tmp_path: Path, scale_y: float, ok: bool) -> None:
    counts, spots, image = _her2st_c3(tmp_path, scale_y)
    if ok:
        section = read_legacy_st(counts, spots, image)
        assert section.mpp == pytest.approx(200 / 291 / (1 + scale_y) * 2, rel=0.02)
    else:
        with pytest.raises(DataFormatError, match="resized unevenly"):
            read_legacy_st(counts, spots, image)


@pytest.mark.realdata
def test_train_refuses_the_checkerboard_section_before_any_work(tmp_path: Path) -> None:
    from wsi_histosge.cli.app import app

    root = need_shared("st-mob-stutility")
    spec = f"{root / 'MOB1.tsv'}:{root / 'alignment_table_MOB1.tsv'}:{root / 'MOB1.jpg'}"
    out = tmp_path / "m"
    res = CliRunner().invoke(app, ["train", spec, "--out", str(out)])
    assert res.exit_code == 9, res.output
    assert "checkerboard" in " ".join(res.output.split()) and not out.exists()
