"""CPU encoder forward with glibc's default allocator behaviour vs ``runtime.keep_freed_memory()``.

Each round runs both sides in fresh processes (the setting is process-wide), A then B, interleaved; it
reports seconds per image, minor page faults per image and peak RSS for the default encoder at the CPU batch
size, min and median over rounds, and the load average before and after.

    python benchmarks/cpu_allocator.py [--rounds 5] [--batch 64] [--images 256]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time
import torch
from wsi_histosge import config
from wsi_histosge.encoders import create_encoder
from wsi_histosge.runtime import keep_freed_memory
keep = sys.argv[1] == "keep"
applied = keep_freed_memory() if keep else False
batch, images = int(sys.argv[2]), int(sys.argv[3])
enc = create_encoder(config.DEFAULT_ENCODER).eval()
x = torch.rand(batch, 3, enc.cfg.input_px, enc.cfg.input_px)
with torch.inference_mode():
    enc(x)  # warm-up
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    n = max(1, images // batch)
    for _ in range(n):
        enc(x)
    dt = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({
    "applied": applied,
    "s_per_image": dt / (n * batch),
    "faults_per_image": (r1.ru_minflt - r0.ru_minflt) / (n * batch),
    "peak_rss_gb": r1.ru_maxrss / 2**20,
}))
"""


def run(side: str, batch: int, images: int) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, side, str(batch), str(images)], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--images", type=int, default=256)
    args = ap.parse_args()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load0 = os.getloadavg()
    print(f"cores {cores}, load average {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}; batch {args.batch}")
    results: dict[str, list[dict[str, float]]] = {"default": [], "keep": []}
    for r in range(args.rounds):
        for side in ("default", "keep"):
            res = run(side, args.batch, args.images)
            results[side].append(res)
            print(
                f"round {r + 1} {side:7s}: {res['s_per_image'] * 1e3:7.1f} ms/image, "
                f"{res['faults_per_image']:8.0f} faults/image, peak RSS {res['peak_rss_gb']:.2f} GB"
            )
    print(f"{'':8s} {'ms/image min':>13s} {'median':>8s} {'faults/image':>13s} {'peak RSS GB':>12s}")
    med = {}
    for side, rows in results.items():
        t = [x["s_per_image"] * 1e3 for x in rows]
        med[side] = statistics.median(t)
        faults = statistics.median(x["faults_per_image"] for x in rows)
        rss = max(x["peak_rss_gb"] for x in rows)
        print(f"{side:8s} {min(t):13.1f} {med[side]:8.1f} {faults:13.0f} {rss:12.2f}")
    print(f"speed-up default/keep (medians): {med['default'] / med['keep']:.2f}x")
    load1 = os.getloadavg()
    print(f"load average after {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")
    if max(load0[0], load1[0]) > 0.5 * (cores or 1):
        print("loaded machine: other work was running; these numbers are not comparable to an idle run")


if __name__ == "__main__":
    main()
