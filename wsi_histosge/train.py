"""Training the HisToSGE head on spatial transcriptomics sections (first form: legacy ST).

Steps: encoder features for every measured spot (read through the same super-tile reader and
device-side patch cutting as inference, cached on disk), log1p(CP10k) targets of the chosen genes,
attention groups from the assay's own lattice neighbours, then Adam on MSE with early stopping on
validation Pearson r. A ridge regression on the same features is the baseline reported next to it.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .encoders import Encoder
from .loader import encode_points
from .model import HeadConfig, HisToSGEHead, Model, ModelMeta
from .slide import open_slide
from .stdata import STSection

#: Square lattice neighbourhood (legacy ST): the spot itself first, then its 8 neighbours (array steps).
SQUARE_NEIGHBOURS = [(0, 0), (-1, 0), (1, 0), (0, -1), (0, 1), (-1, -1), (1, -1), (-1, 1), (1, 1)]


def default_cache_dir() -> Path:
    import os

    return Path(os.environ.get("WSI_HISTOSGE_CACHE", Path.home() / ".cache" / "wsi-histosge")) / "features"


def section_features(
    section: STSection,
    encoder: Encoder,
    *,
    context_um: float,
    device: torch.device | None = None,
    cache_dir: Path | None = None,
) -> np.ndarray:
    """Encoder features (n_spots, dim) of a section's spots, cached by image + encoder + geometry."""
    slide = open_slide(section.image, mpp=section.mpp)
    key = hashlib.sha256(
        f"{slide.fingerprint}|{encoder.cfg.name}|{encoder.weights_hash}|{context_um}|{section.mpp:.6f}|"
        f"{np.ascontiguousarray(section.centres_level0).tobytes().hex()}".encode()
    ).hexdigest()[:24]
    cache = (cache_dir or default_cache_dir()) / f"{section.name}-{key}.npy"
    if cache.is_file():
        return np.load(cache, allow_pickle=False)
    feats = encode_points(slide, section.centres_level0, encoder, context_um=context_um, device=device)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp.npy")
    np.save(tmp, feats, allow_pickle=False)
    tmp.replace(cache)
    return feats


@dataclass
class Groups:
    """Attention groups of a section: neighbour indices (-1 = absent) and µm offsets."""

    index: np.ndarray  # (n, G) int
    offsets_um: np.ndarray  # (n, G, 2) float32
    absolute: np.ndarray  # (n, G, 2) array coordinates


def lattice_groups(section: STSection, neighbours: Sequence[tuple[int, int]] = SQUARE_NEIGHBOURS) -> Groups:
    lookup = {(int(x), int(y)): i for i, (x, y) in enumerate(section.array_xy)}
    n, g = len(section.array_xy), len(neighbours)
    index = np.full((n, g), -1, dtype=np.int64)
    offsets = np.zeros((n, g, 2), dtype=np.float32)
    absolute = np.zeros((n, g, 2), dtype=np.float32)
    for i, (x, y) in enumerate(section.array_xy):
        for j, (dx, dy) in enumerate(neighbours):
            k = lookup.get((int(x) + dx, int(y) + dy), -1)
            index[i, j] = k
            absolute[i, j] = (x + dx, y + dy)
            if k >= 0:
                offsets[i, j] = (section.centres_level0[k] - section.centres_level0[i]) * section.mpp
            else:
                offsets[i, j] = (dx * section.pitch_um, dy * section.pitch_um)
    return Groups(index, offsets, absolute)


@dataclass
class TrainSet:
    features: np.ndarray  # (n, D)
    targets: np.ndarray  # (n, genes)
    groups: Groups

    def tensors(self, position_mode: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        idx = self.groups.index
        valid = idx >= 0
        feats = self.features[np.where(valid, idx, 0)]
        pos = self.groups.absolute if position_mode == "absolute" else self.groups.offsets_um
        return (
            torch.from_numpy(feats).float(),
            torch.from_numpy(pos).float(),
            torch.from_numpy(valid),
            torch.from_numpy(self.targets).float(),
        )


def pearson_per_gene(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Pearson r of each column: 0 where the prediction is constant (no signal), NaN where the truth is."""
    p = pred - pred.mean(0)
    t = true - true.mean(0)
    pp, tt = (p * p).sum(0), (t * t).sum(0)
    denom = np.sqrt(pp * tt)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (p * t).sum(0) / denom
    r[(pp == 0) & (tt > 0)] = 0.0
    r[tt == 0] = np.nan
    return np.asarray(r)


def summarise_r(r: np.ndarray) -> dict[str, float]:
    return {
        "mean_r": float(np.nanmean(r)),
        "median_r": float(np.nanmedian(r)),
        "n_above_0.3": int(np.nansum(r > 0.3)),
        "n_genes": int(np.isfinite(r).sum()),
    }


@dataclass
class FitConfig:
    epochs: int = 400
    lr: float = 3e-4
    weight_decay: float = 1e-3
    patience: int = 40
    seed: int = 1234
    batch_size: int = 256


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
    head = HisToSGEHead(head_cfg)
    all_feats = np.concatenate([t.features for t in train])
    mean = all_feats.mean(0)
    std = all_feats.std(0)
    std = np.maximum(std, 0.1 * np.median(std) + 1e-6)  # near-constant channels must not explode
    head.feature_mean.copy_(torch.from_numpy(mean))
    head.feature_std.copy_(torch.from_numpy(std))
    parts_targets = np.concatenate([t.targets for t in train])
    with torch.no_grad():  # start every gene at its mean so the output ReLU does not begin dead
        last = head.gene_head[-1]
        assert isinstance(last, torch.nn.Linear)
        last.bias.copy_(torch.from_numpy(parts_targets.mean(0)))
        last.weight.mul_(0.1)
    parts = [t.tensors(head_cfg.position_mode) for t in train]
    feats = torch.cat([p[0] for p in parts])
    pos = torch.cat([p[1] for p in parts])
    valid = torch.cat([p[2] for p in parts])
    target = torch.cat([p[3] for p in parts])
    opt = torch.optim.Adam(head.parameters(), lr=fit.lr, weight_decay=fit.weight_decay)
    best_r, best_state, best_epoch, history = -np.inf, None, 0, []
    epochs = fixed_epochs or fit.epochs
    gen = torch.Generator().manual_seed(fit.seed)
    for epoch in range(1, epochs + 1):
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
        val_r = float("nan")
        if val and fixed_epochs is None:
            val_r = float(np.nanmean([np.nanmean(pearson_per_gene(predict_set(head, v), v.targets)) for v in val]))
            if val_r > best_r:
                best_r, best_state, best_epoch = val_r, copy.deepcopy(head.state_dict()), epoch
            elif epoch - best_epoch >= fit.patience:
                break
        history.append({"epoch": epoch, "loss": float(np.mean(losses)), "val_r": val_r})
        if on_epoch:
            on_epoch(epoch, float(np.mean(losses)), val_r)
    if best_state is not None:
        head.load_state_dict(best_state)
    head.eval()
    return head, {
        "best_epoch": best_epoch or epochs,
        "best_val_r": None if best_state is None else best_r,
        "epochs_run": len(history),
        "fit": asdict(fit),
    }


@torch.inference_mode()
def predict_set(head: HisToSGEHead, data: TrainSet) -> np.ndarray:
    head.eval()
    feats, pos, valid, _ = data.tensors(head.cfg.position_mode)
    return head(feats, pos, valid).numpy()


def ridge_baseline(train: list[TrainSet], test: TrainSet) -> np.ndarray:
    """Ridge on standardised (clipped |z| <= 5) features with alpha by cross-validation."""
    from sklearn.linear_model import RidgeCV

    x = np.concatenate([t.features for t in train])
    y = np.concatenate([t.targets for t in train])
    mean, std = x.mean(0), x.std(0)
    std = np.maximum(std, 0.1 * np.median(std) + 1e-6)

    def z(a: np.ndarray) -> np.ndarray:
        return np.clip((a - mean) / std, -5, 5)

    model = RidgeCV(alphas=np.logspace(0, 5, 11)).fit(z(x), y)
    return np.asarray(model.predict(z(test.features)))


def build_model(
    head: HisToSGEHead,
    genes: list[str],
    encoder: Encoder,
    *,
    spot_um: float,
    context_um: float,
    pitch_um: float,
    neighbours: Sequence[tuple[int, int]],
    name: str,
    training: dict[str, Any],
    metrics: dict[str, Any],
) -> Model:
    meta = ModelMeta(
        genes=list(genes),
        head=asdict(head.cfg),
        encoder=encoder.cfg.name,
        encoder_weights_sha256=encoder.weights_hash,
        spot_um=spot_um,
        context_um=context_um,
        neighbour_offsets_um=[[dx * pitch_um, dy * pitch_um] for dx, dy in neighbours],
        training=training,
        metrics=metrics,
        name=name,
    )
    return Model(meta, head)


def select_genes(sections: Sequence[STSection], n_genes: int) -> list[str]:
    """Top-``n_genes`` by variance of log1p(CP10k) over the pooled training spots (genes in every section)."""
    common = set(sections[0].genes)
    for s in sections[1:]:
        common &= set(s.genes)
    genes = sorted(common)
    pooled = np.concatenate([s.log_cp10k(genes) for s in sections])
    order = np.argsort(-pooled.var(0), kind="stable")[:n_genes]
    return [genes[i] for i in order]


def read_gene_list(path: Path) -> list[str]:
    if path.suffix == ".npy":
        return [str(g) for g in np.load(path, allow_pickle=False)]
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _parse_triple(spec: str) -> STSection:
    from .errors import UsageError
    from .stdata import read_legacy_st

    parts = spec.split(":")
    if len(parts) != 3:
        raise UsageError(f"section {spec!r}: expected COUNTS.tsv[.gz]:SPOTS.tsv:IMAGE")
    return read_legacy_st(*parts)


def train_from_triples(
    sections: Sequence[str],
    out: str | Path,
    *,
    genes: Path | None = None,
    val: Sequence[str] = (),
    encoder: str = "efficientnet-lite0",
    encoder_weights: Path | None = None,
    n_genes: int = 1000,
    epochs: int = 400,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train and save a model from legacy-ST sections; returns the metrics summary."""
    from .encoders import create_encoder
    from .errors import OutputExistsError
    from .model import save_model

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(f"{out}: exists and is not empty; pass --overwrite or choose another --out")
    train_secs = [_parse_triple(s) for s in sections]
    val_secs = [_parse_triple(s) for s in val]
    gene_list = read_gene_list(genes) if genes else select_genes(train_secs, n_genes)
    enc = create_encoder(encoder, weights=encoder_weights)
    context_um = enc.cfg.context_um

    def to_set(sec: STSection) -> TrainSet:
        log(f"features: {sec.name} ({len(sec.centres_level0)} spots)")
        return TrainSet(
            section_features(sec, enc, context_um=context_um), sec.log_cp10k(gene_list), lattice_groups(sec)
        )

    train_sets = [to_set(s) for s in train_secs]
    val_sets = [to_set(s) for s in val_secs]
    head_cfg = HeadConfig(in_dim=enc.cfg.embed_dim, n_genes=len(gene_list))
    fit = FitConfig(epochs=epochs)
    head, info = fit_head(
        head_cfg,
        train_sets,
        val_sets or None,
        fit,
        on_epoch=lambda e, loss, r: log(f"epoch {e}: loss {loss:.4f} val r {r:.3f}") if e % 10 == 0 else None,
    )
    metrics: dict[str, Any] = {"fit": info}
    for sec, vs in zip(val_secs, val_sets, strict=True):
        metrics[f"val_{sec.name}_head"] = summarise_r(pearson_per_gene(predict_set(head, vs), vs.targets))
        metrics[f"val_{sec.name}_ridge"] = summarise_r(pearson_per_gene(ridge_baseline(train_sets, vs), vs.targets))
    pitch = train_secs[0].pitch_um
    model = build_model(
        head,
        gene_list,
        enc,
        spot_um=train_secs[0].spot_um,
        context_um=context_um,
        pitch_um=pitch,
        neighbours=SQUARE_NEIGHBOURS,
        name=out.name,
        training={
            "summary": f"{len(train_secs)} legacy-ST sections",
            "sections": [s.name for s in train_secs],
            "spots": int(sum(len(t.features) for t in train_sets)),
        },
        metrics=metrics,
    )
    save_model(model, out)
    log(f"wrote {out}")
    return metrics
