"""Artefact flags per lattice cell: pen ink and out-of-focus tissue, from the super-tile infer already reads.

Each cell gets a ``uint8`` of bit flags (``QC_PEN | QC_BLUR``; bit 4 is kept free for "unlike training").
The square of side ``box_um`` around the cell's centre (infer passes the lattice stride) is resampled on the
tile's device to ``MEASURE_MPP`` µm/px (area averaging: ``roi_align``), and judged from those pixels alone:

``QC_PEN`` (1): marker ink. A pixel is ink when it is green/teal (G > R + 15), blue (B > R + 40 with
G > R - 15: haematoxylin is blue-purple too, but its green is well below its red) or black (all channels
< 60 and within 25 of each other: the darkest nuclei stay blue-purple). The cell is flagged when at least
``PEN_FRACTION`` of its box is ink. H&E is pink/purple (G < R in every pixel of clean tissue), so ink
strokes, even where they are laid over tissue, show up by colour; what the rule also counts is the green
or black dye pathologists paint on resection margins (a thin line along the tissue edge: it reaches the
threshold only where it is thick).

``QC_BLUR`` (2): out of focus. Sharpness is the ratio of the fine-scale to the mid-scale contrast energy
of the grey image over the box's tissue pixels: ``sum((I - G1 I)^2) / sum((G1 I - G4 I)^2)``, with ``Gs``
a Gaussian of ``s`` px at ``MEASURE_MPP`` (1 µm/px). Defocus removes the fine band first, so the ratio
falls, while a pale or sparse field lowers both bands and keeps its ratio (an absolute Laplacian
variance would flag pale tissue). Only boxes with at least ``MIN_TISSUE_FRACTION`` tissue pixels
(chroma >= 18, not ink) are judged: glass is never "blurred". Tiles coarser than ``BLUR_MAX_TILE_MPP``
(a slide whose finest level is 2-4 µm/px) cannot show focus and are never flagged as blurred.

Thresholds and how they were chosen (``python benchmarks/qc_flags.py``; cell level, boxes of 100 µm;
a cell is positive when >= 50% of its box lies inside a truth polygon, negative when none of it does):
see the constants below; the measured numbers are in their comments.

What it misses: folds and air bubbles are not detected (a fold is darker, thicker tissue and reads as
sharp; a bubble's rim is sharp and its inside is glass). Faint, thin ink lines and ink that covers under
``PEN_FRACTION`` of a box pass unflagged. Blur milder than ~2 µm sigma is not flagged. Black ink over
dense dark tissue can be confused with very dark, grey (unstained-looking) material such as pigment.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from .loader import TileGeometry

if TYPE_CHECKING:
    from .slide import Slide

QC_PEN = 1
QC_BLUR = 2
# QC bit 4 is reserved for "unlike training" (set elsewhere).

#: µm per pixel at which every box is judged (boxes of coarser tiles are judged at the tile's own pixels).
MEASURE_MPP = 1.0
#: Pixel colour rules for ink (0-255 RGB after resampling).
INK_GREEN_MIN_G_MINUS_R = 15.0
INK_BLUE_MIN_B_MINUS_R = 40.0
INK_BLUE_MIN_G_MINUS_R = -15.0
INK_BLACK_MAX_VALUE = 60.0
INK_BLACK_MAX_CHROMA = 25.0
#: A cell is ``QC_PEN`` when at least this fraction of its box is ink.
PEN_FRACTION = 0.25
#: Tissue pixels for the focus measure: chroma (max - min of RGB) at least this, and not ink.
TISSUE_MIN_CHROMA = 18.0
#: Boxes with less tissue than this are not judged for focus.
MIN_TISSUE_FRACTION = 0.25
#: Gaussian sigmas (px at ``MEASURE_MPP``) of the fine and the mid band of the sharpness ratio.
SHARP_FINE_SIGMA = 1.0
SHARP_COARSE_SIGMA = 4.0
#: A judged cell is ``QC_BLUR`` when its sharpness ratio is below this.
BLUR_MAX_SHARPNESS = 0.2
#: Tiles coarser than this (µm/px) are not judged for focus.
BLUR_MAX_TILE_MPP = 1.0


@dataclass(frozen=True)
class CellMeasures:
    """Per-cell measurements behind the flags (float32 arrays, one value per centre)."""

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


def _gaussian_kernel(sigma: float, device: torch.device) -> torch.Tensor:
    radius = max(1, math.ceil(3.0 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=device)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def _blur(img: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian of (N, 1, H, W), 'valid' in neither direction: replicate-padded."""
    r = (kernel.numel() - 1) // 2
    x = torch.nn.functional.pad(img, (r, r, 0, 0), mode="replicate")
    x = torch.nn.functional.conv2d(x, kernel.view(1, 1, 1, -1))
    x = torch.nn.functional.pad(x, (0, 0, r, r), mode="replicate")
    return torch.nn.functional.conv2d(x, kernel.view(1, 1, -1, 1))


def ink_mask(rgb: torch.Tensor) -> torch.Tensor:
    """Boolean (N, H, W) ink pixels of float RGB (N, 3, H, W) in 0-255."""
    r, g, b = rgb[:, 0], rgb[:, 1], rgb[:, 2]
    g_r = g - r
    green = g_r > INK_GREEN_MIN_G_MINUS_R
    blue = (g_r > INK_BLUE_MIN_G_MINUS_R) & (b - r > INK_BLUE_MIN_B_MINUS_R)
    hi = rgb.amax(dim=1)
    black = (hi < INK_BLACK_MAX_VALUE) & (hi - rgb.amin(dim=1) < INK_BLACK_MAX_CHROMA)
    return green | blue | black


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

    ``tile`` is the (h, w, 3) uint8 super-tile (any device; the work runs there), ``geom`` where it sits,
    ``mpp`` the slide's level-0 µm/px (x, y). The slide is not read."""
    from torchvision.ops import roi_align

    n = len(centres_level0)
    ink = np.zeros(n, dtype=np.float32)
    tissue = np.zeros(n, dtype=np.float32)
    sharp = np.full(n, np.nan, dtype=np.float32)
    if n == 0:
        return CellMeasures(ink, tissue, sharp)
    device = tile.device
    ds = geom.downsample
    tile_mpp = (mpp[0] * ds, mpp[1] * ds)
    measure_mpp = max(MEASURE_MPP, tile_mpp[0], tile_mpp[1])
    judge_focus = max(tile_mpp) <= BLUR_MAX_TILE_MPP * 1.01
    out_px = max(4, round(box_um / measure_mpp))
    margin = math.ceil(3.0 * SHARP_COARSE_SIGMA) if judge_focus else 0
    full = out_px + 2 * margin
    # Half-side of the box plus margin, in tile px: the margin lets the filters see real pixels at box edges.
    half_x = (box_um / 2.0 + margin * measure_mpp) / tile_mpp[0]
    half_y = (box_um / 2.0 + margin * measure_mpp) / tile_mpp[1]
    k_fine = _gaussian_kernel(SHARP_FINE_SIGMA, device)
    k_coarse = _gaussian_kernel(SHARP_COARSE_SIGMA, device)
    grey_w = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float32, device=device).view(1, 3, 1, 1)
    h, w = tile.shape[0], tile.shape[1]
    cx_all, cy_all = geom.to_tile_px(centres_level0)
    for start in range(0, n, batch):
        cx, cy = cx_all[start : start + batch], cy_all[start : start + batch]
        # Only the part of the tile these boxes cover is made float (memory follows the batch).
        x0 = max(0, int(np.floor((cx - half_x).min())) - 2)
        y0 = max(0, int(np.floor((cy - half_y).min())) - 2)
        x1 = min(w, int(np.ceil((cx + half_x).max())) + 3)
        y1 = min(h, int(np.ceil((cy + half_y).max())) + 3)
        if x1 <= x0 or y1 <= y0:
            continue  # boxes entirely off the tile: nothing to judge
        img = tile[y0:y1, x0:x1].permute(2, 0, 1).unsqueeze(0).to(torch.float32)
        bx, by = cx - x0, cy - y0
        boxes = np.stack([np.zeros_like(bx), bx - half_x, by - half_y, bx + half_x, by + half_y], axis=1)
        rois = torch.as_tensor(boxes, dtype=torch.float32, device=device)
        rgb = roi_align(img, rois, output_size=(full, full), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
        core = rgb[:, :, margin : margin + out_px, margin : margin + out_px]
        is_ink = ink_mask(core)
        chroma = core.amax(dim=1) - core.amin(dim=1)
        is_tissue = (chroma >= TISSUE_MIN_CHROMA) & ~is_ink
        sl = slice(start, start + len(cx))
        ink[sl] = is_ink.float().mean(dim=(1, 2)).cpu().numpy()
        t_frac = is_tissue.float().mean(dim=(1, 2))
        tissue[sl] = t_frac.cpu().numpy()
        if not judge_focus:
            continue
        grey = (rgb * grey_w).sum(dim=1, keepdim=True)
        g1 = _blur(grey, k_fine)
        g4 = _blur(grey, k_coarse)
        crop = (slice(None), 0, slice(margin, margin + out_px), slice(margin, margin + out_px))
        fine = (grey - g1)[crop].square()
        band = (g1 - g4)[crop].square()
        wts = is_tissue.float()
        ratio = (fine * wts).sum(dim=(1, 2)) / (band * wts).sum(dim=(1, 2)).clamp_min(1e-6)
        ratio = torch.where(t_frac >= MIN_TISSUE_FRACTION, ratio, torch.full_like(ratio, float("nan")))
        sharp[sl] = ratio.cpu().numpy()
    return CellMeasures(ink, tissue, sharp)


def cell_flags(
    tile: torch.Tensor,
    geom: TileGeometry,
    centres_level0: np.ndarray,
    mpp: tuple[float, float],
    box_um: float,
) -> np.ndarray:
    """``uint8`` QC bit flags (``QC_PEN``, ``QC_BLUR``), one per centre, from the super-tile on its device."""
    return cell_measures(tile, geom, centres_level0, mpp, box_um).flags()


def lattice_centres(slide: Slide, step_um: float) -> np.ndarray:
    """(N, 2) level-0 (x, y) centres of a ``step_um`` lattice whose boxes tile the slide from its top-left."""
    sx, sy = step_um / slide.mpp.x, step_um / slide.mpp.y
    w, h = slide.dimensions
    xs = (np.arange(int(w // sx)) + 0.5) * sx
    ys = (np.arange(int(h // sy)) + 0.5) * sy
    gx, gy = np.meshgrid(xs, ys)
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
    """:func:`cell_measures` for arbitrary centres of a slide, read as super-tiles of about ``tile_um`` at
    ``level`` (default: the level infer reads for a 0.5 µm/px encoder)."""
    from .loader import read_tile, tile_for_points

    device = device or torch.device("cpu")
    if level is None:
        level = slide.best_level_for_mpp(0.5)
    n = len(centres_level0)
    ink = np.zeros(n, dtype=np.float32)
    tissue = np.zeros(n, dtype=np.float32)
    sharp = np.full(n, np.nan, dtype=np.float32)
    cell = tile_um / slide.mpp.x
    keys = np.floor(centres_level0 / cell).astype(np.int64)
    groups: dict[tuple[int, int], list[int]] = {}
    for i in np.lexsort((keys[:, 0], keys[:, 1])):
        groups.setdefault((int(keys[i, 1]), int(keys[i, 0])), []).append(int(i))
    mpp = (slide.mpp.x, slide.mpp.y)
    for idx in groups.values():
        pts = centres_level0[idx]
        geom = tile_for_points(slide, pts, box_um + 2 * 3.0 * SHARP_COARSE_SIGMA * MEASURE_MPP + 8.0, level)
        tile = torch.from_numpy(read_tile(slide, geom)).to(device)
        m = cell_measures(tile, geom, pts, mpp, box_um)
        ink[idx], tissue[idx], sharp[idx] = m.ink_fraction, m.tissue_fraction, m.sharpness
    return CellMeasures(ink, tissue, sharp)


def slide_cell_flags(
    slide: Slide, centres_level0: np.ndarray, box_um: float, *, level: int | None = None
) -> np.ndarray:
    """``uint8`` QC flags of arbitrary centres of a slide (see :func:`slide_cell_measures`)."""
    return slide_cell_measures(slide, centres_level0, box_um, level=level).flags()
