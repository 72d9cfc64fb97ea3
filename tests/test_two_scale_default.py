"""The two-scale default encoder as users meet it: listed as the default, counted honestly in the run report, a
model folder whose JSON names another encoder refused by name, evaluate's options checked before any work,
the encoder recorded in evaluate's outputs, and a damaged feature cache never used."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from tests.conftest import need_shared
from wsi_histosge.cli.app import app
from wsi_histosge.config import DEFAULT_ENCODER
from wsi_histosge.errors import DataFormatError, ModelError
from wsi_histosge.model import default_model_path, load_model

runner = CliRunner()
SAMPLE = Path(__file__).resolve().parents[1] / "wsi_histosge" / "samples" / "cmu1-skin-crop.tif"


def test_encoders_mark_the_one_default() -> None:
    res = runner.invoke(app, ["encoders", "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)
    assert [r["name"] for r in rows if r["default"]] == [DEFAULT_ENCODER] == ["efficientnet-lite0-ms"]
    assert [r["name"] for r in rows if "default" in r["description"]] == [DEFAULT_ENCODER]
    res = runner.invoke(app, ["encoders"], terminal_width=200)
    assert "efficientnet-lite0-ms (default)" in res.output


def test_the_run_report_counts_both_trunk_passes(tmp_path: Path) -> None:
    res = runner.invoke(app, ["infer", str(SAMPLE), "--out", str(tmp_path / "s.zarr"), "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "s.zarr.report.json").read_text())
    assert report["encoder"] == "efficientnet-lite0-ms"
    assert report["patches_encoded"] == report["spots"] > 0
    assert report["encoder_passes"] == 2 * report["patches_encoded"]


@pytest.mark.parametrize(
    ("name", "error", "words"),
    [
        ("efficientnet-lite0", ModelError, "do not belong together"),
        ("bogus-net", DataFormatError, "not a known encoder"),
    ],
)
def test_a_model_json_naming_another_encoder_is_refused(tmp_path: Path, name: str, error: type, words: str) -> None:
    folder = tmp_path / "model"
    shutil.copytree(default_model_path(), folder)
    meta = json.loads((folder / "model.json").read_text())
    meta["encoder"] = name
    (folder / "model.json").write_text(json.dumps(meta))
    with pytest.raises(error, match=words) as info:
        load_model(folder)
    assert "model.json" in str(info.value)
    res = runner.invoke(app, ["infer", str(SAMPLE), "--model", str(folder), "--out", str(tmp_path / "o.zarr")])
    assert res.exit_code == (8 if error is ModelError else 9), res.output
    assert not (tmp_path / "o.zarr").exists()


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--protocol", "loso", "--bootstrap", "1000000000"], "--bootstrap"),
        (["--protocol", "loso", "--seeds", "1000000"], "--seeds"),
        ([str(default_model_path()), "--encoder", "efficientnet-lite0"], "--encoder"),
        ([str(default_model_path()), "--genes", "genes.txt"], "--genes"),
        ([str(default_model_path()), "--n-genes", "10"], "--n-genes"),
    ],
)
def test_evaluate_refuses_options_that_would_be_ignored_or_run_away(args: list[str], words: str) -> None:
    res = runner.invoke(app, ["evaluate", *args, "--data", "her2st:/nonexistent:C2"])
    assert res.exit_code == 2 and words in res.output, res.output


def test_the_gene_drop_note_names_whole_genes() -> None:
    from wsi_histosge.train import measured_genes

    genes = [f"GENE{i:03d}LONGNAME" for i in range(40)]
    lacking = set(genes[5:30])
    section = SimpleNamespace(name="S1", missing=lambda gs: [g for g in gs if g in lacking])
    notes: list[str] = []
    kept = measured_genes([section], genes, log=notes.append)  # type: ignore[list-item]
    assert kept == [g for g in genes if g not in lacking]
    (note,) = notes
    assert "(GENE005LONGNAME, " in note and "GENE014LONGNAME and 15 more): dropped" in note


@pytest.mark.realdata
def test_evaluate_records_the_encoder_and_a_damaged_feature_cache_is_not_used(tmp_path: Path) -> None:
    from wsi_histosge.dataset import section_features
    from wsi_histosge.encoders import create_encoder
    from wsi_histosge.stdata import her2st_section

    root = need_shared("her2st")
    section = her2st_section(root, "C6")
    enc = create_encoder("tiny-test")
    first = section_features(section, enc, context_um=enc.cfg.context_um, cache_dir=tmp_path)
    # a chunk that still decodes, to other numbers (zstd keeps no checksum): what a flipped bit can give
    (cache,) = tmp_path.glob("C6-*.zarr")
    zarr.open_group(str(cache), mode="r+")["features"][0, :4] = 1e30
    again = section_features(section, enc, context_um=enc.cfg.context_um, cache_dir=tmp_path)
    np.testing.assert_array_equal(first, again)

    out = tmp_path / "ev.json"
    res = runner.invoke(
        app,
        ["evaluate", str(default_model_path()), "--data", f"her2st:{root}:C6", "--bootstrap", "0", "--json", str(out)],
    )
    assert res.exit_code == 0, res.output
    result = json.loads(out.read_text())
    record = result["encoder"]
    assert record["name"] == "efficientnet-lite0-ms" and record["embed_dim"] == 3968
    # without --train, the top 50 are still the training genes (model.json's list), so C6 scores as at training
    assert result["top50_source"] == "the model's training sections (model.json)"
    (stored,) = load_model(default_model_path()).meta.metrics["folds"]
    (fold,) = result["folds"]
    assert fold["scores"]["model"]["top50"]["mean_r"] == pytest.approx(
        stored["scores"]["head"]["top50"]["mean_r"], abs=0.002
    )
    assert json.loads(res.output[res.output.index("{") :])["encoder"] == "efficientnet-lite0-ms"
