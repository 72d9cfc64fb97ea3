"""How much the number-of-epochs rule moves a leave-one-section-out fold's score, and a steadier rule.

For each held-out section of HER2ST C2-C6 (default encoder, 785-gene list) and each seed, the head is fitted
on every training section but one (held out in turn) for a fixed number of epochs, recording the validation
mean-r curve. From the same curves, three rules pick the epochs (early stopping with ``patience`` simulated
on a curve), then the head is refitted on all training sections for that many epochs and scored on the
held-out section (top-50 mean r):

* ``last``: the curve with the last training section held out (the default rule); ``held-out j``:
  the same rule with training section j held out instead;
* ``pooled``: the mean curve over the inner folds (each training section held out in turn) of that seed;
* ``pooled-seeds``: the mean curve over inner folds and seeds (one epoch count for all seeds of a fold).

Prints per fold: the spread over seeds (SD) of each rule, the range over the held-out-section choice, and the
mean of sections; ``--json`` writes the raw curves and scores.

    python benchmarks/epoch_rule.py --data ../shared/data/her2st [--seeds 3] [--epochs 60]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from wsi_histosge.dataset import TrainSet, make_sets, top_variable
from wsi_histosge.encoders import create_encoder
from wsi_histosge.metrics import pearson_per_gene
from wsi_histosge.model import HeadConfig
from wsi_histosge.stdata import her2st_section
from wsi_histosge.train import FitConfig, early_stop_epoch, fit_head, measured_genes, predict_set, seed_list


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("../shared/data/her2st"))
    ap.add_argument("--sections", default="C2,C3,C4,C5,C6")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=60, help="length of every recorded validation curve")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)

    genes = [str(g) for g in np.load(args.data / "gene-lists" / "her_hvg_cut_1000.npy", allow_pickle=False)]
    secs = [her2st_section(args.data, n) for n in args.sections.split(",")]
    genes = measured_genes(secs, genes, log=lambda _m: None)
    enc = create_encoder("efficientnet-lite0")
    sets = make_sets(secs, genes, enc, log=lambda _m: None)
    head_cfg = HeadConfig(in_dim=enc.cfg.embed_dim, n_genes=len(genes))
    base = FitConfig()
    seeds = seed_list(base.seed, args.seeds)
    record: dict[str, dict] = {}
    cache: dict[tuple[str, int, int], float] = {}  # refit scores by (held-out section, seed index, epochs)
    for i, test in enumerate(sets):
        train = [s for j, s in enumerate(sets) if j != i]
        top = top_variable(train)
        curves = np.zeros((len(seeds), len(train), args.epochs))
        for a, seed in enumerate(seeds):
            fit = FitConfig(epochs=args.epochs, patience=10**9, seed=seed)
            for j in range(len(train)):
                row: list[float] = []
                fit_head(
                    head_cfg,
                    train[:j] + train[j + 1 :],
                    [train[j]],
                    fit,
                    on_epoch=lambda _e, _l, r, row=row: row.append(r),
                )
                curves[a, j] = row

        def scored(a: int, epochs: int, train: list = train, test: TrainSet = test, top: np.ndarray = top) -> float:
            key = (test.name, a, epochs)
            if key not in cache:
                head, _ = fit_head(head_cfg, train, None, FitConfig(seed=seeds[a]), fixed_epochs=epochs)
                r = pearson_per_gene(predict_set(head, test)[:, top], test.targets[:, top])
                cache[key] = float(np.nanmean(r))
            return cache[key]

        rules: dict[str, list[int]] = {}
        for j in range(len(train)):
            rules[f"held-out {train[j].name}"] = [
                early_stop_epoch(curves[a, j], base.patience) for a in range(len(seeds))
            ]
        rules["pooled"] = [early_stop_epoch(curves[a].mean(0), base.patience) for a in range(len(seeds))]
        together = early_stop_epoch(curves.mean((0, 1)), base.patience)
        rules["pooled-seeds"] = [together] * len(seeds)
        scores = {k: [scored(a, e) for a, e in enumerate(v)] for k, v in rules.items()}
        record[test.name] = {"epochs": rules, "scores": scores, "curves": curves.round(5).tolist()}
        last = f"held-out {train[-1].name}"
        held = [np.mean(scores[f"held-out {t.name}"]) for t in train]
        print(
            f"{test.name}: last {np.mean(scores[last]):.3f} ± {np.std(scores[last], ddof=1):.3f} "
            f"(epochs {rules[last]}), held-out choice range {max(held) - min(held):.3f} "
            f"({min(held):.3f}-{max(held):.3f}); pooled {np.mean(scores['pooled']):.3f} ± "
            f"{np.std(scores['pooled'], ddof=1):.3f} (epochs {rules['pooled']}); pooled-seeds "
            f"{np.mean(scores['pooled-seeds']):.3f} ± {np.std(scores['pooled-seeds'], ddof=1):.3f} (epochs {together})",
            flush=True,
        )
    for rule in ("last", "pooled", "pooled-seeds"):
        per_seed = [
            np.mean(
                [record[n]["scores"][rule if rule != "last" else f"held-out {_last(record, n)}"][a] for n in record]
            )
            for a in range(len(seeds))
        ]
        print(f"mean of sections, rule {rule}: {np.mean(per_seed):.4f} ± {np.std(per_seed, ddof=1):.4f} over seeds")
    if args.json:
        args.json.write_text(json.dumps(record))


def _last(record: dict[str, dict], name: str) -> str:
    held = [k for k in record[name]["epochs"] if k.startswith("held-out ")]
    return held[-1].removeprefix("held-out ")


if __name__ == "__main__":
    main()
