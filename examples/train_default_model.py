"""Reproduce the built-in default model (wsi_histosge/models/her2st-effnetlite0).

Trains the HisToSGE head on HER2ST sections C2-C5 with the offline EfficientNet-Lite0 encoder and
scores it on the held-out section C6, next to ridge and training-mean baselines on the same features, with
the library's one training flow (``train.fit_and_score``). The number of epochs is chosen without looking
at C6: first C2-C4 -> C5 with early stopping, then C2-C5 for that many epochs.

    python examples/train_default_model.py --data ../shared/data/her2st --out wsi_histosge/models/her2st-effnetlite0
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from wsi_histosge.dataset import make_sets, pooled_offsets_um
from wsi_histosge.encoders import create_encoder
from wsi_histosge.model import HeadConfig, save_model
from wsi_histosge.stdata import her2st_section
from wsi_histosge.train import FitConfig, build_model, fit_and_score


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
    test_secs = [her2st_section(args.data, n) for n in args.test.split(",")]
    train = make_sets(train_secs, genes, encoder)
    test = make_sets(test_secs, genes, encoder)

    head_cfg = HeadConfig(in_dim=encoder.cfg.embed_dim, n_genes=len(genes))
    fitted = fit_and_score(head_cfg, train, test, FitConfig(), genes=genes)
    metrics = {
        "protocol": f"train {args.train} -> test {args.test} (HER2ST patient C, within-patient)",
        **fitted.metrics,
    }
    print(json.dumps({k: v for k, v in metrics.items() if k != "top50_genes"}, indent=1))
    if args.out:
        gene_means = np.concatenate([t.targets for t in train]).mean(0)
        model = build_model(
            fitted.head,
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
