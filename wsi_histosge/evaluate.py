"""Honest numbers: a model, or the HisToSGE head under a protocol, next to baselines on the same features.

Protocols:

* ``loso``: leave one section out; for each held-out section the head is trained on the others (epochs
  chosen on them alone, ``train.choose_epochs``, never on the held-out one), and so are the baselines;
* ``recovery`` (the reference paper's protocol): a random half of one section's spots trains, the other
  half is predicted; neighbours are taken from all spots of the section (features only, no expression);
* a trained model on held-out sections (``evaluate MODEL --data ...``).

Baselines, always computed in the same run on the same features: ridge regression (standardised
features clipped at |z| <= 5, PCA to 256 dims, alpha by cross-validation, HEST-Benchmark style) and the
training mean. Scores: per-gene Pearson r (mean, median, count > 0.3), MSE, MAE, SSIM of gene maps on
the assay lattice, and ARI of k-means clusterings of predicted vs measured expression, per section and
pooled over sections; on all genes and on the 50 most variable training genes (among genes that vary).

Every number carries its noise: a protocol fits the head with ``SEEDS`` seeds and reports mean ± SD over
them (ridge and the training mean are deterministic), every method gets a 95% percentile bootstrap interval
over the held-out spots, and the head (or model) minus ridge is reported as a paired difference with its
interval, per section and for the mean of sections (``stats``; keys in ``train.FOLD_SCHEMA``).

Only genes a section measures are scored, never a missing gene as zeros: a model is evaluated on the genes
every given section measures, and a section measuring fewer than half of the model's genes (or fewer than
10; all of them for a smaller model) is refused (``OVERLAP_RULE``); the overlap is logged and returned.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import stats
from .baselines import ridge_baseline
from .dataset import MIN_GENE_VARIANCE, TrainSet, make_sets, top_variable
from .encoders import Encoder
from .errors import DataFormatError
from .metrics import pearson_per_gene, rasterise, score
from .model import HeadConfig, Model
from .stdata import STSection
from .train import (
    FitConfig,
    early_stop_epoch,
    fit_and_score,
    measured_genes,
    pooled_curve,
    predict_set,
    score_methods,
    seed_list,
)

#: A section is scored against a model only when it measures at least this fraction of the model's genes...
MIN_OVERLAP_FRACTION = 0.5
#: ... and at least this many of them (all of them for a model of fewer genes).
MIN_OVERLAP_GENES = 10
#: Head fits per fold in ``loso`` and ``recovery`` (``evaluate --seeds``): each fold reports the mean and SD
#: over seeds. Each seed costs about one single-seed run's fitting: a C2-C6 leave-one-section-out (785 genes)
#: took 312 s of CPU with one seed and 1252 s with five (pooled-inner-fold epochs, a shared 2-core machine),
#: so three seeds, ~13 min of CPU; fewer seeds leave the SD too rough to read.
SEEDS = 3
#: Most head fits per fold a protocol run accepts (each is a full training).
MAX_SEEDS = 100
#: Genes of a protocol run without --genes: the most variable this many.
N_GENES = 1000


def encoder_record(encoder: Encoder) -> dict[str, Any]:
    """What the features were made with, for the JSON and the report."""
    return {"name": encoder.cfg.name, "weights_sha256": encoder.weights_hash, "embed_dim": encoder.cfg.embed_dim}


OVERLAP_RULE = (
    f"a section must measure at least {MIN_OVERLAP_FRACTION:.0%} of the model's genes and at least "
    f"{MIN_OVERLAP_GENES} of them (all, for a model of fewer genes); only genes measured in every section are scored"
)


def required_overlap(n_model_genes: int) -> int:
    """How many of a model's genes a section must measure to be scored (see ``OVERLAP_RULE``)."""
    return min(n_model_genes, max(MIN_OVERLAP_GENES, math.ceil(MIN_OVERLAP_FRACTION * n_model_genes)))


def _require_scorable(sections: Sequence[STSection], genes: list[str]) -> None:
    """Each section must vary in at least one scored gene: a constant truth has no Pearson r (NaN means)."""
    for sec in sections:
        sec.require_variation()
        if not (sec.log_cp10k(genes).var(0) > MIN_GENE_VARIANCE).any():
            raise DataFormatError(
                f"{sec.label}: none of the {len(genes)} scored genes varies across its "
                f"{len(sec.counts)} spots; there is nothing to score"
            )


def _pooled(
    folds: list[dict[str, Any]],
    preds: dict[str, list[list[np.ndarray]]],
    truth: list[np.ndarray],
    top: np.ndarray | None,
) -> dict[str, Any]:
    """Per-gene r over all held-out spots pooled, and the mean of per-section summaries. ``preds``: per method,
    per section, one prediction per seed (a method fitted with several seeds scores the mean over them)."""
    out: dict[str, Any] = {}
    y = np.concatenate(truth)
    for method, per_section in preds.items():
        runs = [np.concatenate([p[k] for p in per_section]) for k in range(len(per_section[0]))]
        scored = [score(p, y) for p in runs]
        entry: dict[str, Any] = {"pooled_all_genes": _mean_scores(scored)}
        if top is not None:
            entry["pooled_top50"] = _mean_scores([score(p, y, None, top) for p in runs])
        for key in ("all_genes", "top50"):
            vals = [f["scores"][method][key] for f in folds if key in f["scores"][method]]
            entry[f"mean_of_sections_{key}"] = {m: float(np.mean([v[m] for v in vals])) for m in vals[0]}
        entry["per_gene_r_pooled"] = np.mean([pearson_per_gene(p, y) for p in runs], axis=0)
        out[method] = entry
    return out


def _mean_scores(scored: list[dict[str, Any]]) -> dict[str, Any]:
    if len(scored) == 1:
        return scored[0]
    return {m: float(np.mean([s[m] for s in scored])) for m in scored[0]}


def mean_of_sections(folds: list[dict[str, Any]], replicates: list[dict[str, Any]]) -> dict[str, Any]:
    """The mean over held-out sections of every score, with (when the folds carry them) the SD over seeds of
    that mean, its bootstrap interval (each section resampled independently in each replicate) and the paired
    differences of the folds, averaged the same way."""
    out: dict[str, Any] = {"sections": [f["section"] for f in folds], "scores": {}}
    for method, keys in folds[0]["scores"].items():
        out["scores"][method] = {
            key: {m: float(np.mean([f["scores"][method][key][m] for f in folds])) for m in per_key}
            for key, per_key in keys.items()
        }
    if all("sd_over_seeds" in f for f in folds):
        out["sd_over_seeds"] = _sd_of_section_means(folds)
    if replicates and all(replicates):
        averaged = _average_replicates(replicates)
        out["intervals"] = stats.intervals_of(averaged)
        pairs = folds[0].get("paired", {})
        out["paired"] = {name: stats.paired(averaged, out["scores"], *name.split("-", 1)) for name in pairs}
    return out


def _sd_of_section_means(folds: list[dict[str, Any]]) -> dict[str, Any]:
    """SD over seeds of the mean over sections, per method, gene set and metric (seed k of every fold together)."""
    return {
        method: {
            key: {
                m: float(np.std(np.mean([f["seeds"][method][key][m] for f in folds], axis=0), ddof=1)) for m in per_key
            }
            for key, per_key in folds[0]["seeds"][method].items()
        }
        for method in folds[0]["sd_over_seeds"]
    }


def _average_replicates(replicates: list[dict[str, Any]]) -> dict[str, Any]:
    """Bootstrap replicates of the mean over sections: replicate b of each section's statistic, averaged."""
    return {
        method: {
            key: {m: np.mean([r[method][key][m] for r in replicates], axis=0) for m in per_key}
            for key, per_key in keys.items()
        }
        for method, keys in replicates[0].items()
    }


def loso(
    sections: Sequence[STSection],
    genes: list[str],
    encoder: Any,
    *,
    seeds: int = SEEDS,
    replicates: int = stats.REPLICATES,
    head_cfg: HeadConfig | None = None,
    fit: FitConfig | None = None,
    log: Callable[[str], None] = print,
    tta: str = "none",
) -> dict[str, Any]:
    """Leave-one-section-out: head (fitted ``seeds`` times) vs ridge vs training mean, per section, pooled and
    as the mean of sections, with bootstrap intervals over held-out spots (``replicates``; 0: none); features
    under the test-time augmentation ``tta``."""
    fit = fit or FitConfig()
    genes = measured_genes(sections, genes, log=log)
    _require_scorable(sections, genes)
    sets = make_sets(sections, genes, encoder, log=log, tta=tta)
    head_cfg = head_cfg or HeadConfig(in_dim=encoder.cfg.embed_dim, n_genes=len(genes))
    folds: list[dict[str, Any]] = []
    preds: dict[str, list[list[np.ndarray]]] = {"head": [], "ridge": [], "training_mean": []}
    truth, reps = [], []
    for i, test in enumerate(sets):
        train = [s for j, s in enumerate(sets) if j != i]
        fitted = fit_and_score(
            head_cfg,
            train,
            [test],
            fit,
            genes=genes,
            seeds=seeds,
            replicates=replicates,
            bootstrap_seed=[stats.SEED, i],
        )
        fold = {**fitted.metrics["folds"][0], "top50_genes": fitted.metrics["top50_genes"]}
        folds.append(fold)
        preds["head"].append(fitted.head_predictions[0])
        for k in ("ridge", "training_mean"):
            preds[k].append([fitted.predictions[0][k]])
        truth.append(test.targets)
        reps.append(fitted.replicates[0])
        log(f"{test.name}: top-50 mean r " + _fold_line(fold) + f" ({fold['epochs']} epochs)")
    top_all = top_variable(sets)
    return {
        "protocol": "leave-one-section-out",
        "tta": tta,
        "encoder": encoder_record(encoder),
        "genes": genes,
        "seeds": seed_list(fit.seed, seeds),
        "epoch_rule": "each fold: "
        + fitted.metrics["epoch_rule"].replace(train[-1].name or "the last training set", "its last training section"),
        "folds": folds,
        "mean_of_sections": mean_of_sections(folds, reps),
        "pooled": _pooled(folds, preds, truth, top_all),
        "maps": _maps_payload(sections[-1], sets[-1], {k: [v[-1][0]] for k, v in preds.items()}, genes),
        "top50_pooled_genes": [genes[g] for g in top_all],
        **_bootstrap_note(replicates),
    }


def _bootstrap_note(replicates: int) -> dict[str, Any]:
    return (
        {"bootstrap": {"replicates": replicates, "level": stats.LEVEL, **stats.BOOTSTRAP_NOTES}} if replicates else {}
    )


def _fold_line(fold: dict[str, Any], key: str = "top50") -> str:
    """``head 0.345 ± 0.010 [0.30, 0.39], ridge ...`` for a log line."""
    parts = []
    for method, per_key in fold["scores"].items():
        text = f"{method} {per_key[key]['mean_r']:.3f}"
        sd = fold.get("sd_over_seeds", {}).get(method, {}).get(key, {}).get("mean_r")
        if sd is not None:
            text += f" ± {sd:.3f}"
        lo, hi = fold.get("intervals", {}).get(method, {}).get(key, {}).get("mean_r", [None, None])
        if lo is not None and hi is not None:
            text += f" [{lo:.3f}, {hi:.3f}]"
        parts.append(text)
    return ", ".join(parts)


def recovery(
    section: STSection,
    genes: list[str],
    encoder: Any,
    *,
    seed: int = 0,
    seeds: int = SEEDS,
    replicates: int = stats.REPLICATES,
    head_cfg: HeadConfig | None = None,
    fit: FitConfig | None = None,
    log: Callable[[str], None] = print,
    tta: str = "none",
) -> dict[str, Any]:
    """Train on a random half of one section's spots (split by ``seed``), predict the other half; the head is
    fitted ``seeds`` times, with bootstrap intervals over the predicted spots (``replicates``; 0: none)."""
    fit = fit or FitConfig()
    genes = measured_genes([section], genes, log=log)
    _require_scorable([section], genes)
    full = make_sets([section], genes, encoder, log=log, tta=tta)[0]
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(full.features))
    half = len(order) // 2
    tr_idx, te_idx = np.sort(order[:half]), np.sort(order[half:])
    # inner split of the training half for the number of epochs (the curve averaged over the seeds)
    inner = rng.permutation(tr_idx)
    fit_idx, val_idx = np.sort(inner[: int(0.8 * len(inner))]), np.sort(inner[int(0.8 * len(inner)) :])

    head_cfg = head_cfg or HeadConfig(in_dim=encoder.cfg.embed_dim, n_genes=len(genes))
    seed_values = seed_list(fit.seed, seeds)
    split = [([full.subset(fit_idx)], [full.subset(val_idx)])]
    epochs = early_stop_epoch(pooled_curve(head_cfg, split, fit, seed_values), fit.patience)
    fitted = fit_and_score(
        head_cfg,
        [full.subset(tr_idx)],
        [full.subset(te_idx)],
        fit,
        genes=genes,
        epochs=epochs,
        seeds=seeds,
        replicates=replicates,
    )
    fold = {**fitted.metrics["folds"][0], "top50_genes": fitted.metrics["top50_genes"]}
    log(f"recovery {section.name}: top-50 mean r " + _fold_line(fold))
    return {
        "protocol": "recovery (random half of the spots of one section)",
        "tta": tta,
        "encoder": encoder_record(encoder),
        "section": section.name,
        "train_spots": len(tr_idx),
        "test_spots": len(te_idx),
        "epochs": epochs,
        "epoch_rule": "early stopping on a random fifth of the training half"
        + (f" (validation mean r averaged over {seeds} seeds)" if seeds > 1 else "")
        + ", then the whole training half",
        "seeds": seed_values,
        "folds": [fold],
        "genes": genes,
        **_bootstrap_note(replicates),
    }


def _scored_genes(
    model: Model, sections: Sequence[STSection], train_sections: Sequence[STSection], log: Callable[[str], None]
) -> tuple[list[str], dict[str, int], int]:
    """The model's genes every section measures, each section's overlap, and the overlap required
    (``OVERLAP_RULE``); a section (or the set of them) measuring too few is refused."""
    model_genes = list(model.meta.genes)
    need = required_overlap(len(model_genes))
    overlap: dict[str, int] = {}
    for sec in (*sections, *train_sections):
        found = len(model_genes) - len(sec.missing(model_genes))
        overlap[sec.name] = found
        log(f"section {sec.name}: measures {found} of the model's {len(model_genes)} genes")
        if found < need:
            raise DataFormatError(
                f"{sec.label}: measures only {found} of the {len(model_genes)} genes of model "
                f"{model.meta.name} (at least {need} needed: half of them and at least {MIN_OVERLAP_GENES}); check "
                "that its gene names match the model's (species, symbols vs Ensembl ids)"
            )
    genes = measured_genes([*sections, *train_sections], model_genes, log=log)
    if len(genes) < need:
        raise DataFormatError(
            f"sections {', '.join(s.name for s in (*sections, *train_sections))}: only {len(genes)} of the "
            f"{len(model_genes)} genes of model {model.meta.name} are measured in all of them (at least {need} "
            "needed); evaluate the sections separately"
        )
    return genes, overlap, need


def _model_and_baselines(
    model: Model, data: TrainSet, cols: np.ndarray, gene_means: Any, train_sets: list[TrainSet]
) -> dict[str, np.ndarray | list[np.ndarray]]:
    """Predictions of the model (its columns ``cols``), the training mean it recorded and, with training sets,
    ridge on the same features."""
    p: dict[str, np.ndarray | list[np.ndarray]] = {"model": predict_set(model.head, data)[:, cols]}
    if gene_means is not None:
        means = np.asarray(gene_means, dtype=np.float32)[cols]
        p["training_mean"] = np.repeat(means[None], len(data.features), axis=0)
    if train_sets:
        p["ridge"] = ridge_baseline(train_sets, data)
    return p


def evaluate_model(
    model: Model,
    sections: Sequence[STSection],
    encoder: Any,
    *,
    train_sections: Sequence[STSection] = (),
    replicates: int = stats.REPLICATES,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """A trained model on held-out sections, next to the training mean (from the checkpoint) and, when
    training sections are given, a ridge regression trained on them; with bootstrap intervals over the spots
    of each section (``replicates``; 0: none) and the paired model-minus-ridge difference.

    Only the model's genes that every section measures are scored, and a section that measures too few of
    them is refused (``OVERLAP_RULE``); the overlap is logged and reported under ``gene_overlap``.
    """
    model_genes = list(model.meta.genes)
    genes, overlap, need = _scored_genes(model, sections, train_sections, log)
    log(f"scoring {len(genes)} of the model's {len(model_genes)} genes (measured in every section)")
    _require_scorable(sections, genes)
    position = {g: i for i, g in enumerate(model_genes)}
    cols = np.array([position[g] for g in genes], dtype=np.int64)
    tta = model.meta.tta  # the features the model was trained on; the ridge baseline gets the same
    sets = make_sets(sections, genes, encoder, log=log, tta=tta)
    train_sets = make_sets(train_sections, genes, encoder, log=log, tta=tta) if train_sections else []
    named = [g for g in model.meta.training.get("added_genes", []) if g in genes]
    gene_means = model.meta.training.get("gene_means")
    folds, truth, reps = [], [], []
    preds: dict[str, list[list[np.ndarray]]] = {"model": []}
    top_genes, top_source = _model_top_genes(model, genes, train_sets)
    for i, (sec, ts) in enumerate(zip(sections, sets, strict=True)):
        p = _model_and_baselines(model, ts, cols, gene_means, train_sets)
        top = top_genes if top_genes is not None else top_variable([ts])
        scored = score_methods(p, ts, top, replicates=replicates, bootstrap_seed=[stats.SEED, i])
        folds.append({"section": sec.name, "spots": len(ts.targets), **scored.entries})
        if named:
            folds[-1]["per_gene"] = per_gene_scores(p, ts, [genes.index(g) for g in named], genes, replicates, i)
        reps.append(scored.replicates)
        log(f"{sec.name}: top-50 mean r " + _fold_line(folds[-1]))
        for k, v in p.items():
            preds.setdefault(k, []).append([v] if isinstance(v, np.ndarray) else v)
        truth.append(ts.targets)
    return {
        "protocol": f"model {model.meta.name} on held-out sections",
        "tta": tta,
        "encoder": encoder_record(encoder),
        "genes": genes,
        "model_genes": len(model_genes),
        "gene_overlap": {
            "scored": len(genes),
            "model_genes": len(model_genes),
            "per_section": overlap,
            "required": need,
            "rule": OVERLAP_RULE,
        },
        "folds": folds,
        "mean_of_sections": mean_of_sections(folds, reps),
        "top50_source": top_source,
        "pooled": _pooled(folds, preds, truth, top_genes if top_genes is not None else top_variable(sets)),
        "maps": _maps_payload(sections[-1], sets[-1], {k: [v[-1][0]] for k, v in preds.items()}, genes),
        **_bootstrap_note(replicates),
    }


def _model_top_genes(model: Model, genes: list[str], train_sets: list[TrainSet]) -> tuple[np.ndarray | None, str]:
    """The "50 most variable training genes" a MODEL is scored on: of the sections given with --train, else the
    list its model.json stored at training, else (older models: None) each held-out section's own, said so."""
    if train_sets:
        return top_variable(train_sets), "training sections given with --train"
    stored = model.meta.metrics.get("top50_genes") if isinstance(model.meta.metrics, dict) else None
    if isinstance(stored, list) and stored and all(isinstance(g, str) and g in genes for g in stored):
        return np.array([genes.index(g) for g in stored]), "the model's training sections (model.json)"
    return None, "the held-out sections' own (give --train: model.json lists none)"


def per_gene_scores(
    preds: dict[str, Any], data: TrainSet, cols: list[int], genes: list[str], replicates: int, fold: int
) -> dict[str, dict[str, Any]]:
    """Pearson r of each of the genes ``cols`` per method, with a 95% bootstrap interval over the spots (the
    same resamples for every method): the scores of genes a user asked for by name (``train --add-genes``)."""
    weights = stats.spot_weights(len(data.targets), replicates, [stats.SEED, fold, 1]) if replicates else None
    out: dict[str, dict[str, Any]] = {}
    for method, pred in preds.items():
        p = np.mean(pred, axis=0) if isinstance(pred, list) else pred
        r = pearson_per_gene(p[:, cols], data.targets[:, cols])
        reps = stats.weighted_pearson(p[:, cols], data.targets[:, cols], weights) if weights is not None else None
        constant = np.ptp(p[:, cols], axis=0) == 0
        for k, g in enumerate(cols):
            entry: dict[str, Any] = {"r": None if np.isnan(r[k]) else float(r[k])}
            if constant[k]:  # r is 0 by convention: no signal, and no interval to speak of
                entry["note"] = "constant prediction"
            elif reps is not None:
                entry["interval"] = stats.interval(reps[:, k])
            out.setdefault(genes[g], {})[method] = entry
    return out


def _per_gene_table(fold: dict[str, Any]) -> str:
    """The genes asked for by name (``train --add-genes``): r per method with its 95% interval."""
    methods = list(next(iter(fold["per_gene"].values())))

    def cell(e: dict[str, Any]) -> str:
        if e["r"] is None:
            return "<td>no variation</td>"
        if e.get("note"):
            return f"<td>{e['r']:.3f} ({html.escape(e['note'])})</td>"
        lo, hi = e.get("interval", [None, None])
        return f"<td>{e['r']:.3f}" + ("" if lo is None or hi is None else f" [{lo:.3f}, {hi:.3f}]") + "</td>"

    head = "<tr><th>gene</th>" + "".join(f"<th>{html.escape(m)}</th>" for m in methods) + "</tr>"
    body = "".join(
        f"<tr><td>{html.escape(g)}</td>" + "".join(cell(per[m]) for m in methods) + "</tr>"
        for g, per in fold["per_gene"].items()
    )
    return f"<h3>{html.escape(fold['section'])}: genes added to the model by name, Pearson r [95% interval]</h3>" + (
        f"<table>{head}{body}</table>"
    )


def _maps_payload(
    section: STSection, data: TrainSet, preds: dict[str, list[np.ndarray]], genes: list[str]
) -> dict[str, Any]:
    method = "head" if "head" in preds else "model"
    pred = preds[method][-1]
    r = pearson_per_gene(pred, data.targets)
    best = [int(i) for i in np.argsort(-np.nan_to_num(r, nan=-1))[:6]]
    return {
        "section": section.name,
        "method": method,
        "genes": [genes[i] for i in best],
        "r": [float(r[i]) for i in best],
        "array_xy": section.array_xy,
        "measured": data.targets[:, best],
        "predicted": pred[:, best],
    }


# -- reports ---------------------------------------------------------------------------------------
_HTML_MARK = "<h1>wsi-histosge evaluation</h1>"


def _is_own_report(path: Path) -> bool:
    """Whether ``path`` holds an evaluation report or JSON this tool wrote (which a rerun may replace)."""
    try:
        head = path.read_bytes()[: 1 << 20].decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    if _HTML_MARK in head:
        return True
    try:
        return isinstance(obj := json.loads(head), dict) and {"protocol", "genes"} <= set(obj)
    except ValueError:
        return False


def check_report_target(path: str | Path, flag: str) -> None:
    """Before any work: ``path`` must be a file this tool may write. A folder is refused, a file the user
    wrote is never replaced (a report of this tool is), and the folder must be writable."""
    from .errors import OutputExistsError, UsageError

    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{path}: is a folder; {flag} takes the path of the file to write")
    if path.exists() and not _is_own_report(path):
        raise OutputExistsError(f"{path}: exists and is not a report of this tool; choose another {flag}")
    from .train import require_writable_folder

    require_writable_folder(path.parent, flag)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items() if k != "maps"}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return (
            [None if not np.isfinite(v) else round(float(v), 5) for v in obj.ravel()]
            if obj.dtype.kind == "f"
            else obj.tolist()
        )
    if isinstance(obj, np.floating | float):
        return None if not np.isfinite(obj) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def write_json(result: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(result), indent=1))
    return path


def _maps_png(maps: dict[str, Any]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    genes = maps["genes"]
    fig, axes = plt.subplots(2, len(genes), figsize=(2.6 * len(genes), 5.4), dpi=100, squeeze=False)
    measured = rasterise(maps["measured"], maps["array_xy"])
    predicted = rasterise(maps["predicted"], maps["array_xy"])
    for j, gene in enumerate(genes):
        for row, (label, m) in enumerate((("measured", measured[j]), (maps["method"], predicted[j]))):
            ax = axes[row, j]
            im = ax.imshow(np.ma.masked_invalid(m), cmap="magma", interpolation="nearest")
            ax.set_title(f"{gene} {label}" + (f"\nr = {maps['r'][j]:.2f}" if row == 1 else ""), fontsize=8)
            ax.set_axis_off()
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


_COLOURS = {"head": "#1b6ca8", "model": "#1b6ca8", "ridge": "#d1495b", "training_mean": "#7a7a7a"}


def _draw_score(ax: Any, x: float, width: float, fold: dict[str, Any], method: str, key: str, *, label: bool) -> None:
    """One method's top-50 mean r in one column: the dot, its interval (thin) and its SD over seeds (thick)."""
    y = fold["scores"][method][key]["mean_r"]
    lo, hi = fold.get("intervals", {}).get(method, {}).get(key, {}).get("mean_r", [None, None])
    colour = _COLOURS.get(method, "black")
    if lo is not None and hi is not None:
        ax.plot([x, x], [lo, hi], color=colour, lw=1.2, alpha=0.8)
        ax.plot([x - width / 4, x + width / 4], [lo, lo], color=colour, lw=1.2, alpha=0.8)
        ax.plot([x - width / 4, x + width / 4], [hi, hi], color=colour, lw=1.2, alpha=0.8)
    sd = fold.get("sd_over_seeds", {}).get(method, {}).get(key, {}).get("mean_r")
    if sd is not None:
        ax.plot([x, x], [y - sd, y + sd], color=colour, lw=5, alpha=0.45, solid_capstyle="butt")
        # an SD far smaller than the interval hides under the dot: also written out
        ax.annotate(
            f"±{sd:.3f}",
            (x, lo if lo is not None else y - sd),
            xytext=(0, -9),
            textcoords="offset points",
            ha="center",
            fontsize=6.5,
            color=colour,
        )
    ax.plot([x], [y], "o", color=colour, ms=5, label=method.replace("_", " ") if label else None)


def _folds_png(result: dict[str, Any], key: str = "top50") -> str:
    """Top-50 mean r of each method per held-out section and as the mean of sections: a dot at the score, a
    thin bar for the 95% bootstrap interval over spots, and for the head a thick bar of ± 1 SD over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = [(f["section"], f) for f in result["folds"]]
    if "mean_of_sections" in result and len(columns) > 1:
        columns.append(("mean of\nsections", result["mean_of_sections"]))
    methods = list(columns[0][1]["scores"])
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(columns) + 2.5), 3.8), dpi=110)
    for k, method in enumerate(methods):
        for c, (_, fold) in enumerate(columns):
            _draw_score(ax, c - 0.4 + width * (k + 0.5), width, fold, method, key, label=c == 0)
    if len(columns) > 1 and "mean_of_sections" in result:
        ax.axvline(len(columns) - 1.5, color="#bbbbbb", lw=0.8, ls="--")
    ax.axhline(0, color="#dddddd", lw=0.8)
    ax.set_xticks(range(len(columns)), [name for name, _ in columns])
    ax.set_xlim(-0.6, len(columns) - 0.4)
    ax.set_ylabel("mean Pearson r, 50 most variable genes")
    ax.set_xlabel("held-out section")
    n_seeds = len(result.get("seeds", []))
    notes = [
        "thin bars: 95% bootstrap interval over spots" if "bootstrap" in result else "no intervals (--bootstrap 0)"
    ]
    if n_seeds > 1:
        notes.append(f"thick bars and numbers: ± 1 SD over {n_seeds} seeds (head)")
    elif n_seeds == 1:
        notes.append("one seed: no spread over seeds")
    note = "; ".join(notes)
    ax.set_title(note, fontsize=8)
    ax.legend(fontsize=8, frameon=False, loc="best")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:+.3f}"


def _noise_note(result: dict[str, Any]) -> str:
    """What the ± and the brackets mean in this report."""
    parts = []
    n_seeds = len(result.get("seeds", []))
    if n_seeds > 1:
        parts.append(
            f"head: mean ± SD over {n_seeds} seeds ({', '.join(map(str, result['seeds']))}); ridge and the training "
            "mean are deterministic"
        )
    if "epoch_rule" in result:
        parts.append(f"epochs: {result['epoch_rule']}")
    if "bootstrap" in result:
        b = result["bootstrap"]
        parts.append(
            f"[brackets]: {b['level']:.0%} {b['method']}, {b['replicates']} replicates; ARI: {b['ari']}; "
            f"SSIM: {b['ssim']}; paired differences use the same resampled spots for both methods"
        )
    return "; ".join(parts) + "." if parts else ""


def write_html(result: dict[str, Any], path: str | Path) -> Path:
    """A self-contained HTML report: at the top a figure of every method per held-out section with its
    spread over seeds and bootstrap interval; tables (score ± SD over seeds, [95% interval]) per section, as
    the mean of sections and pooled, paired differences, per-gene r, top genes' maps."""
    rows = []
    esc = html.escape
    metrics = ("mean_r", "median_r", "n_above_0.3", "mse", "mae", "ssim", "ari")

    def cell(block: dict[str, Any], method: str, key: str, metric: str) -> str:
        v = block["scores"][method][key].get(metric)
        if v is None:
            return "<td></td>"
        text = f"{v:.3f}" if isinstance(v, float) and not float(v).is_integer() else f"{v:g}"
        sd = block.get("sd_over_seeds", {}).get(method, {}).get(key, {}).get(metric)
        if sd is not None:
            text += f" ± {sd:.3f}"
        lo, hi = block.get("intervals", {}).get(method, {}).get(key, {}).get(metric, [None, None])
        if lo is not None and hi is not None:
            text += f"<br><small>[{lo:.3f}, {hi:.3f}]</small>"
        return f"<td>{text}</td>"

    def table(title: str, block: dict[str, Any], key: str) -> str:
        head = (
            "<tr><th>method</th><th>mean r</th><th>median r</th><th>r&gt;0.3</th><th>MSE</th><th>MAE</th>"
            "<th>SSIM</th><th>ARI</th></tr>"
        )
        body = "".join(
            f"<tr><td>{esc(m)}</td>" + "".join(cell(block, m, key, k) for k in metrics) + "</tr>"
            for m, v in block["scores"].items()
            if key in v
        )
        pairs = "".join(
            f"<tr><td>{esc(name)}</td><td>{d[key]['mean_r']['difference']:+.3f}<br><small>"
            f"[{_fmt(d[key]['mean_r']['interval'][0])}, {_fmt(d[key]['mean_r']['interval'][1])}]</small></td>"
            + "<td></td>" * (len(metrics) - 1)
            + "</tr>"
            for name, d in block.get("paired", {}).items()
            if key in d
        )
        return f"<h3>{esc(title)}</h3><table>{head}{body}{pairs}</table>"

    enc = result.get("encoder") or {}
    features = f"; encoder {enc['name']} ({enc['weights_sha256'][:12]}…)" if enc else ""
    notes = f", features averaged over {result['tta']}" if result.get("tta", "none") != "none" else ""
    if result.get("top50_source"):
        notes += f"; top-50 genes from {result['top50_source']}"
    rows.append(
        f"{_HTML_MARK}<p>{esc(result['protocol'])}; {len(result['genes'])} genes{esc(features)}{esc(notes)}</p>"
    )
    if result.get("folds"):
        rows.append(f"<img src='data:image/png;base64,{_folds_png(result)}'/>")
    rows.append(f"<p>{esc(_noise_note(result))}</p>")
    blocks = [(f"{f['section']} ({f['spots']} spots)", f) for f in result.get("folds", [])]
    if "mean_of_sections" in result and len(blocks) > 1:
        blocks.insert(
            0, (f"mean of sections ({', '.join(result['mean_of_sections']['sections'])})", result["mean_of_sections"])
        )
    for title, block in blocks:
        rows.append(table(f"{title}, 50 most variable training genes", block, "top50"))
        rows.append(table(f"{title}, all genes", block, "all_genes"))
    for fold in result.get("folds", []):
        if fold.get("per_gene"):
            rows.append(_per_gene_table(fold))
    if "pooled" in result:
        pooled = {
            m: {"top50": v.get("pooled_top50", {}), "all": v["pooled_all_genes"], "sec": v["mean_of_sections_top50"]}
            for m, v in result["pooled"].items()
        }
        rows.append(table("pooled over held-out spots, top 50 (no intervals)", {"scores": pooled}, "top50"))
        rows.append(table("pooled over held-out spots, all genes (no intervals)", {"scores": pooled}, "all"))
        first = next(iter(result["pooled"]))
        r = np.asarray(result["pooled"][first]["per_gene_r_pooled"], dtype=float)
        order = np.argsort(-np.nan_to_num(r, nan=-1))[:25]
        rows.append(
            f"<h3>best genes ({esc(first)}, pooled r)</h3><table><tr><th>gene</th><th>r</th></tr>"
            + "".join(f"<tr><td>{esc(result['genes'][i])}</td><td>{r[i]:.3f}</td></tr>" for i in order)
            + "</table>"
        )
    if "highres" in result:
        rows.append(
            "<h3>high-resolution consistency</h3><pre>" + esc(json.dumps(result["highres"], indent=1)) + "</pre>"
        )
    if "maps" in result:
        rows.append(
            f"<h3>measured vs predicted, {esc(result['maps']['section'])}</h3>"
            f"<img src='data:image/png;base64,{_maps_png(result['maps'])}'/>"
        )
    style = (
        "<style>body{font-family:sans-serif}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
        "padding:2px 6px;text-align:right}</style>"
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"<!doctype html><html><head><meta charset='utf-8'>{style}</head><body>{''.join(rows)}</body></html>"
    )
    return path
