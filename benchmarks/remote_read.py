"""Bytes an `infer` of a slide in an object store reads, against the slide's size and a local run of the same file.

Writes a JPEG-tiled pyramid of real H&E pixels (CMU-1-Small-Region repeated; levels at 0.5 and 2 µm/px) of
``--size`` px under /tmp, serves it from a real S3 protocol server on loopback (moto, as the tests do), and runs
`wsi-histosge infer` twice in fresh processes with default flags but the tiny test model and ``--stride-um``:
once on the local file (the baseline), once on its s3:// URL. Prints the run report's ``bytes_read`` and
``file_size`` (counted where range reads return bytes, summed over the DataLoader workers), the range GETs the
server answered (its access log, counted independently of the client), the seconds of each side (rounds
interleaved) and their ratio, and whether the two cubes are identical.

    python benchmarks/remote_read.py [--size 16384] [--stride-um 20] [--rounds 1]

What is read: the fingerprint (first and last MiB), the TIFF structure (a few 64 KiB blocks per process), the
level checks' probe tiles, the thumbnail's level, and the tiles under tissue at the encoder's level (2 µm/px
here: the 0.5 µm/px level 0 is only probed). A real encoder at 0.5 µm/px reads level 0 under tissue instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from rounds import interleave, load_line, min_median

WORK = Path("/tmp/wsi-histosge-remotebench")


def make_slide(size: int) -> Path:
    from synthetic_slides import source_pixels, write_repeated_jpeg

    path = WORK / f"slide-{size}.tif"
    if not path.is_file():
        WORK.mkdir(parents=True, exist_ok=True)
        pix, mpp = source_pixels()
        write_repeated_jpeg(path, size, pix, mpp, downsamples=(1, 4))
    return path


def make_model() -> Path:
    import torch

    from wsi_histosge.encoders import create_encoder
    from wsi_histosge.model import HeadConfig, HisToSGEHead, Model, ModelMeta, save_model

    path = WORK / "tiny-model"
    if (path / "model.json").is_file():
        return path
    torch.manual_seed(0)
    enc = create_encoder("tiny-test")
    cfg = HeadConfig(in_dim=enc.cfg.embed_dim, n_genes=50, dim=32, hidden=64, dropout=0.0)
    meta = ModelMeta(
        genes=[f"G{i}" for i in range(50)],
        head=cfg.__dict__.copy(),
        encoder="tiny-test",
        encoder_weights_sha256=enc.weights_hash,
        spot_um=40.0,
        context_um=enc.cfg.context_um,
        neighbour_offsets_um=[[dx * 80.0, dy * 80.0] for dx, dy in [(0, 0), (-1, 0), (1, 0), (0, -1), (0, 1)]],
        name="remotebench",
    )
    save_model(Model(meta, HisToSGEHead(cfg).eval()), path)
    return path


def infer(slide: str, out: Path, model: Path, stride_um: float, env: dict[str, str]) -> tuple[float, dict]:
    """Seconds of one `wsi-histosge infer` in a fresh process, and its run report."""
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    args = [sys.executable, "-m", "wsi_histosge.cli.app", "infer", slide, "--out", str(out)]
    args += ["--model", str(model), "--stride-um", str(stride_um), "--json"]
    t0 = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"infer {slide} failed ({proc.returncode}): {proc.stderr.strip()}")
    return seconds, json.loads(proc.stdout)


class _Requests(logging.Handler):
    """Counts the range GETs the S3 server answers for the slide (its access log), server side."""

    def __init__(self, key: str) -> None:
        super().__init__()
        self.key = key
        self.gets = 0

    def emit(self, record: logging.LogRecord) -> None:
        if f"GET /bench/{self.key} " in record.getMessage():
            self.gets += 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=16384, help="side of the slide in level-0 px (0.5 µm/px)")
    ap.add_argument("--stride-um", type=float, default=20.0)
    ap.add_argument("--rounds", type=int, default=1, help="local and s3 runs, interleaved (seconds: min, median)")
    a = ap.parse_args()

    import boto3
    import zarr
    from moto.server import ThreadedMotoServer

    print(load_line("start"), flush=True)
    slide = make_slide(a.size)
    model = make_model()
    size = slide.stat().st_size
    requests = _Requests(slide.name)
    werkzeug = logging.getLogger("werkzeug")
    werkzeug.addHandler(requests)
    werkzeug.propagate = False  # counted, not printed
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    reports: dict[str, list[dict]] = {"local file (baseline)": [], "s3:// (moto, loopback)": []}
    try:
        host, port = server.get_host_and_port()
        s3 = {
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        }
        client = boto3.client("s3", endpoint_url=s3["AWS_ENDPOINT_URL"], region_name="us-east-1", **_keys(s3))
        client.create_bucket(Bucket="bench")
        client.upload_file(str(slide), "bench", slide.name)
        env = {**os.environ, **s3}
        sources = {"local file (baseline)": str(slide), "s3:// (moto, loopback)": f"s3://bench/{slide.name}"}
        outs = {"local file (baseline)": WORK / "local.zarr", "s3:// (moto, loopback)": WORK / "remote.zarr"}

        def side(name: str) -> Callable[[], float]:
            def run() -> float:
                seconds, report = infer(sources[name], outs[name], model, a.stride_um, env)
                reports[name].append(report)
                return seconds

            return run

        werkzeug.setLevel(logging.INFO)
        seconds = interleave({name: side(name) for name in sources}, a.rounds)
    finally:
        server.stop()
    same = np.array_equal(
        np.asarray(zarr.open_group(str(outs["local file (baseline)"]), mode="r")["expression"][:]),
        np.asarray(zarr.open_group(str(outs["s3:// (moto, loopback)"]), mode="r")["expression"][:]),
        equal_nan=True,
    )
    remote = reports["s3:// (moto, loopback)"][-1]
    mb = 1e6
    print(
        f"\nslide {a.size} x {a.size} px, {size / mb:.1f} MB, tissue {remote['tissue_area_mm2']:.1f} mm2, "
        f"{remote['spots']} spots at {a.stride_um:g} µm, {a.rounds} round(s)\n"
    )
    print("| side | seconds (min / median) | bytes read | range GETs per run (server log) | read / file size |")
    print("|---|---|---|---|---|")
    for name, values in seconds.items():
        lo, med = min_median(values)
        if name.startswith("local"):
            print(f"| {name} | {lo:.1f} / {med:.1f} | - | - | - |")
            continue
        read = {r["bytes_read"] for r in reports[name]}
        print(
            f"| {name} | {lo:.1f} / {med:.1f} | {', '.join(f'{b / mb:.2f} MB' for b in sorted(read))} | "
            f"{requests.gets / a.rounds:.0f} | {max(read) / remote['file_size']:.1%} of "
            f"{remote['file_size'] / mb:.1f} MB |"
        )
    local_med = min_median(seconds["local file (baseline)"])[1]
    remote_med = min_median(seconds["s3:// (moto, loopback)"])[1]
    print(f"\ns3 / local seconds (medians): {remote_med / local_med:.2f}x; cubes identical: {same}")
    print(load_line("end"), flush=True)


def _keys(env: dict[str, str]) -> dict[str, str]:
    return {"aws_access_key_id": env["AWS_ACCESS_KEY_ID"], "aws_secret_access_key": env["AWS_SECRET_ACCESS_KEY"]}


if __name__ == "__main__":
    main()
