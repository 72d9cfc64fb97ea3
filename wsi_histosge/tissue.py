"""Tissue detection on a thumbnail, and tissue masks as GeoJSON polygons in level-0 pixels.

Detection: Otsu threshold on HSV saturation (H&E stains are saturated, glass is not), excluding
near-black scanner borders and marker ink (qc.py's colour rules), then closing, hole filling and removal
of specks smaller than a minimum area. The mask lives at thumbnail resolution with its own µm/px.

User masks: GeoJSON polygons in level-0 px (QuPath export; holes honoured, partly outside the slide is
clipped, entirely outside is a usage error that gives the polygons' bounding box), or a mask image covering
the whole slide at its aspect ratio (within 2%). Malformed files are :class:`DataFormatError` (exit 9), and
sizes are bounded before anything is allocated (image size from the header, GeoJSON bytes, coordinates).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from . import config
from .errors import DataFormatError, InputNotFoundError, NoTissueError, SlideFormatError, UsageError
from .owned import GENERATOR
from .slide import Slide


@dataclass(frozen=True)
class TissueMask:
    """A boolean mask over the slide; pixel (r, c) covers level-0 px [c*scale, (c+1)*scale)."""

    mask: np.ndarray
    mpp: float  # µm per mask pixel
    level0_per_px: float  # level-0 pixels per mask pixel
    source: str
    #: Marker ink (µm²) seen on the thumbnail and left out of the mask where it is not enclosed by tissue.
    ink_excluded_um2: float = 0.0

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
    ink = thumbnail_ink(thumb)
    # Scanner borders, black padding and marker ink are not tissue (ink is saturated: left in, thick strokes
    # pull the threshold up until only the ink remains). Ink lying inside tissue is filled back with the holes.
    valid = (cmax > 25) & ~ink
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
    ink_out = float((ink & ~mask).sum()) * thumb_mpp * thumb_mpp
    return TissueMask(mask.astype(bool), thumb_mpp, level0_per_px, f"otsu-saturation@{thumb_mpp:.2f}um/px", ink_out)


def thumbnail_ink(thumb: np.ndarray) -> np.ndarray:
    """Marker-ink pixels of an RGB uint8 thumbnail, by the colour rules of :func:`wsi_histosge.qc.ink_mask`."""
    import torch

    from .qc import ink_mask

    rgb = torch.from_numpy(np.ascontiguousarray(thumb[..., :3].transpose(2, 0, 1))).float()[None]
    return ink_mask(rgb)[0].numpy()


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
                "properties": {
                    "objectType": "annotation",
                    "classification": {"name": "Tissue", "color": [80, 160, 80]},
                },
            }
        )
    return {"type": "FeatureCollection", "generator": GENERATOR, "features": features}


def write_geojson(mask: TissueMask, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(mask_to_geojson(mask)))
    return path


# -- user-given masks --------------------------------------------------------------------------
#: Largest GeoJSON mask we parse (bytes); QuPath exports of whole-slide annotations are a few MB.
MAX_GEOJSON_BYTES = 512 * 2**20
#: Largest mask image we decode (pixels, e.g. 16384 x 16384); it is resampled to the tissue grid anyway.
MAX_MASK_IMAGE_PIXELS = 2**28
#: A coordinate beyond this (level-0 px) belongs to no slide (the largest side we open is 1e6 px).
MAX_ABS_COORDINATE = 1e9
#: Scanline crossings rasterised per mask (edges x mask rows they span): a few seconds of work at most.
MAX_CROSSINGS = 200_000_000
#: A mask image may differ from the slide's aspect ratio by this much (rounding of a downsampled export).
MASK_ASPECT_TOLERANCE = 0.02
_MAX_NESTING = 32
_GEOJSON_SUFFIXES = {".json", ".geojson"}


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_xy(pos: Any) -> bool:
    return isinstance(pos, list) and len(pos) >= 2 and _is_number(pos[0]) and _is_number(pos[1])


def _ring(ring: Any, path: Path, where: str, k: int) -> np.ndarray:
    """Ring ``k`` of a Polygon as an (n, 2) float array of level-0 px, validated."""
    if not isinstance(ring, list) or len(ring) < 3:
        raise DataFormatError(f"{path}: {where} ring {k}: a ring needs at least 3 (x, y) positions")
    for j, pos in enumerate(ring):
        if not _is_xy(pos):
            raise DataFormatError(
                f"{path}: {where} ring {k} position {j} is {json.dumps(pos)[:60]}, not an (x, y) pair of numbers; "
                "export the polygons as GeoJSON in level-0 px"
            )
    arr = np.array([pos[:2] for pos in ring], dtype=np.float64)
    if not np.isfinite(arr).all():
        raise DataFormatError(f"{path}: {where} ring {k} has NaN or infinite coordinates; re-export the polygons")
    if np.abs(arr).max() > MAX_ABS_COORDINATE:
        raise DataFormatError(
            f"{path}: {where} ring {k} has a coordinate of {np.abs(arr).max():.3g} px, beyond any slide; "
            "give polygons in level-0 px"
        )
    return arr


def _rings(coords: Any, path: Path, where: str) -> list[np.ndarray]:
    """A Polygon's rings as (n, 2) float arrays of level-0 px, validated."""
    if not isinstance(coords, list) or not coords:
        raise DataFormatError(f"{path}: {where}: Polygon coordinates must be a non-empty list of rings of (x, y) pairs")
    return [_ring(ring, path, where, k) for k, ring in enumerate(coords)]


def _polygons(obj: dict[str, Any], kind: str, path: Path, here: str) -> list[list[np.ndarray]]:
    """The polygons (lists of rings) of a Polygon or MultiPolygon geometry."""
    coords = obj.get("coordinates")
    if kind == "Polygon":
        return [_rings(coords, path, here)]
    if not isinstance(coords, list):
        raise DataFormatError(f"{path}: {here}: MultiPolygon coordinates must be a list of polygons")
    return [_rings(rings, path, f"{here} polygon {j}") for j, rings in enumerate(coords)]


#: GeoJSON objects that hold other objects, and the key of their list.
_MEMBER_LISTS = {"FeatureCollection": "features", "GeometryCollection": "geometries"}
#: How messages name a JSON value that is not an object (None reads as null).
_JSON_TYPES = {bool: "boolean", int: "number", float: "number", str: "string"}


def _collect(obj: Any, path: Path, where: str, polys: list[list[np.ndarray]], other: set[str], depth: int) -> None:
    """Append every Polygon (list of rings) in a GeoJSON object to ``polys``; other geometry types to ``other``."""
    here = where or "the top level"
    if depth > _MAX_NESTING:
        raise DataFormatError(f"{path}: GeoJSON nested deeper than {_MAX_NESTING} levels; export flat polygons")
    if isinstance(obj, list):  # QuPath writes a bare list of Features
        for i, item in enumerate(obj):
            _collect(item, path, f"{where}[{i}]", polys, other, depth + 1)
        return
    if not isinstance(obj, dict):
        raise DataFormatError(
            f"{path}: {here} is a JSON {_JSON_TYPES.get(type(obj), 'null')}, not a GeoJSON object; export the "
            "annotation as GeoJSON"
        )
    kind = obj.get("type")
    if kind in _MEMBER_LISTS:
        _collect_members(obj, kind, path, where, polys, other, depth)
    elif kind == "Feature":
        if obj.get("geometry") is not None:  # null geometry is valid GeoJSON: no area
            _collect(obj["geometry"], path, f"{where}.geometry".lstrip("."), polys, other, depth + 1)
    elif kind in ("Polygon", "MultiPolygon"):
        polys.extend(_polygons(obj, kind, path, here))
    elif isinstance(kind, str):
        other.add(kind)  # Point, LineString, ...: no area
    else:
        raise DataFormatError(f"{path}: {here} has no GeoJSON 'type'; export the annotation as GeoJSON")


def _collect_members(
    obj: dict[str, Any], kind: str, path: Path, where: str, polys: list[list[np.ndarray]], other: set[str], depth: int
) -> None:
    """_collect over the members of a FeatureCollection or GeometryCollection."""
    key = _MEMBER_LISTS[kind]
    items = obj.get(key)
    if not isinstance(items, list):
        raise DataFormatError(f"{path}: {where or 'the top level'}: a {kind} needs a list '{key}'")
    for i, item in enumerate(items):
        _collect(item, path, f"{where}.{key}[{i}]".lstrip("."), polys, other, depth + 1)


def _ring_crossings(ring_px: np.ndarray, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Scanline crossings of a closed ring: for each mask row r whose centre line y = r it crosses (an edge
    spans min(y) <= r < max(y)), the row and the crossing's x."""
    x0, y0 = ring_px[:, 0], ring_px[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    lo = np.clip(np.ceil(np.minimum(y0, y1)), 0, rows).astype(np.int64)
    hi = np.clip(np.ceil(np.maximum(y0, y1)), 0, rows).astype(np.int64)
    n = hi - lo  # 0 for horizontal edges and edges outside the mask
    edge = np.repeat(np.arange(len(n)), n)
    starts = np.repeat(np.cumsum(n) - n, n)
    row = np.repeat(lo, n) + (np.arange(len(edge)) - starts)
    t = (row - y0[edge]) / (y1[edge] - y0[edge])
    return row, x0[edge] + t * (x1[edge] - x0[edge])


def _rasterise(path: Path, polys: list[list[np.ndarray]], shape: tuple[int, int], level0_per_px: float) -> np.ndarray:
    """Union of the polygons: a pixel is tissue when its centre is inside a polygon (even-odd rule over the
    polygon's rings, so holes are honoured). Scanline fill: the work follows the outline, not its area x
    its vertex count (point-in-polygon over a 20k-vertex QuPath outline took minutes)."""
    h, w = shape
    mask = np.zeros(shape, dtype=bool)
    budget = MAX_CROSSINGS
    for rings in polys:
        parts = [_ring_crossings(ring / level0_per_px - 0.5, h) for ring in rings]
        row = np.concatenate([p[0] for p in parts])
        if len(row) == 0:
            continue
        budget -= len(row)
        if budget < 0:
            raise DataFormatError(
                f"{path}: the polygons are too complex to rasterise (over {MAX_CROSSINGS} scanline crossings); "
                "simplify them (e.g. QuPath: Simplify shape)"
            )
        x = np.concatenate([p[1] for p in parts])
        r0, r1 = int(row.min()), int(row.max()) + 1
        # a crossing at x toggles every pixel whose centre c > x; the parity of the toggles is inside/outside
        col = np.clip(np.floor(x) + 1, 0, w).astype(np.int64)
        toggles = np.zeros((r1 - r0, w + 1), dtype=np.uint8)
        np.add.at(toggles, (row - r0, col), 1)
        mask[r0:r1] |= (np.cumsum(toggles, axis=1, dtype=np.uint8)[:, :w] & 1).astype(bool)
    return mask


def _geojson_mask(path: Path, slide: Slide, shape: tuple[int, int], level0_per_px: float) -> np.ndarray:
    if path.stat().st_size > MAX_GEOJSON_BYTES:
        raise DataFormatError(
            f"{path}: {path.stat().st_size / 2**20:.0f} MB of GeoJSON, beyond the {MAX_GEOJSON_BYTES // 2**20} MB "
            "limit for a tissue mask; simplify the polygons"
        )
    try:
        obj = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise DataFormatError(
            f"{path}: not valid GeoJSON ({_one_line(exc)}); export the annotation as GeoJSON"
        ) from exc
    polys: list[list[np.ndarray]] = []
    other: set[str] = set()
    _collect(obj, path, "", polys, other, 0)
    if not polys:
        found = f" (found only {', '.join(sorted(other))})" if other else ""
        raise DataFormatError(
            f"{path}: no Polygon/MultiPolygon geometry{found}; export the tissue areas as polygons in level-0 px"
        )
    width, height = slide.dimensions
    boxes = np.array([[s[:, 0].min(), s[:, 1].min(), s[:, 0].max(), s[:, 1].max()] for s in (p[0] for p in polys)])
    inside = (boxes[:, 2] > 0) & (boxes[:, 0] < width) & (boxes[:, 3] > 0) & (boxes[:, 1] < height)
    if not inside.any():
        x0, y0 = boxes[:, :2].min(0)
        x1, y1 = boxes[:, 2:].max(0)
        raise UsageError(
            f"{path}: the mask's polygons lie outside the slide: they span x {x0:.6g}..{x1:.6g}, y {y0:.6g}..{y1:.6g} "
            f"but {slide.path.name} is {width}x{height} level-0 px; give coordinates in level-0 pixels of this slide "
            "(not another level's pixels, a thumbnail's, or µm)"
        )
    return _rasterise(path, polys, shape, level0_per_px)


def _check_mask_size(path: Path, w: int, h: int) -> None:
    if w <= 0 or h <= 0:
        raise DataFormatError(f"{path}: the mask image header says {w}x{h} px; the file is corrupt")
    if w * h > MAX_MASK_IMAGE_PIXELS:
        raise DataFormatError(
            f"{path}: the mask image header says {w}x{h} px, beyond the {MAX_MASK_IMAGE_PIXELS} px limit for a "
            "mask; give a smaller mask image at the slide's aspect ratio, or GeoJSON polygons in level-0 px"
        )


def _decode_tiff_mask(path: Path) -> tuple[np.ndarray, int, int]:
    import tifffile

    with tifffile.TiffFile(path) as tf:
        page = tf.pages.first
        w, h = int(page.imagewidth), int(page.imagelength)
        _check_mask_size(path, w, h)
        return np.asarray(page.asarray()), w, h


def _decode_png_jpeg_mask(path: Path) -> tuple[np.ndarray, int, int]:
    import imagecodecs

    from .slide import _image_size

    try:
        w, h = _image_size(path)
    except SlideFormatError as exc:
        raise DataFormatError(
            f"{path}: not a PNG, JPEG or TIFF image (unrecognised or truncated header); give a mask image "
            "or GeoJSON polygons in level-0 px"
        ) from exc
    _check_mask_size(path, w, h)
    with open(path, "rb") as fh:  # the header said which codec; decode with that one only
        png = fh.read(4) == b"\x89PNG"
    return np.asarray(imagecodecs.imread(str(path), codec="png" if png else "jpeg8")), w, h


def _read_mask_image(path: Path) -> np.ndarray:
    """Decode a PNG/JPEG/TIFF mask after checking its size from the header (never allocate a claimed size)."""
    decode = _decode_tiff_mask if path.suffix.lower() in {".tif", ".tiff"} else _decode_png_jpeg_mask
    try:
        img, w, h = decode(path)
    except DataFormatError:
        raise
    except Exception as exc:
        raise DataFormatError(
            f"{path}: cannot read the mask image ({type(exc).__name__}: {_one_line(exc)}); give a PNG/TIFF mask "
            "or GeoJSON polygons in level-0 px"
        ) from exc
    if img.ndim not in (2, 3) or img.shape[:2] != (h, w) or (img.ndim == 3 and not 1 <= img.shape[2] <= 4):
        raise DataFormatError(
            f"{path}: the mask image decodes to shape {img.shape}, expected {h}x{w} with 1-4 channels; the file is "
            "corrupt or not a single image"
        )
    if img.ndim == 3:  # tissue where any colour channel is non-zero (alpha and grey+alpha's alpha ignored)
        img = np.asarray((img[..., : 1 if img.shape[2] <= 2 else 3] > 0).any(axis=2))
    return np.asarray(img > 0)


def _image_mask(path: Path, slide: Slide, shape: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    tissue = _read_mask_image(path)
    h, w = tissue.shape
    width, height = slide.dimensions
    if abs((w / h) / (width / height) - 1.0) > MASK_ASPECT_TOLERANCE:
        k = max(width, height) / max(w, h)
        raise UsageError(
            f"{path}: the mask image is {w}x{h} px (aspect {w / h:.3f}) but {slide.path.name} is {width}x{height} "
            f"level-0 px (aspect {width / height:.3f}); a mask image covers the whole slide, so give one at the "
            f"slide's aspect ratio (e.g. {round(width / k)}x{round(height / k)} px) or GeoJSON polygons in level-0 px"
        )
    if not tissue.any():
        raise NoTissueError(f"{path}: the mask image has no non-zero (tissue) pixel; mark tissue with non-zero values")
    resized = Image.fromarray(tissue.view(np.uint8)).resize(shape[::-1], Image.Resampling.NEAREST)
    return np.asarray(resized) > 0


def load_tissue_mask(path: str | Path, slide: Slide, *, mpp: float | None = None) -> TissueMask:
    """Rasterise a GeoJSON (level-0 px polygons, holes honoured) or read a PNG/JPEG/TIFF mask image.

    An image mask covers the whole slide, so its aspect ratio must be the slide's (within 2%); it is resampled
    to the tissue grid, non-zero = tissue. Malformed files raise :class:`DataFormatError`, polygons outside the
    slide or a mask of another aspect ratio :class:`UsageError`, a mask without tissue :class:`NoTissueError`.
    """
    path = Path(path)
    if not path.exists():
        raise InputNotFoundError(f"{path}: tissue mask file not found; check --tissue-mask")
    if not path.is_file():
        raise DataFormatError(f"{path}: is a folder, not a mask file; give GeoJSON polygons (level-0 px) or a PNG mask")
    if mpp is not None and not (math.isfinite(mpp) and mpp > 0):
        raise UsageError(f"the tissue mask resolution must be a positive number of µm/px, got {mpp}")
    mpp = effective_tissue_mpp(slide, mpp)
    shape = slide.thumbnail_shape(mpp)
    level0_per_px = slide.dimensions[0] / shape[1]
    mpp = level0_per_px * slide.mpp.x
    if path.suffix.lower() in _GEOJSON_SUFFIXES:
        mask = _geojson_mask(path, slide, shape, level0_per_px)
        source = f"geojson:{path.name}"
    else:
        mask = _image_mask(path, slide, shape)
        source = f"image:{path.name}"
    if not mask.any():
        raise NoTissueError(
            f"{path}: the mask covers no pixel of the slide's tissue grid ({shape[1]}x{shape[0]} px at {mpp:.1f} "
            "µm/px); mark larger tissue areas"
        )
    return TissueMask(mask, mpp, level0_per_px, source)
