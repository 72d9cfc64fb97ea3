"""Reproduce the built-in default model (wsi_histosge/models/her2st-effnetlite0).

Trains the HisToSGE head on HER2ST sections C2-C5 with the offline EfficientNet-Lite0 encoder and
reports per-gene Pearson r on the held-out section C6, next to a ridge baseline on the same features.
The number of epochs is chosen without looking at C6: first C2-C4 -> C5 with early stopping, then
C2-C5 for that many epochs.

    python examples/train_default_model.py --data ../shared/data/her2st --out wsi_histosge/models/her2st-effnetlite0
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from wsi_histosge.encoders import create_encoder
from wsi_histosge.model import HeadConfig, save_model
from wsi_histosge.stdata import her2st_section
from wsi_histosge.train import (
    SQUARE_NEIGHBOURS,
    FitConfig,
    TrainSet,
    build_model,
    fit_head,
    lattice_groups,
    pearson_per_gene,
    predict_set,
    ridge_baseline,
    section_features,
    summarise_r,
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
    context_um = encoder.cfg.context_um
    train_names = args.train.split(",")
    sets: dict[str, TrainSet] = {}
    for name in [*train_names, args.test]:
        sec = her2st_section(args.data, name)
        feats = section_features(sec, encoder, context_um=context_um)
        sets[name] = TrainSet(feats, sec.log_cp10k(genes), lattice_groups(sec, SQUARE_NEIGHBOURS))
        print(f"{name}: {len(feats)} spots, mpp {sec.mpp:.4f} ({sec.mpp_source})")

    head_cfg = HeadConfig(in_dim=encoder.cfg.embed_dim, n_genes=len(genes))
    fit = FitConfig()
    # 1) epochs by early stopping on the last training section (C6 is not looked at)
    inner_train, inner_val = train_names[:-1], train_names[-1]
    _, info = fit_head(head_cfg, [sets[n] for n in inner_train], [sets[inner_val]], fit)
    epochs = int(info["best_epoch"])
    print(f"inner split {inner_train} -> {inner_val}: best epoch {epochs}, val mean r {info['best_val_r']:.3f}")
    # 2) final fit on all training sections
    head, _ = fit_head(head_cfg, [sets[n] for n in train_names], None, fit, fixed_epochs=epochs)

    test = sets[args.test]
    var = np.concatenate([sets[n].targets for n in train_names]).var(0)
    top50 = np.argsort(-var)[:50]
    pred = predict_set(head, test)
    ridge = ridge_baseline([sets[n] for n in train_names], test)
    r_head, r_ridge = pearson_per_gene(pred, test.targets), pearson_per_gene(ridge, test.targets)
    metrics = {
        "protocol": f"train {','.join(train_names)} -> test {args.test} (HER2ST patient C, within-patient)",
        "head_all_genes": summarise_r(r_head),
        "ridge_all_genes": summarise_r(r_ridge),
        "head_top50_hvg": summarise_r(r_head[top50]),
        "ridge_top50_hvg": summarise_r(r_ridge[top50]),
        "epochs": epochs,
    }
    print(json.dumps(metrics, indent=1))
    if args.out:
        model = build_model(
            head,
            genes,
            encoder,
            spot_um=100.0,
            context_um=context_um,
            pitch_um=200.0,
            neighbours=SQUARE_NEIGHBOURS,
            name="her2st-effnetlite0",
            training={
                "summary": "HER2ST patient C sections C2-C5 (legacy ST, 100 µm spots), 785-gene HER2ST list",
                "sections": train_names,
                "spots": int(sum(len(sets[n].features) for n in train_names)),
                "targets": "log1p(CP10k)",
                "encoder": "efficientnet-lite0 (ImageNet, offline)",
            },
            metrics=metrics,
        )
        save_model(model, args.out, half=True)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
