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

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import config
from .errors import DataFormatError, InputNotFoundError, UsageError

LEGACY_ST_PITCH_UM = 200.0
LEGACY_ST_SPOT_UM = 100.0
VISIUM_PITCH_UM = 100.0
VISIUM_SPOT_UM = 55.0
#: Space Ranger's ``spot_diameter_fullres`` spans a *theoretical 65 µm* spot, not the 55 µm capture area
#: (10x documentation); the tiny Visium fixture confirms it: 89.4 px for a 138 px (100 µm) pitch.
SPACERANGER_DIAMETER_UM = 65.0

#: Largest spots x genes count matrix we hold dense (float32 values): 4 GiB.
MAX_DENSE_COUNTS = 2**30

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
    source: str = ""  # the counts file it was read from, for messages

    @property
    def label(self) -> str:
        """How messages name the section: its name and, when known, its counts file."""
        return f"section {self.name}" + (f" ({self.source})" if self.source else "")

    @property
    def neighbour_steps(self) -> list[tuple[int, int]]:
        return self.steps or SQUARE_STEPS

    def log_cp10k(self, genes: list[str]) -> np.ndarray:
        """log1p(counts per 10k) of ``genes`` (library size over all genes of the section).

        A gene the section does not measure is an error, never a column of zeros: callers choose the genes
        the section has (see :meth:`missing`).
        """
        lib = self.counts.sum(axis=1, keepdims=True)
        lib[lib == 0] = 1.0
        index = {g: i for i, g in enumerate(self.genes)}
        missing = self.missing(genes)
        if missing:
            raise DataFormatError(
                f"{self.label}: {len(missing)} of {len(genes)} requested genes are not in its counts "
                f"(e.g. {', '.join(missing[:3])}); use genes the section measures"
            )
        cols = np.array([index[g] for g in genes], dtype=np.int64)
        return np.log1p(self.counts[:, cols] / lib * 1e4).astype(np.float32)

    def missing(self, genes: list[str]) -> list[str]:
        """The genes of ``genes`` this section does not measure."""
        have = set(self.genes)
        return [g for g in genes if g not in have]

    def require_variation(self) -> None:
        """Refuse a section whose counts carry no variation (all zero, or every gene's log1p(CP10k) the same at
        every spot): nothing can be learned from it or scored on it, and its "most variable genes" would be
        an arbitrary (alphabetical) pick."""
        if not self.counts.any():
            raise DataFormatError(
                f"{self.label}: the counts are all zero ({self.counts.shape[0]} spots x "
                f"{self.counts.shape[1]} genes); check the counts file"
            )
        lib = self.counts.sum(axis=1, keepdims=True)
        lib[lib == 0] = 1.0
        lo = hi = None
        for start in range(0, len(self.counts), 2048):  # chunks: the full log matrix can be large
            block = np.log1p(self.counts[start : start + 2048] / lib[start : start + 2048] * 1e4)
            lo = block.min(0) if lo is None else np.minimum(lo, block.min(0))
            hi = block.max(0) if hi is None else np.maximum(hi, block.max(0))
        if lo is None or hi is None or not (hi - lo > 1e-6).any():
            raise DataFormatError(
                f"{self.label}: the counts carry no variation (every gene has the same log1p(CP10k) at all "
                f"{len(self.counts)} spots); check the counts file"
            )


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise InputNotFoundError(f"{path}: {what} not found; check the section spec")
    if not path.is_file():
        raise DataFormatError(f"{path}: is a folder, not the {what}; check the section spec")
    return path


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300] or type(exc).__name__


def _check_dense(n_spots: int, n_genes: int, where: Path) -> None:
    if n_spots * n_genes > MAX_DENSE_COUNTS:
        raise DataFormatError(
            f"{where}: {n_spots} spots x {n_genes} genes is beyond {MAX_DENSE_COUNTS} values held in memory; "
            "subset the spots or genes (or bin Visium HD data) first"
        )


def check_counts(counts: np.ndarray, where: Path | str, spots: Any = None, genes: Any = None) -> np.ndarray:
    """Raw counts must be finite, non-negative integers with at least one spot and one gene."""
    if counts.ndim != 2 or counts.shape[0] == 0 or counts.shape[1] == 0:
        raise DataFormatError(f"{where}: the count matrix is empty ({counts.shape}); give spots x genes raw counts")

    def at(flat: int) -> str:
        i, j = divmod(flat, counts.shape[1])
        row = spots[i] if spots is not None else i
        col = genes[j] if genes is not None else j
        return f"spot {row}, gene {col}: {float(counts[i, j]):g}"

    finite = np.isfinite(counts)
    if not finite.all():
        raise DataFormatError(f"{where}: missing or non-finite count at {at(int(np.argmin(finite)))}; fix the file")
    negative = counts < 0
    if negative.any():
        raise DataFormatError(f"{where}: negative count at {at(int(np.argmax(negative)))}; give raw counts")
    fractional = counts != np.round(counts)
    if fractional.any():
        raise DataFormatError(
            f"{where}: non-integer count at {at(int(np.argmax(fractional)))}; this looks normalised, give raw counts"
        )
    return counts


def _numeric_column(frame: pd.DataFrame, column: str, where: Path, *, integer: bool = False) -> np.ndarray:
    """A column as float64, refusing text, empty cells, NaN/inf (and fractions when ``integer``)."""
    values = pd.to_numeric(frame[column], errors="coerce").to_numpy(np.float64)
    bad = ~np.isfinite(values)
    if integer:
        bad |= values != np.round(values)
    if bad.any():
        i = int(np.argmax(bad))
        label = frame.index[i]
        row = f"data row {label + 1}" if isinstance(label, int | np.integer) else f"spot {label}"
        kind = "an integer" if integer else "a finite number"
        value = frame[column].iloc[i]
        value = value.item() if isinstance(value, np.generic) else value
        raise DataFormatError(f"{where}: column {column!r} at {row} is {value!r}, not {kind}; fix the file")
    return values


def _read_table(path: Path, what: str, **kwargs: Any) -> pd.DataFrame:
    try:
        table = pd.read_csv(path, **kwargs)
    except Exception as exc:  # pandas raises a zoo of parser, codec and gzip errors
        raise DataFormatError(f"{path}: cannot parse the {what} ({type(exc).__name__}: {_one_line(exc)})") from exc
    if len(table) == 0:
        raise DataFormatError(f"{path}: the {what} has no data rows; check the file")
    return table


def _positive(value: float | None, name: str) -> None:
    if value is not None and not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise UsageError(f"{name} must be a positive number, got {value!r}")


def _numeric_counts(counts: pd.DataFrame, where: Path) -> pd.DataFrame:
    """The counts table with its text columns made numeric; the first non-numeric cell is an error."""
    if counts.shape[1] == 0:
        raise DataFormatError(f"{where}: no gene columns; expected spots x genes with '<x>x<y>' row names")
    for c in [c for c, dtype in counts.dtypes.items() if dtype.kind not in "iufb"]:
        coerced = pd.to_numeric(counts[c], errors="coerce")
        bad = coerced.isna() & counts[c].notna()
        if bad.any():
            row = bad.idxmax()
            raise DataFormatError(
                f"{where}: non-numeric count {counts.at[row, c]!r} at spot {row}, gene {c}; fix the file"
            )
        counts[c] = coerced
    names = counts.index.astype(str)
    if names.duplicated().any():
        raise DataFormatError(f"{where}: spot {names[names.duplicated()][0]!r} appears twice; fix the file")
    counts.index = names
    return counts


#: Columns a legacy-ST spot file must have: array position and pixel position of each spot.
_LEGACY_SPOT_COLUMNS = {"x", "y", "pixel_x", "pixel_y"}


def _legacy_spots(spots: pd.DataFrame, where: Path) -> pd.DataFrame:
    """The selected spots of a spot file, numeric and indexed by their '<x>x<y>' key."""
    need = _LEGACY_SPOT_COLUMNS
    if not need.issubset(spots.columns):
        raise DataFormatError(f"{where}: needs columns {sorted(need)}, has {list(spots.columns)[:10]}")
    if "selected" in spots.columns:
        spots = spots[pd.to_numeric(spots["selected"], errors="coerce") == 1].copy()
    for column in ("x", "y"):
        spots[column] = _numeric_column(spots, column, where, integer=True).astype(np.int64)
    for column in ("pixel_x", "pixel_y", *(c for c in ("new_x", "new_y") if c in spots.columns)):
        spots[column] = _numeric_column(spots, column, where)
    spots = spots.assign(key=spots["x"].astype(str) + "x" + spots["y"].astype(str))
    return spots.drop_duplicates("key").set_index("key")


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
    for value, label in ((mpp, "mpp"), (pitch_um, "pitch_um"), (spot_um, "spot_um")):
        _positive(value, label)
    _need(counts_tsv, "counts table")
    _need(spots_tsv, "spot file")
    _need(image, "H&E image")
    counts = _read_table(counts_tsv, "counts table", sep="\t", index_col=0)
    spots = _read_table(spots_tsv, "spot file", sep="\t")
    counts = _numeric_counts(counts, counts_tsv)
    spots = _legacy_spots(spots, spots_tsv)
    shared = [k for k in counts.index if k in spots.index]
    if len(shared) < 3:
        raise DataFormatError(f"{counts_tsv}: fewer than 3 spots match {spots_tsv} (row names must be '<x>x<y>')")
    counts = counts.loc[shared]
    spots = spots.loc[shared]
    _check_dense(*counts.shape, counts_tsv)
    values = check_counts(counts.to_numpy(np.float32), counts_tsv, shared, list(counts.columns))
    px = spots[["pixel_x", "pixel_y"]].to_numpy(np.float64)
    axy = spots[["x", "y"]].to_numpy(np.int64)
    _require_unit_lattice(axy, spots_tsv)
    source = "given"
    if mpp is None:
        mpp = _mpp_from_lattice(px, spots, pitch_um, spots_tsv)
        source = f"spot file: lattice pitch {pitch_um:g} µm"
    return STSection(
        name=name or counts_tsv.name.split(".")[0],
        counts=values,
        genes=[str(g) for g in counts.columns],
        centres_level0=px,
        array_xy=axy,
        image=image,
        mpp=float(mpp),
        spot_um=spot_um,
        pitch_um=pitch_um,
        mpp_source=source,
        source=str(counts_tsv),
    )


#: At least this share of a legacy-ST section's spots must have a spot one array step away in x or y.
MIN_UNIT_NEIGHBOUR_SHARE = 0.5
#: Pixel coordinates may scale differently in x and y by at most this fraction (HER2ST: under 1%).
MAX_ANISOTROPY = 0.05


def _require_unit_lattice(axy: np.ndarray, where: Path) -> None:
    """The legacy-ST layout this reader knows: one array step (x or y) is one lattice pitch, so most spots
    have a spot one step away. A layout whose spots sit only on (odd, odd) and (even, even) positions (nearest
    spots diagonal) would get a pixel size off by the step and attention groups with no neighbours."""
    keys = {(int(x), int(y)) for x, y in axy}
    steps = ((1, 0), (-1, 0), (0, 1), (0, -1))
    share = np.mean([any((x + dx, y + dy) in keys for dx, dy in steps) for x, y in keys])
    if len(keys) > 1 and share < MIN_UNIT_NEIGHBOUR_SHARE:
        raise DataFormatError(
            f"{where}: only {share:.0%} of the spots have a spot one array step away in x or y (the array "
            "coordinates form a checkerboard: nearest spots are diagonal); this is not the legacy-ST layout the "
            "reader knows (one array step = one 200 µm pitch), and its pixel size and neighbours would be wrong"
        )


def _mpp_from_lattice(px: np.ndarray, spots: pd.DataFrame, pitch_um: float, where: Path) -> float:
    """µm/px from a least-squares fit of pixel position on (adjusted) array position."""
    ax = spots["new_x"].to_numpy(np.float64) if "new_x" in spots else spots["x"].to_numpy(np.float64)
    ay = spots["new_y"].to_numpy(np.float64) if "new_y" in spots else spots["y"].to_numpy(np.float64)
    if np.ptp(ax) == 0 or np.ptp(ay) == 0:
        raise DataFormatError(f"{where}: the spots span one array row or column; the pixel size cannot be derived")
    sx = np.polyfit(ax, px[:, 0], 1)[0]
    sy = np.polyfit(ay, px[:, 1], 1)[0]
    if abs(abs(sx) / max(abs(sy), 1e-12) - 1.0) > MAX_ANISOTROPY:
        raise DataFormatError(
            f"{where}: pixel_x/pixel_y give {abs(sx):.3g} px per array step in x but {abs(sy):.3g} in y; the image "
            "was resized unevenly or the coordinates belong to another image; give the image the spot coordinates "
            "were made on"
        )
    px_per_step = (abs(sx) + abs(sy)) / 2.0
    mpp = pitch_um / px_per_step if np.isfinite(px_per_step) and px_per_step > 0 else float("nan")
    lo, hi = config.MPP_PLAUSIBLE
    if not lo <= mpp <= hi:
        raise DataFormatError(
            f"{where}: pixel_x/pixel_y give {px_per_step:.3g} px per {pitch_um:g} µm array step ({mpp:.3g} µm/px, "
            f"outside {lo}-{hi}); the pixel coordinates do not follow the array coordinates"
        )
    return float(mpp)


def her2st_section(root: str | Path, section: str) -> STSection:
    """A section of the HER2ST data folder (e.g. ``section="C2"``)."""
    root = Path(root)
    if not section or "/" in section or section.startswith("."):
        raise UsageError(f"her2st section {section!r}: give a section name such as C2")
    if not root.is_dir():
        raise InputNotFoundError(f"{root}: HER2ST data folder not found; check her2st:ROOT:SECTION")
    images = sorted((root / "ST-imgs" / section[0] / section).glob("*.jpg"))
    if not images:
        raise InputNotFoundError(f"{root}/ST-imgs/{section[0]}/{section}: no H&E JPEG found; check ROOT and SECTION")
    return read_legacy_st(
        root / "ST-cnts" / f"{section}.tsv.gz",
        root / "ST-spotfiles" / f"{section}_selection.tsv",
        images[0],
        name=section,
    )


def _scalefactors(raw: Any, where: Path, image_scale: str | float | None) -> dict[str, float]:
    """Space Ranger / scanpy scale factors, checked: the spot diameter and the scale of the image used."""
    if not isinstance(raw, dict):
        raise DataFormatError(f"{where}: scale factors must be a JSON object, got {type(raw).__name__}")
    keys = ["spot_diameter_fullres"]
    if image_scale in ("hires", "lowres"):
        keys.append(f"tissue_{image_scale}_scalef")
    out: dict[str, float] = {}
    for key in keys:
        value = raw.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
            raise DataFormatError(f"{where}: scale factor {key!r} is {value!r}, not a positive number; fix the file")
        out[key] = float(value)
    return out


def _scale_for(image_scale: str | float | None, scalefactors: dict[str, float]) -> float:
    if image_scale is None or image_scale == "fullres":
        return 1.0
    if image_scale in ("hires", "lowres"):
        return float(scalefactors[f"tissue_{image_scale}_scalef"])
    try:
        scale = float(image_scale)
    except ValueError:
        scale = float("nan")
    if not math.isfinite(scale) or scale <= 0:
        raise UsageError(f"image scale must be hires, lowres, fullres or a positive number, got {image_scale!r}")
    return scale


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
    counts_file: Path,
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
        source=str(counts_file),
    )


_POSITION_COLUMNS = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]


def _guarded(where: Path, what: str, read: Callable[[], Any]) -> Any:
    """Run a reader; any failure but our own errors becomes a one-line DataFormatError naming the file."""
    from .errors import HistoSGEError

    try:
        return read()
    except HistoSGEError:
        raise
    except Exception as exc:  # h5py, json, anndata and numpy raise many types for a malformed file
        raise DataFormatError(f"{where}: not a valid {what} ({type(exc).__name__}: {_one_line(exc)})") from exc


def _spaceranger_files(outs: Path, image: Path) -> tuple[Path, Path, Path]:
    """The matrix, spot positions and scale factors of a Space Ranger outs/ folder, each checked to exist."""
    if not outs.is_dir():
        raise InputNotFoundError(f"{outs}: Space Ranger outs/ folder not found; check the section spec")
    h5 = _need(outs / "filtered_feature_bc_matrix.h5", "Space Ranger matrix")
    _need(image, "H&E image")
    spatial = outs / "spatial"
    positions = next(
        (p for p in (spatial / "tissue_positions.csv", spatial / "tissue_positions_list.csv") if p.is_file()), None
    )
    if positions is None:
        raise InputNotFoundError(f"{spatial}: no tissue_positions(_list).csv; is this a Space Ranger outs/ folder?")
    return h5, positions, _need(spatial / "scalefactors_json.json", "scale factors")


def _read_feature_matrix(h5: Path) -> tuple[Any, list[str], list[str]]:
    """A Space Ranger feature-barcode matrix (genes x barcodes, sparse), its barcodes and gene names."""
    import h5py
    from scipy import sparse

    with h5py.File(h5, "r") as f:
        m = f["matrix"]
        shape = tuple(int(v) for v in m["shape"][:])
        barcodes = [b.decode() for b in m["barcodes"][:]]
        genes = [g.decode() for g in m["features"]["name"][:]]
        if shape != (len(genes), len(barcodes)):
            raise DataFormatError(
                f"{h5}: matrix shape {shape} does not match its {len(genes)} features x {len(barcodes)} barcodes"
            )
        _check_dense(len(barcodes), len(genes), h5)
        mat = sparse.csc_matrix((m["data"][:], m["indices"][:], m["indptr"][:]), shape=shape)
    return mat, barcodes, genes


def _spot_positions(positions: Path, barcodes: list[str]) -> pd.DataFrame:
    """The tissue positions table, indexed by barcode in the matrix's order; every barcode needs one."""
    header = 0 if positions.name == "tissue_positions.csv" else None
    pos = _read_table(positions, "spot positions", header=header)
    if pos.shape[1] != len(_POSITION_COLUMNS):
        raise DataFormatError(
            f"{positions}: {pos.shape[1]} columns, expected {len(_POSITION_COLUMNS)}: {_POSITION_COLUMNS}"
        )
    pos.columns = _POSITION_COLUMNS
    pos["barcode"] = pos["barcode"].astype(str)
    if pos["barcode"].duplicated().any():
        raise DataFormatError(f"{positions}: barcode {pos['barcode'][pos['barcode'].duplicated()].iloc[0]} repeats")
    pos = pos.set_index("barcode")
    missing = [b for b in barcodes if b not in pos.index]
    if missing:
        raise DataFormatError(
            f"{positions}: {len(missing)} barcodes of the matrix have no position (e.g. {missing[0]})"
        )
    return pos.loc[barcodes]


def _array_xy(frame: pd.DataFrame, where: Path) -> np.ndarray:
    """Integer (array_col, array_row) lattice coordinates from a table's columns."""
    return np.stack(
        [_numeric_column(frame, c, where, integer=True) for c in ("array_col", "array_row")], axis=1
    ).astype(np.int64)


def read_spaceranger(
    outs: str | Path,
    image: str | Path,
    *,
    image_scale: str | float | None = None,
    mpp: float | None = None,
    name: str | None = None,
) -> STSection:
    """A Space Ranger ``outs/`` folder and its H&E image (full resolution unless ``image_scale``)."""
    import json

    outs, image = Path(outs), Path(image)
    _positive(mpp, "mpp")
    h5, positions, sf_path = _spaceranger_files(outs, image)
    raw_sf = _guarded(sf_path, "scale factors JSON", lambda: json.loads(sf_path.read_bytes()))
    scalefactors = _scalefactors(raw_sf, sf_path, image_scale)
    mat, barcodes, genes = _guarded(h5, "Space Ranger feature-barcode matrix", lambda: _read_feature_matrix(h5))
    pos = _spot_positions(positions, barcodes)
    counts = check_counts(np.asarray(mat.T.todense(), dtype=np.float32), h5, barcodes, genes)  # (spots, genes)
    array_xy = _array_xy(pos, positions)
    fullres_xy = np.stack([_numeric_column(pos, c, positions) for c in ("pxl_col_in_fullres", "pxl_row_in_fullres")], 1)
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
        h5,
    )


def _read_anndata(path: Path) -> Any:
    import anndata as ad

    try:
        return ad.read_h5ad(path)
    except Exception as exc:
        raise DataFormatError(f"{path}: cannot read as AnnData ({type(exc).__name__}: {_one_line(exc)})") from exc


def _h5ad_scalefactors(adata: Any, path: Path, library_id: str | None) -> Any:
    """The raw scale factors of the library in uns['spatial'] (the only one, or ``library_id``)."""
    if "spatial" not in adata.obsm or "spatial" not in adata.uns or not hasattr(adata.uns["spatial"], "keys"):
        raise DataFormatError(f"{path}: needs obsm['spatial'] and uns['spatial'] (scanpy's Visium convention)")
    libs = list(adata.uns["spatial"])
    lib = library_id or (libs[0] if len(libs) == 1 else None)
    if lib is None or lib not in adata.uns["spatial"]:
        raise DataFormatError(f"{path}: choose a library_id among {libs}")
    entry = adata.uns["spatial"][lib]
    if not hasattr(entry, "get") or not hasattr(entry.get("scalefactors"), "keys"):
        raise DataFormatError(f"{path}: uns['spatial'][{lib!r}] lacks 'scalefactors' (scanpy's Visium convention)")
    return entry["scalefactors"]


def _h5ad_counts(adata: Any, path: Path) -> np.ndarray:
    """Raw counts from layers['counts'] or X, dense float32; normalised values are refused."""
    x = adata.layers.get("counts", adata.X)
    if x is None:
        raise DataFormatError(f"{path}: no count matrix in X or layers['counts']")
    _check_dense(adata.n_obs, adata.n_vars, path)
    x = _guarded(path, "count matrix", lambda: np.asarray(x.todense() if hasattr(x, "todense") else x, np.float32))
    if np.isfinite(x).all() and ((x < 0).any() or not np.allclose(x, np.round(x))):
        raise DataFormatError(f"{path}: X holds normalised values; put raw counts in X or layers['counts']")
    return check_counts(x, path, list(adata.obs_names), list(adata.var_names))


def _h5ad_positions(adata: Any, path: Path) -> np.ndarray:
    """obsm['spatial'] as (n_spots, 2) finite x, y pixel positions."""
    xy = _guarded(path, "obsm['spatial']", lambda: np.asarray(adata.obsm["spatial"], dtype=np.float64))
    if xy.ndim != 2 or xy.shape[1] < 2 or not np.isfinite(xy[:, :2]).all():
        raise DataFormatError(f"{path}: obsm['spatial'] must hold finite (x, y) pixel positions, shape {xy.shape}")
    return np.asarray(xy[:, :2])


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
    path, image = Path(path), Path(image)
    _positive(mpp, "mpp")
    _need(path, "AnnData file")
    _need(image, "H&E image")
    adata = _read_anndata(path)
    scalefactors = _scalefactors(dict(_h5ad_scalefactors(adata, path, library_id)), path, image_scale)
    x = _h5ad_counts(adata, path)
    xy = _h5ad_positions(adata, path)
    if all(c in adata.obs for c in ("array_col", "array_row")):
        array_xy = _array_xy(adata.obs, path)
    else:
        array_xy = _lattice_from_positions(xy, scalefactors)
    return _from_positions(
        name or path.stem,
        x,
        _unique([str(g) for g in adata.var_names]),
        array_xy,
        xy,
        image,
        scalefactors,
        image_scale,
        mpp,
        path,
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


def _visium_section(first: Path, parts: list[str]) -> STSection:
    """``OUTS_DIR:IMAGE[:scale]`` or ``FILE.h5ad:IMAGE[:scale]``, split at ':'."""
    scale = parts[2] if len(parts) == 3 and parts[2] in ("hires", "lowres") else None
    if first.is_dir():
        outs = first / "outs" if (first / "outs").is_dir() else first
        return read_spaceranger(outs, parts[1], image_scale=scale, name=first.name)
    return read_h5ad_section(first, parts[1], image_scale=scale)


def read_section(spec: str) -> STSection:
    """A section from a command-line spec.

    * ``COUNTS.tsv[.gz]:SPOTS.tsv:IMAGE`` legacy ST (HER2ST layout)
    * ``OUTS_DIR:IMAGE[:hires|lowres]`` Space Ranger outs/ folder and its image
    * ``FILE.h5ad:IMAGE[:hires|lowres]`` AnnData with raw counts and uns['spatial']
    * ``her2st:ROOT:SECTION`` a section of the HER2ST data folder (e.g. her2st:../shared/data/her2st:C2)
    """
    parts = spec.split(":")
    if parts[0] == "her2st" and len(parts) == 3:
        return her2st_section(parts[1], parts[2])
    first = Path(parts[0])
    if len(parts) == 2 and not first.exists():
        raise InputNotFoundError(f"{first}: not found (section {spec!r}); give OUTS_DIR:IMAGE or FILE.h5ad:IMAGE")
    if len(parts) in (2, 3) and (first.is_dir() or first.suffix == ".h5ad"):
        return _visium_section(first, parts)
    if len(parts) == 3:
        return read_legacy_st(*parts)
    raise UsageError(
        f"section {spec!r}: expected COUNTS.tsv:SPOTS.tsv:IMAGE (legacy ST), OUTS_DIR:IMAGE[:hires] (Space Ranger), "
        "FILE.h5ad:IMAGE[:hires], or her2st:ROOT:SECTION"
    )
