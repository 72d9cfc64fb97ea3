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

from . import config
from .encoders import Encoder
from .errors import DataFormatError, InputNotFoundError, UsageError
from .loader import encode_points
from .metrics import pearson_per_gene
from .model import HeadConfig, HisToSGEHead, Model, ModelMeta
from .slide import open_slide
from .stdata import SQUARE_STEPS, STSection


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
    require_spots_on_image(section, slide.dimensions)
    key = hashlib.sha256(
        f"{slide.fingerprint}|{encoder.cfg.name}|{encoder.weights_hash}|{context_um}|{section.mpp:.6f}|"
        f"{np.ascontiguousarray(section.centres_level0).tobytes().hex()}".encode()
    ).hexdigest()[:24]
    import zarr

    cache = (cache_dir or default_cache_dir()) / f"{section.name}-{key}.zarr"
    if (cache / "zarr.json").is_file():
        try:
            group: Any = zarr.open_group(str(cache), mode="r")
            if group.attrs.get("complete") and group.attrs.get("key") == key:
                return np.asarray(group["features"][:], dtype=np.float32)
        except Exception:
            pass
    feats = encode_points(slide, section.centres_level0, encoder, context_um=context_um, device=device)
    cache.parent.mkdir(parents=True, exist_ok=True)
    group = zarr.open_group(str(cache), mode="w", zarr_format=3)
    group.create_array("features", data=feats, chunks=(min(len(feats), 4096), feats.shape[1]))
    group.attrs.update(
        {
            "key": key,
            "section": section.name,
            "encoder": encoder.cfg.name,
            "encoder_weights_sha256": encoder.weights_hash,
            "context_um": context_um,
            "image": str(section.image),
            "complete": True,
        }
    )
    return feats


def require_spots_on_image(section: STSection, dimensions: tuple[int, int]) -> None:
    """Spot centres must lie on the image (within a spot radius of its edge): centres beyond it mean the
    coordinates belong to another image (the hires PNG vs the full-resolution H&E, another scan), and their
    "features" would be white padding."""
    width, height = dimensions
    margin = section.spot_um / 2 / section.mpp
    xy = section.centres_level0
    off = (xy[:, 0] < -margin) | (xy[:, 0] > width + margin) | (xy[:, 1] < -margin) | (xy[:, 1] > height + margin)
    if off.any():
        x, y = xy[int(np.argmax(off))]
        raise DataFormatError(
            f"{section.label}: {int(off.sum())} of {len(xy)} spot centres lie outside {section.image.name} "
            f"({width}x{height} px), e.g. at ({x:.0f}, {y:.0f}); the spot coordinates belong to another image or "
            "scale (Space Ranger: add :hires or :lowres when giving that PNG)"
        )


@dataclass
class Groups:
    """Attention groups of a section: neighbour indices (-1 = absent) and µm offsets."""

    index: np.ndarray  # (n, G) int
    offsets_um: np.ndarray  # (n, G, 2) float32
    absolute: np.ndarray  # (n, G, 2) array coordinates


def lattice_groups(section: STSection, neighbours: Sequence[tuple[int, int]] | None = None) -> Groups:
    """Each spot's attention group: itself, then the spots one lattice step away (absent: index -1)."""
    neighbours = neighbours or section.neighbour_steps
    lookup = {(int(x), int(y)): i for i, (x, y) in enumerate(section.array_xy)}
    n, g = len(section.array_xy), len(neighbours)
    nominal = measured_offsets_um(section, neighbours)
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
                offsets[i, j] = nominal[j]
    return Groups(index, offsets, absolute)


def measured_offsets_um(section: STSection, neighbours: Sequence[tuple[int, int]] | None = None) -> np.ndarray:
    """Median µm offset of each neighbour step over the section's spots, (G, 2); step 0 is (0, 0)."""
    neighbours = neighbours or section.neighbour_steps
    lookup = {(int(x), int(y)): i for i, (x, y) in enumerate(section.array_xy)}
    out = np.zeros((len(neighbours), 2))
    for j, (dx, dy) in enumerate(neighbours):
        d = [
            section.centres_level0[k] - section.centres_level0[i]
            for i, (x, y) in enumerate(section.array_xy)
            if (k := lookup.get((int(x) + dx, int(y) + dy), -1)) >= 0
        ]
        if d:
            out[j] = np.median(np.asarray(d), axis=0) * section.mpp
        else:  # the lattice's nominal geometry
            hexagonal = section.neighbour_steps != SQUARE_STEPS
            step_x = section.pitch_um / 2 if hexagonal else section.pitch_um
            step_y = section.pitch_um * np.sqrt(3) / 2 if hexagonal else section.pitch_um
            out[j] = (dx * step_x, dy * step_y)
    return out


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


def feature_scale(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std per feature channel, the std floored at a tenth of the median std: channels that are
    near-constant on training tissue would otherwise explode on a new section (the head and the ridge
    baseline both clip the resulting z at 5)."""
    mean, std = features.mean(0), features.std(0)
    return mean, np.maximum(std, 0.1 * np.median(std) + 1e-6)


@dataclass
class FitConfig:
    epochs: int = config.MAX_EPOCHS
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
    mean, std = feature_scale(np.concatenate([t.features for t in train]))
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
    )
    return Model(meta, head)


#: A gene "varies" when the variance of its log1p(CP10k) over the pooled training spots exceeds this
#: (float32 rounding leaves ~1e-14 on constant columns).
MIN_GENE_VARIANCE = 1e-10


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
            f"{path}: not a gene list ({detail}); give one name per line (.txt) or a .npy of strings"
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
            example = ", ".join(g for g in keep if g in missing)[:120]
            say(f"section {section.name} lacks {len(missing)} of the {len(keep)} genes (e.g. {example}): dropped")
            keep = [g for g in keep if g not in missing]
    if not keep:
        raise DataFormatError(
            f"{where}none of the {len(genes)} listed genes is measured in every section "
            f"({', '.join(s.name for s in sections)}); check the gene list against the counts"
        )
    return keep


def pooled_offsets_um(sections: Sequence[STSection]) -> np.ndarray:
    """Neighbour offsets of the model: medians over the training sections (they share one lattice)."""
    steps = sections[0].neighbour_steps
    if any(s.neighbour_steps != steps for s in sections):
        raise DataFormatError(
            f"sections {', '.join(s.name for s in sections)} mix lattices (legacy ST and Visium); train them separately"
        )
    return np.median(np.stack([measured_offsets_um(s, steps) for s in sections]), axis=0)


def make_sets(
    sections: Sequence[STSection],
    genes: list[str],
    encoder: Encoder,
    *,
    device: torch.device | None = None,
    log: Callable[[str], None] = print,
) -> list[TrainSet]:
    out = []
    for sec in sections:
        log(f"features: {sec.name} ({len(sec.centres_level0)} spots)")
        feats = section_features(sec, encoder, context_um=encoder.cfg.context_um, device=device)
        out.append(TrainSet(feats, sec.log_cp10k(genes), lattice_groups(sec)))
    return out


def choose_epochs(head_cfg: HeadConfig, sets: list[TrainSet], fit: FitConfig) -> int:
    """Epochs by early stopping with the last training section held out (the test data is never seen)."""
    if len(sets) < 2:
        return max(1, fit.epochs // 20)
    _, info = fit_head(head_cfg, sets[:-1], [sets[-1]], fit)
    return int(info["best_epoch"])


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
) -> dict[str, Any]:
    """Train and save a model; returns its metrics.

    With ``val`` sections: early stopping on them, and validation scores (head, ridge, training mean)
    recorded in the checkpoint. Without: the number of epochs is chosen by holding out the last
    training section, then all training sections are used.
    """
    from .encoders import create_encoder
    from .errors import OutputExistsError
    from .evaluate import mean_baseline, ridge_baseline
    from .metrics import score
    from .model import save_model
    from .stdata import read_section

    out = Path(out)
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
    train_secs = [s if isinstance(s, STSection) else read_section(s) for s in sections]
    val_secs = [s if isinstance(s, STSection) else read_section(s) for s in val]
    for sec in (*train_secs, *val_secs):
        sec.require_variation()
    pooled_offsets_um([*train_secs, *val_secs])  # refuse mixed lattices before any feature is computed
    if genes:
        gene_list = measured_genes([*train_secs, *val_secs], read_gene_list(genes), log=log, where=f"{genes}: ")
        pooled = np.concatenate([s.log_cp10k(gene_list) for s in train_secs])
        if not (pooled.var(0) > MIN_GENE_VARIANCE).any():
            raise DataFormatError(
                f"{genes}: none of the {len(gene_list)} listed genes varies across the training spots of "
                f"{', '.join(s.name for s in train_secs)}; nothing to learn"
            )
    else:
        gene_list = select_genes(train_secs, n_genes, log=log)
        if val_secs:  # a gene the validation sections do not measure cannot be validated: never scored as zero
            gene_list = measured_genes(val_secs, gene_list, log=log)
    enc = create_encoder(encoder, weights=encoder_weights)
    train_sets = make_sets(train_secs, gene_list, enc, device=device, log=log)
    val_sets = make_sets(val_secs, gene_list, enc, device=device, log=log)
    head_cfg = HeadConfig(in_dim=enc.cfg.embed_dim, n_genes=len(gene_list))
    fit = FitConfig(epochs=epochs)

    def progress(e: int, loss: float, r: float) -> None:
        if e % 10 == 0:
            log(f"epoch {e}: loss {loss:.4f}" + ("" if np.isnan(r) else f", validation mean r {r:.3f}"))

    if val_sets:
        head, info = fit_head(head_cfg, train_sets, val_sets, fit, on_epoch=progress)
    else:
        n_epochs = choose_epochs(head_cfg, train_sets, fit)
        log(f"epochs chosen on a held-out training section: {n_epochs}")
        head, info = fit_head(head_cfg, train_sets, None, fit, fixed_epochs=n_epochs, on_epoch=progress)
    metrics: dict[str, Any] = {"fit": info}
    for sec, vs in zip(val_secs, val_sets, strict=True):
        metrics[f"val_{sec.name}"] = {
            "head": score(predict_set(head, vs), vs.targets, sec.array_xy),
            "ridge": score(ridge_baseline(train_sets, vs), vs.targets, sec.array_xy),
            "training_mean": score(mean_baseline(train_sets, vs), vs.targets, sec.array_xy),
        }
    gene_means = np.concatenate([t.targets for t in train_sets]).mean(0)
    model = build_model(
        head,
        gene_list,
        enc,
        spot_um=train_secs[0].spot_um,
        context_um=enc.cfg.context_um,
        neighbour_offsets_um=pooled_offsets_um(train_secs),
        name=name or out.name,
        training={
            "summary": f"{len(train_secs)} sections ({', '.join(s.name for s in train_secs)})",
            "sections": [s.name for s in train_secs],
            "spots": int(sum(len(t.features) for t in train_sets)),
            "targets": "log1p(CP10k), library size over all genes of the section",
            "gene_selection": f"list {genes}" if genes else f"top {len(gene_list)} by variance of pooled log1p(CP10k)",
            "gene_means": [round(float(v), 5) for v in gene_means],
        },
        metrics=metrics,
    )
    save_model(model, out)
    log(f"wrote {out}")
    return metrics
