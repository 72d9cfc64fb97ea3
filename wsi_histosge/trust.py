"""How much to trust each prediction: novelty (how unlike the training tissue a cell's image is) and
uncertainty (how large its error is expected to be).

Novelty is the cosine distance of a cell's *raw* encoder features to its ``k`` nearest training spots
(1 - mean of the top-``k`` cosine similarities). Raw features, not standardised or PCA-whitened ones:
after standardising, the weak activations of glass or out-of-domain tissue land near the centre of the
training cloud and look *familiar* (measured: ``benchmarks/trust_study.py``). The reference is a sample of
the training spots' features stored with the model; the score is calibrated by the scores of held-out
training sections against the other sections (leave-one-section-out), stored as percentiles, so a
threshold reads "more unusual than p% of training tissue seen as new".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .errors import DataFormatError, HistoSGEError, ModelError

#: Neighbours averaged by the novelty score.
NOVELTY_K = 5
#: Training spots kept as the novelty reference (a seeded sample when there are more).
REFERENCE_MAX = 4096
#: The percentiles of the calibration scores stored with the model (0..100 in steps of 0.5).
CALIBRATION_PERCENTILES = np.arange(0.0, 100.01, 0.5)
#: The ``qc`` flag bit of a cell whose novelty is above the threshold (bits 1 and 2: ``qc``'s artefacts).
QC_NOVEL = 4
#: Default flag threshold: the calibration scores' 95th percentile.
DEFAULT_NOVELTY_PERCENTILE = 95.0


def unit_rows(features: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit length (float32); an all-zero row stays zero."""
    x = torch.as_tensor(features).float()
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def knn_cosine_distance(
    query: np.ndarray | torch.Tensor, reference: torch.Tensor, k: int = NOVELTY_K, *, chunk: int = 4096
) -> np.ndarray:
    """1 - mean cosine similarity of each query row to its ``k`` most similar rows of ``reference`` (which
    must already be unit rows, on the query's device)."""
    q = unit_rows(query).to(reference.device)
    k = min(k, len(reference))
    out = []
    for start in range(0, len(q), chunk):
        sims = q[start : start + chunk] @ reference.T
        out.append(1.0 - sims.topk(k, dim=1).values.mean(1))
    if not out:
        return np.zeros(0, dtype=np.float32)
    return torch.cat(out).cpu().numpy().astype(np.float32)


def reference_sample(features: np.ndarray, max_n: int = REFERENCE_MAX, seed: int = 0) -> np.ndarray:
    """At most ``max_n`` rows of ``features``, a seeded random sample when there are more."""
    if len(features) <= max_n:
        return features
    idx = np.sort(np.random.default_rng(seed).choice(len(features), max_n, replace=False))
    return features[idx]


def loso_novelty(per_section: Sequence[np.ndarray], k: int = NOVELTY_K) -> list[np.ndarray]:
    """Each section's novelty against a reference of all the other sections (the calibration scores)."""
    scores = []
    for i, feats in enumerate(per_section):
        others = [f for j, f in enumerate(per_section) if j != i]
        if not others:
            raise ValueError("novelty calibration needs at least two training sections")
        ref = unit_rows(reference_sample(np.concatenate(others)))
        scores.append(knn_cosine_distance(feats, ref, k))
    return scores


def percentile_of(scores: np.ndarray, calibration: np.ndarray) -> np.ndarray:
    """Where each score falls among the calibration percentiles (``CALIBRATION_PERCENTILES`` values of the
    calibration scores), 0-100, interpolated; above the largest: 100."""
    return np.interp(scores, calibration, CALIBRATION_PERCENTILES[: len(calibration)]).astype(np.float32)


def auroc(negatives: np.ndarray, positives: np.ndarray) -> float:
    """Area under the ROC curve of a score that should be higher on ``positives`` (ties count half)."""
    neg, pos = np.asarray(negatives, np.float64), np.asarray(positives, np.float64)
    if len(neg) == 0 or len(pos) == 0:
        return float("nan")
    allv = np.concatenate([neg, pos])
    order = allv.argsort(kind="mergesort")
    ranks = np.empty(len(allv))
    sorted_v = allv[order]
    # average ranks of ties
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_v)) + 1]
    ends = np.r_[starts[1:], len(allv)]
    for s, e in zip(starts, ends, strict=True):
        ranks[order[s:e]] = (s + e + 1) / 2.0
    return float((ranks[len(neg) :].sum() - len(pos) * (len(pos) + 1) / 2.0) / (len(neg) * len(pos)))


# -- the model's trust part ------------------------------------------------------------------------
#: Largest |coefficient| of the error model a checkpoint may hold (fitted ones are single digits; the log
#: mean squared error is clamped to ±30 anyway, but a larger one is an edit, not a fit).
MAX_ERROR_COEF = 100.0
#: Inputs of the uncertainty model, in the order of its coefficients.
UNCERTAINTY_INPUTS = ("predicted_log_library_size", "novelty")
#: Tensor names in the checkpoint (next to the head's).
TENSOR_PREFIX = "trust."
_REFERENCE, _LIB_W, _LIB_B = "trust.novelty_reference", "trust.library_weight", "trust.library_bias"


@dataclass
class Trust:
    """What a model stores to say how far to trust each cell: the novelty reference and its calibration, a
    linear read-out of the spot's library size from its (standardised) features, and a log-linear model of
    the expected error from those two."""

    reference: torch.Tensor  # (M, D) unit rows, float32
    calibration: np.ndarray  # novelty at CALIBRATION_PERCENTILES of the held-out training scores
    library_weight: torch.Tensor  # (D,) on the head's standardised features
    library_bias: float
    error_coef: dict[str, float]  # intercept + one per UNCERTAINTY_INPUTS: log(mean squared error)
    k: int = NOVELTY_K
    info: dict[str, Any] = field(default_factory=dict)

    def threshold(self, percentile: float) -> float:
        """The novelty score at ``percentile`` of the calibration scores."""
        return float(np.interp(percentile, CALIBRATION_PERCENTILES, self.calibration))

    def to(self, device: torch.device) -> Trust:
        self.reference = self.reference.to(device)
        self.library_weight = self.library_weight.to(device)
        return self

    def scores(self, features: torch.Tensor, standardised: torch.Tensor) -> torch.Tensor:
        """(N, 2) float32 on the features' device: novelty and uncertainty of each cell from its raw features
        and the head's standardised ones."""
        q = features.float()
        q = q / q.norm(dim=1, keepdim=True).clamp_min(1e-12)
        k = min(self.k, len(self.reference))
        novelty = 1.0 - (q @ self.reference.T).topk(k, dim=1).values.mean(1)
        log_lib = standardised.float() @ self.library_weight + self.library_bias
        c = self.error_coef
        log_mse = c["intercept"] + c[UNCERTAINTY_INPUTS[0]] * log_lib + c[UNCERTAINTY_INPUTS[1]] * novelty
        return torch.stack([novelty, log_mse.clamp(-30.0, 30.0).exp().sqrt()], dim=1)

    # checkpoint --------------------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            _REFERENCE: quantised_directions(self.reference),
            _LIB_W: self.library_weight.detach().cpu().float().contiguous(),
            _LIB_B: torch.tensor([self.library_bias], dtype=torch.float32),
        }

    def meta(self) -> dict[str, Any]:
        return {
            "novelty": {
                "score": "1 - mean cosine similarity of the cell's raw encoder features to its k nearest "
                "training spots",
                "k": self.k,
                "reference_spots": len(self.reference),
                "calibration_percentiles": "0 to 100 in steps of 0.5",
                "calibration": [round(float(v), 6) for v in self.calibration],
            },
            "uncertainty": {
                "score": "expected root mean squared error of the cell's prediction over the training top-50 genes, "
                "log1p(CP10k) units: exp(intercept + sum of coefficient x input) is the expected mean squared error",
                "coefficients": {k: round(float(v), 6) for k, v in self.error_coef.items()},
            },
            **self.info,
        }


def quantised_directions(rows: torch.Tensor) -> torch.Tensor:
    """Rows as int8, each scaled so its largest magnitude is 127: only directions matter to the cosine score,
    and loading scales the rows back to unit length (``unit_rows``). A quarter of float32's bytes, half of
    float16's; the novelty of a held-out section moves by under 1e-3 (measured on the built-in model)."""
    r = rows.detach().cpu().float()
    peak = r.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)
    return (r / peak * 127.0).round().to(torch.int8).contiguous()


def _finite_list(values: Any, n: int | None = None) -> bool:
    return (
        isinstance(values, list)
        and (n is None or len(values) == n)
        and all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in values)
    )


def trust_from_checkpoint(meta: dict[str, Any], tensors: dict[str, torch.Tensor], in_dim: int, where: str) -> Trust:
    """The trust part of a checkpoint, checked: a malformed field of model.json is a DataFormatError (exit 9,
    like any malformed model JSON), a missing or damaged tensor a ModelError (exit 8), each naming it."""

    def bad(what: str, error: type[HistoSGEError] = DataFormatError) -> HistoSGEError:
        return error(
            f"{where}: 'trust' {what}; the file is corrupt or was edited by hand (restore the files written by `train`)"
        )

    nov, unc = meta.get("novelty"), meta.get("uncertainty")
    if not isinstance(nov, dict) or not isinstance(unc, dict):
        raise bad("must hold 'novelty' and 'uncertainty' objects")
    calib = nov.get("calibration")
    if not _finite_list(calib, len(CALIBRATION_PERCENTILES)) or np.any(np.diff(np.asarray(calib)) < 0):
        raise bad(f"novelty.calibration must be {len(CALIBRATION_PERCENTILES)} finite non-decreasing numbers")
    k = nov.get("k")
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 1000:
        raise bad(f"novelty.k must be an integer in [1, 1000], got {k!r}")
    coef = unc.get("coefficients")
    if (
        not isinstance(coef, dict)
        or set(coef) != {"intercept", *UNCERTAINTY_INPUTS}
        or not _finite_list(list(coef.values()))
        or max(abs(float(v)) for v in coef.values()) > MAX_ERROR_COEF
    ):
        raise bad(
            f"uncertainty.coefficients must be finite numbers within ±{MAX_ERROR_COEF:g} for intercept, "
            f"{', '.join(UNCERTAINTY_INPUTS)}"
        )
    ref, w, b = tensors.get(_REFERENCE), tensors.get(_LIB_W), tensors.get(_LIB_B)
    if ref is None or w is None or b is None:
        raise bad(f"tensors {_REFERENCE}, {_LIB_W} and {_LIB_B} must all be in the weights file", ModelError)
    if ref.ndim != 2 or ref.shape[1] != in_dim or len(ref) < 1 or tuple(w.shape) != (in_dim,) or b.numel() != 1:
        raise bad(f"tensors do not fit the encoder's {in_dim} features", ModelError)
    for name, t in ((_REFERENCE, ref), (_LIB_W, w), (_LIB_B, b)):
        if not bool(torch.isfinite(t.float()).all()):
            raise bad(f"tensor {name} holds NaN or infinite values", ModelError)
    info = {key: v for key, v in meta.items() if key not in ("novelty", "uncertainty")}
    return Trust(
        unit_rows(ref.float()),
        np.asarray(calib, dtype=np.float64),
        w.float(),
        float(b.float().reshape(())),
        {key: float(v) for key, v in coef.items()},
        k=k,
        info=info,
    )


# -- fitting (at train time) -----------------------------------------------------------------------
def log_library_size(counts: np.ndarray) -> np.ndarray:
    """log(1 + total counts) of each spot (all genes of the section)."""
    return np.log1p(np.asarray(counts, dtype=np.float64).sum(1)).astype(np.float32)


def _library_readout(features: np.ndarray, log_lib: np.ndarray, head: Any) -> tuple[np.ndarray, float]:
    """Ridge (alpha by cross-validation) from the head's standardised features to log library size."""
    from sklearn.linear_model import RidgeCV

    with torch.no_grad():
        z = head.standardise(torch.as_tensor(features).float()).numpy()
    model = RidgeCV(alphas=np.logspace(0, 5, 11)).fit(z, log_lib)
    return np.asarray(model.coef_, dtype=np.float32), float(model.intercept_)


def _readout(features: np.ndarray, head: Any, weight: np.ndarray, bias: float) -> np.ndarray:
    with torch.no_grad():
        z = head.standardise(torch.as_tensor(features).float()).numpy()
    return z @ weight + bias


def fit_trust(
    train: Sequence[Any],
    log_libs: Sequence[np.ndarray],
    head: Any,
    fold_predict: Any,
    *,
    log: Any = print,
    reference_max: int = REFERENCE_MAX,
) -> Trust:
    """Fit the trust part of a model from its training sets (``dataset.TrainSet``), each spot's measured log
    library size, and the final ``head`` (whose feature standardisation the library read-out shares).

    ``fold_predict(inner_train, held_out) -> (predictions, top_genes)`` fits a head on ``inner_train`` the
    way training does and predicts ``held_out``: the error model is fitted on those held-out errors (leave
    one training section out), never on training-set errors. ``reference_max``: training spots kept as the
    stored novelty reference (a seeded sample when there are more)."""
    from scipy.stats import spearmanr
    from sklearn.linear_model import LinearRegression

    if len(train) < 2:
        raise ValueError("trust needs at least two training sections")
    feats = [t.centre_features for t in train]
    pooled = np.concatenate(feats)
    reference = unit_rows(reference_sample(pooled, reference_max))
    held_out_novelty = loso_novelty(feats)
    calibration = np.percentile(np.concatenate(held_out_novelty), CALIBRATION_PERCENTILES)
    weight, bias = _library_readout(pooled, np.concatenate(log_libs), head)
    xs, ys, rho = [], [], []
    for i, held in enumerate(train):
        inner = [t for j, t in enumerate(train) if j != i]
        pred, top = fold_predict(inner, held)
        err = ((pred[:, top] - held.targets[:, top]) ** 2).mean(1)
        w_i, b_i = _library_readout(
            np.concatenate([t.centre_features for t in inner]),
            np.concatenate([x for j, x in enumerate(log_libs) if j != i]),
            head,
        )
        x = np.stack([_readout(held.centre_features, head, w_i, b_i), held_out_novelty[i]], 1)
        xs.append(x)
        ys.append(np.log(err + 1e-6))
        log(f"trust: {held.name or i} held out, {len(err)} spots")
    reg = LinearRegression().fit(np.concatenate(xs), np.concatenate(ys))
    for x, y in zip(xs, ys, strict=True):
        rho.append(float(spearmanr(reg.predict(x), y).statistic))
    coef = {
        "intercept": float(reg.intercept_),
        **{n: float(c) for n, c in zip(UNCERTAINTY_INPUTS, reg.coef_, strict=True)},
    }
    info = {
        "fitted_on": "leave-one-section-out over the training sections: " + ", ".join(str(t.name) for t in train),
        "held_out_spearman_with_error": [round(r, 3) for r in rho],
    }
    return Trust(reference, calibration, torch.from_numpy(weight), bias, coef, info=info)
