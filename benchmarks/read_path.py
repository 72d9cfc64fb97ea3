"""Read-path benchmark on this CPU: the block loader vs bare tile decode vs per-spot reads.

Measured in one run on the same slide:

* bare decode: every JPEG tile of level 0 decoded once (tifffile + imagecodecs, one thread);
* loader: the super-tile BlockDataset streaming the whole slide (tissue = everything) at the chosen
  stride and context, one process, no encoder;
* per-spot: one ``read_region`` of the context patch per spot (what patch-per-spot tools do).

Prints decode throughput in level-0 Mpx/s and spots/s, and the ratios the design targets:
loader / bare decode >= 0.8, and loader / per-spot >= the overlap factor (context / stride)^2.

    python benchmarks/read_path.py [--slide PATH] [--stride-um 27.5] [--context-um 112]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from wsi_histosge.grid import make_grid
from wsi_histosge.loader import BlockDataset, block_loader
from wsi_histosge.slide import open_slide
from wsi_histosge.tissue import TissueMask

DEFAULT_SLIDE = Path(__file__).resolve().parents[2] / "shared" / "data" / "wsi-samples" / "CMU-1-Small-Region.svs"


def bare_decode(path: Path) -> tuple[float, int, int]:
    """Seconds to decode every level-0 tile once; tile count; decoded pixels."""
    import tifffile

    with tifffile.TiffFile(path) as tf:
        page = tf.pages[0]
        t0 = time.perf_counter()
        n, px = 0, 0
        for data, _index, shape in page.segments(lock=None, maxworkers=1):
            if data is not None:  # segments() yields decoded tiles
                px += int(np.prod(shape[1:3]))
                n += 1
        return time.perf_counter() - t0, n, px


def run_loader(
    slide_path: Path, stride_um: float, context_um: float, halo: int, workers: int, block_cells: int | None = None
) -> tuple[float, int, int]:
    slide = open_slide(slide_path)
    th, tw = slide.thumbnail_shape(8.0)
    everything = TissueMask(np.ones((th, tw), bool), 8.0, slide.dimensions[0] / tw, "all")
    grid = make_grid(
        slide, everything, stride_um=stride_um, spot_um=stride_um, context_um=context_um, block_cells=block_cells
    ).with_halo(halo)
    blocks = list(grid.blocks())
    ds = BlockDataset(slide, grid, blocks, slide.best_level_for_mpp(0.5))
    t0 = time.perf_counter()
    px = 0
    for item in block_loader(ds, num_workers=workers):
        px += item.tile.shape[0] * item.tile.shape[1]
    return time.perf_counter() - t0, grid.n_spots, px


def per_spot(slide_path: Path, stride_um: float, context_um: float, limit: int) -> tuple[float, int]:
    """Per-spot reads the way patch-per-spot tools do them: tiffslide's read_region, one patch each."""
    import tiffslide

    slide = tiffslide.TiffSlide(slide_path)
    w, h = slide.dimensions
    mpp = float(slide.properties["tiffslide.mpp-x"])
    step = stride_um / mpp
    size = round(context_um / mpp)
    xs = np.arange(step / 2, w, step)
    ys = np.arange(step / 2, h, step)
    pts = [(x, y) for y in ys for x in xs][:limit]
    t0 = time.perf_counter()
    for x, y in pts:
        slide.read_region((int(x - size / 2), int(y - size / 2)), 0, (size, size), as_array=True)
    return time.perf_counter() - t0, len(pts)


def generate_slide(path: Path, size_px: int, source: Path) -> Path:
    """A JPEG-tiled (240 px, quality 85) pyramidal TIFF of ``size_px`` square, tiled from real H&E pixels."""
    from synthetic_slides import source_pixels, tiled, write_pyramid

    if path.is_file():
        return path
    pix, mpp = source_pixels()
    return write_pyramid(path, tiled(pix, size_px), mpp, downsamples=(1, 2, 4))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slide", type=Path, default=DEFAULT_SLIDE)
    ap.add_argument("--stride-um", type=float, default=27.5)
    ap.add_argument("--context-um", type=float, default=112.0)
    ap.add_argument("--halo", type=int, default=0, help="halo cells read around each block (model dependent)")
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--block-cells", type=int, default=None, help="cells per block side (default: as infer sizes it)")
    ap.add_argument("--per-spot-limit", type=int, default=600)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--generate", type=int, default=0, help="benchmark a generated N px square slide instead")
    args = ap.parse_args()
    if args.generate:
        args.slide = generate_slide(Path(f"/tmp/wsi-histosge-bench-{args.generate}.tif"), args.generate, args.slide)

    slide = open_slide(args.slide)
    if args.block_cells is None:
        from wsi_histosge.grid import block_cells_for

        args.block_cells = block_cells_for(
            args.stride_um, slide.mpp.x, args.halo * args.stride_um + args.context_um / 2
        )
    print(
        f"slide {args.slide.name}: {slide.dimensions[0]}x{slide.dimensions[1]} px, mpp {slide.mpp.x}, "
        f"stride {args.stride_um} µm, context {args.context_um} µm, halo {args.halo}, workers {args.workers}, "
        f"blocks of {args.block_cells or 'auto'} cells"
    )
    bare = min(bare_decode(args.slide)[0] for _ in range(args.repeat))
    _, n_tiles, bare_px = bare_decode(args.slide)
    loader_runs = [
        run_loader(args.slide, args.stride_um, args.context_um, args.halo, args.workers, args.block_cells)
        for _ in range(args.repeat)
    ]
    loader_t = min(r[0] for r in loader_runs)
    n_spots, loader_px = loader_runs[0][1], loader_runs[0][2]
    ps_t, ps_n = min(
        (per_spot(args.slide, args.stride_um, args.context_um, args.per_spot_limit) for _ in range(args.repeat)),
        key=lambda r: r[0],
    )

    bare_rate = bare_px / bare / 1e6
    loader_rate_px = (slide.dimensions[0] * slide.dimensions[1]) / loader_t / 1e6  # slide area streamed per s
    loader_spots = n_spots / loader_t
    ps_spots = ps_n / ps_t
    overlap = (args.context_um / args.stride_um) ** 2
    rows = [
        ("bare decode (all level-0 tiles)", f"{bare:.3f} s", f"{bare_rate:.1f} Mpx/s", f"{n_tiles} tiles"),
        (
            "loader (super-tiles, whole slide)",
            f"{loader_t:.3f} s",
            f"{loader_rate_px:.1f} slide-Mpx/s",
            f"{loader_spots:.0f} spots/s ({n_spots} spots, read {loader_px / 1e6:.1f} Mpx)",
        ),
        ("per-spot read_region", f"{ps_t:.3f} s", "", f"{ps_spots:.0f} spots/s ({ps_n} spots)"),
    ]
    width = max(len(r[0]) for r in rows)
    for r in rows:
        print(f"{r[0]:<{width}}  {r[1]:>10}  {r[2]:>18}  {r[3]}")
    print(f"ratio loader / bare decode (slide area per second): {bare / loader_t:.2f}  (target >= 0.80)")
    print(
        f"ratio loader / per-spot (spots per second):         {loader_spots / ps_spots:.1f}  "
        f"(overlap factor (context/stride)^2 = {overlap:.1f})"
    )


if __name__ == "__main__":
    main()
