"""Slides for the benchmarks, written once from real H&E pixels (CMU-1-Small-Region.svs).

Two writers: ``write_pyramid`` encodes whole arrays (any codec tifffile has), ``write_repeated_jpeg`` writes
pre-encoded JPEG tiles repeated over any size in seconds (gigapixel slides for memory and GPU checks).
Both write to a temporary name and rename, so an interrupted run never leaves a half slide behind.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tifffile

SOURCE_CANDIDATES = [
    Path(__file__).resolve().parents[2] / "shared" / "data" / "wsi-samples" / "CMU-1-Small-Region.svs",
    Path("shared/data/wsi-samples/CMU-1-Small-Region.svs"),  # on the device machine, shared/ is in the tree
    # without the data folder: the packaged crop of the same slide (1280 x 1536 px of the same pixels)
    Path(__file__).resolve().parents[1] / "wsi_histosge" / "samples" / "cmu1-skin-crop.tif",
]


def source_path() -> Path:
    """The first sample slide found (``SOURCE_CANDIDATES``)."""
    return next(p for p in SOURCE_CANDIDATES if p.is_file())


def source_pixels() -> tuple[np.ndarray, float]:
    """Level-0 RGB pixels of the sample slide (CMU-1-Small-Region, or the packaged crop of it) and its µm/px."""
    from wsi_histosge.slide import open_slide

    path = source_path()
    print(f"synthetic slides tiled from {path}", flush=True)
    slide = open_slide(path)
    return slide.read_region((0, 0), 0, slide.dimensions), slide.mpp.x


def tiled(pix: np.ndarray, size_px: int) -> np.ndarray:
    """``pix`` repeated to a ``size_px`` square."""
    return np.tile(pix, (-(-size_px // pix.shape[0]), -(-size_px // pix.shape[1]), 1))[:size_px, :size_px]


def write_pyramid(
    path: Path,
    img: np.ndarray,
    mpp: float,
    *,
    downsamples: Sequence[int] = (1,),
    codec: str = "jpeg",
    level: int = 85,
    tile: int = 240,
) -> Path:
    tmp = path.with_suffix(".partial.tif")
    with tifffile.TiffWriter(tmp, bigtiff=True) as tw:
        for i, ds in enumerate(downsamples):
            res = 1e4 / (mpp * ds)
            tw.write(
                img[::ds, ::ds],
                tile=(tile, tile),
                compression=codec,
                compressionargs={"level": level},
                photometric="rgb",
                subfiletype=int(i > 0),
                resolution=(res, res),
                resolutionunit="CENTIMETER",
            )
    tmp.replace(path)
    return path


def write_repeated_jpeg(
    path: Path, size_px: int, pix: np.ndarray, mpp: float, *, downsamples: Sequence[int] = (1,), tile: int = 256
) -> Path:
    """A gigapixel JPEG-tiled pyramid from a few pre-encoded tiles: level 0 repeats a square pattern of real
    pixels by position, and each level holds that pattern area-averaged by its downsample, so every level
    shows what level 0 shows there (the readers check this and skip levels that do not)."""
    import imagecodecs

    top = max(downsamples)
    period = 4 * tile * top  # level-0 px; a whole number of tiles at every level
    base = tiled(pix, period).astype(np.float32)
    tmp = path.with_suffix(".partial.tif")
    with tifffile.TiffWriter(tmp, bigtiff=True) as tw:
        for i, ds in enumerate(downsamples):
            side_pattern = period // ds
            img = base.reshape(side_pattern, ds, side_pattern, ds, 3).mean(axis=(1, 3)).round().astype(np.uint8)
            n = side_pattern // tile
            tiles = [
                imagecodecs.jpeg8_encode(np.ascontiguousarray(img[y : y + tile, x : x + tile]), level=85)
                for y in range(0, side_pattern, tile)
                for x in range(0, side_pattern, tile)
            ]
            side = -(-size_px // ds)
            per_row = -(-side // tile)
            res = 1e4 / (mpp * ds)
            tw.write(
                (tiles[(ty % n) * n + (tx % n)] for ty in range(per_row) for tx in range(per_row)),
                shape=(side, side, 3),
                dtype="uint8",
                tile=(tile, tile),
                compression="jpeg",
                photometric="rgb",
                subfiletype=int(i > 0),
                resolution=(res, res),
                resolutionunit="CENTIMETER",
            )
    tmp.replace(path)
    return path
