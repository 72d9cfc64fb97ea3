"""Novelty and uncertainty: the scores, the checkpoint's trust part (and its refusal when damaged), and the
cube arrays ``infer`` writes from them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from tests.conftest import need_shared
from wsi_histosge import trust
from wsi_histosge.model import load_model, save_model


def test_cosine_knn_distance_is_zero_for_a_reference_row_and_one_for_an_orthogonal_one() -> None:
    ref = trust.unit_rows(np.eye(4, dtype=np.float32) * 3.0)
    q = np.array([[2.0, 0, 0, 0], [0, 0, 0, 0.5], [1.0, 1.0, 0, 0]], dtype=np.float32)
    d1 = trust.knn_cosine_distance(q, ref, k=1)
    assert d1 == pytest.approx([0.0, 0.0, 1 - 2**-0.5], abs=1e-6)
    d2 = trust.knn_cosine_distance(q, ref, k=2)  # mean of the two best: (1 + 0) / 2 for a reference row
    assert d2 == pytest.approx([0.5, 0.5, 1 - 2**-0.5], abs=1e-6)
    # scaling a query does not change its cosine distance; raw features, not standardised ones
    assert trust.knn_cosine_distance(q * 7.0, ref, k=2) == pytest.approx(d2, abs=1e-6)


def test_auroc_matches_the_rank_statistic() -> None:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    neg, pos = rng.normal(0, 1, 200).round(1), rng.normal(0.7, 1, 150).round(1)  # rounded: ties
    expected = roc_auc_score(np.r_[np.zeros(200), np.ones(150)], np.r_[neg, pos])
    assert trust.auroc(neg, pos) == pytest.approx(expected, abs=1e-12)
    assert trust.auroc(neg, neg + 100) == 1.0 and trust.auroc(neg + 100, neg) == 0.0


def test_percentile_of_reads_the_calibration() -> None:
    calib = np.percentile(np.arange(1001, dtype=float), trust.CALIBRATION_PERCENTILES)
    assert trust.percentile_of(np.array([0.0, 500.0, 950.0, 5000.0]), calib) == pytest.approx([0, 50, 95, 100])


def _trust_for(model_path: Path, slide: Path, *, seed: int = 0) -> trust.Trust:
    """A trust part whose reference is the slide's own tissue (encoded with the model's encoder), calibrated
    leave-one-half-out, with a seeded library read-out and error model."""
    from wsi_histosge.encoders import create_encoder
    from wsi_histosge.loader import encode_points
    from wsi_histosge.slide import open_slide

    model = load_model(model_path)
    enc = create_encoder(model.meta.encoder)
    s = open_slide(slide)
    rng = np.random.default_rng(seed)
    w, h = s.dimensions
    pts = np.stack([rng.uniform(0.3 * w, 0.7 * w, 80), rng.uniform(0.3 * h, 0.7 * h, 80)], 1)
    feats = encode_points(s, pts, enc, context_um=model.meta.context_um)
    calib = np.percentile(np.concatenate(trust.loso_novelty([feats[:40], feats[40:]])), trust.CALIBRATION_PERCENTILES)
    gen = torch.Generator().manual_seed(seed)
    return trust.Trust(
        trust.unit_rows(feats),
        calib,
        torch.randn(enc.cfg.embed_dim, generator=gen) * 0.01,
        7.0,
        {"intercept": -1.0, "predicted_log_library_size": -0.2, "novelty": 3.0},
    )


@pytest.fixture(scope="module")
def trust_model(tiny_model: Path, pyramid_slide: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = load_model(tiny_model)
    model.trust = _trust_for(tiny_model, pyramid_slide)
    out = tmp_path_factory.mktemp("trust") / "model"
    save_model(model, out)
    return out


def test_the_trust_part_survives_save_and_load(trust_model: Path) -> None:
    model = load_model(trust_model)
    assert model.trust is not None
    meta = json.loads((trust_model / "model.json").read_text())
    assert meta["trust"]["novelty"]["k"] == trust.NOVELTY_K
    assert len(meta["trust"]["novelty"]["calibration"]) == len(trust.CALIBRATION_PERCENTILES)
    feats = torch.randn(5, model.head.cfg.in_dim)
    scores = model.trust.scores(feats, model.head.standardise(feats))
    assert scores.shape == (5, 2) and bool(torch.isfinite(scores).all()) and bool((scores[:, 1] > 0).all())
    assert model.trust.threshold(95.0) >= model.trust.threshold(50.0)


def _damaged(src: Path, dst: Path, edit: object) -> Path:
    shutil.copytree(src, dst)
    meta = json.loads((dst / "model.json").read_text())
    edit(meta)  # type: ignore[operator]
    (dst / "model.json").write_text(json.dumps(meta))
    return dst


@pytest.mark.parametrize(
    ("name", "edit", "message"),
    [
        ("decreasing", lambda m: m["trust"]["novelty"]["calibration"].reverse(), "non-decreasing"),
        ("short", lambda m: m["trust"]["novelty"].update(calibration=[0.1, 0.2]), "novelty.calibration"),
        ("nan", lambda m: m["trust"]["uncertainty"]["coefficients"].update(novelty=float("nan")), "coefficients"),
        ("huge", lambda m: m["trust"]["uncertainty"]["coefficients"].update(novelty=1e6), "within ±100"),
        ("k", lambda m: m["trust"]["novelty"].update(k=0), "novelty.k"),
        ("k-bool", lambda m: m["trust"]["novelty"].update(k=True), "novelty.k"),
        ("gone", lambda m: m.pop("trust"), "'trust' must hold"),
        ("list", lambda m: m.update(trust=[1]), "'trust' must be an object"),
    ],
)
def test_a_damaged_trust_part_is_refused_by_name(
    trust_model: Path, tmp_path: Path, name: str, edit: object, message: str
) -> None:
    from wsi_histosge.errors import DataFormatError

    bad = _damaged(trust_model, tmp_path / name, edit)
    # model.json is JSON a user can edit: malformed fields are exit 9, as the README's table says
    with pytest.raises(DataFormatError, match=message.replace("(", r"\(")):
        load_model(bad)


def test_a_model_without_trust_still_loads_and_has_none(tiny_model: Path) -> None:
    assert load_model(tiny_model).trust is None


def test_infer_writes_novelty_uncertainty_and_flags_and_keeps_the_expression(
    trust_model: Path, tiny_model: Path, pyramid_slide: Path, tmp_path: Path
) -> None:
    """The same head with and without a trust part: bit-identical expression; the trust cube has novelty,
    uncertainty and qc for every predicted cell, and the report counts the flags."""
    import zarr

    from wsi_histosge.infer import InferOptions, infer_slide

    plain = infer_slide(pyramid_slide, tmp_path / "plain.zarr", InferOptions(model=str(tiny_model), num_workers=0))
    res = infer_slide(pyramid_slide, tmp_path / "trust.zarr", InferOptions(model=str(trust_model), num_workers=0))
    a = zarr.open_group(str(tmp_path / "plain.zarr"), mode="r")
    b = zarr.open_group(str(tmp_path / "trust.zarr"), mode="r")
    np.testing.assert_array_equal(np.asarray(a["expression"][:]), np.asarray(b["expression"][:]))
    assert "novelty" not in a and "qc" in a
    tissue = np.asarray(b["tissue"][:], bool)
    nov, unc, flags = (np.asarray(b[k][:]) for k in ("novelty", "uncertainty", "qc"))
    assert np.isfinite(nov[tissue]).all() and np.isfinite(unc[tissue]).all() and (unc[tissue] > 0).all()
    assert np.isnan(nov[~tissue]).all() and (flags[~tissue] == 0).all()
    assert b.attrs["trust"]["novelty"]["threshold_percentile"] == trust.DEFAULT_NOVELTY_PERCENTILE
    assert res.trust["cells"] == int(tissue.sum()) == plain.trust["cells"]
    assert res.trust["unlike_training"] == int(((flags & trust.QC_NOVEL) > 0).sum())
    assert "unlike_training" not in plain.trust


@pytest.mark.parametrize(("percentile", "all_flagged"), [(0.0, True), (100.0, False)])  # min / max of calibration
def test_novelty_threshold_flags_cells_and_never_drops_them(
    trust_model: Path, pyramid_slide: Path, tmp_path: Path, percentile: float, all_flagged: bool
) -> None:
    import zarr

    from wsi_histosge.infer import InferOptions, infer_slide

    out = tmp_path / "c.zarr"
    infer_slide(pyramid_slide, out, InferOptions(model=str(trust_model), num_workers=0, novelty_threshold=percentile))
    g = zarr.open_group(str(out), mode="r")
    tissue = np.asarray(g["tissue"][:], bool)
    novel = (np.asarray(g["qc"][:]) & trust.QC_NOVEL) > 0
    expr = np.asarray(g["expression"][0])
    assert np.isfinite(expr[tissue]).all()  # flagged cells are still predicted
    nov = np.asarray(g["novelty"][:])
    assert (novel == (nov > g.attrs["trust"]["novelty"]["threshold"])).all()
    share = novel[tissue].mean()
    assert share > 0.9 if all_flagged else share < 0.5, share  # the reference covers the middle of the slide


def test_a_different_novelty_threshold_is_another_run(trust_model: Path, pyramid_slide: Path, tmp_path: Path) -> None:
    from wsi_histosge.errors import OutputExistsError
    from wsi_histosge.infer import InferOptions, infer_slide

    out = tmp_path / "c.zarr"
    infer_slide(pyramid_slide, out, InferOptions(model=str(trust_model), num_workers=0))
    with pytest.raises(OutputExistsError, match="--overwrite"):
        infer_slide(pyramid_slide, out, InferOptions(model=str(trust_model), num_workers=0, novelty_threshold=99))


@pytest.mark.parametrize("value", ["-1", "101", "nan", "ninety"])
def test_infer_refuses_a_bad_novelty_threshold(pyramid_slide: Path, tmp_path: Path, value: str) -> None:
    from wsi_histosge.cli.app import app

    res = CliRunner().invoke(
        app, ["infer", str(pyramid_slide), "--out", str(tmp_path / "o.zarr"), "--novelty-threshold", value]
    )
    assert res.exit_code == 2, res.output
    assert "--novelty-threshold" in res.output
    assert not (tmp_path / "o.zarr").exists()


@pytest.mark.realdata
def test_train_on_two_sections_fits_trust_from_held_out_sections(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`train` with its defaults on two real sections: the model carries a novelty reference of every training
    spot, a calibration from each section held out against the other, and an uncertainty model fitted on
    held-out errors whose Spearman with those errors is recorded (and positive)."""
    from wsi_histosge.cli.app import app

    root = need_shared("her2st")
    out = tmp_path / "m"
    res = CliRunner().invoke(
        app, ["train", f"her2st:{root}:C3", f"her2st:{root}:C4", "--out", str(out), "--n-genes", "50", "--epochs", "20"]
    )
    assert res.exit_code == 0, res.output
    model = load_model(out)
    assert model.trust is not None
    assert len(model.trust.reference) == model.meta.training["spots"]
    rho = model.meta.trust["held_out_spearman_with_error"]
    assert len(rho) == 2 and all(r > 0.2 for r in rho), rho
    assert np.all(np.diff(model.trust.calibration) >= 0)


@pytest.mark.realdata
def test_train_on_one_section_says_it_has_no_trust(tmp_path: Path) -> None:
    from wsi_histosge.cli.app import app

    root = need_shared("her2st")
    out = tmp_path / "m"
    res = CliRunner().invoke(app, ["train", f"her2st:{root}:C3", "--out", str(out), "--n-genes", "20", "--epochs", "3"])
    assert res.exit_code == 0, res.output
    assert "no novelty or uncertainty" in res.output
    assert load_model(out).trust is None


def test_the_built_in_model_has_a_trust_part() -> None:
    from wsi_histosge.model import default_model_path

    model = load_model(default_model_path())
    assert model.trust is not None
    # a seeded sample of the training spots (examples/train_default_model.py keeps the file under 5 MiB)
    assert len(model.trust.reference) == model.meta.trust["novelty"]["reference_spots"] == 640
    assert model.meta.training["spots"] == 732
    assert model.meta.trust["novelty"]["k"] == trust.NOVELTY_K


def test_to_anndata_and_plot_carry_the_trust_arrays(trust_model: Path, pyramid_slide: Path, tmp_path: Path) -> None:
    """Default `to-anndata` and `plot`: obs columns for novelty, its percentile, uncertainty and each flag's
    fraction; a gene picture with the reliability panel beside it."""
    import anndata as ad
    import zarr

    from wsi_histosge.cli.app import app
    from wsi_histosge.infer import InferOptions, infer_slide

    cube = tmp_path / "c.zarr"
    infer_slide(pyramid_slide, cube, InferOptions(model=str(trust_model), num_workers=0, novelty_threshold=50))
    res = CliRunner().invoke(app, ["to-anndata", str(cube), "--out", str(tmp_path / "c.h5ad")])
    assert res.exit_code == 0, res.output
    adata = ad.read_h5ad(tmp_path / "c.h5ad")
    for col in ("novelty", "novelty_percentile", "uncertainty", "pen_ink_fraction", "unlike_training_fraction"):
        assert col in adata.obs, col
    g = zarr.open_group(str(cube), mode="r")
    iy, ix = adata.obs["array_row"].to_numpy(), adata.obs["array_col"].to_numpy()
    np.testing.assert_allclose(adata.obs["novelty"].to_numpy(), np.asarray(g["novelty"][:])[iy, ix], rtol=1e-6)
    novel = (np.asarray(g["qc"][:])[iy, ix] & trust.QC_NOVEL) > 0
    np.testing.assert_array_equal(adata.obs["unlike_training_fraction"].to_numpy() == 1.0, novel)
    assert 0 < novel.mean() < 1
    pct = adata.obs["novelty_percentile"].to_numpy()
    assert ((pct > 50) == novel).mean() > 0.99  # the flag is the calibrated percentile read back
    res = CliRunner().invoke(app, ["plot", str(cube), "--out", str(tmp_path / "png"), "--genes", "G0"])
    assert res.exit_code == 0, res.output
    from PIL import Image

    with Image.open(tmp_path / "png" / "G0.png") as im:
        w, h = im.size
    assert w > 1.6 * h  # two panels side by side: the gene and its reliability


@pytest.mark.parametrize("damage", ["no-novelty", "no-qc", "inf-uncertainty", "reversed-calibration"])
def test_a_cube_with_damaged_trust_arrays_is_refused_not_read_as_unflagged(
    trust_model: Path, pyramid_slide: Path, tmp_path: Path, damage: str
) -> None:
    """A deleted novelty/qc array, infinite uncertainty or an edited calibration: to-anndata and plot refuse
    (exit 9, naming the array or attribute) instead of writing a table or picture without the flags."""
    import json as _json

    import zarr

    from wsi_histosge.cli.app import app
    from wsi_histosge.infer import InferOptions, infer_slide

    cube = tmp_path / "c.zarr"
    infer_slide(pyramid_slide, cube, InferOptions(model=str(trust_model), num_workers=0))
    if damage == "no-novelty":
        shutil.rmtree(cube / "novelty")
    elif damage == "no-qc":
        shutil.rmtree(cube / "qc")
    elif damage == "inf-uncertainty":
        g = zarr.open_group(str(cube), mode="r+")
        g["uncertainty"][:] = np.inf
    else:
        meta = _json.loads((cube / "zarr.json").read_text())
        meta["attributes"]["trust"]["novelty"]["calibration"].reverse()
        (cube / "zarr.json").write_text(_json.dumps(meta))
    name = {"no-novelty": "novelty", "no-qc": "qc", "inf-uncertainty": "uncertainty"}.get(damage, "calibration")
    res = CliRunner().invoke(app, ["to-anndata", str(cube), "--out", str(tmp_path / "c.h5ad")])
    assert res.exit_code == 9, res.output
    assert name in res.output and not (tmp_path / "c.h5ad").exists()
    if damage in ("no-qc", "inf-uncertainty"):  # plot draws the flags from qc; it reads neither novelty nor calibration
        res = CliRunner().invoke(app, ["plot", str(cube), "--out", str(tmp_path / "png"), "--genes", "G0"])
        assert res.exit_code == 9, res.output


def test_the_stored_reference_keeps_directions_to_a_thousandth() -> None:
    """The novelty reference is stored as int8 directions: reloaded to unit rows, cosine scores against it
    stay within 1e-3 of the float reference's."""
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(300, 3968, generator=gen).abs() * torch.linspace(0.1, 3.0, 3968)
    reference = trust.unit_rows(rows)
    stored = trust.quantised_directions(reference)
    assert stored.dtype == torch.int8 and int(stored.abs().amax(dim=1).min()) == 127
    query = torch.randn(200, 3968, generator=gen).abs() * torch.linspace(0.1, 3.0, 3968)
    exact = trust.knn_cosine_distance(query, reference)
    again = trust.knn_cosine_distance(query, trust.unit_rows(stored.float()))
    assert np.abs(exact - again).max() < 1e-3
