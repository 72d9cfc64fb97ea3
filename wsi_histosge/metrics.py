"""Scores of predicted against measured expression (spots x genes, log1p CP10k)."""

from __future__ import annotations

from typing import Any

import numpy as np


def pearson_per_gene(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Pearson r of each column: 0 where the prediction is constant (no signal), NaN where the truth is."""
    p = pred - pred.mean(0)
    t = true - true.mean(0)
    pp, tt = (p * p).sum(0), (t * t).sum(0)
    denom = np.sqrt(pp * tt)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (p * t).sum(0) / denom
    r[(pp == 0) & (tt > 0)] = 0.0
    r[tt == 0] = np.nan
    return np.asarray(r)


def summarise_r(r: np.ndarray) -> dict[str, float]:
    return {
        "mean_r": float(np.nanmean(r)),
        "median_r": float(np.nanmedian(r)),
        "n_above_0.3": int(np.nansum(r > 0.3)),
        "n_genes": int(np.isfinite(r).sum()),
    }


def rasterise(values: np.ndarray, array_xy: np.ndarray) -> np.ndarray:
    """(spots, genes) on a lattice -> (genes, rows, cols) maps, NaN where no spot."""
    x = array_xy[:, 0] - array_xy[:, 0].min()
    y = array_xy[:, 1] - array_xy[:, 1].min()
    maps = np.full((values.shape[1], int(y.max()) + 1, int(x.max()) + 1), np.nan, dtype=np.float64)
    maps[:, y, x] = values.T
    return maps


def ssim_per_gene(pred: np.ndarray, true: np.ndarray, array_xy: np.ndarray) -> np.ndarray:
    """SSIM of each gene's predicted vs measured map on the assay lattice (both scaled to [0, 1] by the
    measured range; empty lattice positions set to 0 in both), window 3 (legacy ST maps are ~30 spots)."""
    from skimage.metrics import structural_similarity

    mp, mt = rasterise(pred, array_xy), rasterise(true, array_xy)
    out = np.full(pred.shape[1], np.nan)
    for g in range(pred.shape[1]):
        t = mt[g]
        lo, hi = np.nanmin(t), np.nanmax(t)
        if not np.isfinite(hi - lo) or hi == lo:
            continue
        a = np.nan_to_num((mp[g] - lo) / (hi - lo), nan=0.0)
        b = np.nan_to_num((t - lo) / (hi - lo), nan=0.0)
        out[g] = structural_similarity(a, b, data_range=1.0, win_size=3)
    return out


def cluster_labels(x: np.ndarray, *, k: int = 5, seed: int = 0) -> np.ndarray:
    """k-means clusters (on PCA-20 of standardised expression) of each spot; one cluster when ``x`` is constant
    (a constant prediction has no clusters)."""
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA

    if np.ptp(x, axis=0).max(initial=0.0) == 0:
        return np.zeros(len(x), dtype=np.int64)
    z = (x - x.mean(0)) / np.maximum(x.std(0), 1e-6)
    n = min(20, z.shape[0] - 1, z.shape[1])
    emb = PCA(n_components=n, random_state=seed).fit_transform(z)
    return np.asarray(KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(emb))


def ari_of_clusters(
    pred: np.ndarray,
    true: np.ndarray,
    *,
    k: int = 5,
    seed: int = 0,
    labels: tuple[np.ndarray, np.ndarray] | None = None,
) -> float:
    """Adjusted Rand index between k-means clusterings (on PCA-20 of standardised expression) of
    predicted and of measured expression (``labels``: those clusterings, measured first, when already made)."""
    from sklearn.metrics import adjusted_rand_score

    if np.ptp(pred, axis=0).max(initial=0.0) == 0 or np.ptp(true, axis=0).max(initial=0.0) == 0:
        return 0.0  # a constant prediction has no clusters to compare
    true_labels, pred_labels = labels or (cluster_labels(true, k=k, seed=seed), cluster_labels(pred, k=k, seed=seed))
    return float(adjusted_rand_score(true_labels, pred_labels))


def score(
    pred: np.ndarray,
    true: np.ndarray,
    array_xy: np.ndarray | None = None,
    genes_subset: np.ndarray | None = None,
    *,
    labels: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, Any]:
    """All scores of one prediction: per-gene r summary, MSE, MAE, SSIM, ARI (on the given gene subset;
    ``labels``: the measured and predicted clusterings of that subset, when already made)."""
    if genes_subset is not None:
        pred, true = pred[:, genes_subset], true[:, genes_subset]
    r = pearson_per_gene(pred, true)
    out: dict[str, Any] = {
        **summarise_r(r),
        "mse": float(np.mean((pred - true) ** 2)),
        "mae": float(np.mean(np.abs(pred - true))),
    }
    if array_xy is not None:
        out["ssim"] = float(np.nanmean(ssim_per_gene(pred, true, array_xy)))
        if len(true) >= 10:
            out["ari"] = ari_of_clusters(pred, true, labels=labels)
    return out
