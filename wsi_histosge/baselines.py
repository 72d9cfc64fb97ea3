"""Baselines scored next to the HisToSGE head on the same features: ridge regression (HEST-Benchmark
style: standardised features clipped at |z| <= 5, PCA to 256 dims, alpha by cross-validation) and the
training mean of each gene."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from .dataset import TrainSet, feature_scale


def _z(train_x: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    mean, std = feature_scale(train_x)
    return lambda a: np.clip((a - mean) / std, -5, 5)


def ridge_baseline(train: Sequence[TrainSet], test: TrainSet, *, pca_dims: int = 256) -> np.ndarray:
    """Ridge on standardised, clipped features reduced by PCA; alpha by (generalised) cross-validation.
    Each spot is predicted from its own features only (no neighbours)."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import RidgeCV

    x = np.concatenate([t.centre_features for t in train])
    y = np.concatenate([t.targets for t in train])
    z = _z(x)
    pca = PCA(n_components=min(pca_dims, x.shape[0] - 1, x.shape[1]), random_state=0).fit(z(x))
    model = RidgeCV(alphas=np.logspace(-1, 5, 13)).fit(pca.transform(z(x)), y)
    return np.asarray(model.predict(pca.transform(z(test.centre_features))))


def mean_baseline(train: Sequence[TrainSet], test: TrainSet) -> np.ndarray:
    """Every spot predicted as the training spots' mean of each gene."""
    mean = np.concatenate([t.targets for t in train]).mean(0)
    return np.repeat(mean[None], len(test.targets), axis=0)
