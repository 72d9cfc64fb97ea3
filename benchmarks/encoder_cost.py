"""What the two-scale default encoder costs: features of the same spots with ``efficientnet-lite0-ms`` (the
built-in model's encoder: a 224 µm read at 0.5 µm/px, two trunk passes) against ``efficientnet-lite0`` (112 µm,
one pass), each through the loader that ``train`` and ``evaluate`` use (``loader.encode_points``: super-tile
read, patch cut and resize, normalisation, encoder), interleaved A/B rounds in one process, min and median.

The spots are the tissue cells of a stride-50 µm lattice on CMU-1-Small-Region (``../shared/data``) when it is
there, else on the packaged crop of it. Encoding is ~95% of a CPU ``infer``, so the ratio is close to what a
run of the built-in model costs against the previous one-scale model.

    python benchmarks/encoder_cost.py [--rounds 3] [--slide PATH] [--max-spots 400]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rounds import cores, interleave, load_line, min_median

from wsi_histosge.encoders import create_encoder
from wsi_histosge.grid import make_grid
from wsi_histosge.loader import encode_points
from wsi_histosge.slide import open_slide
from wsi_histosge.tissue import detect_tissue

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data" / "wsi-samples" / "CMU-1-Small-Region.svs"
PACKAGED = ROOT / "wsi_histosge" / "samples" / "cmu1-skin-crop.tif"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--slide", type=Path, default=None)
    ap.add_argument("--max-spots", type=int, default=400)
    args = ap.parse_args()
    path = args.slide or (SHARED if SHARED.is_file() else PACKAGED)
    slide = open_slide(path)
    grid = make_grid(slide, detect_tissue(slide), stride_um=50.0, spot_um=100.0, context_um=112.0)
    iy, ix = np.nonzero(grid.keep)
    centres = grid.centres_level0(iy, ix)[: args.max_spots]
    print(f"{path.name}: {len(centres)} tissue spots, stride 50 µm; torch threads {torch.get_num_threads()}")
    print(load_line("start"))
    encoders = {name: create_encoder(name) for name in ("efficientnet-lite0", "efficientnet-lite0-ms")}
    feats: dict[str, np.ndarray] = {}

    def side(name: str):
        def run() -> float:
            enc = encoders[name]
            start = time.perf_counter()
            with torch.inference_mode():
                feats[name] = encode_points(slide, centres, enc, context_um=enc.cfg.context_um)
            return time.perf_counter() - start

        return run

    seconds = interleave({f"{n} ({e.cfg.context_um:g} µm)": side(n) for n, e in encoders.items()}, args.rounds)
    print(load_line("end"))
    (a, sa), (b, sb) = seconds.items()
    amin, amed = min_median(sa)
    bmin, bmed = min_median(sb)
    print("\n| encoder | spots/s (median) | seconds min | seconds median | features |")
    print("|---|---|---|---|---|")
    for name, lo, med, enc in ((a, amin, amed, "efficientnet-lite0"), (b, bmin, bmed, "efficientnet-lite0-ms")):
        print(f"| {name} | {len(centres) / med:.1f} | {lo:.2f} | {med:.2f} | {feats[enc].shape[1]} |")
    print(f"\ntwo-scale / one-scale time: {bmed / amed:.2f}x (median), {bmin / amin:.2f}x (min); {cores()} cores")


if __name__ == "__main__":
    main()
