"""Measure the trust signals on real data: novelty (is a cell's image unlike the training tissue?) and
uncertainty (which spots' predictions are worst?).

Novelty: cosine k-NN distance of encoder features to the training spots, with raw, standardised and
PCA-whitened features, against glass (background of the HER2ST images and of the CMU-1 sample), mouse
olfactory bulb (another organ and species, images at ~3.5 µm/px) and breast sections downsampled to
3.5 µm/px (resolution alone). Method choices are made on the *choice* split and reported on the *test*
split (different sections, different bulb sections, different glass).

Uncertainty (leave-one-section-out over HER2ST C2-C6, ``--seeds`` heads per fold): Spearman of each
candidate with the per-spot squared error (mean over the fold's top-50 genes) and the partial Spearman
with the spot's measured library size held fixed.

    python benchmarks/trust_study.py --data ../shared/data
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from wsi_histosge import config, trust
from wsi_histosge.dataset import default_cache_dir, feature_scale, make_sets, top_variable
from wsi_histosge.encoders import create_encoder
from wsi_histosge.loader import encode_points
from wsi_histosge.model import HeadConfig
from wsi_histosge.slide import open_slide
from wsi_histosge.stdata import her2st_section
from wsi_histosge.tissue import detect_tissue
from wsi_histosge.train import FitConfig, fit_and_score, fit_model_trust, measured_genes, read_gene_list

SECTIONS = ["C2", "C3", "C4", "C5", "C6"]
CHOICE_C, TEST_C = ["C2", "C3"], ["C4", "C5", "C6"]
CHOICE_MOB, TEST_MOB = ["MOB1", "MOB2"], ["MOB3", "MOB4"]
MOB_MPP = 3.5


def log(msg: str) -> None:
    print(msg, flush=True)


def cached_points(
    tag: str, slide_path: Path, mpp: float, centres: np.ndarray, encoder, context_um: float
) -> np.ndarray:
    slide = open_slide(slide_path, mpp=mpp)
    key = hashlib.sha256(
        f"{slide.fingerprint}|{encoder.cfg.name}|{encoder.weights_hash}|{context_um}|{mpp}|".encode()
        + np.ascontiguousarray(centres).tobytes()
    ).hexdigest()[:20]
    path = default_cache_dir().parent / "study" / f"{tag}-{key}.npy"
    if path.is_file():
        return np.load(path, allow_pickle=False)
    t0 = time.perf_counter()
    feats = encode_points(slide, centres, encoder, context_um=context_um)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, feats)
    log(f"  encoded {tag}: {len(centres)} points in {time.perf_counter() - t0:.0f} s")
    return feats


def lattice_points(slide_path: Path, mpp: float, stride_um: float, *, glass: bool, context_um: float, max_n: int):
    """Centres (level-0 px) of a lattice on the tissue (or, with ``glass``, far from any tissue)."""
    slide = open_slide(slide_path, mpp=mpp)
    mask = detect_tissue(slide)
    w, h = slide.dimensions
    step = stride_um / slide.mpp.x
    half = context_um / slide.mpp.x
    xs = np.arange(half, w - half, step)
    ys = np.arange(half, h - half, step)
    gx, gy = np.meshgrid(xs, ys)
    centres = np.stack([gx.ravel(), gy.ravel()], 1)
    if glass:
        frac = mask.fraction_within(centres, 2 * half)  # no tissue within two contexts
        centres = centres[frac == 0]
    else:
        frac = mask.fraction_within(centres, 50.0 / slide.mpp.x)
        centres = centres[frac >= 0.5]
    if len(centres) > max_n:
        centres = centres[np.sort(np.random.default_rng(0).choice(len(centres), max_n, replace=False))]
    return centres


def downsampled_copy(image: Path, factor: float, out_dir: Path) -> Path:
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None
    out = out_dir / f"{image.stem}-ds{factor:.2f}.tif"
    if not out.is_file():
        with Image.open(image) as im:
            small = im.convert("RGB").resize((round(im.width / factor), round(im.height / factor)), Image.LANCZOS)
        small.save(out, compression="jpeg", quality=90)
    return out


class Space:
    """A feature space for the k-NN: raw, standardised (training mean/std, clipped) or PCA-whitened."""

    def __init__(self, kind: str, train: np.ndarray) -> None:
        self.kind = kind
        if kind != "raw":
            self.mean, self.std = feature_scale(train)
        if kind == "whitened":
            from sklearn.decomposition import PCA

            self.pca = PCA(n_components=64, whiten=True, random_state=0).fit(self._z(train))

    def _z(self, x: np.ndarray) -> np.ndarray:
        return np.clip((x - self.mean) / self.std, -5, 5)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.kind == "raw":
            return x
        if self.kind == "standardised":
            return self._z(x)
        return self.pca.transform(self._z(x))


def novelty_scores(train: list[np.ndarray], queries: dict[str, np.ndarray], kind: str, k: int, metric: str):
    pooled = np.concatenate(train)
    space = Space(kind, pooled)
    ref = trust.reference_sample(space(pooled))
    if metric == "cosine":
        ref_t = trust.unit_rows(ref)
        return {n: trust.knn_cosine_distance(space(q), ref_t, k) for n, q in queries.items()}
    import torch

    ref_t = torch.as_tensor(ref).float()
    out = {}
    for n, q in queries.items():
        d = torch.cdist(torch.as_tensor(space(q)).float(), ref_t)
        out[n] = d.topk(min(k, len(ref)), dim=1, largest=False).values.mean(1).numpy()
    return out


def novelty_study(args, sets, encoder) -> None:
    data = Path(args.data)
    context = encoder.cfg.context_um
    feats = {s.name: s.features for s in sets}
    sec = {s: her2st_section(data / "her2st", s) for s in SECTIONS}
    extra: dict[str, np.ndarray] = {}
    for s in SECTIONS:
        c = lattice_points(sec[s].image, sec[s].mpp, 150.0, glass=True, context_um=context, max_n=150)
        extra[f"glass-{s}"] = cached_points(f"glass-{s}", sec[s].image, sec[s].mpp, c, encoder, context)
    samples = data / "wsi-samples"
    for name, path in (
        ("glass-CMU1", samples / "CMU-1-Small-Region.svs"),
        ("glass-DICOM", samples / "pathml_small_dicom.dcm"),
    ):
        if path.exists():
            slide = open_slide(path)
            try:
                slide.mpp  # noqa: B018
            except Exception:  # the DICOM sample records no pixel size: no µm-true glass from it
                continue
            c = lattice_points(path, slide.mpp.x, 100.0, glass=True, context_um=context, max_n=150)
            if len(c):
                extra[name] = cached_points(name, path, slide.mpp.x, c, encoder, context)
    for m in CHOICE_MOB + TEST_MOB:
        img = data / "st-mob-stutility" / f"{m}.jpg"
        c = lattice_points(img, MOB_MPP, 200.0, glass=False, context_um=context, max_n=400)
        extra[m] = cached_points(m, img, MOB_MPP, c, encoder, context)
    tmp = default_cache_dir().parent / "study"
    for s in SECTIONS:
        factor = MOB_MPP / sec[s].mpp
        small = downsampled_copy(sec[s].image, factor, tmp)
        extra[f"{s}@3.5"] = cached_points(f"{s}-ds", small, MOB_MPP, sec[s].centres_level0 / factor, encoder, context)
    for name, f in extra.items():
        log(f"  {name}: {len(f)} points")

    rows = []
    for kind in ("raw", "standardised", "whitened"):
        for metric in ("cosine", "euclidean"):
            for k in (1, 5, 10, 20):
                res = {"choice": {}, "test": {}}
                for held in SECTIONS:
                    train = [feats[s] for s in SECTIONS if s != held]
                    q = {held: feats[held], **{n: v for n, v in extra.items() if not n.startswith(held) or "@" in n}}
                    q[f"{held}@3.5"] = extra[f"{held}@3.5"]
                    sc = novelty_scores(train, q, kind, k, metric)
                    split = "choice" if held in CHOICE_C else "test"
                    mobs = CHOICE_MOB if split == "choice" else TEST_MOB
                    glass_names = [f"glass-{held}"] + ([] if split == "choice" else ["glass-CMU1", "glass-DICOM"])
                    glass = np.concatenate([sc[g] for g in glass_names if g in sc])
                    res[split].setdefault("glass", []).append(trust.auroc(sc[held], glass))
                    res[split].setdefault("mob", []).append(
                        trust.auroc(sc[held], np.concatenate([sc[m] for m in mobs]))
                    )
                    res[split].setdefault("res", []).append(trust.auroc(sc[held], sc[f"{held}@3.5"]))
                rows.append((kind, metric, k, res))
    log(
        "\nnovelty AUROC (held-out breast section vs ...), mean over held-out sections; choice = C2,C3 + MOB1,2;"
        " test = C4-C6 + MOB3,4 (+ CMU-1/DICOM glass)"
    )
    head = ("space", "metric", "k", "choice: glass", "bulb", "3.5um", "test: glass", "bulb", "3.5um", "test min")
    log("{:13s} {:9s} {:>3s} | {:>13s} {:>6s} {:>6s} | {:>11s} {:>6s} {:>6s} | {}".format(*head))
    for kind, metric, k, res in rows:
        c, t = res["choice"], res["test"]
        means = [np.mean(v) for v in (c["glass"], c["mob"], c["res"], t["glass"], t["mob"], t["res"])]
        line = "{:13s} {:9s} {:3d} | {:13.3f} {:6.3f} {:6.3f} | {:11.3f} {:6.3f} {:6.3f}".format(
            kind, metric, k, *means
        )
        log(f"{line} | glass {min(t['glass']):.3f}, bulb {min(t['mob']):.3f}")

    # flagged share on held-out sections at the calibrated 95th percentile (raw cosine, default k)
    log("\nshare of a held-out section above the training 95th percentile (calibrated leave-one-section-out):")
    for held in SECTIONS:
        train = [feats[s] for s in SECTIONS if s != held]
        calib = np.concatenate(trust.loso_novelty(train))
        thr = np.percentile(calib, trust.DEFAULT_NOVELTY_PERCENTILE)
        ref = trust.unit_rows(trust.reference_sample(np.concatenate(train)))
        s_held = trust.knn_cosine_distance(feats[held], ref)
        s_glass = trust.knn_cosine_distance(extra[f"glass-{held}"], ref)
        s_mob = trust.knn_cosine_distance(np.concatenate([extra[m] for m in CHOICE_MOB + TEST_MOB]), ref)
        s_res = trust.knn_cosine_distance(extra[f"{held}@3.5"], ref)
        log(
            f"  {held}: held-out {np.mean(s_held > thr):.1%}, glass {np.mean(s_glass > thr):.1%}, "
            f"bulb {np.mean(s_mob > thr):.1%}, same section at 3.5 µm/px {np.mean(s_res > thr):.1%} "
            f"(threshold {thr:.4f})"
        )


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def partial_spearman(a: np.ndarray, b: np.ndarray, control: np.ndarray) -> float:
    from scipy.stats import rankdata

    ra, rb, rc = rankdata(a), rankdata(b), rankdata(control)
    X = np.stack([np.ones_like(rc), rc], 1)
    res = [r - X @ np.linalg.lstsq(X, r, rcond=None)[0] for r in (ra, rb)]
    return float(np.corrcoef(res[0], res[1])[0, 1])


def uncertainty_study(args, sets, sections, genes) -> None:
    """Per held-out section: the uncertainty the tool ships (``trust.fit_trust`` on the training sections, as
    ``train`` does) next to the ensemble spread of ``--seeds`` heads, each against the per-spot error of the
    model's prediction (the first seed's head), raw and with the measured library size held fixed."""
    fit = FitConfig()
    log(
        f"\nuncertainty (leave-one-section-out, error = per-spot mean squared error over the fold's top-50 genes; "
        f"spread = SD over {args.seeds} seeds' heads)"
    )
    cols = (
        "fold",
        "shipped",
        "partial",
        "spread",
        "partial",
        "novelty",
        "lib/err",
        "worst/best 20%",
        "head r",
        "ens r",
    )
    log("{:5s} {:>8s} {:>8s} {:>7s} {:>8s} {:>8s} {:>8s} {:>15s} {:>7s} {:>6s}".format(*cols))
    shipped_all = []
    for i, test in enumerate(sets):
        train = [s for j, s in enumerate(sets) if j != i]
        train_secs = [s for s in sections if s.name != test.name]
        cfg = HeadConfig(in_dim=test.features.shape[1], n_genes=len(genes))
        fitted = fit_and_score(cfg, train, [test], fit, genes=genes, seeds=args.seeds, replicates=0)
        epochs = int(fitted.metrics["epochs"])
        per_seed = np.stack(fitted.head_predictions[0])  # (S, n, G)
        top = top_variable(train)
        truth = test.targets
        err = ((per_seed[0][:, top] - truth[:, top]) ** 2).mean(1)
        spread = per_seed[:, :, top].std(0).mean(1)
        lib = trust.log_library_size(next(s for s in sections if s.name == test.name).counts)
        model_trust = fit_model_trust(train, train_secs, fitted.head, cfg, genes, epochs, lambda m: None)
        feats = torch.as_tensor(test.centre_features)
        scores = model_trust.scores(feats, fitted.head.standardise(feats)).numpy()
        shipped = scores[:, 1]
        shipped_all.append(spearman(shipped, err))
        q = np.quantile(shipped, [0.2, 0.8])
        ratio = err[shipped >= q[1]].mean() / err[shipped <= q[0]].mean()
        ens = per_seed.mean(0)
        head_r = np.nanmean([np.corrcoef(per_seed[0][:, g], truth[:, g])[0, 1] for g in top])
        ens_r = np.nanmean([np.corrcoef(ens[:, g], truth[:, g])[0, 1] for g in top])
        values = (
            spearman(shipped, err),
            partial_spearman(shipped, err, lib),
            spearman(spread, err),
            partial_spearman(spread, err, lib),
            spearman(scores[:, 0], err),
            spearman(lib, err),
        )
        log(f"{test.name:5s} " + " ".join(f"{v:8.3f}" for v in values) + f" {ratio:15.2f} {head_r:7.3f} {ens_r:6.3f}")
    log(
        f"shipped uncertainty: Spearman with per-spot error min {min(shipped_all):.3f}, "
        f"mean {np.mean(shipped_all):.3f} over {len(shipped_all)} held-out sections (target >= 0.3 in every one)"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/data")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--only", choices=["novelty", "uncertainty"], default=None)
    args = p.parse_args()
    data = Path(args.data)
    if not (data / "her2st").is_dir():
        sys.exit(f"{data}/her2st not found: give --data the folder holding her2st/ and st-mob-stutility/")
    log(f"cores: {os.cpu_count()}, load: {os.getloadavg()[0]:.1f}")
    encoder = create_encoder(config.DEFAULT_ENCODER)
    sections = [her2st_section(data / "her2st", s) for s in SECTIONS]
    genes = measured_genes(sections, read_gene_list(data / "her2st" / "gene-lists" / "her_hvg_cut_1000.npy"))
    sets = make_sets(sections, genes, encoder, log=lambda m: None)
    if args.only in (None, "novelty"):
        novelty_study(args, sets, encoder)
    if args.only in (None, "uncertainty"):
        uncertainty_study(args, sets, sections, genes)
    log(f"load at end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
