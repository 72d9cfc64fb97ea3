"""JPEG 2000 vs JPEG tiles: decode cost on the CPU, and what more reader processes buy.

Writes the same real H&E pixels (CMU-1-Small-Region, tiled to N x N px) twice as tiled TIFFs, JPEG and
JPEG 2000 (the Aperio 33003-style codec TCGA slides use), then measures in one run:
bare decode of every tile (one thread), and the super-tile loader streaming the whole slide with
0, 1, ... worker processes. Prints Mpx/s and ratios.

    python benchmarks/jpeg2000.py [--size 6000] [--workers 0,1,2]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import tifffile

from wsi_histosge.grid import make_grid
from wsi_histosge.loader import BlockDataset, block_loader
from wsi_histosge.slide import open_slide
from wsi_histosge.tissue import TissueMask


def make(path: Path, n: int, codec: str) -> Path:
    from synthetic_slides import source_pixels, tiled, write_pyramid

    if path.is_file():
        return path
    pix, mpp = source_pixels()
    return write_pyramid(path, tiled(pix, n), mpp, codec=codec, level=85 if codec == "jpeg" else 40)


def bare(path: Path) -> tuple[float, float]:
    with tifffile.TiffFile(path) as tf:
        page = tf.pages[0]
        t0 = time.perf_counter()
        px = sum(int(np.prod(shape[1:3])) for data, _i, shape in page.segments(maxworkers=1) if data is not None)
        return time.perf_counter() - t0, px


def loader(path: Path, workers: int) -> float:
    slide = open_slide(path)
    th, tw = slide.thumbnail_shape(8.0)
    mask = TissueMask(np.ones((th, tw), bool), 8.0, slide.dimensions[0] / tw, "all")
    grid = make_grid(slide, mask, stride_um=27.5, spot_um=27.5, context_um=112.0)
    ds = BlockDataset(slide, grid, list(grid.blocks()), 0)
    t0 = time.perf_counter()
    for _ in block_loader(ds, num_workers=workers):
        pass
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=6000)
    ap.add_argument("--workers", default="0,1,2")
    args = ap.parse_args()
    rows = []
    for codec in ("jpeg", "jpeg2000"):
        path = make(Path(f"/tmp/wsi-histosge-{codec}-{args.size}.tif"), args.size, codec)
        secs, px = bare(path)
        loads = {w: loader(path, w) for w in (int(x) for x in args.workers.split(","))}
        rows.append((codec, secs, px, loads))
    area = args.size * args.size / 1e6
    print(f"{'codec':<9} {'bare decode Mpx/s':>17}  " + "  ".join(f"loader w={w} Mpx/s" for w in rows[0][3]))
    for codec, secs, px, loads in rows:
        print(f"{codec:<9} {px / secs / 1e6:>17.1f}  " + "  ".join(f"{area / t:>16.1f}" for t in loads.values()))
    j, k = rows[0], rows[1]
    print(f"JPEG 2000 / JPEG decode time: {k[1] / j[1]:.1f}x slower")
    for w, t in k[3].items():
        print(
            f"JPEG 2000 loader, {w} worker process(es): {area / t / (k[2] / k[1] / 1e6):.2f}x the single-thread "
            "bare decode rate (tiles of a super-tile decode on threads)"
        )


if __name__ == "__main__":
    main()
