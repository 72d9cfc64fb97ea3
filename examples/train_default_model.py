"""Reproduce the built-in default model (wsi_histosge/models/her2st-effnetlite0).

Trains the HisToSGE head on HER2ST sections C2-C5 with the offline EfficientNet-Lite0 encoder and
reports per-gene Pearson r on the held-out section C6, next to ridge and training-mean baselines on the
same features. The number of epochs is chosen without looking at C6: first C2-C4 -> C5 with early
stopping, then C2-C5 for that many epochs.

    python examples/train_default_model.py --data ../shared/data/her2st --out wsi_histosge/models/her2st-effnetlite0
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from wsi_histosge.encoders import create_encoder
from wsi_histosge.evaluate import mean_baseline, ridge_baseline, top_variable
from wsi_histosge.metrics import score
from wsi_histosge.model import HeadConfig, save_model
from wsi_histosge.stdata import her2st_section
from wsi_histosge.train import (
    FitConfig,
    build_model,
    choose_epochs,
    fit_head,
    make_sets,
    pooled_offsets_um,
    predict_set,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("../shared/data/her2st"))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--train", default="C2,C3,C4,C5")
    ap.add_argument("--test", default="C6")
    args = ap.parse_args()

    genes = [str(g) for g in np.load(args.data / "gene-lists" / "her_hvg_cut_1000.npy", allow_pickle=False)]
    encoder = create_encoder("efficientnet-lite0")
    train_secs = [her2st_section(args.data, n) for n in args.train.split(",")]
    test_sec = her2st_section(args.data, args.test)
    train = make_sets(train_secs, genes, encoder)
    test = make_sets([test_sec], genes, encoder)[0]

    head_cfg = HeadConfig(in_dim=encoder.cfg.embed_dim, n_genes=len(genes))
    fit = FitConfig()
    epochs = choose_epochs(head_cfg, train, fit)
    head, _ = fit_head(head_cfg, train, None, fit, fixed_epochs=epochs)
    top = top_variable(train)
    preds = {
        "head": predict_set(head, test),
        "ridge": ridge_baseline(train, test),
        "training_mean": mean_baseline(train, test),
    }
    metrics = {
        "protocol": f"train {args.train} -> test {args.test} (HER2ST patient C, within-patient); "
        f"epochs ({epochs}) chosen on {train_secs[-1].name}",
        **{f"{m}_all_genes": score(p, test.targets, test_sec.array_xy) for m, p in preds.items()},
        **{f"{m}_top50_hvg": score(p, test.targets, test_sec.array_xy, top) for m, p in preds.items()},
        "epochs": epochs,
    }
    print(json.dumps(metrics, indent=1))
    if args.out:
        gene_means = np.concatenate([t.targets for t in train]).mean(0)
        model = build_model(
            head,
            genes,
            encoder,
            spot_um=100.0,
            context_um=encoder.cfg.context_um,
            neighbour_offsets_um=pooled_offsets_um(train_secs),
            name="her2st-effnetlite0",
            training={
                "summary": "HER2ST patient C sections C2-C5 (legacy ST, 100 µm spots), 785-gene HER2ST list",
                "sections": [s.name for s in train_secs],
                "spots": int(sum(len(t.features) for t in train)),
                "targets": "log1p(CP10k)",
                "encoder": "efficientnet-lite0 (ImageNet, offline)",
                "gene_means": [round(float(v), 5) for v in gene_means],
            },
            metrics=metrics,
        )
        save_model(model, args.out, half=True)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
