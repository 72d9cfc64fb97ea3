"""The command line on real files: the README's main job, errors and exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from tests.conftest import need_shared
from wsi_histosge.cli.app import app
from wsi_histosge.model import default_model_path
from wsi_histosge.store import open_cube

runner = CliRunner()


@pytest.mark.realdata
def test_cmu_end_to_end_with_default_model(tmp_path: Path) -> None:
    slide = need_shared("wsi-samples", "CMU-1-Small-Region.svs")
    out = tmp_path / "cmu.zarr"
    res = runner.invoke(app, ["infer", str(slide), "--out", str(out), "--workers", "1", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout[res.stdout.index("{") :])
    assert report["model"] == "her2st-effnetlite0" and report["mpp_source"] == "aperio image description (MPP)"
    g = open_cube(out)
    expr = np.asarray(g["expression"][:], dtype=np.float32)
    tissue = np.asarray(g["tissue"][:]).astype(bool)
    assert tissue.sum() == report["spots"] > 100
    assert np.isfinite(expr[:, tissue]).all()
    genes = list(g.attrs["genes"])
    # each gene's plane holds that gene: the model's genes in its order, and per-gene means over the tissue that
    # follow the model's training means (a plane shifted by one gene correlates about 0)
    model = json.loads((default_model_path() / "model.json").read_text())
    assert genes == model["genes"]
    assert np.corrcoef(expr[:, tissue].mean(axis=1), model["training"]["gene_means"])[0, 1] > 0.9
    # epithelial/stromal markers vary across the tissue
    for gene in ("FN1", "CD74"):
        assert expr[genes.index(gene)][tissue].std() > 0
    # the tissue mask matches the slide's pixels: kept spots sit on stained (non-white) pixels
    from wsi_histosge.slide import open_slide

    s = open_slide(slide)
    iy, ix = np.nonzero(tissue)
    affine = np.asarray(g.attrs["affine_level0"])
    xy = (affine @ np.stack([ix, iy, np.ones_like(ix)]))[:2].T.astype(int)
    means = [s.read_region((x - 20, y - 20), 0, (40, 40)).mean() for x, y in xy[::7]]
    assert np.median(means) < 200
    again = runner.invoke(app, ["infer", str(slide), "--out", str(out), "--workers", "0"])
    assert again.exit_code == 0 and "already complete" in again.output


@pytest.mark.realdata
def test_her2st_jpeg_needs_mpp_exit_code(tmp_path: Path) -> None:
    jpg = need_shared("her2st", "ST-imgs", "C", "C6", "5714_HE_BT_E2.jpg")
    res = runner.invoke(app, ["infer", str(jpg), "--out", str(tmp_path / "x.zarr")])
    assert res.exit_code == 5 and "--mpp" in res.output
    assert not (tmp_path / "x.zarr").exists()


def test_errors_have_exit_codes_and_no_traceback(tmp_path: Path) -> None:
    res = runner.invoke(app, ["infer", str(tmp_path / "missing.svs")])
    assert res.exit_code == 3 and "Traceback" not in res.output and "missing.svs" in res.output
    fake = tmp_path / "fake.svs"
    fake.write_text("not a slide")
    res = runner.invoke(app, ["info", str(fake)])
    assert res.exit_code == 4 and "fake.svs" in res.output


def test_model_encoder_mismatch(pyramid_slide: Path, tiny_model: Path, tmp_path: Path) -> None:
    meta = json.loads((tiny_model / "model.json").read_text())
    bad = tmp_path / "mismatch"
    bad.mkdir()
    meta["encoder"] = "efficientnet-lite0"
    meta["encoder_weights_sha256"] = ""
    (bad / "model.json").write_text(json.dumps(meta))
    (bad / "model.safetensors").write_bytes((tiny_model / "model.safetensors").read_bytes())
    res = runner.invoke(app, ["infer", str(pyramid_slide), "--model", str(bad), "--out", str(tmp_path / "o.zarr")])
    assert res.exit_code == 8 and "16-d" in res.output and "1280-d" in res.output


def test_info_and_encoders_json(pyramid_slide: Path) -> None:
    res = runner.invoke(app, ["info", str(pyramid_slide), "--json"])
    assert res.exit_code == 0
    data = json.loads(res.stdout)
    assert data["mpp"]["source"] == "TIFF resolution tags" and len(data["levels"]) == 3
    res = runner.invoke(app, ["encoders", "--json"])
    assert res.exit_code == 0 and any(e["name"] == "uni" for e in json.loads(res.stdout))


def test_doctor_passes_offline() -> None:
    res = runner.invoke(app, ["doctor", "--json"])
    assert res.exit_code == 0, res.output
    rows = {r["check"]: r for r in json.loads(res.stdout)}
    assert rows["built-in model"]["ok"] and "795 genes" in rows["built-in model"]["detail"]
