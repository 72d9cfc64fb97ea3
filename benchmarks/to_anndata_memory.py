"""Peak memory of `to-anndata` against cube size (it streams the cube band by band).

Writes synthetic cubes (N x N lattice cells x G genes, float16, a disc of tissue over ~60% of the
area, smooth values) once under /tmp, converts each in a fresh process, and prints peak RSS next to
the size the cube would take in memory as float32 — the baseline a load-everything conversion needs.

    python benchmarks/to_anndata_memory.py [--sizes 500,2000] [--genes 1000] [--bin-cells 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def make_cube(path: Path, n: int, genes: int, slide: Path) -> Path:
    from wsi_histosge import config
    from wsi_histosge.store import ATTR_KEY, CubeStore

    if (path / "zarr.json").is_file() and "completed" in json.loads((path / "zarr.json").read_text())["attributes"]:
        return path
    yy, xx = np.mgrid[0:n, 0:n]
    tissue = ((yy - n / 2) ** 2 + (xx - n / 2) ** 2) < (0.44 * n) ** 2
    attrs = {
        ATTR_KEY: {
            "slide": {"path": str(slide), "dimensions": [2220, 2967], "fingerprint": "synthetic"},
            "mpp": {"x": 0.499, "y": 0.499, "source": "synthetic"},
        },
        "genes": [f"GENE{i}" for i in range(genes)],
        "units": "log1p(counts per 10k)",
        "stride_um": 27.5,
        "spot_um": 55.0,
        "context_um": 112.0,
        "origin_um": [13.75, 13.75],
        "affine_level0": [[27.5 / 0.499, 0, 13.75 / 0.499], [0, 27.5 / 0.499, 13.75 / 0.499], [0, 0, 1]],
    }
    store, _ = CubeStore.open_for_run(
        path,
        fingerprint="synthetic",
        shape=(genes, n, n),
        attrs=attrs,
        tissue=tissue,
        tissue_fraction=tissue.astype(np.float32),
        overwrite=True,
    )
    c = config.CHUNK_CELLS
    g = np.arange(genes, dtype=np.float32)[:, None, None]
    for cy in range(-(-n // c)):
        for cx in range(-(-n // c)):
            y0, x0 = cy * c, cx * c
            ys = np.arange(y0, min(n, y0 + c), dtype=np.float32)[None, :, None]
            xs = np.arange(x0, min(n, x0 + c), dtype=np.float32)[None, None, :]
            block = 1.0 + np.sin(ys / 50.0 + g / 7.0) * np.cos(xs / 80.0 - g / 11.0)
            block = np.where(tissue[y0 : y0 + c, x0 : x0 + c][None], block, np.nan).astype(np.float16)
            store.write_chunk(cy, cx, block)
    store.mark_complete("synthetic", {"spots": int(tissue.sum())})
    return path


CHILD = """
import resource, sys, time
from wsi_histosge.convert import to_anndata
t0 = time.perf_counter()
to_anndata(sys.argv[1], sys.argv[2], resolution=float(sys.argv[3]), overwrite=True)
print(time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="500,2000")
    ap.add_argument("--genes", type=int, default=1000)
    ap.add_argument("--bin-cells", type=int, default=2, help="bin side in lattice cells (1 = native)")
    ap.add_argument(
        "--slide",
        type=Path,
        default=Path(__file__).resolve().parents[2] / "shared/data/wsi-samples/CMU-1-Small-Region.svs",
    )
    args = ap.parse_args()
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        t0 = time.perf_counter()
        cube = make_cube(Path(f"/tmp/wsi-histosge-bench-cube-{n}-{args.genes}.zarr"), n, args.genes, args.slide)
        made = time.perf_counter() - t0
        out = Path(f"/tmp/wsi-histosge-bench-{n}.h5ad")
        res = subprocess.run(
            [sys.executable, "-c", CHILD, str(cube), str(out), str(27.5 * args.bin_cells)],
            capture_output=True,
            text=True,
            check=True,
        )
        secs, rss_kb = res.stdout.split()
        cube_gb = n * n * args.genes * 4 / 1e9
        rows.append((n, made, float(secs), int(rss_kb) / 1e6, cube_gb, out.stat().st_size / 1e9))
        out.unlink()
    print(
        f"{'cells':>11} {'genes':>6} {'make s':>7} {'convert s':>9} {'peak RSS GB':>11} "
        f"{'cube fp32 GB':>12} {'RSS/cube':>8} {'h5ad GB':>8}"
    )
    for n, made, secs, rss, cube_gb, h5 in rows:
        print(
            f"{n:>5}x{n:<5} {args.genes:>6} {made:>7.1f} {secs:>9.1f} {rss:>11.2f} {cube_gb:>12.1f} "
            f"{rss / cube_gb:>8.3f} {h5:>8.2f}"
        )
    if len(rows) > 1:
        print(
            f"peak RSS ratio largest/smallest cube: {rows[-1][3] / rows[0][3]:.2f} for "
            f"{(rows[-1][0] / rows[0][0]) ** 2:.0f}x the cells"
        )


if __name__ == "__main__":
    main()
