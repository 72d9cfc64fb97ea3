"""Spatial-transcriptomics training data, read into one internal form.

``STSection``: raw counts (spots x genes), spot centres in level-0 px of a full-resolution H&E image,
array (lattice) coordinates, spot diameter and lattice pitch in µm, the lattice's neighbour steps, and
the image with its MPP.

Readers:

* legacy ST in the HER2ST layout (counts ``.tsv.gz`` with ``<x>x<y>`` row names + spot selection file
  with ``pixel_x``/``pixel_y`` + H&E image); the image's pixel size comes from the spot file (spot pitch
  in px vs the assay's 200 µm pitch) unless given;
* a Space Ranger ``outs/`` folder (``filtered_feature_bc_matrix.h5`` + ``spatial/``) and the
  full-resolution image; MPP from ``spot_diameter_fullres`` (55 µm spots). If only the hires/lowres
  PNG is at hand, pass it with ``image_scale="hires"``/``"lowres"``;
* an AnnData ``.h5ad`` with ``obsm['spatial']`` and ``uns['spatial']`` (scanpy convention) plus the
  image it refers to, with the same ``image_scale`` option.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import DataFormatError, SlideNotFoundError

LEGACY_ST_PITCH_UM = 200.0
LEGACY_ST_SPOT_UM = 100.0
VISIUM_PITCH_UM = 100.0
VISIUM_SPOT_UM = 55.0
#: Space Ranger's ``spot_diameter_fullres`` spans a *theoretical 65 µm* spot, not the 55 µm capture area
#: (10x documentation); the tiny Visium fixture confirms it: 89.4 px for a 138 px (100 µm) pitch.
SPACERANGER_DIAMETER_UM = 65.0

#: Neighbour steps in array coordinates (dx, dy), the spot itself first.
SQUARE_STEPS = [(0, 0), (-1, 0), (1, 0), (0, -1), (0, 1), (-1, -1), (1, -1), (-1, 1), (1, 1)]
#: Visium's hexagonal lattice in (array_col, array_row): columns step by 2 along a row.
HEX_STEPS = [(0, 0), (-2, 0), (2, 0), (-1, -1), (1, -1), (-1, 1), (1, 1)]


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
    steps: list[tuple[int, int]] | None = None  # neighbour steps in array coordinates

    @property
    def neighbour_steps(self) -> list[tuple[int, int]]:
        return self.steps or SQUARE_STEPS

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


def _scale_for(image_scale: str | float | None, scalefactors: dict[str, float]) -> float:
    if image_scale is None or image_scale == "fullres":
        return 1.0
    if image_scale in ("hires", "lowres"):
        return float(scalefactors[f"tissue_{image_scale}_scalef"])
    return float(image_scale)


def _from_positions(
    name: str,
    counts: np.ndarray,
    genes: list[str],
    array_xy: np.ndarray,
    fullres_xy: np.ndarray,
    image: Path,
    scalefactors: dict[str, float],
    image_scale: str | float | None,
    mpp: float | None,
) -> STSection:
    scale = _scale_for(image_scale, scalefactors)
    spot_px_full = float(scalefactors["spot_diameter_fullres"])
    source = f"spot_diameter_fullres ({spot_px_full:.2f} px = {SPACERANGER_DIAMETER_UM:g} µm)"
    if mpp is None:
        mpp = SPACERANGER_DIAMETER_UM / spot_px_full / scale
    else:
        source = "given"
    return STSection(
        name=name,
        counts=counts,
        genes=genes,
        centres_level0=fullres_xy * scale,
        array_xy=array_xy,
        image=image,
        mpp=float(mpp),
        spot_um=VISIUM_SPOT_UM,
        pitch_um=VISIUM_PITCH_UM,
        mpp_source=source + (f", image scale {scale:g}" if scale != 1.0 else ""),
        steps=HEX_STEPS,
    )


def read_spaceranger(
    outs: str | Path,
    image: str | Path,
    *,
    image_scale: str | float | None = None,
    mpp: float | None = None,
    name: str | None = None,
) -> STSection:
    """A Space Ranger ``outs/`` folder and its H&E image (full resolution unless ``image_scale``)."""
    import h5py
    from scipy import sparse

    outs, image = Path(outs), Path(image)
    h5 = _need(outs / "filtered_feature_bc_matrix.h5", "Space Ranger matrix")
    _need(image, "H&E image")
    spatial = outs / "spatial"
    positions = next(
        (p for p in (spatial / "tissue_positions.csv", spatial / "tissue_positions_list.csv") if p.is_file()), None
    )
    if positions is None:
        raise SlideNotFoundError(f"{spatial}: no tissue_positions(_list).csv; is this a Space Ranger outs/ folder?")
    sf_path = _need(spatial / "scalefactors_json.json", "scale factors")
    import json

    try:
        scalefactors = json.loads(sf_path.read_text())
        with h5py.File(h5, "r") as f:
            m = f["matrix"]
            shape = tuple(int(v) for v in m["shape"][:])
            mat = sparse.csc_matrix((m["data"][:], m["indices"][:], m["indptr"][:]), shape=shape)
            barcodes = [b.decode() for b in m["barcodes"][:]]
            genes = [g.decode() for g in m["features"]["name"][:]]
    except (OSError, KeyError, ValueError) as exc:
        raise DataFormatError(f"{h5}: not a Space Ranger feature-barcode matrix ({exc})") from exc
    header = 0 if positions.name == "tissue_positions.csv" else None
    pos = pd.read_csv(positions, header=header)
    pos.columns = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]
    pos = pos.set_index("barcode")
    missing = [b for b in barcodes if b not in pos.index]
    if missing:
        raise DataFormatError(
            f"{positions}: {len(missing)} barcodes of the matrix have no position (e.g. {missing[0]})"
        )
    pos = pos.loc[barcodes]
    counts = np.asarray(mat.T.todense(), dtype=np.float32)  # (spots, genes)
    array_xy = pos[["array_col", "array_row"]].to_numpy(np.int64)
    fullres_xy = pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(np.float64)
    return _from_positions(
        name or outs.parent.name or outs.name,
        counts,
        _unique(genes),
        array_xy,
        fullres_xy,
        image,
        scalefactors,
        image_scale,
        mpp,
    )


def read_h5ad_section(
    path: str | Path,
    image: str | Path,
    *,
    library_id: str | None = None,
    image_scale: str | float | None = None,
    mpp: float | None = None,
    name: str | None = None,
) -> STSection:
    """An AnnData with raw counts in X (or layers['counts']), obsm['spatial'] in full-resolution px."""
    import anndata as ad

    path, image = Path(path), Path(image)
    _need(path, "AnnData file")
    _need(image, "H&E image")
    try:
        adata = ad.read_h5ad(path)
    except Exception as exc:
        raise DataFormatError(f"{path}: cannot read as AnnData ({type(exc).__name__}: {exc})") from exc
    if "spatial" not in adata.obsm or "spatial" not in adata.uns:
        raise DataFormatError(f"{path}: needs obsm['spatial'] and uns['spatial'] (scanpy's Visium convention)")
    libs = list(adata.uns["spatial"])
    lib = library_id or (libs[0] if len(libs) == 1 else None)
    if lib is None or lib not in adata.uns["spatial"]:
        raise DataFormatError(f"{path}: choose a library_id among {libs}")
    scalefactors = dict(adata.uns["spatial"][lib]["scalefactors"])
    x = adata.layers.get("counts", adata.X)
    x = np.asarray(x.todense() if hasattr(x, "todense") else x, dtype=np.float32)
    if (x < 0).any() or not np.allclose(x, np.round(x)):
        raise DataFormatError(f"{path}: X holds normalised values; put raw counts in X or layers['counts']")
    cols = [c for c in ("array_col", "array_row") if c in adata.obs]
    if len(cols) == 2:
        array_xy = adata.obs[["array_col", "array_row"]].to_numpy(np.int64)
    else:
        array_xy = _lattice_from_positions(np.asarray(adata.obsm["spatial"], dtype=np.float64), scalefactors)
    return _from_positions(
        name or path.stem,
        x,
        _unique([str(g) for g in adata.var_names]),
        array_xy,
        np.asarray(adata.obsm["spatial"], dtype=np.float64),
        image,
        scalefactors,
        image_scale,
        mpp,
    )


def _lattice_from_positions(xy: np.ndarray, scalefactors: dict[str, float]) -> np.ndarray:
    """Visium array coordinates recovered from full-resolution positions (100 µm hex pitch)."""
    pitch_px = float(scalefactors["spot_diameter_fullres"]) * VISIUM_PITCH_UM / SPACERANGER_DIAMETER_UM
    row = np.round((xy[:, 1] - xy[:, 1].min()) / (pitch_px * np.sqrt(3) / 2)).astype(np.int64)
    col = np.round((xy[:, 0] - xy[:, 0].min()) / (pitch_px / 2)).astype(np.int64)
    return np.stack([col, row], axis=1)


def _unique(genes: list[str]) -> list[str]:
    """Gene names made unique the way scanpy does (NAME, NAME-1, ...)."""
    seen: dict[str, int] = {}
    out = []
    for g in genes:
        if g in seen:
            seen[g] += 1
            out.append(f"{g}-{seen[g]}")
        else:
            seen[g] = 0
            out.append(g)
    return out


def read_section(spec: str) -> STSection:
    """A section from a command-line spec.

    * ``COUNTS.tsv[.gz]:SPOTS.tsv:IMAGE`` legacy ST (HER2ST layout)
    * ``OUTS_DIR:IMAGE[:hires|lowres]`` Space Ranger outs/ folder and its image
    * ``FILE.h5ad:IMAGE[:hires|lowres]`` AnnData with raw counts and uns['spatial']
    * ``her2st:ROOT:SECTION`` a section of the HER2ST data folder (e.g. her2st:../shared/data/her2st:C2)
    """
    from .errors import UsageError

    parts = spec.split(":")
    if parts[0] == "her2st" and len(parts) == 3:
        return her2st_section(parts[1], parts[2])
    first = Path(parts[0])
    scale = parts[2] if len(parts) == 3 and parts[2] in ("hires", "lowres") else None
    if first.is_dir() and len(parts) in (2, 3):
        outs = first / "outs" if (first / "outs").is_dir() else first
        return read_spaceranger(outs, parts[1], image_scale=scale, name=first.name)
    if first.suffix == ".h5ad" and len(parts) in (2, 3):
        return read_h5ad_section(first, parts[1], image_scale=scale)
    if len(parts) == 3:
        return read_legacy_st(*parts)
    raise UsageError(
        f"section {spec!r}: expected COUNTS.tsv:SPOTS.tsv:IMAGE (legacy ST), OUTS_DIR:IMAGE[:hires] (Space Ranger), "
        "FILE.h5ad:IMAGE[:hires], or her2st:ROOT:SECTION"
    )
