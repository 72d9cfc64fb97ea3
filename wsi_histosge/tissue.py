"""Tissue detection on a thumbnail, and tissue masks as GeoJSON polygons in level-0 pixels.

Detection: Otsu threshold on HSV saturation (H&E stains are saturated, glass and pen-free
background are not), excluding near-black scanner borders, then closing, hole filling and removal of
specks smaller than a minimum area. The mask lives at thumbnail resolution with its own µm/px.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from . import config
from .errors import DataFormatError, NoTissueError, SlideNotFoundError
from .slide import Slide


@dataclass(frozen=True)
class TissueMask:
    """A boolean mask over the slide; pixel (r, c) covers level-0 px [c*scale, (c+1)*scale)."""

    mask: np.ndarray
    mpp: float  # µm per mask pixel
    level0_per_px: float  # level-0 pixels per mask pixel
    source: str

    @property
    def area_um2(self) -> float:
        return float(self.mask.sum()) * self.mpp * self.mpp

    def fraction_within(self, centres_level0: np.ndarray, radius_level0: float) -> np.ndarray:
        """Fraction of the square of half-side ``radius_level0`` around each centre that is tissue."""
        if len(centres_level0) == 0:
            return np.zeros(0, dtype=np.float32)
        integral = np.pad(
            self.mask.astype(np.int32).cumsum(0, dtype=np.int32).cumsum(1, dtype=np.int32), ((1, 0), (1, 0))
        )
        h, w = self.mask.shape
        c = centres_level0 / self.level0_per_px
        r = max(radius_level0 / self.level0_per_px, 0.5)
        x0 = np.clip(np.floor(c[:, 0] - r), 0, w).astype(int)
        x1 = np.clip(np.ceil(c[:, 0] + r), 0, w).astype(int)
        y0 = np.clip(np.floor(c[:, 1] - r), 0, h).astype(int)
        y1 = np.clip(np.ceil(c[:, 1] + r), 0, h).astype(int)
        total = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
        area = np.maximum((x1 - x0) * (y1 - y0), 1)
        return (total / area).astype(np.float32)


def _otsu(values: np.ndarray) -> float:
    from skimage.filters import threshold_otsu

    if values.size == 0 or values.min() == values.max():
        return float(values.max(initial=0)) + 1.0
    return float(threshold_otsu(values))


def detect_tissue(slide: Slide, *, mpp: float | None = None, min_area_um2: float = 20_000.0) -> TissueMask:
    """Detect tissue on a thumbnail of ``slide`` at ``mpp`` µm/px (default ``config.TISSUE_MPP``)."""
    mpp = mpp or config.TISSUE_MPP
    # Tiny slides: keep at least ~64 px across so detection has something to work with.
    mpp = effective_tissue_mpp(slide, mpp)
    thumb, thumb_mpp = slide.thumbnail(mpp)
    cmax = thumb.max(axis=2)
    cmin = thumb.min(axis=2)
    sat = (cmax - cmin).astype(np.float32) / np.maximum(cmax, 1).astype(np.float32)
    valid = cmax > 25  # scanner borders and black padding are not tissue
    thr = max(_otsu(sat[valid]) if valid.any() else 1.0, 0.05)
    mask = (sat > thr) & valid
    radius = max(1, round(20.0 / thumb_mpp))
    structure = _disk(radius)
    mask = ndimage.binary_closing(mask, structure=structure, iterations=1)
    mask = ndimage.binary_fill_holes(mask)
    mask = ndimage.binary_opening(mask, structure=_disk(max(1, radius // 2)))
    labels, n = ndimage.label(mask)
    if n:
        sizes = ndimage.sum(mask, labels, index=np.arange(1, n + 1)) * thumb_mpp * thumb_mpp
        keep = np.zeros(n + 1, dtype=bool)
        keep[1:] = sizes >= min(min_area_um2, sizes.max())
        mask = keep[labels]
    level0_per_px = thumb_mpp / slide.mpp.x
    return TissueMask(mask.astype(bool), thumb_mpp, level0_per_px, f"otsu-saturation@{thumb_mpp:.2f}um/px")


def effective_tissue_mpp(slide: Slide, mpp: float | None = None) -> float:
    """Requested mask resolution, made finer on tiny slides (>= ~64 px across) and coarser on huge ones
    (<= config.MAX_TISSUE_PX on the long side), so the mask's memory does not grow with the slide."""
    mpp = mpp or config.TISSUE_MPP
    width_um = slide.dimensions[0] * slide.mpp.x
    long_um = max(slide.dimensions[0] * slide.mpp.x, slide.dimensions[1] * slide.mpp.y)
    mpp = max(mpp, long_um / config.MAX_TISSUE_PX)
    return min(mpp, max(slide.mpp.x, width_um / 64))


def _disk(radius: int) -> np.ndarray:
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return np.asarray(xx * xx + yy * yy <= radius * radius)


def require_tissue(mask: TissueMask, slide: Slide) -> None:
    if not mask.mask.any():
        raise NoTissueError(
            f"{slide.path}: no tissue found on the slide; check the slide, or give a mask with --tissue-mask "
            "(GeoJSON polygons in level-0 px, e.g. exported from QuPath)"
        )


# -- GeoJSON ---------------------------------------------------------------------------------
def mask_to_geojson(mask: TissueMask) -> dict[str, Any]:
    """Outer boundaries of the mask as GeoJSON polygons in level-0 px (QuPath opens it)."""
    from skimage.measure import approximate_polygon, find_contours

    padded = np.pad(mask.mask.astype(np.uint8), 1)
    features = []
    for contour in find_contours(padded, 0.5):
        contour = approximate_polygon(contour, tolerance=0.75)
        if len(contour) < 4:
            continue
        # (row, col) in padded mask px -> (x, y) level-0 px of pixel edges
        xy = (contour[:, ::-1] - 1 + 0.5) * mask.level0_per_px
        ring = [[round(float(x), 1), round(float(y), 1)] for x, y in xy]
        if ring[0] != ring[-1]:
            ring.append(ring[0])
        features.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {"objectType": "annotation", "classification": {"name": "Tissue"}},
            }
        )
    return {"type": "FeatureCollection", "features": features}


def write_geojson(mask: TissueMask, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(mask_to_geojson(mask)))
    return path


def _polygons(obj: Any) -> list[list[list[list[float]]]]:
    """All polygons (list of rings) in a GeoJSON object."""
    kind = obj.get("type") if isinstance(obj, dict) else None
    if kind == "FeatureCollection":
        return [p for f in obj.get("features", []) for p in _polygons(f)]
    if kind == "Feature":
        return _polygons(obj.get("geometry") or {})
    if kind == "GeometryCollection":
        return [p for g in obj.get("geometries", []) for p in _polygons(g)]
    if kind == "Polygon":
        return [obj["coordinates"]]
    if kind == "MultiPolygon":
        return list(obj["coordinates"])
    return []


def load_tissue_mask(path: str | Path, slide: Slide, *, mpp: float | None = None) -> TissueMask:
    """Rasterise a GeoJSON (level-0 px polygons, holes honoured) or read a PNG/TIFF mask image.

    An image mask covers the whole slide: it is stretched to the slide's aspect, non-zero = tissue.
    """
    from skimage.draw import polygon as draw_polygon

    path = Path(path)
    if not path.is_file():
        raise SlideNotFoundError(f"{path}: tissue mask file not found; check --tissue-mask")
    mpp = effective_tissue_mpp(slide, mpp)
    shape = slide.thumbnail_shape(mpp)
    level0_per_px = slide.dimensions[0] / shape[1]
    mpp = level0_per_px * slide.mpp.x
    if path.suffix.lower() in {".json", ".geojson"}:
        try:
            obj = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataFormatError(f"{path}: not valid GeoJSON ({exc}); export the annotation as GeoJSON") from exc
        polys = _polygons(obj)
        if not polys:
            raise DataFormatError(f"{path}: no Polygon/MultiPolygon geometry found; export tissue polygons")
        mask = np.zeros(shape, dtype=bool)
        for rings in polys:
            for i, ring in enumerate(rings):
                pts = np.asarray(ring, dtype=np.float64) / level0_per_px
                rr, cc = draw_polygon(pts[:, 1] - 0.5, pts[:, 0] - 0.5, shape=shape)
                mask[rr, cc] = i == 0  # first ring is the shell, the others are holes
        return TissueMask(mask, mpp, level0_per_px, f"geojson:{path.name}")
    import imagecodecs
    from PIL import Image

    try:
        img = np.asarray(imagecodecs.imread(str(path)))
    except Exception as exc:
        raise DataFormatError(f"{path}: cannot read the mask image ({exc}); give GeoJSON or a PNG") from exc
    if img.ndim == 3:
        img = img[..., 0]
    mask = (
        np.asarray(Image.fromarray((img > 0).astype(np.uint8) * 255).resize(shape[::-1], Image.Resampling.NEAREST)) > 0
    )
    return TissueMask(mask, mpp, level0_per_px, f"image:{path.name}")
