"""Honest numbers: a model, or the HisToSGE head under a protocol, next to baselines on the same features.

Protocols:

* ``loso``: leave one section out; for each held-out section the head is trained on the others (epochs
  chosen on the last of them, never on the held-out one), and so are the baselines;
* ``recovery`` (the reference paper's protocol): a random half of one section's spots trains, the other
  half is predicted; neighbours are taken from all spots of the section (features only, no expression);
* a trained model on held-out sections (``evaluate MODEL --data ...``).

Baselines, always computed in the same run on the same features: ridge regression (standardised
features clipped at |z| <= 5, PCA to 256 dims, alpha by cross-validation, HEST-Benchmark style) and the
training mean. Scores: per-gene Pearson r (mean, median, count > 0.3), MSE, MAE, SSIM of gene maps on
the assay lattice, and ARI of k-means clusterings of predicted vs measured expression, per section and
pooled over sections; on all genes and on the 50 most variable training genes (among genes that vary).

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

from .baselines import ridge_baseline
from .dataset import MIN_GENE_VARIANCE, TrainSet, make_sets, top_variable
from .errors import DataFormatError
from .metrics import pearson_per_gene, rasterise, score
from .model import HeadConfig, Model
from .stdata import STSection
from .train import FitConfig, fit_and_score, fit_head, measured_genes, predict_set, score_methods

#: A section is scored against a model only when it measures at least this fraction of the model's genes...
MIN_OVERLAP_FRACTION = 0.5
#: ... and at least this many of them (all of them for a model of fewer genes).
MIN_OVERLAP_GENES = 10
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
    folds: list[dict[str, Any]], preds: dict[str, list[np.ndarray]], truth: list[np.ndarray], top: np.ndarray | None
) -> dict[str, Any]:
    """Per-gene r over all held-out spots pooled, and the mean of per-section summaries."""
    out: dict[str, Any] = {}
    y = np.concatenate(truth)
    for method, ps in preds.items():
        p = np.concatenate(ps)
        r = pearson_per_gene(p, y)
        entry: dict[str, Any] = {"pooled_all_genes": score(p, y)}
        if top is not None:
            entry["pooled_top50"] = score(p, y, None, top)
        for key in ("all_genes", "top50"):
            vals = [f["scores"][method][key] for f in folds if key in f["scores"][method]]
            entry[f"mean_of_sections_{key}"] = {m: float(np.mean([v[m] for v in vals])) for m in vals[0]}
        entry["per_gene_r_pooled"] = r
        out[method] = entry
    return out


def loso(
    sections: Sequence[STSection],
    genes: list[str],
    encoder: Any,
    *,
    head_cfg: HeadConfig | None = None,
    fit: FitConfig | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Leave-one-section-out: head vs ridge vs training mean, per section and pooled."""
    fit = fit or FitConfig()
    genes = measured_genes(sections, genes, log=log)
    _require_scorable(sections, genes)
    sets = make_sets(sections, genes, encoder, log=log)
    head_cfg = head_cfg or HeadConfig(in_dim=encoder.cfg.embed_dim, n_genes=len(genes))
    folds: list[dict[str, Any]] = []
    preds: dict[str, list[np.ndarray]] = {"head": [], "ridge": [], "training_mean": []}
    truth = []
    for i, test in enumerate(sets):
        train = [s for j, s in enumerate(sets) if j != i]
        fitted = fit_and_score(head_cfg, train, [test], fit, genes=genes)
        fold = {**fitted.metrics["folds"][0], "top50_genes": fitted.metrics["top50_genes"]}
        folds.append(fold)
        for k, v in fitted.predictions[0].items():
            preds[k].append(v)
        truth.append(test.targets)
        s = fold["scores"]
        log(
            f"{test.name}: top-50 mean r head {s['head']['top50']['mean_r']:.3f}, "
            f"ridge {s['ridge']['top50']['mean_r']:.3f}, mean {s['training_mean']['top50']['mean_r']:.3f}"
        )
    top_all = top_variable(sets)
    return {
        "protocol": "leave-one-section-out",
        "genes": genes,
        "folds": folds,
        "pooled": _pooled(folds, preds, truth, top_all),
        "maps": _maps_payload(sections[-1], sets[-1], preds, genes),
        "top50_pooled_genes": [genes[g] for g in top_all],
    }


def recovery(
    section: STSection,
    genes: list[str],
    encoder: Any,
    *,
    seed: int = 0,
    head_cfg: HeadConfig | None = None,
    fit: FitConfig | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train on a random half of one section's spots, predict the other half."""
    fit = fit or FitConfig()
    genes = measured_genes([section], genes, log=log)
    _require_scorable([section], genes)
    full = make_sets([section], genes, encoder, log=log)[0]
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(full.features))
    half = len(order) // 2
    tr_idx, te_idx = np.sort(order[:half]), np.sort(order[half:])
    # inner split of the training half for the number of epochs
    inner = rng.permutation(tr_idx)
    fit_idx, val_idx = np.sort(inner[: int(0.8 * len(inner))]), np.sort(inner[int(0.8 * len(inner)) :])

    head_cfg = head_cfg or HeadConfig(in_dim=encoder.cfg.embed_dim, n_genes=len(genes))
    _, info = fit_head(head_cfg, [full.subset(fit_idx)], [full.subset(val_idx)], fit)
    epochs = int(info["best_epoch"])
    fitted = fit_and_score(head_cfg, [full.subset(tr_idx)], [full.subset(te_idx)], fit, genes=genes, epochs=epochs)
    fold = {**fitted.metrics["folds"][0], "top50_genes": fitted.metrics["top50_genes"]}
    scores = fold["scores"]
    log(
        f"recovery {section.name}: top-50 mean r head {scores['head']['top50']['mean_r']:.3f}, "
        f"ridge {scores['ridge']['top50']['mean_r']:.3f}"
    )
    return {
        "protocol": "recovery (random half of the spots of one section)",
        "section": section.name,
        "train_spots": len(tr_idx),
        "test_spots": len(te_idx),
        "epochs": epochs,
        "folds": [fold],
        "genes": genes,
    }


def evaluate_model(
    model: Model,
    sections: Sequence[STSection],
    encoder: Any,
    *,
    train_sections: Sequence[STSection] = (),
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """A trained model on held-out sections, next to the training mean (from the checkpoint) and, when
    training sections are given, a ridge regression trained on them.

    Only the model's genes that every section measures are scored, and a section that measures too few of
    them is refused (``OVERLAP_RULE``); the overlap is logged and reported under ``gene_overlap``.
    """
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
    log(f"scoring {len(genes)} of the model's {len(model_genes)} genes (measured in every section)")
    _require_scorable(sections, genes)
    position = {g: i for i, g in enumerate(model_genes)}
    cols = np.array([position[g] for g in genes], dtype=np.int64)
    sets = make_sets(sections, genes, encoder, log=log)
    train_sets = make_sets(train_sections, genes, encoder, log=log) if train_sections else []
    gene_means = model.meta.training.get("gene_means")
    folds, truth = [], []
    preds: dict[str, list[np.ndarray]] = {"model": []}
    for sec, ts in zip(sections, sets, strict=True):
        p = {"model": predict_set(model.head, ts)[:, cols]}
        if gene_means is not None:
            means = np.asarray(gene_means, dtype=np.float32)[cols]
            p["training_mean"] = np.repeat(means[None], len(ts.features), axis=0)
        if train_sets:
            p["ridge"] = ridge_baseline(train_sets, ts)
        top = top_variable(train_sets or [ts])
        folds.append({"section": sec.name, "spots": len(ts.targets), "scores": score_methods(p, ts, top)})
        for k, v in p.items():
            preds.setdefault(k, []).append(v)
        truth.append(ts.targets)
    return {
        "protocol": f"model {model.meta.name} on held-out sections",
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
        "pooled": _pooled(folds, preds, truth, top_variable(train_sets or sets)),
        "maps": _maps_payload(sections[-1], sets[-1], preds, genes),
    }


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


def write_html(result: dict[str, Any], path: str | Path) -> Path:
    """A self-contained HTML report: tables per section and pooled, per-gene r, top genes' maps."""
    rows = []
    esc = html.escape

    def table(title: str, scores: dict[str, Any], key: str) -> str:
        head = (
            "<tr><th>method</th><th>mean r</th><th>median r</th><th>r&gt;0.3</th><th>MSE</th><th>MAE</th>"
            "<th>SSIM</th><th>ARI</th></tr>"
        )
        body = "".join(
            f"<tr><td>{esc(m)}</td>"
            + "".join(
                f"<td>{v[key].get(k, float('nan')):.3f}</td>"
                if isinstance(v[key].get(k), float)
                else f"<td>{v[key].get(k, '')}</td>"
                for k in ("mean_r", "median_r", "n_above_0.3", "mse", "mae", "ssim", "ari")
            )
            + "</tr>"
            for m, v in scores.items()
            if key in v
        )
        return f"<h3>{esc(title)}</h3><table>{head}{body}</table>"

    rows.append(f"{_HTML_MARK}<p>{esc(result['protocol'])}; {len(result['genes'])} genes</p>")
    for fold in result.get("folds", []):
        rows.append(
            table(
                f"{fold['section']} ({fold['spots']} spots), 50 most variable training genes", fold["scores"], "top50"
            )
        )
        rows.append(table(f"{fold['section']}, all genes", fold["scores"], "all_genes"))
    if "pooled" in result:
        pooled = {
            m: {"top50": v.get("pooled_top50", {}), "all": v["pooled_all_genes"], "sec": v["mean_of_sections_top50"]}
            for m, v in result["pooled"].items()
        }
        rows.append(table("pooled over held-out spots, top 50", pooled, "top50"))
        rows.append(table("mean of per-section scores, top 50", pooled, "sec"))
        rows.append(table("pooled over held-out spots, all genes", pooled, "all"))
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
