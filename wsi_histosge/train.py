"""Fitting the HisToSGE head and scoring it: the one training flow.

``fit_and_score`` fits the head on training sets (``dataset``: encoder features, log1p(CP10k) targets,
lattice attention groups), choosing the number of epochs without looking at the held-out sections, and
scores it next to the ridge and training-mean baselines (``baselines``) on each held-out section, in the
one metrics schema that checkpoints, ``evaluate`` and the reports share (``FOLD_SCHEMA``).
``train_sections`` (the ``train`` command), leave-one-section-out, recovery and the example that
reproduces the built-in model all call it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import config, stats
from .baselines import mean_baseline, ridge_baseline
from .dataset import MIN_GENE_VARIANCE, TrainSet, feature_scale, make_sets, pooled_offsets_um, top_variable
from .encoders import Encoder
from .errors import DataFormatError, InputNotFoundError, UsageError
from .metrics import pearson_per_gene, score
from .model import HeadConfig, HisToSGEHead, Model, ModelMeta
from .stdata import STSection
from .trust import Trust


@dataclass
class FitConfig:
    epochs: int = config.MAX_EPOCHS
    lr: float = 3e-4
    weight_decay: float = 1e-3
    patience: int = 40
    seed: int = 1234
    batch_size: int = 256


def _new_head(head_cfg: HeadConfig, train: list[TrainSet]) -> HisToSGEHead:
    """A head with the training features' scale, every gene starting at its training mean (so the output
    ReLU does not begin dead)."""
    head = HisToSGEHead(head_cfg)
    mean, std = feature_scale(np.concatenate([t.features for t in train]))
    head.feature_mean.copy_(torch.from_numpy(mean))
    head.feature_std.copy_(torch.from_numpy(std))
    parts_targets = np.concatenate([t.targets for t in train])
    with torch.no_grad():
        last = head.gene_head[-1]
        assert isinstance(last, torch.nn.Linear)
        last.bias.copy_(torch.from_numpy(parts_targets.mean(0)))
        last.weight.mul_(0.1)
    return head


def _stacked(train: list[TrainSet], position_mode: str) -> tuple[torch.Tensor, ...]:
    """Features, positions, validity and targets of all training spots, concatenated."""
    parts = [t.tensors(position_mode) for t in train]
    return tuple(torch.cat([p[k] for p in parts]) for k in range(4))


def _one_epoch(
    head: HisToSGEHead, opt: torch.optim.Optimizer, data: tuple[torch.Tensor, ...], fit: FitConfig, gen: torch.Generator
) -> float:
    """One pass over the training spots in a random order; the mean batch loss."""
    feats, pos, valid, target = data
    head.train()
    perm = torch.randperm(len(feats), generator=gen)
    losses = []
    for start in range(0, len(perm), fit.batch_size):
        b = perm[start : start + fit.batch_size]
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(head(feats[b], pos[b], valid[b]), target[b])
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return float(np.mean(losses))


def _mean_r(head: HisToSGEHead, sets: list[TrainSet]) -> float:
    return float(np.nanmean([np.nanmean(pearson_per_gene(predict_set(head, v), v.targets)) for v in sets]))


def fit_head(
    head_cfg: HeadConfig,
    train: list[TrainSet],
    val: list[TrainSet] | None,
    fit: FitConfig,
    *,
    fixed_epochs: int | None = None,
    on_epoch: Callable[[int, float, float], None] | None = None,
) -> tuple[HisToSGEHead, dict[str, Any]]:
    """Adam + MSE; early stopping on mean validation Pearson r (or a fixed number of epochs)."""
    torch.manual_seed(fit.seed)
    np.random.seed(fit.seed)
    head = _new_head(head_cfg, train)
    data = _stacked(train, head_cfg.position_mode)
    opt = torch.optim.Adam(head.parameters(), lr=fit.lr, weight_decay=fit.weight_decay)
    best_r, best_state, best_epoch, epochs_run = -np.inf, None, 0, 0
    epochs = fixed_epochs or fit.epochs
    gen = torch.Generator().manual_seed(fit.seed)
    for epoch in range(1, epochs + 1):
        loss = _one_epoch(head, opt, data, fit, gen)
        val_r = _mean_r(head, val) if val and fixed_epochs is None else float("nan")
        if val_r > best_r:
            best_r, best_state, best_epoch = val_r, copy.deepcopy(head.state_dict()), epoch
        elif val and fixed_epochs is None and epoch - best_epoch >= fit.patience:
            break
        epochs_run = epoch
        if on_epoch:
            on_epoch(epoch, loss, val_r)
    if best_state is not None:
        head.load_state_dict(best_state)
    head.eval()
    return head, {
        "best_epoch": best_epoch or epochs,
        "best_val_r": None if best_state is None else best_r,
        "epochs_run": epochs_run,
        "fit": asdict(fit),
    }


@torch.inference_mode()
def predict_set(head: HisToSGEHead, data: TrainSet) -> np.ndarray:
    head.eval()
    feats, pos, valid, _ = data.tensors(head.cfg.position_mode)
    return head(feats, pos, valid).numpy()


def build_model(
    head: HisToSGEHead,
    genes: list[str],
    encoder: Encoder,
    *,
    spot_um: float,
    context_um: float,
    neighbour_offsets_um: np.ndarray,
    name: str,
    training: dict[str, Any],
    metrics: dict[str, Any],
    tta: str = "none",
) -> Model:
    meta = ModelMeta(
        genes=list(genes),
        head=asdict(head.cfg),
        encoder=encoder.cfg.name,
        encoder_weights_sha256=encoder.weights_hash,
        spot_um=spot_um,
        context_um=context_um,
        neighbour_offsets_um=[[round(float(x), 2), round(float(y), 2)] for x, y in neighbour_offsets_um],
        training=training,
        metrics=metrics,
        name=name,
        tta=tta,
    )
    return Model(meta, head)


def _quiet(_message: str) -> None:
    return None


def select_genes(sections: Sequence[STSection], n_genes: int, *, log: Callable[[str], None] | None = None) -> list[str]:
    """Top-``n_genes`` by variance of log1p(CP10k) over the pooled training spots (genes in every section).

    Only genes that vary are ever picked: a section without variation is refused, and when fewer than
    ``n_genes`` genes vary, those that do are taken (and ``log`` says so).
    """
    say = log or _quiet
    if n_genes < 1:
        raise UsageError(f"--n-genes must be at least 1, got {n_genes}")
    for section in sections:
        section.require_variation()
    names = ", ".join(s.name for s in sections)
    common = set(sections[0].genes)
    for s in sections[1:]:
        common &= set(s.genes)
    genes = sorted(common)
    if not genes:
        raise DataFormatError(f"sections {names} share no gene names; check that they measure the same genes")
    pooled = np.concatenate([s.log_cp10k(genes) for s in sections])
    var = pooled.var(0)
    varying = int((var > MIN_GENE_VARIANCE).sum())
    if varying == 0:
        raise DataFormatError(
            f"sections {names}: the counts carry no variation in the {len(genes)} genes they share; check the counts"
        )
    order = np.argsort(-var, kind="stable")[: min(n_genes, varying)]
    if varying < n_genes:
        say(
            f"only {varying} of the {len(genes)} genes shared by {names} vary across the training spots: "
            f"using those {varying} instead of the top {n_genes}"
        )
    return [genes[i] for i in order]


def read_gene_list(path: Path) -> list[str]:
    """Gene names from a .txt (one per line) or a .npy of strings; duplicates dropped, order kept."""
    path = Path(path)
    if not path.exists():
        raise InputNotFoundError(f"{path}: gene list not found; check --genes")
    try:
        if path.suffix == ".npy":
            arr = np.load(path, allow_pickle=False)
            if arr.ndim != 1:
                raise ValueError(f"a {arr.ndim}-d array, expected a 1-d array of names")
            names = [str(g).strip() for g in arr]
        else:
            names = [line.strip() for line in path.read_text().splitlines()]
    except (OSError, ValueError, EOFError) as exc:  # a pickled/object .npy is a ValueError: never unpickled
        detail = " ".join(str(exc).split())[:200]
        raise DataFormatError(
            f"{path}: not a gene list ({detail}); give one name per line (.txt) or a .npy of fixed-width strings "
            "(object arrays, as pandas writes, are never unpickled: np.save(f, np.array(names, dtype=str)))"
        ) from exc
    genes = list(dict.fromkeys(g for g in names if g))
    if not genes:
        raise DataFormatError(f"{path}: the gene list is empty; give one name per line (.txt) or a .npy of strings")
    return genes


def measured_genes(
    sections: Sequence[STSection],
    genes: list[str],
    *,
    log: Callable[[str], None] | None = None,
    where: str = "",
) -> list[str]:
    """The genes of ``genes`` that every section measures (in the given order); the others are dropped, and
    ``log`` names them. A gene missing from a section is never treated as zero expression. ``where`` prefixes
    the error (e.g. the gene list's path)."""
    say = log or _quiet
    keep = list(genes)
    for section in sections:
        missing = set(section.missing(keep))
        if missing:
            names = [g for g in keep if g in missing]
            more = f" and {len(names) - 10} more" if len(names) > 10 else ""
            say(
                f"section {section.name} lacks {len(missing)} of the {len(keep)} genes "
                f"({', '.join(names[:10])}{more}): dropped"
            )
            keep = [g for g in keep if g not in missing]
    if not keep:
        raise DataFormatError(
            f"{where}none of the {len(genes)} listed genes is measured in every section "
            f"({', '.join(s.name for s in sections)}); check the gene list against the counts"
        )
    return keep


def seed_list(seed: int, n: int) -> list[int]:
    """``n`` fit seeds derived from ``seed`` (``seed``, ``seed + 1``, ...): one seed is the single fit."""
    return [seed + k for k in range(n)]


def early_stop_epoch(curve: Sequence[float] | np.ndarray, patience: int) -> int:
    """The epoch (1-based) early stopping picks on a validation curve: the best so far, stopping once
    ``patience`` epochs pass without a strictly better value (as ``fit_head`` does)."""
    best_r, best_epoch = -np.inf, 0
    for epoch, r in enumerate(curve, start=1):
        if r > best_r:
            best_r, best_epoch = float(r), epoch
        elif epoch - best_epoch >= patience:
            break
    return max(best_epoch, 1)


class _Run:
    """One head being fitted, stepped an epoch at a time, with its own torch RNG stream (so runs stepped in
    turn give what ``fit_head`` gives each alone)."""

    def __init__(self, head_cfg: HeadConfig, train: list[TrainSet], val: list[TrainSet], fit: FitConfig) -> None:
        torch.manual_seed(fit.seed)
        np.random.seed(fit.seed)
        self.head = _new_head(head_cfg, train)
        self.data = _stacked(train, head_cfg.position_mode)
        self.opt = torch.optim.Adam(self.head.parameters(), lr=fit.lr, weight_decay=fit.weight_decay)
        self.gen = torch.Generator().manual_seed(fit.seed)
        self.val, self.fit = val, fit
        self.rng_state = torch.get_rng_state()

    def step(self) -> float:
        """One epoch; the validation mean r after it."""
        torch.set_rng_state(self.rng_state)
        _one_epoch(self.head, self.opt, self.data, self.fit, self.gen)
        self.rng_state = torch.get_rng_state()
        return _mean_r(self.head, self.val)


def pooled_curve(
    head_cfg: HeadConfig, splits: Sequence[tuple[list[TrainSet], list[TrainSet]]], fit: FitConfig, seeds: Sequence[int]
) -> np.ndarray:
    """The validation mean-r curve averaged over ``splits`` (training sets, validation sets) and ``seeds``,
    each run stepped in turn, with early stopping (``fit.patience``) on that mean curve."""
    runs = [_Run(head_cfg, tr, va, replace(fit, seed=seed)) for seed in seeds for tr, va in splits]
    curve: list[float] = []
    for _ in range(fit.epochs):
        curve.append(float(np.mean([run.step() for run in runs])))
        if len(curve) - early_stop_epoch(curve, fit.patience) >= fit.patience:
            break
    return np.asarray(curve)


def inner_folds(sets: list[TrainSet]) -> list[tuple[list[TrainSet], list[TrainSet]]]:
    """Each set held out in turn: (the others, [that one])."""
    return [(sets[:j] + sets[j + 1 :], [sets[j]]) for j in range(len(sets))]


#: How ``choose_epochs`` picks the number of epochs without looking at the test sections. Measured on HER2ST
#: C2-C6 leave-one-section-out, 3 seeds (``benchmarks/epoch_rule.py``): the last-section rule gives a LOSO mean
#: of sections of 0.3405 ± 0.0068 (SD over seeds; per fold SD 0.008-0.018, range over the held-out-section
#: choice 0.007-0.026); pooled inner folds 0.3360 ± 0.0026 (per fold SD 0.004-0.009, no choice to make) but it
#: picks 5 epochs everywhere and scores lower in 4 of 5 folds (inner folds train on one section fewer, so their
#: curves peak early). Steadier but not as good on average: the last-section rule stays the default.
EPOCH_RULE = "last section held out"
EPOCH_RULES = ("last section held out", "pooled inner folds")


def choose_epochs(
    head_cfg: HeadConfig,
    sets: list[TrainSet],
    fit: FitConfig,
    *,
    seeds: Sequence[int] | None = None,
    rule: str = EPOCH_RULE,
) -> int:
    """Epochs by early stopping without the test data.

    ``pooled inner folds``: each training set is held out in turn, the validation mean-r curves are averaged
    over these inner folds and ``seeds`` (default ``fit.seed``), and early stopping runs on the mean curve.
    ``last section held out`` (the default): early stopping with the last training set held out (which set is
    last moves a fold's score by up to 0.03, ``benchmarks/epoch_rule.py``; the pooled rule is steadier but
    scored lower in 4 of 5 HER2ST folds).
    """
    if rule not in EPOCH_RULES:
        raise UsageError(f"epoch rule must be one of {EPOCH_RULES}, got {rule!r}")
    if len(sets) < 2:
        return max(1, fit.epochs // 20)
    if rule == "last section held out":
        _, info = fit_head(head_cfg, sets[:-1], [sets[-1]], fit)
        return int(info["best_epoch"])
    return early_stop_epoch(pooled_curve(head_cfg, inner_folds(sets), fit, seeds or [fit.seed]), fit.patience)


def describe_epoch_rule(train: Sequence[TrainSet], seeds: Sequence[int], rule: str = EPOCH_RULE) -> str:
    """``metrics["epoch_rule"]`` for ``choose_epochs``."""
    if len(train) < 2:
        return "a twentieth of the maximum epochs (one training set: none to hold out)"
    if rule == "last section held out":
        each = " (each seed its own)" if len(seeds) > 1 else ""
        return (
            f"early stopping with {train[-1].name or 'the last training set'} held out{each}, then all training "
            "sets for that many epochs"
        )
    over = f"{len(seeds)} seeds" if len(seeds) > 1 else f"seed {seeds[0]}"
    return (
        f"early stopping on the validation mean r averaged over {len(train)} inner folds (each training set "
        f"held out in turn; {over}), then all training sets for that many epochs"
    )


#: The methods scored on every held-out section, always in the same run on the same features.
METHODS = ("head", "ridge", "training_mean")

#: The one metrics schema (checkpoints, ``evaluate`` JSON, reports): a fold per held-out section,
#: ``{"section", "spots", "epochs", "scores": {method: {"all_genes": SCORE, "top50": SCORE}}}``, where
#: SCORE is ``metrics.score`` (mean_r, median_r, n_above_0.3, n_genes, mse, mae, ssim, ari) and top50 is
#: the 50 most variable training genes among those that vary (``top50_genes`` beside the folds).
#: With several seeds the head's SCORE is the mean over seeds of each metric, and beside ``scores``:
#: ``seeds`` ``{"seeds": [int], "epochs": [int], "head": {key: {metric: [one value per seed]}}}`` and
#: ``sd_over_seeds`` ``{"head": {key: {metric: SD}}}`` (ddof 1; absent with one seed; ridge and the training
#: mean are deterministic). With a bootstrap (``stats``): ``intervals`` ``{method: {key: {metric: [lo, hi]}}}``
#: (95% percentile over held-out spots; no ``ssim``), and ``paired`` ``{"head-ridge": {key: {"mean_r":
#: {"difference", "interval"}}}}`` (the same resampled spots on both sides; ``model-ridge`` for a model).
FOLD_SCHEMA = "folds[].scores[method][all_genes|top50] = metrics.score"


@dataclass
class FoldScores:
    """One held-out set scored: the fold's entries (``FOLD_SCHEMA``) and each method's bootstrap replicates
    ``{method: {key: {metric: (replicates,)}}}`` (empty without a bootstrap), for means over sections."""

    entries: dict[str, Any]
    replicates: dict[str, dict[str, dict[str, np.ndarray]]] = field(default_factory=dict)


def score_methods(
    preds: dict[str, np.ndarray | list[np.ndarray]],
    test: TrainSet,
    top: np.ndarray,
    *,
    replicates: int = 0,
    bootstrap_seed: int | Sequence[int] = stats.SEED,
) -> FoldScores:
    """Each method's scores on one held-out set, on all genes and on the ``top`` genes (``FOLD_SCHEMA``).

    A method given a list of predictions (the head's seeds) scores the mean over them, with the per-seed
    values and their SD beside. With ``replicates``, a bootstrap over the held-out spots (the same resamples
    for every method) gives each metric's interval and the paired difference of the first method minus ridge.
    """
    from .metrics import cluster_labels

    keys: dict[str, np.ndarray | None] = {"all_genes": None, "top50": top}
    weights = stats.spot_weights(len(test.targets), replicates, bootstrap_seed) if replicates else None
    scores: dict[str, Any] = {}
    reps: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    per_seed: dict[str, Any] = {}
    truths = {key: test.targets if cols is None else test.targets[:, cols] for key, cols in keys.items()}
    truth_labels = {key: cluster_labels(t) for key, t in truths.items()} if len(test.targets) >= 10 else {}
    for method, given in preds.items():
        runs = given if isinstance(given, list) else [given]
        scores[method], reps[method] = {}, {}
        for key, cols in keys.items():
            true = truths[key]
            parts = [p if cols is None else p[:, cols] for p in runs]
            labels = None
            if truth_labels:  # the ARI threshold of metrics.score
                labels = (truth_labels[key], [cluster_labels(p) for p in parts])
            each = [
                score(p, true, test.array_xy, labels=None if labels is None else (labels[0], labels[1][k]))
                for k, p in enumerate(parts)
            ]
            # one prediction keeps metrics.score's own values (counts stay integers); several: the mean over seeds
            scores[method][key] = (
                dict(each[0]) if len(each) == 1 else {m: float(np.mean([e[m] for e in each])) for m in each[0]}
            )
            if isinstance(given, list):
                per_seed.setdefault(method, {})[key] = {m: [e[m] for e in each] for m in each[0]}
            if weights is not None:
                reps[method][key] = stats.resampled_metrics(parts, true, weights, labels=labels)
    entries: dict[str, Any] = {"scores": scores}
    if per_seed:
        entries["seeds"] = per_seed
        multi = {m: v for m, v in per_seed.items() if len(preds[m]) > 1}
        if multi:
            entries["sd_over_seeds"] = {
                m: {
                    k: {name: float(np.std(vals, ddof=1)) for name, vals in per_key.items()} for k, per_key in v.items()
                }
                for m, v in multi.items()
            }
    if weights is None:
        return FoldScores(entries)
    entries["intervals"] = stats.intervals_of(reps)
    first = next(iter(preds))
    if "ridge" in preds and first != "ridge":
        entries["paired"] = {f"{first}-ridge": stats.paired(reps, scores, first, "ridge")}
    return FoldScores(entries, reps)


@dataclass
class Fitted:
    """A fitted head (the first seed's), its metrics (JSON-able, ``FOLD_SCHEMA``), each method's predictions
    per test set (the head's of the first seed), every seed's head predictions per test set, and each test
    set's bootstrap replicates (``FoldScores.replicates``)."""

    head: HisToSGEHead
    metrics: dict[str, Any]
    predictions: list[dict[str, np.ndarray]] = field(default_factory=list)
    head_predictions: list[list[np.ndarray]] = field(default_factory=list)
    replicates: list[dict[str, dict[str, dict[str, np.ndarray]]]] = field(default_factory=list)


def fit_and_score(
    head_cfg: HeadConfig,
    train: list[TrainSet],
    test: Sequence[TrainSet],
    fit: FitConfig,
    *,
    genes: Sequence[str],
    epochs: int | None = None,
    select_on_test: bool = False,
    on_epoch: Callable[[int, float, float], None] | None = None,
    seeds: int = 1,
    replicates: int = 0,
    bootstrap_seed: int | Sequence[int] = stats.SEED,
) -> Fitted:
    """Fit the head on ``train`` (``seeds`` times, seeds from ``fit.seed``) and score it next to ridge and the
    training mean on each of ``test``, with a bootstrap of ``replicates`` over the test spots (``stats``).

    The number of epochs is ``epochs`` when given; else, with ``select_on_test``, early stopping on ``test``
    (``train --val``: those scores are then optimistic, and ``epoch_rule`` says so); else ``choose_epochs``
    on the training sets alone (``EPOCH_RULE``: with the last-section rule each seed chooses its own), then a
    refit on all of them for that many epochs (``test`` never seen).
    """
    if seeds < 1:
        raise UsageError(f"--seeds must be at least 1, got {seeds}")
    seed_values = seed_list(fit.seed, seeds)
    heads: list[HisToSGEHead] = []
    infos: list[dict[str, Any]] = []
    chosen: list[int] = []
    on_test = epochs is None and select_on_test and bool(test)
    if epochs is None and not on_test:
        rule = describe_epoch_rule(train, seed_values)
        if EPOCH_RULE == "pooled inner folds":
            # once per fold with the first seed: on pooled inner folds the choice barely moves with the seed
            # (benchmarks/epoch_rule.py), and per seed it would cost each seed an inner fit per training set
            epochs = choose_epochs(head_cfg, train, fit, seeds=seed_values[:1])
            if len(seed_values) > 1:
                rule += f"; every one of the {len(seed_values)} seeds refits with that number of epochs"
    elif epochs is not None:
        rule = "given"
    else:
        rule = "early stopping on the held-out sections (their scores are optimistic)"
    for seed in seed_values:
        fit_s = replace(fit, seed=seed)
        if on_test:
            head, info = fit_head(head_cfg, train, list(test), fit_s, on_epoch=on_epoch)
            chosen.append(int(info["best_epoch"]))
        else:
            # the last-section rule moves with the seed: each seed chooses its own epochs, so the SD over seeds
            # includes the choice
            n_epochs = epochs if epochs is not None else choose_epochs(head_cfg, train, fit_s)
            head, info = fit_head(head_cfg, train, None, fit_s, fixed_epochs=n_epochs, on_epoch=on_epoch)
            chosen.append(n_epochs)
        heads.append(head)
        infos.append(info)
    top = top_variable(train)
    folds, predictions, head_predictions, reps = [], [], [], []
    for i, t in enumerate(test):
        per_seed = [predict_set(h, t) for h in heads]
        ridge, mean = ridge_baseline(train, t), mean_baseline(train, t)
        preds: dict[str, np.ndarray | list[np.ndarray]] = {"head": per_seed, "ridge": ridge, "training_mean": mean}
        boot_seed = [*np.atleast_1d(bootstrap_seed).tolist(), i]
        scored = score_methods(preds, t, top, replicates=replicates, bootstrap_seed=boot_seed)
        entries = scored.entries
        if "seeds" in entries:
            entries["seeds"] = {"seeds": seed_values, "epochs": chosen, **entries["seeds"]}
        predictions.append({"head": per_seed[0], "ridge": ridge, "training_mean": mean})
        head_predictions.append(per_seed)
        reps.append(scored.replicates)
        folds.append({"section": t.name, "spots": len(t.targets), "epochs": chosen[0], **entries})
    metrics = {
        "epochs": chosen[0],
        "epoch_rule": rule,
        "fit": infos[0],
        "seeds": seed_values,
        "train_sections": [t.name for t in train],
        "top50_genes": [genes[g] for g in top],
        "folds": folds,
    }
    if replicates:
        metrics["bootstrap"] = {"replicates": replicates, "level": stats.LEVEL, **stats.BOOTSTRAP_NOTES}
    return Fitted(heads[0], metrics, predictions, head_predictions, reps)


def _check_train_args(out: Path, overwrite: bool, n_genes: int, epochs: int, sections: Sequence[object]) -> None:
    from .errors import OutputExistsError

    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out}: exists and is not a folder; choose another --out")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(f"{out}: exists and is not empty; pass --overwrite or choose another --out")
    if n_genes < 1:
        raise UsageError(f"--n-genes must be at least 1, got {n_genes}")
    if epochs < 1:
        raise UsageError(f"--epochs must be at least 1, got {epochs}")
    if not sections:
        raise UsageError("give at least one training section")
    require_writable_folder(out, "--out")


def require_writable_folder(out: Path, flag: str) -> None:
    """Check, before any work, that ``out`` (a folder, made later) can be created and written: a probe file is
    written in ``out`` or its nearest existing parent and removed; nothing is left behind."""
    import tempfile

    from .errors import OutputWriteError

    where = out
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        if not where.is_dir():
            raise NotADirectoryError(20, "not a directory", str(where))
        with tempfile.NamedTemporaryFile(dir=where, prefix=".wsi-histosge-write-check"):
            pass
    except OSError as exc:
        raise OutputWriteError(
            f"{out}: cannot write there ({exc.strerror or exc}); fix permissions or choose another {flag}"
        ) from None


def _require_distinct(train: list[STSection], val: list[STSection]) -> None:
    """A section may appear once: a validation section that is also a training section would report
    training scores as held-out ones."""
    seen: dict[str, str] = {}
    for role, secs in (("training", train), ("validation", val)):
        for sec in secs:
            key = sec.label
            if key in seen:
                raise UsageError(
                    f"{sec.label} is given twice (as {seen[key]} and {role} section); give each section once, "
                    "and validation sections that are not training sections"
                )
            seen[key] = role


def parse_gene_names(text: str | Sequence[str], flag: str = "--add-genes") -> list[str]:
    """Gene names given on the command line, comma- or space-separated (repeats dropped, order kept)."""
    parts = [text] if isinstance(text, str) else list(text)
    names = [g.strip() for part in parts for g in part.replace(",", " ").split()]
    if not names:
        raise UsageError(f"{flag} names no gene; give names such as ERBB2,ESR1")
    return list(dict.fromkeys(names))


def add_genes(gene_list: list[str], extra: Sequence[str], sections: Sequence[STSection]) -> list[str]:
    """``gene_list`` followed by the ``extra`` genes it lacks; a gene some section does not measure is refused
    by name (it would be learnt as zero expression)."""
    missing = {name: [s.name for s in sections if s.missing([name])] for name in extra}
    missing = {name: where for name, where in missing.items() if where}
    if missing:
        named = "; ".join(f"{g} (not in {', '.join(where)})" for g, where in list(missing.items())[:10])
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        cased = _case_hint(list(missing), sections)
        raise DataFormatError(
            f"--add-genes: {len(missing)} gene(s) not measured in every section: {named}{more}{cased}; remove them, "
            "or train on sections that measure them"
        )
    return [*gene_list, *(g for g in extra if g not in gene_list)]


def _case_hint(names: list[str], sections: Sequence[STSection]) -> str:
    """' (names are case-sensitive: ERBB2 for erbb2)' when a missing name matches a measured one but for case."""
    measured = {g.upper(): g for g in sections[0].genes}
    pairs = [f"{measured[n.upper()]} for {n}" for n in names if n.upper() in measured and measured[n.upper()] != n]
    return f" (names are case-sensitive: {', '.join(pairs[:5])})" if pairs else ""


def _training_genes(
    train_secs: list[STSection], val_secs: list[STSection], genes: Path | None, n_genes: int, log: Callable[[str], None]
) -> list[str]:
    """The gene list given (those measured everywhere, at least one varying), or the top ``n_genes``."""
    if genes:
        gene_list = measured_genes([*train_secs, *val_secs], read_gene_list(genes), log=log, where=f"{genes}: ")
        pooled = np.concatenate([s.log_cp10k(gene_list) for s in train_secs])
        if not (pooled.var(0) > MIN_GENE_VARIANCE).any():
            raise DataFormatError(
                f"{genes}: none of the {len(gene_list)} listed genes varies across the training spots of "
                f"{', '.join(s.name for s in train_secs)}; nothing to learn"
            )
        return gene_list
    gene_list = select_genes(train_secs, n_genes, log=log)
    if val_secs:  # a gene the validation sections do not measure cannot be validated: never scored as zero
        gene_list = measured_genes(val_secs, gene_list, log=log)
    return gene_list


def _sections(given: Sequence[str | STSection]) -> list[STSection]:
    """Sections read from their specs (or given), each with variation in its counts."""
    from .stdata import read_section

    out = [s if isinstance(s, STSection) else read_section(s) for s in given]
    for sec in out:
        sec.require_variation()
    return out


def train_sections(
    sections: Sequence[str | STSection],
    out: str | Path,
    *,
    genes: Path | None = None,
    val: Sequence[str | STSection] = (),
    encoder: str = config.DEFAULT_ENCODER,
    encoder_weights: Path | None = None,
    n_genes: int = 1000,
    epochs: int = config.MAX_EPOCHS,
    overwrite: bool = False,
    name: str | None = None,
    device: torch.device | None = None,
    log: Callable[[str], None] = print,
    tta: str = "none",
    extra_genes: Sequence[str] = (),
) -> dict[str, Any]:
    """Train and save a model; returns its metrics (``FOLD_SCHEMA``, also stored in the checkpoint).

    With ``val`` sections: early stopping on them, and their scores (head, ridge, training mean) recorded.
    Without: the number of epochs is chosen by holding out the last training section, then all training
    sections are used. ``tta`` (``encoders.TTA_ROTATIONS``) is the model's feature augmentation, used for its
    training features and by every run of the model; ``extra_genes`` are predicted besides the gene list
    (each must be measured in every section).
    """
    from .encoders import TTA_ROTATIONS, create_encoder
    from .model import save_model

    out = Path(out)
    if tta not in TTA_ROTATIONS:
        raise UsageError(f"--tta must be one of {', '.join(TTA_ROTATIONS)}, got {tta!r}")
    _check_train_args(out, overwrite, n_genes, epochs, sections)
    train_secs, val_secs = _sections(sections), _sections(val)
    _require_distinct(train_secs, val_secs)
    pooled_offsets_um([*train_secs, *val_secs])  # refuse mixed lattices before any feature is computed
    selected = _training_genes(train_secs, val_secs, genes, n_genes, log)
    gene_list = add_genes(selected, extra_genes, [*train_secs, *val_secs])
    added = gene_list[len(selected) :]
    enc = create_encoder(encoder, weights=encoder_weights)
    train_sets = make_sets(train_secs, gene_list, enc, device=device, log=log, tta=tta)
    val_sets = make_sets(val_secs, gene_list, enc, device=device, log=log, tta=tta)

    def progress(e: int, loss: float, r: float) -> None:
        if e % 10 == 0:
            log(f"epoch {e}: loss {loss:.4f}" + ("" if np.isnan(r) else f", validation mean r {r:.3f}"))

    head_cfg = HeadConfig(in_dim=enc.cfg.embed_dim, n_genes=len(gene_list))
    fitted = fit_and_score(
        head_cfg,
        train_sets,
        val_sets,
        FitConfig(epochs=epochs),
        genes=gene_list,
        select_on_test=True,
        on_epoch=progress,
    )
    log(f"epochs: {fitted.metrics['epochs']} ({fitted.metrics['epoch_rule']})")
    names = ", ".join(s.name for s in train_secs)
    metrics = {
        "protocol": f"train {names}"
        + (f" -> held out {', '.join(s.name for s in val_secs)}" if val_secs else " (no held-out section)"),
        **fitted.metrics,
    }
    training = {
        "summary": f"{len(train_secs)} sections ({names})",
        "sections": [s.name for s in train_secs],
        "spots": int(sum(len(t.features) for t in train_sets)),
        "targets": "log1p(CP10k), library size over all genes of the section",
        "gene_selection": (f"list {genes}" if genes else f"top {len(selected)} by variance of pooled log1p(CP10k)")
        + (f", plus {', '.join(added)}" if added else ""),
        "added_genes": added,
        "tta": tta,
        "gene_means": [round(float(v), 5) for v in np.concatenate([t.targets for t in train_sets]).mean(0)],
    }
    trust = fit_model_trust(
        train_sets, train_secs, fitted.head, head_cfg, gene_list, int(fitted.metrics["epochs"]), log
    )
    model = build_model(
        fitted.head,
        gene_list,
        enc,
        spot_um=train_secs[0].spot_um,
        context_um=enc.cfg.context_um,
        neighbour_offsets_um=pooled_offsets_um(train_secs),
        name=name or out.name,
        training=training,
        metrics=metrics,
        tta=tta,
    )
    model.trust = trust
    save_model(model, out)
    log(f"wrote {out}")
    return metrics


def fit_model_trust(
    train_sets: list[TrainSet],
    sections: Sequence[STSection],
    head: HisToSGEHead,
    head_cfg: HeadConfig,
    genes: list[str],
    epochs: int,
    log: Callable[[str], None],
    *,
    reference_max: int | None = None,
) -> Trust | None:
    """The model's novelty reference (at most ``reference_max`` training spots, default
    ``trust.REFERENCE_MAX``) and uncertainty model (``trust.fit_trust``); None with one section."""
    from . import trust

    if len(train_sets) < 2:
        log(
            "trust: one training section, so nothing to calibrate novelty and uncertainty on; this model's "
            "cubes will have no novelty or uncertainty (train on two or more sections for them)"
        )
        return None

    def fold_predict(inner: list[TrainSet], held: TrainSet) -> tuple[np.ndarray, np.ndarray]:
        fitted = fit_and_score(head_cfg, inner, [held], FitConfig(epochs=epochs), genes=genes, epochs=epochs)
        return fitted.head_predictions[0][0], top_variable(inner)

    libs = [trust.log_library_size(s.counts) for s in sections]
    fitted = trust.fit_trust(
        train_sets, libs, head, fold_predict, log=log, reference_max=reference_max or trust.REFERENCE_MAX
    )
    rho = fitted.info["held_out_spearman_with_error"]
    log(f"trust: uncertainty vs held-out error, Spearman per training section {rho}")
    return fitted
