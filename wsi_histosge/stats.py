"""How sure a score is: percentile bootstrap intervals over held-out spots, and paired differences.

A section's held-out spots are resampled with replacement (``replicates`` times, seeded), and every method's
metrics are recomputed on each resample from the same weights, so a difference between two methods is paired
(the same spots on both sides). A resample is a vector of spot counts: every weighted moment is one matrix
product, so a thousand replicates of per-gene Pearson r over ~1000 genes take a fraction of a second.

What is and is not resampled (``BOOTSTRAP_NOTES``):

* mean/median per-gene r, MSE, MAE: recomputed on each resample;
* genes with r > 0.3: no interval. Duplicated spots in a resample lift every gene's |r| a little, and a count
  of genes above a cut turns that into a bias: intervals came out above their own point estimate (91 [101, 125]);
* ARI: the k-means clusterings of measured and predicted expression are made once on all spots, and the
  index is recomputed over the resampled spots (a duplicated spot counts as a pair that agrees in both
  clusterings); the interval is the spot-sampling part only, not the clustering's own instability;
* SSIM of gene maps: no interval. SSIM compares lattice images, and a resample with duplicated and missing
  spots is not a map; its spread over seeds is reported instead.

For the head fitted with several seeds, the statistic on each resample is the mean over seeds, the same as
the point estimate. The mean of sections resamples each section independently in each replicate, then
averages.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

#: Bootstrap replicates per section (``evaluate`` default).
REPLICATES = 1000
#: Fewer replicates than this give no usable 95% percentile interval (its tails are 2.5% each).
MIN_REPLICATES = 100
#: More than this is refused before any work (a billion replicates asked for 1.4 TiB, after the training).
MAX_REPLICATES = 100_000
#: Two-sided coverage of every interval.
LEVEL = 0.95
#: Seed of the spot resampling (combined with the fold's index, so sections resample independently).
SEED = 0
#: Metrics with a bootstrap interval; ``ssim`` and ``n_above_0.3`` have none (see the module docstring).
INTERVAL_METRICS = ("mean_r", "median_r", "mse", "mae", "ari")
BOOTSTRAP_NOTES = {
    "method": "percentile bootstrap over held-out spots (resampled with replacement, per section)",
    "ari": "clusterings made once on all spots; the index recomputed over the resampled spots",
    "ssim": "no interval: a resample with duplicated and missing spots is not a lattice map",
    "n_above_0.3": "no interval: resampling spots with repeats lifts |r|, which biases a count above a cut",
    "head": "with several seeds, the statistic on each resample is the mean over seeds",
    "mean_of_sections": "each section resampled independently in each replicate, then averaged",
}


def spot_weights(n_spots: int, replicates: int, seed: int | Sequence[int]) -> np.ndarray:
    """(replicates, n_spots) counts of each spot in a resample of ``n_spots`` spots drawn with replacement."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_spots, size=(replicates, n_spots))
    weights = np.zeros((replicates, n_spots))
    np.add.at(weights, (np.arange(replicates)[:, None], draws), 1.0)
    return weights


def weighted_pearson(pred: np.ndarray, true: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(replicates, genes) Pearson r of each gene on each resample (``metrics.pearson_per_gene`` conventions:
    NaN where the resampled truth is constant, 0 where only the prediction is)."""
    n = weights.sum(1, keepdims=True)
    p = pred.astype(np.float64) - pred.mean(0)
    t = true.astype(np.float64) - true.mean(0)
    sp, st = weights @ p, weights @ t
    spp, stt, spt = weights @ (p * p), weights @ (t * t), weights @ (p * t)
    vp, vt = spp - sp * sp / n, stt - st * st / n
    cov = spt - sp * st / n
    flat_p = vp <= 1e-9 * spp  # centred data: what is left after the mean is rounding only
    flat_t = vt <= 1e-9 * stt
    with np.errstate(invalid="ignore", divide="ignore"):
        r = cov / np.sqrt(vp * vt)
    r[flat_p & ~flat_t] = 0.0
    r[flat_t] = np.nan
    return np.asarray(r)


def ari_of_labels(a: np.ndarray, b: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Adjusted Rand index of two labelings, on each resample (``weights`` (replicates, spots) counts) or on
    all spots once; equals ``sklearn.metrics.adjusted_rand_score`` with all weights 1."""
    w = np.ones((1, len(a))) if weights is None else weights
    ia, ib = np.unique(a, return_inverse=True)[1], np.unique(b, return_inverse=True)[1]
    one_a = np.eye(ia.max() + 1)[ia]
    one_b = np.eye(ib.max() + 1)[ib]
    table = np.einsum("rs,si,sj->rij", w, one_a, one_b)

    def pairs(x: np.ndarray) -> np.ndarray:
        return x * (x - 1) / 2

    index = pairs(table).sum((1, 2))
    rows, cols = pairs(table.sum(2)).sum(1), pairs(table.sum(1)).sum(1)
    total = pairs(w.sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        expected = rows * cols / total
        best = (rows + cols) / 2
        ari = (index - expected) / (best - expected)
    out = np.where(best == expected, 1.0, ari)  # one cluster on both sides: full agreement, as sklearn
    return np.asarray(out if weights is not None else out[:1])


def resampled_metrics(
    preds: Sequence[np.ndarray],
    true: np.ndarray,
    weights: np.ndarray,
    *,
    labels: tuple[np.ndarray, Sequence[np.ndarray]] | None = None,
) -> dict[str, np.ndarray]:
    """Each metric of ``INTERVAL_METRICS`` on each resample, (replicates,), averaged over the predictions of
    ``preds`` (one per seed). ``labels``: (measured clusters, predicted clusters per prediction) for ARI."""
    per_pred: list[dict[str, np.ndarray]] = []
    n = weights.sum(1)
    for k, pred in enumerate(preds):
        r = weighted_pearson(pred, true, weights)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a resample where no gene varies: NaN, on purpose
            out = {
                "mean_r": np.nanmean(r, axis=1),
                "median_r": np.nanmedian(r, axis=1),
            }
        err = pred.astype(np.float64) - true
        out["mse"] = weights @ (err * err).mean(1) / n
        out["mae"] = weights @ np.abs(err).mean(1) / n
        if labels is not None:
            out["ari"] = ari_of_labels(labels[0], labels[1][k], weights)
        per_pred.append(out)
    return {m: np.mean([p[m] for p in per_pred], axis=0) for m in per_pred[0]}


def interval(values: np.ndarray, level: float = LEVEL) -> list[float | None]:
    """The percentile interval ``[lo, hi]`` of bootstrap values (NaN replicates left out; None if all are)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if not len(v):
        return [None, None]
    tail = (1.0 - level) / 2 * 100
    lo, hi = np.percentile(v, [tail, 100 - tail])
    return [float(lo), float(hi)]


def intervals_of(replicates: dict[str, dict[str, dict[str, np.ndarray]]]) -> dict[str, Any]:
    """``{method: {key: {metric: [lo, hi]}}}`` from ``{method: {key: {metric: replicate values}}}``."""
    return {
        method: {key: {m: interval(v) for m, v in per_key.items()} for key, per_key in keys.items()}
        for method, keys in replicates.items()
    }


def paired(
    replicates: dict[str, dict[str, dict[str, np.ndarray]]],
    points: dict[str, dict[str, dict[str, Any]]],
    first: str,
    second: str,
    metric: str = "mean_r",
) -> dict[str, Any]:
    """``first`` minus ``second`` on each key (all_genes, top50): the point difference and its interval from the
    same resamples on both sides (so a method against itself is exactly 0 with a zero-width interval)."""
    out: dict[str, Any] = {}
    for key in replicates[first]:
        if key not in replicates.get(second, {}):
            continue
        diff = replicates[first][key][metric] - replicates[second][key][metric]
        out[key] = {
            metric: {
                "difference": float(points[first][key][metric] - points[second][key][metric]),
                "interval": interval(diff),
            }
        }
    return out
