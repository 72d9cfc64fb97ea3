"""What the head is trained and scored on: encoder features of a section's spots (cached on disk), their
log1p(CP10k) targets, and attention groups from the assay's own lattice neighbours.

Features are read through the same super-tile reader and device-side patch cutting as inference. This
module sits below fitting (``train``), the baselines (``baselines``) and evaluation (``evaluate``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .encoders import Encoder
from .errors import DataFormatError
from .loader import encode_points
from .slide import open_slide
from .stdata import SQUARE_STEPS, STSection

#: A gene "varies" when the variance of its log1p(CP10k) over the pooled training spots exceeds this
#: (float32 rounding leaves ~1e-14 on constant columns).
MIN_GENE_VARIANCE = 1e-10


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
    tta: str = "none",
) -> np.ndarray:
    """Encoder features (n_spots, dim) of a section's spots under the test-time augmentation ``tta``, cached
    by image + encoder + geometry + augmentation."""
    slide = open_slide(section.image, mpp=section.mpp)
    require_spots_on_image(section, slide.dimensions)
    augmentation = "" if tta == "none" else f"|tta={tta}"  # caches made before augmentation existed stay valid
    key = hashlib.sha256(
        f"{slide.fingerprint}|{encoder.cfg.name}|{encoder.weights_hash}|{context_um}|{section.mpp:.6f}|"
        f"{np.ascontiguousarray(section.centres_level0).tobytes().hex()}{augmentation}".encode()
    ).hexdigest()[:24]
    import zarr

    cache = (cache_dir or default_cache_dir()) / f"{section.name}-{key}.zarr"
    if (cache / "zarr.json").is_file():
        try:
            group: Any = zarr.open_group(str(cache), mode="r")
            if group.attrs.get("complete") and group.attrs.get("key") == key:
                cached = np.asarray(group["features"][:], dtype=np.float32)
                # a damaged chunk can decompress to other numbers: only the features as written are used
                if group.attrs.get("sha256") == _digest(cached):
                    return cached
        except Exception:
            pass
    feats = encode_points(slide, section.centres_level0, encoder, context_um=context_um, device=device, tta=tta)
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
            "tta": tta,
            "image": str(section.image),
            "sha256": _digest(feats),
            "complete": True,
        }
    )
    return feats


def _digest(features: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(features, dtype=np.float32).tobytes()).hexdigest()


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
    """One section's (or a subset's) spots: features of every spot the groups may index, targets of the
    scored spots (row i belongs to the spot ``groups.index[i, 0]``), and where the scored spots sit on the
    assay lattice (for SSIM of gene maps)."""

    features: np.ndarray  # (n_features, D)
    targets: np.ndarray  # (n, genes)
    groups: Groups
    name: str = ""
    array_xy: np.ndarray | None = None  # (n, 2) lattice coordinates of the scored spots

    @property
    def centre_features(self) -> np.ndarray:
        """Features of the scored spots themselves (n, D), in the order of ``targets``."""
        centre = self.groups.index[:, 0]
        if len(centre) == len(self.features) and (centre == np.arange(len(centre))).all():
            return self.features
        return self.features[centre]

    def subset(self, idx: np.ndarray) -> TrainSet:
        """The spots ``idx`` scored, with every spot's features still available to their attention groups."""
        g = self.groups
        return TrainSet(
            self.features,
            self.targets[idx],
            Groups(g.index[idx], g.offsets_um[idx], g.absolute[idx]),
            self.name,
            None if self.array_xy is None else self.array_xy[idx],
        )

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
    tta: str = "none",
) -> list[TrainSet]:
    """Each section's features (under ``tta``), log1p(CP10k) targets of ``genes`` and lattice groups."""
    out = []
    for sec in sections:
        log(f"features: {sec.name} ({len(sec.centres_level0)} spots)")
        feats = section_features(sec, encoder, context_um=encoder.cfg.context_um, device=device, tta=tta)
        out.append(TrainSet(feats, sec.log_cp10k(genes), lattice_groups(sec), sec.name, sec.array_xy))
    return out


def top_variable(train: Sequence[TrainSet], n: int = 50) -> np.ndarray:
    """Indices of the ``n`` most variable genes of the training targets, among those that vary at all."""
    var = np.concatenate([t.targets for t in train]).var(0)
    order = np.argsort(-var, kind="stable")[:n]
    return order[var[order] > MIN_GENE_VARIANCE]
