"""Peak memory of `wsi-histosge infer` against slide size (it should not grow with the slide).

Generates JPEG-tiled pyramidal TIFFs of N x N px (20k, 50k, 100k by default) from pre-encoded tiles of real
H&E (CMU-1-Small-Region), written once under /tmp, then runs the full `infer` pipeline (tissue detection,
lattice, super-tile loader, encoder, head, Zarr writer) in a fresh process per slide and reports its peak RSS.
To finish in minutes on a CPU, it uses the tiny test encoder with a HisToSGE head of 1000 genes (the cost that
scales with slide size — pixels, spots, the cube — is the same as with a real encoder; the encoder's own
memory is constant per batch). Compare rows: peak RSS should stay flat while slide area grows 25x.

    python benchmarks/memory_scaling.py [--sizes 20000,50000,100000] [--stride-um 100]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

WORK = Path("/tmp/wsi-histosge-membench")


def make_slide(n: int) -> Path:
    from synthetic_slides import source_pixels, write_repeated_jpeg

    path = WORK / f"slide-{n}.tif"
    if path.is_file():
        return path
    WORK.mkdir(parents=True, exist_ok=True)
    pix, mpp = source_pixels()
    return write_repeated_jpeg(path, n, pix, mpp, downsamples=(1, 4, 16))


def make_model(n_genes: int) -> Path:
    import torch

    from wsi_histosge.encoders import create_encoder
    from wsi_histosge.model import HeadConfig, HisToSGEHead, Model, ModelMeta, save_model

    path = WORK / f"tiny-model-{n_genes}"
    if (path / "model.json").is_file():
        return path
    torch.manual_seed(0)
    enc = create_encoder("tiny-test")
    cfg = HeadConfig(in_dim=enc.cfg.embed_dim, n_genes=n_genes, dim=32, hidden=64, dropout=0.0)
    pitch = 200.0
    meta = ModelMeta(
        genes=[f"G{i}" for i in range(n_genes)],
        head=cfg.__dict__.copy(),
        encoder="tiny-test",
        encoder_weights_sha256=enc.weights_hash,
        spot_um=100.0,
        context_um=enc.cfg.context_um,
        neighbour_offsets_um=[[dx * pitch, dy * pitch] for dx, dy in [(0, 0), (-1, 0), (1, 0), (0, -1), (0, 1)]],
        name="membench",
    )
    save_model(Model(meta, HisToSGEHead(cfg).eval()), path)
    return path


# The child's own peak is its VmHWM: ru_maxrss of a process started by (v)fork + exec keeps the parent's peak
# (Linux records the old address space's high-water mark at exec), and the parent holds the generated slides.
CHILD = """
import json, resource, sys, time
def hwm_kb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
from wsi_histosge.infer import InferOptions, infer_slide
t0 = time.perf_counter()
r = infer_slide(sys.argv[1], sys.argv[2], InferOptions(model=sys.argv[3], stride_um=float(sys.argv[4]),
                num_workers=int(sys.argv[5]), overwrite=True, device="cpu"))
print(json.dumps({"seconds": time.perf_counter() - t0, "spots": r.spots, "tiles": r.tiles,
                  "rss_kb_self": hwm_kb(),
                  "rss_kb_workers": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="20000,50000,100000")
    ap.add_argument("--stride-um", type=float, default=100.0)
    ap.add_argument("--genes", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args()
    model = make_model(args.genes)
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        t0 = time.perf_counter()
        slide = make_slide(n)
        made = time.perf_counter() - t0
        out = WORK / f"out-{n}.zarr"
        shutil.rmtree(out, ignore_errors=True)  # a complete cube from an earlier run would measure nothing
        res = subprocess.run(
            [sys.executable, "-c", CHILD, str(slide), str(out), str(model), str(args.stride_um), str(args.workers)],
            capture_output=True,
            text=True,
            check=True,
        )
        r = json.loads(res.stdout.strip().splitlines()[-1])
        rows.append((n, made, r))
    print(
        f"{'slide px':>13} {'Gpx':>6} {'spots':>9} {'blocks':>7} {'seconds':>8} {'main RSS MB':>11} "
        f"{'worker RSS MB':>13}"
    )
    for n, _made, r in rows:
        print(
            f"{n:>6}x{n:<6} {n * n / 1e9:>6.2f} {r['spots']:>9} {r['tiles']:>7} {r['seconds']:>8.1f} "
            f"{r['rss_kb_self'] / 1024:>11.0f} {r['rss_kb_workers'] / 1024:>13.0f}"
        )
    first, last = rows[0][2], rows[-1][2]
    print(
        f"largest/smallest: area x{(rows[-1][0] / rows[0][0]) ** 2:.0f}, main RSS x"
        f"{last['rss_kb_self'] / first['rss_kb_self']:.2f}, worker RSS x"
        f"{max(last['rss_kb_workers'], 1) / max(first['rss_kb_workers'], 1):.2f}"
    )


if __name__ == "__main__":
    main()
