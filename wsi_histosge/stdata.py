"""Spatial-transcriptomics training data, read into one internal form.

``STSection``: raw counts (spots x genes), spot centres in level-0 px of a full-resolution H&E image,
array (lattice) coordinates, spot diameter and lattice pitch in µm, and the image with its MPP.

Readers: legacy ST in the HER2ST layout (counts ``.tsv.gz`` with ``<x>x<y>`` row names + spot
selection file with ``pixel_x``/``pixel_y`` + H&E image). The image's pixel size is derived from the
spot file (spot pitch in px vs the assay's pitch in µm) unless given.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import DataFormatError, SlideNotFoundError

LEGACY_ST_PITCH_UM = 200.0
LEGACY_ST_SPOT_UM = 100.0


@dataclass
class STSection:
    name: str
    counts: np.ndarray  # (n_spots, n_genes) float32 raw counts
    genes: list[str]
    centres_level0: np.ndarray  # (n_spots, 2) x, y
    array_xy: np.ndarray  # (n_spots, 2) integer lattice coordinates
    image: Path
    mpp: float
    spot_um: float
    pitch_um: float
    mpp_source: str

    def log_cp10k(self, genes: list[str]) -> np.ndarray:
        """log1p(counts per 10k) of ``genes`` (library size over all genes of the section)."""
        lib = self.counts.sum(axis=1, keepdims=True)
        lib[lib == 0] = 1.0
        index = {g: i for i, g in enumerate(self.genes)}
        missing = [g for g in genes if g not in index]
        cols = np.array([index.get(g, 0) for g in genes])
        out = np.log1p(self.counts[:, cols] / lib * 1e4).astype(np.float32)
        if missing:
            out[:, [genes.index(g) for g in missing]] = 0.0
        return out


def _need(path: Path, what: str) -> Path:
    if not path.is_file():
        raise SlideNotFoundError(f"{path}: {what} not found")
    return path


def read_legacy_st(
    counts_tsv: str | Path,
    spots_tsv: str | Path,
    image: str | Path,
    *,
    name: str | None = None,
    mpp: float | None = None,
    pitch_um: float = LEGACY_ST_PITCH_UM,
    spot_um: float = LEGACY_ST_SPOT_UM,
) -> STSection:
    """Read one legacy-ST section (HER2ST layout)."""
    counts_tsv, spots_tsv, image = Path(counts_tsv), Path(spots_tsv), Path(image)
    _need(counts_tsv, "counts table")
    _need(spots_tsv, "spot file")
    _need(image, "H&E image")
    try:
        counts = pd.read_csv(counts_tsv, sep="\t", index_col=0)
        spots = pd.read_csv(spots_tsv, sep="\t")
    except Exception as exc:
        raise DataFormatError(f"{counts_tsv} / {spots_tsv}: cannot parse ({exc})") from exc
    need = {"x", "y", "pixel_x", "pixel_y"}
    if not need.issubset(spots.columns):
        raise DataFormatError(f"{spots_tsv}: needs columns {sorted(need)}, has {list(spots.columns)}")
    if "selected" in spots.columns:
        spots = spots[spots["selected"] == 1]
    spots = spots.assign(key=spots["x"].astype(int).astype(str) + "x" + spots["y"].astype(int).astype(str))
    spots = spots.drop_duplicates("key").set_index("key")
    shared = [k for k in counts.index.astype(str) if k in spots.index]
    if len(shared) < 3:
        raise DataFormatError(f"{counts_tsv}: fewer than 3 spots match {spots_tsv} (row names must be '<x>x<y>')")
    counts = counts.loc[shared]
    spots = spots.loc[shared]
    px = spots[["pixel_x", "pixel_y"]].to_numpy(np.float64)
    axy = spots[["x", "y"]].to_numpy(np.int64)
    source = "given"
    if mpp is None:
        mpp = _mpp_from_lattice(px, spots, pitch_um)
        source = f"spot file: lattice pitch {pitch_um:g} µm"
    return STSection(
        name=name or counts_tsv.name.split(".")[0],
        counts=counts.to_numpy(np.float32),
        genes=[str(g) for g in counts.columns],
        centres_level0=px,
        array_xy=axy,
        image=image,
        mpp=float(mpp),
        spot_um=spot_um,
        pitch_um=pitch_um,
        mpp_source=source,
    )


def _mpp_from_lattice(px: np.ndarray, spots: pd.DataFrame, pitch_um: float) -> float:
    """µm/px from a least-squares fit of pixel position on (adjusted) array position."""
    ax = spots["new_x"].to_numpy(np.float64) if "new_x" in spots else spots["x"].to_numpy(np.float64)
    ay = spots["new_y"].to_numpy(np.float64) if "new_y" in spots else spots["y"].to_numpy(np.float64)
    sx = np.polyfit(ax, px[:, 0], 1)[0]
    sy = np.polyfit(ay, px[:, 1], 1)[0]
    px_per_step = (abs(sx) + abs(sy)) / 2.0
    if not np.isfinite(px_per_step) or px_per_step <= 0:
        raise DataFormatError("cannot derive the pixel size from the spot file; pass mpp")
    return pitch_um / px_per_step


def her2st_section(root: str | Path, section: str) -> STSection:
    """A section of the HER2ST data folder (e.g. ``section="C2"``)."""
    root = Path(root)
    images = sorted((root / "ST-imgs" / section[0] / section).glob("*.jpg"))
    if not images:
        raise SlideNotFoundError(f"{root}/ST-imgs/{section[0]}/{section}: no H&E JPEG found")
    return read_legacy_st(
        root / "ST-cnts" / f"{section}.tsv.gz",
        root / "ST-spotfiles" / f"{section}_selection.tsv",
        images[0],
        name=section,
    )
