"""Evaluation numbers that carry their own noise: bootstrap intervals, paired differences, seeds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score
from typer.testing import CliRunner

from tests.conftest import need_shared
from wsi_histosge import stats
from wsi_histosge.metrics import pearson_per_gene


def _correlated(rng: np.random.Generator, n: int, genes: int, rho: float) -> tuple[np.ndarray, np.ndarray]:
    true = rng.normal(size=(n, genes))
    pred = rho * true + np.sqrt(1 - rho**2) * rng.normal(size=(n, genes))
    return pred, true


def test_weighted_pearson_with_unit_weights_is_pearson_per_gene() -> None:
    rng = np.random.default_rng(1)
    pred, true = _correlated(rng, 40, 7, 0.5)
    pred[:, 3] = 2.5  # constant prediction: 0
    true[:, 5] = 1.0  # constant truth: NaN
    r = stats.weighted_pearson(pred, true, np.ones((1, 40)))[0]
    np.testing.assert_allclose(r, pearson_per_gene(pred, true), atol=1e-12)
    assert r[3] == 0.0 and np.isnan(r[5])


def test_ari_of_labels_matches_sklearn_and_counts_resampled_spots() -> None:
    rng = np.random.default_rng(2)
    a, b = rng.integers(0, 4, 60), rng.integers(0, 3, 60)
    b[:30] = a[:30] % 3
    assert stats.ari_of_labels(a, b)[0] == pytest.approx(adjusted_rand_score(a, b))
    w = stats.spot_weights(60, 5, 0)
    expanded = [np.repeat(np.arange(60), w[k].astype(int)) for k in range(5)]
    want = [adjusted_rand_score(a[i], b[i]) for i in expanded]
    np.testing.assert_allclose(stats.ari_of_labels(a, b, w), want, atol=1e-12)


def test_interval_of_pearson_r_has_about_the_nominal_coverage() -> None:
    """Draws from a known correlation: the 95% percentile interval of one gene's r holds the true rho in about
    95% of them (n = 150 spots; 300 draws, so 0.89-0.99 allowed)."""
    rng = np.random.default_rng(3)
    rho, draws, hits = 0.4, 300, 0
    for _ in range(draws):
        pred, true = _correlated(rng, 150, 1, rho)
        w = stats.spot_weights(150, 1000, int(rng.integers(1 << 30)))
        lo, hi = stats.interval(stats.weighted_pearson(pred, true, w)[:, 0])
        assert lo is not None and hi is not None
        hits += lo <= rho <= hi
    assert 0.89 <= hits / draws <= 0.99, hits / draws


def test_interval_holds_the_estimate_and_shrinks_with_more_spots() -> None:
    rng = np.random.default_rng(4)
    widths = []
    for n in (60, 240, 960):
        pred, true = _correlated(rng, n, 30, 0.5)
        reps = stats.resampled_metrics([pred], true, stats.spot_weights(n, 500, 0))
        for metric, point in (("mean_r", np.mean(pearson_per_gene(pred, true))), ("mse", np.mean((pred - true) ** 2))):
            lo, hi = stats.interval(reps[metric])
            assert lo is not None and hi is not None and lo <= point <= hi, (n, metric)
        lo, hi = stats.interval(reps["mean_r"])
        widths.append(hi - lo)  # type: ignore[operator]
    assert widths[0] > widths[1] > widths[2]
    assert widths[0] / widths[2] == pytest.approx(4.0, rel=0.35)  # ~1/sqrt(n)


def test_paired_difference_of_a_method_with_itself_is_exactly_zero() -> None:
    from wsi_histosge.train import score_methods

    rng = np.random.default_rng(5)
    pred, true = _correlated(rng, 50, 12, 0.6)
    xy = np.stack(np.meshgrid(np.arange(10), np.arange(5)), -1).reshape(-1, 2)
    from wsi_histosge.dataset import Groups, TrainSet

    test = TrainSet(np.zeros((50, 4)), true, Groups(np.arange(50)[:, None], np.zeros((50, 1, 2)), xy[:, None]), "S", xy)
    scored = score_methods({"model": pred, "ridge": pred.copy()}, test, np.arange(6), replicates=200)
    for key in ("all_genes", "top50"):
        d = scored.entries["paired"]["model-ridge"][key]["mean_r"]
        assert d["difference"] == 0.0 and d["interval"] == [0.0, 0.0]
        lo, hi = scored.entries["intervals"]["model"][key]["mean_r"]
        assert lo < scored.entries["scores"]["model"][key]["mean_r"] < hi
    assert "ssim" not in scored.entries["intervals"]["model"]["top50"]  # no fake interval for a map score


@pytest.mark.realdata
def test_loso_with_its_default_flags_carries_seeds_intervals_and_pairs(tmp_path: Path) -> None:
    """`evaluate --protocol loso` as the README shows it (default --seeds and bootstrap), on three sections and a
    short gene list to keep it quick."""
    from wsi_histosge.cli.app import app
    from wsi_histosge.evaluate import SEEDS

    root = need_shared("her2st")
    genes = tmp_path / "genes.txt"
    genes.write_text("\n".join(str(g) for g in np.load(root / "gene-lists" / "her_hvg_cut_1000.npy")[:60]))
    args = ["evaluate", "--protocol", "loso", "--genes", str(genes), "--json", str(tmp_path / "r.json")]
    for s in ("C3", "C4", "C5"):
        args += ["--data", f"her2st:{root}:{s}"]
    res = CliRunner().invoke(app, [*args, "--report", str(tmp_path / "r.html")])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout[res.stdout.index("{") :])
    assert summary["C3"]["head"]["sd"] > 0 and len(summary["C3"]["head"]["ci95"]) == 2
    assert "head-ridge" in summary["mean_of_sections"]
    a = json.loads((tmp_path / "r.json").read_text())
    assert len(a["seeds"]) == SEEDS > 1 and "each seed its own" in a["epoch_rule"]
    for fold in a["folds"]:
        per_seed = fold["seeds"]["head"]["top50"]["mean_r"]
        assert len(per_seed) == SEEDS and len(set(per_seed)) == SEEDS  # the seeds really differ
        assert len(fold["seeds"]["epochs"]) == SEEDS
        assert fold["scores"]["head"]["top50"]["mean_r"] == pytest.approx(np.mean(per_seed))
        assert fold["sd_over_seeds"]["head"]["top50"]["mean_r"] > 0
        assert "ridge" not in fold["sd_over_seeds"]  # deterministic
        for method in ("head", "ridge"):
            lo, hi = fold["intervals"][method]["top50"]["mean_r"]
            assert lo < fold["scores"][method]["top50"]["mean_r"] < hi
            assert "ssim" not in fold["intervals"][method]["top50"]
        d = fold["paired"]["head-ridge"]["top50"]["mean_r"]
        assert d["interval"][0] <= d["difference"] <= d["interval"][1]
    mos = a["mean_of_sections"]
    lo, hi = mos["intervals"]["head"]["top50"]["mean_r"]
    assert lo < mos["scores"]["head"]["top50"]["mean_r"] < hi
    # averaging sections narrows the interval below that of any one section
    assert hi - lo < min(np.diff(f["intervals"]["head"]["top50"]["mean_r"])[0] for f in a["folds"])
    assert set(mos["paired"]["head-ridge"]) == {"all_genes", "top50"}
    html = (tmp_path / "r.html").read_text()
    assert html.count("<img src='data:image/png;base64,") == 2 and "± " in html and f"SD over {SEEDS} seeds" in html


@pytest.mark.realdata
def test_seeds_validated_one_seed_has_no_spread_and_a_rerun_is_identical(tmp_path: Path) -> None:
    from wsi_histosge.cli.app import app

    root = need_shared("her2st")
    runner = CliRunner()
    base = ["evaluate", "--protocol", "recovery", "--data", f"her2st:{root}:C3", "--n-genes", "30"]
    for bad in ("0", "-2"):
        res = runner.invoke(app, [*base, "--seeds", bad])
        assert res.exit_code == 2 and "--seeds" in res.output and "Traceback" not in res.output, res.output
        assert len(res.output.strip().splitlines()) == 1
    res = runner.invoke(app, [*base, "--seeds", "1", "--json", str(tmp_path / "one.json")])
    assert res.exit_code == 0, res.output
    (fold,) = json.loads((tmp_path / "one.json").read_text())["folds"]
    assert "sd_over_seeds" not in fold and len(fold["seeds"]["head"]["top50"]["mean_r"]) == 1
    assert "intervals" in fold and "head-ridge" in fold["paired"]
    runs = []
    for k in range(2):
        res = runner.invoke(app, [*base, "--seeds", "2", "--json", str(tmp_path / f"two{k}.json")])
        assert res.exit_code == 0, res.output
        runs.append(json.loads((tmp_path / f"two{k}.json").read_text()))
    assert runs[0]["folds"] == runs[1]["folds"]  # the same seeds, the same numbers
    (fold,) = runs[0]["folds"]
    assert fold["sd_over_seeds"]["head"]["top50"]["mean_r"] > 0
