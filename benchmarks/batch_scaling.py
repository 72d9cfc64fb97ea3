"""Cohort scaling: the same N slides with 1 and with 2 dask LocalCluster workers, in one run.

Slides are generated once from real H&E pixels (crops of CMU-1-Small-Region tiled into a JPEG pyramid),
the built-in model predicts at 100 µm stride. Prints wall time per configuration and the speed-up.
On a 2-core machine the encoder already uses both cores, so the point here is that scheduling works
(every slide done, resumable) and what the overhead is; on a multi-GPU node each worker gets a GPU.

    python benchmarks/batch_scaling.py [--slides 4] [--stride-um 100]
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np

from wsi_histosge.cohort import RunConfig, SlideJob, run_batch


def make_slides(folder: Path, n: int) -> list[Path]:
    from synthetic_slides import source_pixels, write_pyramid

    folder.mkdir(parents=True, exist_ok=True)
    pix, mpp = source_pixels()
    paths = [folder / f"slide{i}.tif" for i in range(n)]
    for i, path in enumerate(paths):
        if not path.is_file():  # shifted copies, so the slides differ
            write_pyramid(path, np.roll(pix, shift=(i * 211, i * 157), axis=(0, 1)), mpp, downsamples=(1, 2))
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slides", type=int, default=4)
    ap.add_argument("--stride-um", type=float, default=100.0)
    args = ap.parse_args()
    work = Path("/tmp/wsi-histosge-batch-bench")
    slides = make_slides(work / "slides", args.slides)
    jobs = [SlideJob(str(p), p.stem) for p in slides]
    rows = []
    for workers in (1, 2):
        out = work / f"out-{workers}"
        shutil.rmtree(out, ignore_errors=True)
        cfg = RunConfig(out=str(out), options={"stride_um": args.stride_um, "num_workers": 0})
        t0 = time.perf_counter()
        summary = run_batch(jobs, cfg, workers=workers)
        secs = time.perf_counter() - t0
        spots = sum(int(r.get("spots") or 0) for r in summary.rows)
        rows.append((workers, secs, summary.counts, spots))
    print(f"{'workers':>7} {'seconds':>8} {'spots/s':>8}  status")
    for workers, secs, counts, spots in rows:
        print(f"{workers:>7} {secs:>8.1f} {spots / secs:>8.1f}  {counts}")
    print(f"speed-up 2 workers vs 1: {rows[0][1] / rows[1][1]:.2f}x ({args.slides} slides, same run)")


if __name__ == "__main__":
    main()
