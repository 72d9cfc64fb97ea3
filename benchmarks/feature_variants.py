"""Would other features of the same offline encoder (EfficientNet-Lite0, ImageNet) predict expression better?

A cheap screen on HER2ST C2-C6, leave one section out, scored the way the README's LOSO table is (mean over
held-out sections of the mean Pearson r over each fold's 50 most variable training genes, ``metrics.score`` on
``dataset.top_variable``; bootstrap intervals over held-out spots with the same resamples as ``evaluate``).
Every variant is fitted with the project's ridge baseline (``baselines.ridge_baseline``: z-scored, clipped,
PCA 256, RidgeCV alpha); the reference is variant ``a`` in the same run.

Variants (features per spot):

* ``a``: the project's features: spatial mean of the final 1280-channel map, 224 px at 0.5 µm/px (112 µm);
* ``b``: multi-stage: ``a`` plus the global average pools of the outputs of the last four stages of the trunk
  (blocks 7, 10, 14, 15: 80 + 112 + 192 + 320 channels; 1984-d);
* ``c``: two scales: ``a`` plus the same final features of a 224 px patch at 1.0 µm/px (224 µm) on the same
  centre (2560-d);
* ``d``: ``b`` at both scales (3968-d);
* ``e``: ``a`` averaged over the four quarter turns (the project's ``--tta rot4``).

Each block of a concatenation (one stage's pool, one scale) is divided, per fold, by the median channel SD of
its training spots, so that blocks of different magnitude meet the shared SD floor of ``dataset.feature_scale``
alike; ridge and the head then z-score every channel themselves (so a per-block weight would be undone: every
channel counts once, a block weighs as many channels as it has).

When the best of b-e beats ``a`` by at least ``--head-margin`` (0.01) in ridge mean of sections, the project's
head is fitted on it and on ``a`` with the same seeds, per fold, exactly as ``evaluate --protocol loso`` does
(``train.fit_and_score``: epochs by early stopping with the last training section held out, then a refit).

Features are extracted with the project's loader (``loader.encode_points``: super-tile read, patch cut and
resize on the device, the encoder's normalisation) on the CPU with one thread, and cached under
``--cache-dir`` (never in the project's feature cache). Extraction seconds are reported per variant and as a
ratio to ``a`` measured in the same run (a rerun that finds the cache reports the seconds of the run that
made it).

    python benchmarks/feature_variants.py --data ../shared/data/her2st [--variants a,b,c,d,e] [--out-json F]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wsi_histosge import stats
from wsi_histosge.baselines import ridge_baseline
from wsi_histosge.dataset import TrainSet, lattice_groups, top_variable
from wsi_histosge.encoders import Encoder, create_encoder, stage_pools
from wsi_histosge.loader import encode_points
from wsi_histosge.model import HeadConfig
from wsi_histosge.slide import open_slide
from wsi_histosge.stdata import STSection, her2st_section
from wsi_histosge.train import FitConfig, fit_and_score, measured_genes, read_gene_list, score_methods, seed_list

#: Channels of the outputs of the trunk's last four stages (``encoders.STAGE_ENDS``).
STAGE_CHANNELS = (80, 112, 192, 320)
FINAL = 1280

#: Extraction passes: (µm per input pixel, with stage pools, test-time augmentation).
PASSES: dict[str, tuple[float, bool, str]] = {
    "final@0.5": (0.5, False, "none"),
    "stages@0.5": (0.5, True, "none"),
    "stages@1.0": (1.0, True, "none"),
    "final@0.5,rot4": (0.5, False, "rot4"),
}
MULTI_BLOCKS = [FINAL, *STAGE_CHANNELS]

#: Each variant: (what it is, the passes it needs, how its features are built from them, block widths).
VARIANTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "a": ("final pool, 0.5 µm/px (project)", ("final@0.5",)),
    "b": ("+ pools of stages 4-7", ("stages@0.5",)),
    "c": ("+ final pool at 1.0 µm/px", ("final@0.5", "stages@1.0")),
    "d": ("b at 0.5 and 1.0 µm/px", ("stages@0.5", "stages@1.0")),
    "e": ("a, mean of 4 quarter turns", ("final@0.5,rot4",)),
}


def pass_encoder(base: Encoder, name: str) -> Encoder:
    """The encoder of one extraction pass: the project's (final pool, 0.5 µm/px) or the same weights with another
    pixel size and/or the stage pools; never registered, never cached in the project's feature cache."""
    mpp, stages, _ = PASSES[name]
    if not stages and mpp == base.cfg.mpp:
        return base
    cfg = replace(base.cfg, name=f"{base.cfg.name}[{name}]", mpp=mpp, embed_dim=sum(MULTI_BLOCKS) if stages else FINAL)
    fn = stage_pools if stages else base._forward_fn
    return Encoder(cfg, base.trunk, base.weights_hash, fn).eval()


def pass_features(
    sections: list[STSection], base: Encoder, name: str, cache_dir: Path, log: Callable[[str], None]
) -> tuple[list[np.ndarray], float, bool]:
    """Each section's features of pass ``name``, the seconds they took (all sections; read, cut, encode) and
    whether they came from ``cache_dir``."""
    enc = pass_encoder(base, name)
    tta = PASSES[name][2]
    key = hashlib.sha256(
        (
            f"{name}|{base.weights_hash}|"
            + "|".join(f"{s.name}:{s.image}:{s.mpp:.6f}:{s.centres_level0.tobytes().hex()}" for s in sections)
        ).encode()
    ).hexdigest()[:16]
    npz, meta = cache_dir / f"{name}-{key}.npz", cache_dir / f"{name}-{key}.json"
    if npz.is_file() and meta.is_file():
        with np.load(npz) as z:
            feats = [z[s.name] for s in sections]
        return feats, float(json.loads(meta.read_text())["seconds"]), True
    feats, start = [], time.perf_counter()
    for s in sections:
        slide = open_slide(s.image, mpp=s.mpp)
        feats.append(encode_points(slide, s.centres_level0, enc, context_um=enc.cfg.context_um, tta=tta))
    seconds = time.perf_counter() - start
    log(f"  pass {name}: {seconds:.0f} s for {sum(len(f) for f in feats)} spots ({feats[0].shape[1]}-d)")
    cache_dir.mkdir(parents=True, exist_ok=True)
    np.savez(npz, **{s.name: f for s, f in zip(sections, feats, strict=True)})
    meta.write_text(json.dumps({"pass": name, "seconds": seconds, "sections": [s.name for s in sections]}))
    return feats, seconds, False


def variant_features(name: str, per_pass: dict[str, list[np.ndarray]], k: int) -> tuple[np.ndarray, list[int]]:
    """Section ``k``'s features of variant ``name`` and the widths of its blocks."""
    if name == "a":
        return per_pass["final@0.5"][k], [FINAL]
    if name == "b":
        return per_pass["stages@0.5"][k], MULTI_BLOCKS
    if name == "c":
        return np.concatenate([per_pass["final@0.5"][k], per_pass["stages@1.0"][k][:, :FINAL]], 1), [FINAL, FINAL]
    if name == "d":
        return np.concatenate([per_pass["stages@0.5"][k], per_pass["stages@1.0"][k]], 1), MULTI_BLOCKS * 2
    if name == "e":
        return per_pass["final@0.5,rot4"][k], [FINAL]
    raise ValueError(name)


def block_scaled(train: list[np.ndarray], test: np.ndarray, widths: list[int]) -> tuple[list[np.ndarray], np.ndarray]:
    """Each block divided by the median channel SD of the training spots (one block: unchanged, as z-scoring
    would undo a scalar anyway)."""
    if len(widths) == 1:
        return train, test
    pooled = np.concatenate(train)
    scale = np.ones(pooled.shape[1], dtype=np.float32)
    start = 0
    for w in widths:
        scale[start : start + w] = max(float(np.median(pooled[:, start : start + w].std(0))), 1e-6)
        start += w
    return [t / scale for t in train], test / scale


def sets_for(
    sections: list[STSection], feats: list[np.ndarray], targets: list[np.ndarray], groups: list[Any]
) -> list[TrainSet]:
    return [TrainSet(f, y, g, s.name, s.array_xy) for s, f, y, g in zip(sections, feats, targets, groups, strict=True)]


def _average_replicates(reps: list[dict[str, Any]]) -> dict[str, Any]:
    """Replicate b of every section averaged: the bootstrap of the mean of sections (as ``evaluate``)."""
    return {
        m: {k: {x: np.mean([r[m][k][x] for r in reps], 0) for x in v} for k, v in keys.items()}
        for m, keys in reps[0].items()
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("../shared/data/her2st"))
    ap.add_argument("--sections", default="C2,C3,C4,C5,C6")
    ap.add_argument("--genes", type=Path, default=None, help="default: DATA/gene-lists/her_hvg_cut_1000.npy")
    ap.add_argument("--variants", default="a,b,c,d,e", help="comma-separated subset of a,b,c,d,e (a always runs)")
    ap.add_argument("--cache-dir", type=Path, default=Path("/tmp/fv/features"))
    ap.add_argument(
        "--head",
        choices=("auto", "always", "never"),
        default="auto",
        help="auto: fit the head on a and the best variant only if it beats a by --head-margin (ridge)",
    )
    ap.add_argument("--head-margin", type=float, default=0.01)
    ap.add_argument("--seeds", type=int, default=1, help="head fits per fold (evaluate uses 3)")
    ap.add_argument("--bootstrap", type=int, default=stats.REPLICATES)
    ap.add_argument("--out-json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    log = print

    variants = ["a", *[v for v in args.variants.split(",") if v and v != "a"]]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}; choose from {','.join(VARIANTS)}")
    sections = [her2st_section(args.data, n) for n in args.sections.split(",")]
    genes = measured_genes(sections, read_gene_list(args.genes or args.data / "gene-lists" / "her_hvg_cut_1000.npy"))
    targets = [s.log_cp10k(genes) for s in sections]
    groups = [lattice_groups(s) for s in sections]
    base = create_encoder("efficientnet-lite0")
    log(f"{len(sections)} sections, {sum(len(t) for t in targets)} spots, {len(genes)} genes; torch threads 1")

    passes = sorted({p for v in variants for p in VARIANTS[v][1]}, key=list(PASSES).index)
    per_pass: dict[str, list[np.ndarray]] = {}
    seconds: dict[str, float] = {}
    cached: dict[str, bool] = {}
    for p in passes:
        per_pass[p], seconds[p], cached[p] = pass_features(sections, base, p, args.cache_dir, log)
    if "stages@0.5" in per_pass:  # the stage forward must reproduce the project's features exactly
        diff = max(
            float(np.abs(a[:, :FINAL] - b).max())
            for a, b in zip(per_pass["stages@0.5"], per_pass["final@0.5"], strict=True)
        )
        log(f"  check: final pool of the stage pass vs the project's features, max |diff| {diff:.2e}")
    extraction = {v: sum(seconds[p] for p in VARIANTS[v][1]) for v in variants}

    # ridge per fold on each variant; predictions kept for scoring all methods on the same resamples
    n = len(sections)
    preds: list[dict[str, Any]] = [{} for _ in range(n)]

    def fold_sets(v: str, i: int) -> tuple[list[TrainSet], TrainSet]:
        feats, widths = zip(*[variant_features(v, per_pass, k) for k in range(n)], strict=True)
        tr = [f for k, f in enumerate(feats) if k != i]
        tr, te = block_scaled(tr, feats[i], widths[0])
        order = [k for k in range(n) if k != i]
        train = sets_for([sections[k] for k in order], tr, [targets[k] for k in order], [groups[k] for k in order])
        test = sets_for([sections[i]], [te], [targets[i]], [groups[i]])[0]
        return train, test

    # the 50 most variable genes of each fold's training spots (targets only: the same for every variant)
    tops = [top_variable([TrainSet(targets[k], targets[k], groups[k]) for k in range(n) if k != i]) for i in range(n)]
    ridge_seconds: dict[str, float] = {}
    ridge_mos: dict[str, float] = {}
    for v in variants:
        start = time.perf_counter()
        for i in range(n):
            train, test = fold_sets(v, i)
            preds[i][f"ridge_{v}"] = ridge_baseline(train, test)
        ridge_seconds[v] = time.perf_counter() - start
        ridge_mos[v] = float(
            np.mean([np.nanmean(_top50_r(preds[i][f"ridge_{v}"], targets[i], tops[i])) for i in range(n)])
        )
        log(f"  ridge {v}: mean of sections {ridge_mos[v]:.3f} ({ridge_seconds[v]:.0f} s)")

    others = [v for v in variants if v != "a"]
    best = max(others, key=lambda v: ridge_mos[v]) if others else None
    head_on: list[str] = []
    if best is not None and (
        args.head == "always" or (args.head == "auto" and ridge_mos[best] - ridge_mos["a"] >= args.head_margin)
    ):
        head_on = ["a", best]
    head_seconds: dict[str, float] = {}
    epochs: dict[str, list[Any]] = {}
    for v in head_on:
        start = time.perf_counter()
        epochs[v] = []
        for i in range(n):
            train, test = fold_sets(v, i)
            cfg = HeadConfig(in_dim=train[0].features.shape[1], n_genes=len(genes))
            fitted = fit_and_score(cfg, train, [test], FitConfig(), genes=genes, seeds=args.seeds, replicates=0)
            preds[i][f"head_{v}"] = fitted.head_predictions[0]
            epochs[v].append(fitted.metrics["folds"][0]["seeds"]["epochs"])
            log(f"  head {v} {sections[i].name}: epochs {epochs[v][-1]}")
        head_seconds[v] = time.perf_counter() - start

    # score every method per fold with the same bootstrap resamples as `evaluate --protocol loso` (fold i: [0, i, 0])
    folds, reps = [], []
    for i in range(n):
        test = fold_sets("a", i)[1]
        top = tops[i]
        scored = score_methods(preds[i], test, top, replicates=args.bootstrap, bootstrap_seed=[stats.SEED, i, 0])
        folds.append(
            {
                "section": sections[i].name,
                "spots": len(test.targets),
                **scored.entries,
                "top50_genes": [genes[g] for g in top],
            }
        )
        reps.append(scored.replicates)
    methods = list(preds[0])
    mos = {
        m: {k: float(np.mean([f["scores"][m][k]["mean_r"] for f in folds])) for k in ("top50", "all_genes")}
        for m in methods
    }
    pairs = [(f"ridge_{v}", "ridge_a") for v in others] + ([(f"head_{best}", "head_a")] if len(head_on) == 2 else [])
    pairs += [("head_a", "ridge_a")] if head_on else []
    fold_pairs = [
        {f"{x}-{y}": stats.paired(r, f["scores"], x, y) for x, y in pairs} for f, r in zip(folds, reps, strict=True)
    ]
    averaged: dict[str, Any] = {}
    mos_intervals: dict[str, Any] = {}
    mos_pairs: dict[str, Any] = {}
    if args.bootstrap:
        averaged = _average_replicates(reps)
        mos_intervals = stats.intervals_of(averaged)
        points = {m: {k: {"mean_r": v} for k, v in keys.items()} for m, keys in mos.items()}
        mos_pairs = {f"{x}-{y}": stats.paired(averaged, points, x, y) for x, y in pairs}

    _print_tables(sections, variants, methods, folds, fold_pairs, mos, mos_intervals, mos_pairs, args.bootstrap)
    log("")
    log("feature extraction (CPU, 1 thread, all spots; read + cut + encode):")
    log(f"  {'variant':<8}{'what':<38}{'seconds':>9}{'x a':>7}  passes")
    for v in variants:
        src = ", ".join(f"{p}{' (cached)' if cached[p] else ''}" for p in VARIANTS[v][1])
        log(f"  {v:<8}{VARIANTS[v][0]:<38}{extraction[v]:>9.0f}{extraction[v] / extraction['a']:>7.2f}  {src}")
    if best is not None:
        gain = ridge_mos[best] - ridge_mos["a"]
        verdict = "fitted" if head_on else f"not fitted (best ridge gain {gain:+.3f} < {args.head_margin})"
        if head_on:
            fits = ", ".join(f"{v} {s:.0f} s" for v, s in head_seconds.items())
            verdict += f"; seeds {seed_list(FitConfig().seed, args.seeds)}; {fits}"
        log(f"head on the best variant ({best}): {verdict}")

    if args.out_json:
        out = {
            "protocol": "leave-one-section-out, top-50 mean r (metrics.score on dataset.top_variable), ridge_baseline",
            "sections": [s.name for s in sections],
            "n_genes": len(genes),
            "variants": {v: VARIANTS[v][0] for v in variants},
            "dims": {v: int(variant_features(v, per_pass, 0)[0].shape[1]) for v in variants},
            "extraction_seconds": extraction,
            "extraction_ratio_to_a": {v: extraction[v] / extraction["a"] for v in variants},
            "pass_seconds": seconds,
            "pass_cached": cached,
            "ridge_fit_seconds": ridge_seconds,
            "head": {
                "on": head_on,
                "seeds": seed_list(FitConfig().seed, args.seeds) if head_on else [],
                "epochs": epochs,
                "seconds": head_seconds,
                "margin": args.head_margin,
            },
            "folds": [{**f, "pairs": p} for f, p in zip(folds, fold_pairs, strict=True)],
            "mean_of_sections": {"mean_r": mos, "intervals": mos_intervals, "pairs": mos_pairs},
            "bootstrap": {"replicates": args.bootstrap, "level": stats.LEVEL, **stats.BOOTSTRAP_NOTES},
        }
        args.out_json.parent.mkdir(parents=True, exist_ok=True)
        args.out_json.write_text(json.dumps(out, indent=1, default=_jsonable))
        log(f"wrote {args.out_json}")


def _top50_r(pred: np.ndarray, true: np.ndarray, top: np.ndarray) -> np.ndarray:
    from wsi_histosge.metrics import pearson_per_gene

    return pearson_per_gene(pred[:, top], true[:, top])


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(type(obj).__name__)


def _seed_sd(folds: list[dict[str, Any]], first: str, second: str | None = None) -> str:
    """The SD over seeds of the mean over ``folds`` (of ``first`` minus ``second`` when both have seeds) as
    " ± SD", or an empty string when there is one seed or none."""
    seeds = [f.get("seeds", {}) for f in folds]
    if not all(first in s for s in seeds) or (second is not None and not all(second in s for s in seeds)):
        return ""
    values = np.mean([s[first]["top50"]["mean_r"] for s in seeds], axis=0)
    if second is not None:
        values = values - np.mean([s[second]["top50"]["mean_r"] for s in seeds], axis=0)
    return f" ± {float(np.std(values, ddof=1)):.3f}" if len(values) > 1 else ""


def _fmt_interval(iv: list[float | None] | None, signed: bool = False) -> str:
    if not iv or iv[0] is None or iv[1] is None:
        return ""
    f = "{:+.3f}" if signed else "{:.3f}"
    return f" [{f.format(iv[0])}, {f.format(iv[1])}]"


def _print_tables(
    sections: list[STSection],
    variants: list[str],
    methods: list[str],
    folds: list[dict[str, Any]],
    fold_pairs: list[dict[str, Any]],
    mos: dict[str, Any],
    mos_intervals: dict[str, Any],
    mos_pairs: dict[str, Any],
    replicates: int,
) -> None:
    note = f"; [95% bootstrap over held-out spots, {replicates} replicates]" if replicates else ""
    print(f"\nleave-one-section-out, mean r over each fold's 50 most variable training genes{note}")
    print("(head: mean over seeds ± SD over seeds when fitted with several; a - b rows: paired on the same spots)")
    cols = [s.name for s in sections] + ["mean of sections"]
    print("| method | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for m in methods:
        cells = []
        for f in folds:
            iv = f.get("intervals", {}).get(m, {}).get("top50", {}).get("mean_r")
            sd = _seed_sd([f], m)
            cells.append(f"{f['scores'][m]['top50']['mean_r']:.3f}{sd}{_fmt_interval(iv)}")
        iv = mos_intervals.get(m, {}).get("top50", {}).get("mean_r")
        cells.append(f"{mos[m]['top50']:.3f}{_seed_sd(folds, m)}{_fmt_interval(iv)}")
        print(f"| {m} | " + " | ".join(cells) + " |")
    for name in fold_pairs[0]:
        first, second = name.split("-", 1)
        cells = []
        for f, p in zip(folds, fold_pairs, strict=True):
            d = p[name]["top50"]["mean_r"]
            sd = _seed_sd([f], first, second)
            cells.append(f"{d['difference']:+.3f}{sd}{_fmt_interval(d['interval'], True)}")
        d = mos_pairs.get(name, {}).get("top50", {}).get("mean_r")
        sd = _seed_sd(folds, first, second)
        cells.append(
            f"{d['difference']:+.3f}{sd}{_fmt_interval(d['interval'], True)}"
            if d
            else f"{mos[first]['top50'] - mos[second]['top50']:+.3f}{sd}"
        )
        print(f"| {first} - {second}, paired | " + " | ".join(cells) + " |")
    print("\nall genes, mean of sections: " + ", ".join(f"{m} {mos[m]['all_genes']:.3f}" for m in methods))


if __name__ == "__main__":
    main()
