"""Artefact flags per lattice cell: pen ink and out-of-focus tissue, from the super-tile infer already reads.

Each cell gets a ``uint8`` of bit flags, ``QC_PEN | QC_BLUR`` (bit 4 is kept free for "unlike training").
The square of side ``box_um`` around the cell's centre (infer passes the lattice stride) is resampled on the
tile's device to ``MEASURE_MPP`` = 1 µm/px (``roi_align``, averaging when the tile is finer; a coarser tile
is used at its own pixels) and judged from those pixels alone; the slide is never read again.

``QC_PEN`` (1), marker ink. A pixel is ink when it is green/teal (G > R + 25), blue (B > R + 40 with
G > R + 25, or B > R + 100: haematoxylin is blue-purple too; on HER2ST sections its G - R reaches 19 at the 95th
percentile and its B - R 84 at the 99th, and an earlier rule with G > R + 15 / G > R - 15 flagged 93-98% of a
clean HER2ST section as ink; now 0-0.25% of its pixels pass) or black (all channels
< 60 and within 25 of each other: the darkest nuclei stay blue-purple, B well above R and G). A cell is
flagged when at least ``PEN_FRACTION`` (20%) of its box is ink. H&E is pink/purple, G < R in practically
every pixel of clean tissue, so strokes show up by colour even where they lie over tissue.

``QC_BLUR`` (2), out of focus. Sharpness is the ratio of fine-scale to mid-scale contrast energy of the grey
image, ``sum((I - G1*I)^2) / sum((G1*I - G4*I)^2)`` (``Gs``: a Gaussian of ``s`` px at 1 µm/px; G4 is finished
at half resolution), summed over tissue pixels at least ``FOCUS_EDGE_PX`` (6 µm) from glass or ink, per
sub-square of ``FOCUS_SUB_UM`` (25 µm) of the box. The cell's sharpness is the lower median over its
sub-squares that are at least 25% such tissue, and the cell is flagged when it is below
``BLUR_MAX_SHARPNESS`` (0.11): half or more of its judged area is soft. Defocus removes the fine band
first, so the ratio falls (real sharp tissue: 1st percentile 0.16-0.28; 1 µm sigma blur: median 0.09-0.13;
2 µm: 0.03-0.04), while a pale or weakly stained field lowers both bands and keeps its ratio: an absolute
Laplacian variance, thresholded by the same rule, flags 34 of 36 cells of a sharp copy at half the contrast,
this measure none (``benchmarks/qc_flags.py``). The tissue edge is a step whose energy is mid-band, hence
the margin from glass. Only boxes with at least ``MIN_TISSUE_FRACTION`` (25%) tissue are judged: glass is
never "blurred". Tiles coarser than ``BLUR_MAX_TILE_MPP`` (1 µm/px, e.g. a slide scanned at 4 µm/px) cannot
show focus: never flagged blurred, sharpness NaN.

How the thresholds were chosen, and what they give (``python benchmarks/qc_flags.py`` prints every number;
cell level, boxes = lattice step; a cell is positive when >= 50% of its box lies in a truth region, negative
when none of it does, and not scored in between):

- ``PEN_FRACTION`` 0.2: the smallest of 0.1, 0.15, 0.2, ... above the largest ink fraction of any tissue
  cell of the packaged CMU-1 crop (0.18 at 50 µm boxes), i.e. no flag on ordinary tissue; the F1 on the
  tuning half of the DICOM sample was flat (0.963-0.969 at 100 µm for 0.1-0.2). Truth:
  ``tests/fixtures/pathml_small_dicom.pen.geojson``, drawn by hand on ``pathml_small_dicom.dcm`` (no MPP in
  the file: 4 µm/px assumed from gland and epithelium sizes). Tuned on its left half (x < 1618 px), held out
  its right half: precision 0.995, recall 0.935 at 100 µm boxes (left: 0.982, 0.945); 0.978, 0.892 at 50 µm
  (left: 0.955, 0.901). Misses are mostly box-sized slivers at stroke edges and ink laid thinly over tissue.
  No flag in the rectangles drawn as clearly ink-free (1 of 28244 cells at 50 µm). CMU-1-Small-Region
  (no marker): no cell of ordinary tissue flagged; 5 of 280 tissue cells at 50 µm boxes are, all on the
  green margin dye along its cut edge (true ink, not pen).
- ``BLUR_MAX_SHARPNESS`` 0.11: on the packaged crop with a Gaussian-filtered rectangle (blended over 20 µm),
  the geometric mean of the sharp copy's 1st percentile and the 99th percentile of 2 µm sigma cells (0.116 at
  100 µm boxes, 0.114 at 50 µm). There: recall 1.0 at 2, 4 and 8 µm sigma, precision 1.0, no flag on the
  sharp copy. Held out, CMU-1-Small-Region above the crop (few cells: 7 positives at 100 µm, 28 at 50 µm):
  recall 1.0 at 2 µm, 0.96-1.0 at 4 and 8 µm, 0.57-0.70 at 1 µm, precision 1.0, no flag on the sharp copy
  (17 and 55 cells judged).

Cost: on one CPU thread 3.6 ms per cell at 100 µm boxes (0.12x the default encoder's 31.5 ms per patch on
the same tile), 1.5-2 ms at 50 µm (0.04-0.05x); every op runs on the tile's device.

What it misses: folds and air bubbles are not detected (a fold is thicker, darker tissue and reads sharp; a
bubble's rim is sharp and its inside is glass). Faint ink laid thinly over tissue (G only slightly above
R) and ink covering under 20% of a box pass unflagged; tissue-margin dye is ink and is flagged where it
covers 20% of a box. Blur of about 1 µm sigma or less is flagged only in part, and blur on sparse tissue
(no 25 µm square a quarter covered by tissue away from its edges) not at all. Homogeneous material with no
fine structure (colloid, blood lakes, some mucin) can read as blurred. The blur truth is synthetic
(Gaussian, JPEG-tiled at quality 75-85); real scanner defocus on other stains and compressions is untested.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .loader import TileGeometry

if TYPE_CHECKING:
    from .slide import Slide

QC_PEN = 1
QC_BLUR = 2
# Bit 4 is reserved for "unlike training" (set by the caller, never here).

#: µm per pixel at which every box is judged (the boxes of a coarser tile are judged at its own pixels).
MEASURE_MPP = 1.0
#: Pixel colour rules for ink, on 0-255 RGB.
INK_GREEN_MIN_G_MINUS_R = 25.0
INK_BLUE_MIN_B_MINUS_R = 40.0
INK_BLUE_MIN_G_MINUS_R = 25.0
#: Saturated blue marker (hematoxylin on HER2ST reaches B - R ~ 85 at its 99th percentile).
INK_STRONG_BLUE_MIN_B_MINUS_R = 100.0
INK_BLACK_MAX_VALUE = 60.0
INK_BLACK_MAX_CHROMA = 25.0
#: A cell is ``QC_PEN`` when at least this fraction of its box is ink.
PEN_FRACTION = 0.2
#: Tissue pixels: chroma (max - min of RGB) at least this, and not ink.
TISSUE_MIN_CHROMA = 18.0
#: Boxes, and sub-squares of a box, with less tissue than this are not judged for focus.
MIN_TISSUE_FRACTION = 0.25
#: Focus is judged on sub-squares of about this side (µm); a box's sharpness is their lower median.
FOCUS_SUB_UM = 25.0
#: Tissue pixels within this many px of glass or ink are left out of the focus measure.
FOCUS_EDGE_PX = 6
#: Gaussian sigmas (px at ``MEASURE_MPP``) of the fine and the mid band of the sharpness ratio.
SHARP_FINE_SIGMA = 1.0
SHARP_COARSE_SIGMA = 4.0
#: A judged cell is ``QC_BLUR`` when its sharpness is below this.
BLUR_MAX_SHARPNESS = 0.11
#: Tiles coarser than this (µm/px) are not judged for focus.
BLUR_MAX_TILE_MPP = 1.0


@dataclass(frozen=True)
class CellMeasures:
    """Per-cell measurements behind the flags (float32, one value per centre)."""

    ink_fraction: np.ndarray
    tissue_fraction: np.ndarray
    sharpness: np.ndarray  # NaN where focus is not judged (too little tissue, or a coarse tile)

    def flags(self, *, pen_fraction: float = PEN_FRACTION, max_sharpness: float = BLUR_MAX_SHARPNESS) -> np.ndarray:
        """``uint8`` bit flags from the measures and the given thresholds."""
        out = np.zeros(len(self.ink_fraction), dtype=np.uint8)
        out[self.ink_fraction >= pen_fraction] |= QC_PEN
        with np.errstate(invalid="ignore"):
            out[self.sharpness < max_sharpness] |= QC_BLUR  # NaN compares False: not judged, not flagged
        return out


def ink_mask(rgb: torch.Tensor) -> torch.Tensor:
    """Ink pixels (N, H, W) of float RGB (N, 3, H, W) in 0-255."""
    r, g, b = rgb[:, 0], rgb[:, 1], rgb[:, 2]
    g_r = g - r
    green = g_r > INK_GREEN_MIN_G_MINUS_R
    blue = ((g_r > INK_BLUE_MIN_G_MINUS_R) & (b - r > INK_BLUE_MIN_B_MINUS_R)) | (b - r > INK_STRONG_BLUE_MIN_B_MINUS_R)
    hi = rgb.amax(dim=1)
    black = (hi < INK_BLACK_MAX_VALUE) & (hi - rgb.amin(dim=1) < INK_BLACK_MAX_CHROMA)
    return green | blue | black


def _gaussian_kernel(sigma: float, device: torch.device) -> torch.Tensor:
    radius = max(1, math.ceil(3.0 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=device)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def _smooth(img: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian of (N, 1, H, W), edges replicated, as sums of shifted copies (5x faster than a
    one-channel conv2d on CPU)."""
    taps = kernel.numel()
    r = (taps - 1) // 2
    h, w = img.shape[2], img.shape[3]
    padded = torch.nn.functional.pad(img, (r, r, r, r), mode="replicate")
    rows = kernel[0] * padded[..., 0:w]
    for i in range(1, taps):
        rows = rows + kernel[i] * padded[..., i : i + w]
    out = kernel[0] * rows[..., 0:h, :]
    for i in range(1, taps):
        out = out + kernel[i] * rows[..., i : i + h, :]
    return out


def _focus_margin_px(judge_focus: bool) -> int:
    """Pixels read around each box so the filters and the edge margin see real neighbours at its border."""
    return math.ceil(3.0 * SHARP_COARSE_SIGMA) + FOCUS_EDGE_PX if judge_focus else 0


@torch.inference_mode()
def cell_measures(
    tile: torch.Tensor,
    geom: TileGeometry,
    centres_level0: np.ndarray,
    mpp: tuple[float, float],
    box_um: float,
    *,
    batch: int = 64,
) -> CellMeasures:
    """Ink fraction, tissue fraction and sharpness of the ``box_um`` square around every centre.

    ``tile`` is the (h, w, 3) uint8 super-tile on any device (the work runs there, in float32), ``geom``
    where it sits, ``mpp`` the slide's level-0 µm/px (x, y). Memory follows ``batch`` boxes, not the tile."""
    from torchvision.ops import roi_align

    n = len(centres_level0)
    ink = np.zeros(n, dtype=np.float32)
    tissue = np.zeros(n, dtype=np.float32)
    sharp = np.full(n, np.nan, dtype=np.float32)
    if n == 0 or tile.numel() == 0:
        return CellMeasures(ink, tissue, sharp)
    device = tile.device
    tile_mpp = (mpp[0] * geom.downsample, mpp[1] * geom.downsample)
    measure_mpp = max(MEASURE_MPP, *tile_mpp)
    judge_focus = max(tile_mpp) <= BLUR_MAX_TILE_MPP * 1.01
    subs = max(1, round(box_um / FOCUS_SUB_UM))  # sub-squares per side
    sub = max(4, round(box_um / subs / measure_mpp))
    out_px = subs * sub
    margin = _focus_margin_px(judge_focus)
    full = out_px + 2 * margin
    half_x = (box_um / 2.0 + margin * box_um / out_px) / tile_mpp[0]
    half_y = (box_um / 2.0 + margin * box_um / out_px) / tile_mpp[1]
    pool = max(1, int(measure_mpp / max(tile_mpp) + 1e-6))
    k_fine = _gaussian_kernel(SHARP_FINE_SIGMA, device)
    # G4 is G1 followed by the rest of the variance at half resolution (2x2 average: 0.25 px^2): ~3x cheaper
    # than a 25-tap filter at full resolution, and the mid band it bounds is smooth at that scale.
    rest = math.sqrt(SHARP_COARSE_SIGMA**2 - SHARP_FINE_SIGMA**2 - 0.25) / 2.0
    k_coarse = _gaussian_kernel(rest, device)
    grey_w = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float32, device=device).view(1, 3, 1, 1)
    nan = torch.tensor(float("nan"), device=device)
    core = (slice(None), slice(margin, margin + out_px), slice(margin, margin + out_px))
    h, w = tile.shape[0], tile.shape[1]
    cx_all, cy_all = geom.to_tile_px(centres_level0)
    for start in range(0, n, batch):
        cx, cy = cx_all[start : start + batch], cy_all[start : start + batch]
        k = len(cx)
        # Only the part of the tile these boxes cover is made float (memory follows the batch). Its origin
        # sits on the level's pixel grid in steps of ``pool``, so a box gets the same pixels whichever tile or
        # batch it comes from; where the filters' margin leaves the tile, edge pixels are repeated.
        x0 = int(np.floor((cx - half_x).min())) - 2
        y0 = int(np.floor((cy - half_y).min())) - 2
        x0 -= (geom.level_xy[0] + x0) % pool
        y0 -= (geom.level_xy[1] + y0) % pool
        x1 = int(np.ceil((cx + half_x).max())) + 3
        y1 = int(np.ceil((cy + half_y).max())) + 3
        sx0, sy0, sx1, sy1 = max(0, x0), max(0, y0), min(w, x1), min(h, y1)
        if sx1 <= sx0 or sy1 <= sy0:
            continue  # boxes wholly off the tile: nothing to judge
        img = tile[sy0:sy1, sx0:sx1].permute(2, 0, 1).unsqueeze(0).to(torch.float32)
        if (sx0, sy0, sx1, sy1) != (x0, y0, x1, y1):
            pads = (sx0 - x0, x1 - sx1, sy0 - y0, y1 - sy1)
            img = torch.nn.functional.pad(img, pads, mode="replicate")
        if pool > 1:  # area-average first: roi_align then samples ~1 px per output px instead of pool^2
            img = torch.nn.functional.avg_pool2d(img, pool, ceil_mode=True)
        bx, by = cx - x0, cy - y0
        boxes = np.stack([np.zeros_like(bx), bx - half_x, by - half_y, bx + half_x, by + half_y], axis=1)
        rois = torch.as_tensor(boxes, dtype=torch.float32, device=device)
        rgb = roi_align(img, rois, output_size=(full, full), spatial_scale=1.0 / pool, sampling_ratio=-1, aligned=True)
        is_ink = ink_mask(rgb)
        is_tissue = (rgb.amax(dim=1) - rgb.amin(dim=1) >= TISSUE_MIN_CHROMA) & ~is_ink
        t_frac = is_tissue[core].float().mean(dim=(1, 2))
        sl = slice(start, start + k)
        ink[sl] = is_ink[core].float().mean(dim=(1, 2)).cpu().numpy()
        tissue[sl] = t_frac.cpu().numpy()
        if not judge_focus:
            continue
        r = FOCUS_EDGE_PX
        glass = (~is_tissue).float().unsqueeze(1)
        fn = torch.nn.functional
        near_edge = fn.max_pool2d(fn.max_pool2d(glass, (1, 2 * r + 1), 1, (0, r)), (2 * r + 1, 1), 1, (r, 0))[:, 0]
        inner = (is_tissue & (near_edge == 0))[core].float()
        grey = (rgb * grey_w).sum(dim=1, keepdim=True)
        g1 = _smooth(grey, k_fine)
        g4 = _smooth(torch.nn.functional.avg_pool2d(g1, 2, ceil_mode=True), k_coarse)
        g4 = torch.nn.functional.interpolate(g4, scale_factor=2.0, mode="bilinear", align_corners=False)
        g4 = g4[:, :, : g1.shape[2], : g1.shape[3]]
        fine = (grey - g1)[:, 0][core].square() * inner
        band = (g1 - g4)[:, 0][core].square() * inner
        # Per sub-square: a box half in focus must not read as sharp because its sharp half holds most of the
        # fine energy; the lower median says whether half or more of the judged area is soft.
        fine_s = fine.view(k, subs, sub, subs, sub).sum(dim=(2, 4)).flatten(1)
        band_s = band.view(k, subs, sub, subs, sub).sum(dim=(2, 4)).flatten(1)
        inner_s = inner.view(k, subs, sub, subs, sub).mean(dim=(2, 4)).flatten(1)
        ratio = torch.where(inner_s >= MIN_TISSUE_FRACTION, fine_s / band_s.clamp_min(1e-6), nan)
        med = torch.nanmedian(ratio, dim=1).values
        sharp[sl] = torch.where(t_frac >= MIN_TISSUE_FRACTION, med, nan).cpu().numpy()
    return CellMeasures(ink, tissue, sharp)


def cell_flags(
    tile: torch.Tensor,
    geom: TileGeometry,
    centres_level0: np.ndarray,
    mpp: tuple[float, float],
    box_um: float,
) -> np.ndarray:
    """``uint8`` QC bit flags (``QC_PEN``, ``QC_BLUR``), one per centre, computed on the tile's device."""
    return cell_measures(tile, geom, centres_level0, mpp, box_um).flags()


# -- whole slides (benchmarks, tests, checks of a site's own slides) ---------------------------------------
def lattice_centres(slide: Slide, step_um: float) -> np.ndarray:
    """(N, 2) level-0 (x, y) centres of a ``step_um`` lattice whose boxes tile the slide from its top-left."""
    sx, sy = step_um / slide.mpp.x, step_um / slide.mpp.y
    w, h = slide.dimensions
    gx, gy = np.meshgrid((np.arange(int(w // sx)) + 0.5) * sx, (np.arange(int(h // sy)) + 0.5) * sy)
    return np.stack([gx.ravel(), gy.ravel()], axis=1)


def slide_cell_measures(
    slide: Slide,
    centres_level0: np.ndarray,
    box_um: float,
    *,
    level: int | None = None,
    tile_um: float = 1000.0,
    device: torch.device | None = None,
) -> CellMeasures:
    """:func:`cell_measures` of arbitrary centres, read as super-tiles of about ``tile_um`` at ``level``
    (default: the level infer reads for a 0.5 µm/px encoder)."""
    from .loader import read_tile, tile_for_points

    device = device or torch.device("cpu")
    level = slide.best_level_for_mpp(0.5) if level is None else level
    n = len(centres_level0)
    ink = np.zeros(n, dtype=np.float32)
    tissue = np.zeros(n, dtype=np.float32)
    sharp = np.full(n, np.nan, dtype=np.float32)
    keys = np.floor(centres_level0 / (tile_um / slide.mpp.x)).astype(np.int64)
    groups: dict[tuple[int, int], list[int]] = {}
    for i in np.lexsort((keys[:, 0], keys[:, 1])):
        groups.setdefault((int(keys[i, 1]), int(keys[i, 0])), []).append(int(i))
    mpp = (slide.mpp.x, slide.mpp.y)
    # the tile holds each box plus the filters' margin (at most 2 * margin px at MEASURE_MPP, + rounding)
    context_um = box_um + 2 * _focus_margin_px(True) * max(MEASURE_MPP, slide.level_mpp(level)) + 8.0
    for idx in groups.values():
        pts = centres_level0[idx]
        geom = tile_for_points(slide, pts, context_um, level)
        tile = torch.from_numpy(read_tile(slide, geom)).to(device)
        m = cell_measures(tile, geom, pts, mpp, box_um)
        ink[idx], tissue[idx], sharp[idx] = m.ink_fraction, m.tissue_fraction, m.sharpness
    return CellMeasures(ink, tissue, sharp)


def slide_cell_flags(
    slide: Slide, centres_level0: np.ndarray, box_um: float, *, level: int | None = None
) -> np.ndarray:
    """``uint8`` QC flags of arbitrary centres of a slide (see :func:`slide_cell_measures`)."""
    return slide_cell_measures(slide, centres_level0, box_um, level=level).flags()


def annotation_fraction(
    geojson: str | Path, name: str, centres_level0: np.ndarray, box_level0: float, shape: tuple[int, int]
) -> np.ndarray:
    """Fraction of each centre's square (side ``box_level0`` px) inside the polygons classified ``name``
    (QuPath ``properties.classification.name``) of a GeoJSON in level-0 px; ``shape`` is the slide's (h, w).

    For scoring the flags against hand-drawn truth; rasterised at level 0 (small slides and crops)."""
    from skimage.draw import polygon as fill

    h, w = shape
    mask = np.zeros((h, w), dtype=bool)
    obj: Any = json.loads(Path(geojson).read_text())
    for feat in obj.get("features", []):
        cls = (feat.get("properties") or {}).get("classification") or {}
        geom = feat.get("geometry") or {}
        if cls.get("name") != name or geom.get("type") not in ("Polygon", "MultiPolygon"):
            continue
        polys = [geom["coordinates"]] if geom["type"] == "Polygon" else geom["coordinates"]
        for rings in polys:
            part = np.zeros((h, w), dtype=bool)
            for ring in rings:  # even-odd: holes cut out
                xy = np.asarray(ring, dtype=np.float64)
                rr, cc = fill(xy[:, 1] - 0.5, xy[:, 0] - 0.5, (h, w))
                part[rr, cc] ^= True
            mask |= part
    integral = np.pad(mask.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    half = box_level0 / 2.0
    x0 = np.clip(np.round(centres_level0[:, 0] - half), 0, w).astype(int)
    x1 = np.clip(np.round(centres_level0[:, 0] + half), 0, w).astype(int)
    y0 = np.clip(np.round(centres_level0[:, 1] - half), 0, h).astype(int)
    y1 = np.clip(np.round(centres_level0[:, 1] + half), 0, h).astype(int)
    inside = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    return (inside / np.maximum((x1 - x0) * (y1 - y0), 1)).astype(np.float32)
