"""Rotation test-time augmentation as a model property, and the gene panel options of `train`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from tests.conftest import need_shared, synthetic_tissue
from wsi_histosge.encoders import create_encoder
from wsi_histosge.errors import DataFormatError, OutputExistsError
from wsi_histosge.infer import InferOptions, infer_slide
from wsi_histosge.model import default_model_path, load_model
from wsi_histosge.store import open_cube


def _patches(encoder_px: int, n: int = 2) -> torch.Tensor:
    """Normalised-looking patches cut from the synthetic tissue (not rotation-symmetric)."""
    img = synthetic_tissue(600, 800, seed=3)
    crops = [img[100 + 90 * i : 100 + 90 * i + encoder_px, 200 : 200 + encoder_px] for i in range(n)]
    x = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float() / 255.0
    return (x - 0.5) / 0.25


def test_rot4_features_are_the_same_for_a_turned_patch_and_differ_from_none() -> None:
    encoder = create_encoder("efficientnet-lite0")
    x = _patches(encoder.cfg.input_px)
    with torch.inference_mode():
        plain = encoder.embed(x, "none")
        rot = encoder.embed(x, "rot4")
        turned = encoder.embed(torch.rot90(x, 1, dims=(2, 3)), "rot4")
        plain_turned = encoder.embed(torch.rot90(x, 1, dims=(2, 3)), "none")
        assert torch.equal(plain, encoder(x).float())
    # a quarter turn of the input only reorders the four passes: equal to float32 summation order
    assert torch.allclose(rot, turned, atol=1e-4 * float(rot.abs().max()))
    # without augmentation the encoder is not rotation invariant: the augmentation does something
    assert float((plain - plain_turned).abs().max()) > 1e-2
    assert float((rot - plain).abs().max()) > 1e-2


def _with_tta(model: Path, tmp_path: Path, tta: object) -> Path:
    copy = tmp_path / f"model-{tta}"
    shutil.copytree(model, copy)
    meta = json.loads((copy / "model.json").read_text())
    meta["tta"] = tta
    (copy / "model.json").write_text(json.dumps(meta))
    return copy


def test_infer_uses_the_models_augmentation_and_reports_its_cost(
    pyramid_slide: Path, tiny_model: Path, tmp_path: Path
) -> None:
    rot4 = _with_tta(tiny_model, tmp_path, "rot4")
    opts = {"num_workers": 0, "stride_um": 40.0}
    plain = infer_slide(pyramid_slide, tmp_path / "none.zarr", InferOptions(model=tiny_model, **opts))
    turned = infer_slide(pyramid_slide, tmp_path / "rot4.zarr", InferOptions(model=rot4, **opts))
    assert plain.tta == "none" and plain.encoder_passes == plain.patches_encoded == plain.spots
    assert turned.tta == "rot4" and turned.encoder_passes == 4 * turned.patches_encoded == 4 * turned.spots
    report = json.loads((tmp_path / "rot4.zarr.report.json").read_text())
    assert report["tta"] == "rot4" and report["encoder_passes"] == 4 * report["spots"]
    a = np.asarray(open_cube(tmp_path / "none.zarr")["expression"][:], dtype=np.float32)
    b = np.asarray(open_cube(tmp_path / "rot4.zarr")["expression"][:], dtype=np.float32)
    on = np.isfinite(a) & np.isfinite(b)
    assert on.any() and float(np.abs(a[on] - b[on]).max()) > 1e-3  # the features were augmented
    with pytest.raises(OutputExistsError):  # a cube is never resumed by a model of other augmentation
        infer_slide(pyramid_slide, tmp_path / "none.zarr", InferOptions(model=rot4, **opts))


@pytest.mark.parametrize("value", ["rot8", 4, None])
def test_a_checkpoint_with_an_unknown_augmentation_is_refused(tiny_model: Path, tmp_path: Path, value: object) -> None:
    with pytest.raises(DataFormatError, match="'tta' must be one of"):
        load_model(_with_tta(tiny_model, tmp_path, value))


@pytest.mark.parametrize("value", ["none", "absent"])
def test_a_checkpoint_whose_augmentation_was_edited_is_refused(tiny_model: Path, tmp_path: Path, value: str) -> None:
    """model.json's 'tta' must be what training recorded: a removed or edited key would run the model on
    features it never saw."""
    model = _with_tta(tiny_model, tmp_path, "rot4")
    meta = json.loads((model / "model.json").read_text())
    meta["training"]["tta"] = "rot4"
    if value == "absent":
        del meta["tta"]
    else:
        meta["tta"] = value
    (model / "model.json").write_text(json.dumps(meta))
    with pytest.raises(DataFormatError, match="was trained with tta 'rot4'"):
        load_model(model)


def test_a_checkpoint_without_the_key_has_no_augmentation() -> None:
    meta = json.loads((default_model_path() / "model.json").read_text())
    assert load_model(default_model_path()).meta.tta == meta.get("tta", "none")


@pytest.mark.realdata
def test_train_with_tta_and_added_genes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from wsi_histosge.cli.app import app

    monkeypatch.setenv("WSI_HISTOSGE_CACHE", str(tmp_path / "cache"))
    root = need_shared("her2st")
    out = tmp_path / "m"
    args = ["train", f"her2st:{root}:C3", "--val", f"her2st:{root}:C4", "--out", str(out), "--n-genes", "20"]
    res = CliRunner().invoke(app, [*args, "--epochs", "5", "--tta", "rot4", "--add-genes", "ERBB2, COL1A1,ERBB2"])
    assert res.exit_code == 0, res.output
    model = load_model(out)
    assert model.meta.tta == "rot4"
    assert model.meta.genes[-2:] == ["ERBB2", "COL1A1"] and len(model.meta.genes) == 22
    assert model.meta.training["added_genes"] == ["ERBB2", "COL1A1"]
    caches = sorted((tmp_path / "cache" / "features").glob("*.zarr"))
    import zarr

    assert {zarr.open_group(str(c), mode="r").attrs["tta"] for c in caches} == {"rot4"} and len(caches) == 2


@pytest.mark.realdata
@pytest.mark.parametrize(
    ("extra", "code", "message"),
    [
        (["--add-genes", "PGR"], 9, "1 gene(s) not measured in every section: PGR (not in C5)"),
        (
            ["--add-genes", "PGR,KRT14,erbb2"],
            9,
            "KRT14 (not in C3, C5); erbb2 (not in C3, C5) (names are case-sensitive: ERBB2 for erbb2)",
        ),
        (["--add-genes", " , "], 2, "--add-genes names no gene"),
        (["--tta", "rot8"], 2, "--tta must be one of none, rot4"),
    ],
)
def test_train_refuses_a_bad_panel_or_augmentation_before_any_work(
    tmp_path: Path, extra: list[str], code: int, message: str
) -> None:
    from wsi_histosge.cli.app import app

    root = need_shared("her2st")
    out = tmp_path / "m"
    res = CliRunner().invoke(app, ["train", f"her2st:{root}:C3", f"her2st:{root}:C5", "--out", str(out), *extra])
    assert res.exit_code == code, res.output
    assert message in " ".join(res.output.split())
    assert not out.exists()
