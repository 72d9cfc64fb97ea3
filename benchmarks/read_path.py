"""Read-path benchmark on this CPU: the block loader vs bare tile decode vs per-spot reads.

    python benchmarks/read_path.py --generate 20000            # a 20000 px slide of real H&E, 3 rounds
    python benchmarks/read_path.py [--slide PATH] [--rounds 5] [--stride-um 27.5] [--context-um 112]

Measured in one run on the same slide, for each decode thread count T (1, and the library's default
``config.DECODE_THREADS`` when that is more), so both sides of a ratio decode on the same number of threads:

* bare decode: every JPEG tile of level 0 decoded once (tifffile + imagecodecs, ``maxworkers=T``);
* loader: the super-tile BlockDataset streaming the whole slide (tissue = everything) at the chosen
  stride and context, no encoder, its tiles decoded on T threads per reader process (``--workers`` reader
  processes; 0: in this process);
* per-spot: one tiffslide ``read_region`` of the context patch per spot (what patch-per-spot tools do), on
  the main thread (tiffslide decodes the few tiles of one patch as it does); compared with the loader on one
  decode thread, the conservative side for the loader.

Sides run interleaved, round by round; each prints min and median seconds. Ratios are of medians: at equal
threads, loader / bare decode (slide area per second; the design targets >= 0.8) and loader / per-spot
(spots per second; expected near the overlap factor (context / stride)^2). The load average is printed at
the start and the end, with a warning when the machine is loaded.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from rounds import interleave, load_line, min_median
from synthetic_slides import source_path

from wsi_histosge import config
from wsi_histosge.grid import make_grid
from wsi_histosge.loader import BlockDataset, block_loader
from wsi_histosge.slide import open_slide
from wsi_histosge.tissue import TissueMask

#: CMU-1-Small-Region.svs from the data folder beside the project, else the packaged crop of it
DEFAULT_SLIDE = source_path()


def bare_decode(path: Path, threads: int = 1) -> tuple[float, int, int]:
    """Seconds to decode every level-0 tile once on ``threads`` threads; tile count; decoded pixels."""
    import tifffile

    with tifffile.TiffFile(path) as tf:
        page = tf.pages[0]
        t0 = time.perf_counter()
        n, px = 0, 0
        for data, _index, shape in page.segments(lock=None, maxworkers=threads):
            if data is not None:  # segments() yields decoded tiles
                px += int(np.prod(shape[1:3]))
                n += 1
        return time.perf_counter() - t0, n, px


def run_loader(
    slide_path: Path,
    stride_um: float,
    context_um: float,
    halo: int,
    workers: int,
    block_cells: int | None = None,
    threads: int | None = None,
) -> tuple[float, int, int]:
    """Seconds to stream the whole slide, spots, pixels read; ``threads``: decode threads per reader process."""
    if threads is not None:
        # Read when a super-tile is decoded, in this process and in forked DataLoader workers alike.
        config.DECODE_THREADS = threads
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
    ap.add_argument("--rounds", "--repeat", dest="rounds", type=int, default=3, help="interleaved rounds")
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
    print(load_line("start"), flush=True)
    default_threads = config.DECODE_THREADS
    thread_counts = sorted({1, default_threads})
    print(
        f"slide {args.slide.name}: {slide.dimensions[0]}x{slide.dimensions[1]} px, mpp {slide.mpp.x}, "
        f"stride {args.stride_um} µm, context {args.context_um} µm, halo {args.halo}, reader processes "
        f"{args.workers or 'none (this process)'}, blocks of {args.block_cells} cells; decode threads "
        f"{' and '.join(map(str, thread_counts))} (library default {default_threads}); {args.rounds} rounds",
        flush=True,
    )
    facts: dict[str, tuple[int, int]] = {}  # per side: (count, pixels) of its last run

    def bare_side(threads: int) -> Callable[[], float]:
        def run() -> float:
            secs, n_tiles, px = bare_decode(args.slide, threads)
            facts[f"bare{threads}"] = (n_tiles, px)
            return secs

        return run

    def loader_side(threads: int) -> Callable[[], float]:
        def run() -> float:
            secs, n_spots, px = run_loader(
                args.slide, args.stride_um, args.context_um, args.halo, args.workers, args.block_cells, threads
            )
            facts[f"loader{threads}"] = (n_spots, px)
            return secs

        return run

    def per_spot_side() -> float:
        secs, n = per_spot(args.slide, args.stride_um, args.context_um, args.per_spot_limit)
        facts["per-spot"] = (n, 0)
        return secs

    label: dict[str, str] = {}
    sides: dict[str, Callable[[], float]] = {}
    for t in thread_counts:
        label[f"bare{t}"] = f"bare decode, {t} thread{'s' * (t > 1)}"
        label[f"loader{t}"] = f"loader, {t} decode thread{'s' * (t > 1)}"
        sides[label[f"bare{t}"]] = bare_side(t)
        sides[label[f"loader{t}"]] = loader_side(t)
    label["per-spot"] = "per-spot read_region (tiffslide)"
    sides[label["per-spot"]] = per_spot_side
    try:
        seconds = interleave(sides, args.rounds)
    finally:
        config.DECODE_THREADS = default_threads

    area = slide.dimensions[0] * slide.dimensions[1]
    ps_n = facts["per-spot"][0]
    print(f"\n{'side':<34} {'min s':>8} {'median s':>9}  rate (median)")
    med: dict[str, float] = {}
    for key, name in label.items():
        lo, med[key] = min_median(seconds[name])
        if key.startswith("bare"):
            n_tiles, px = facts[key]
            rate = f"{px / med[key] / 1e6:.1f} Mpx/s ({n_tiles} tiles)"
        elif key.startswith("loader"):
            n_spots, px = facts[key]
            rate = (
                f"{area / med[key] / 1e6:.1f} slide-Mpx/s, {n_spots / med[key]:.0f} spots/s "
                f"({n_spots} spots, read {px / 1e6:.1f} Mpx)"
            )
        else:
            rate = f"{ps_n / med[key]:.0f} spots/s ({ps_n} spots)"
        print(f"{name:<34} {lo:>8.3f} {med[key]:>9.3f}  {rate}")

    overlap = (args.context_um / args.stride_um) ** 2
    n_spots = facts["loader1"][0]
    for t in thread_counts:
        print(
            f"loader / bare decode, {t} thread{'s' * (t > 1)} each (slide area per second, medians): "
            f"{med[f'bare{t}'] / med[f'loader{t}']:.2f}  (target >= 0.80)"
        )
    print(
        f"loader with 1 decode thread / per-spot (spots per second, medians): "
        f"{(n_spots / med['loader1']) / (ps_n / med['per-spot']):.1f}  "
        f"(overlap factor (context/stride)^2 = {overlap:.1f})"
    )
    print(load_line("end"))


if __name__ == "__main__":
    main()
