"""Outputs to an object store: a real S3 protocol server (moto) on loopback, real s3fs and zarr."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from tests.conftest import synthetic_tissue, write_pyramid


def test_batch_to_s3_resumes_and_reads_back(s3: dict[str, str], tmp_path: Path, tiny_model: Path) -> None:
    import zarr

    good = write_pyramid(tmp_path / "good.tif", synthetic_tissue(1200, 1600), levels=2)
    bad = tmp_path / "bad.svs"
    bad.write_text("not a slide")
    state = tmp_path / "state"
    args = [
        sys.executable,
        "-m",
        "wsi_histosge.cli.app",
        "batch",
        str(good),
        str(bad),
        "--out",
        "s3://results/run1",
        "--state-dir",
        str(state),
        "--model",
        str(tiny_model),
        "--stride-um",
        "20",
        "--slide-workers",
        "0",
        "--json",
    ]
    env = {**os.environ, **s3}
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 10, proc.stderr
    g = zarr.open_group("s3://results/run1/good.zarr", mode="r")
    assert "completed" in g.attrs
    expr = np.asarray(g["expression"][:], dtype=np.float32)
    assert np.isfinite(expr).sum() == expr.shape[0] * int(np.asarray(g["tissue"][:]).sum())
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3["AWS_ENDPOINT_URL"])
    summary = json.loads(fs.cat_file("results/run1/summary.json"))
    assert {r["id"]: r["status"] for r in summary["slides"]} == {"good": "done", "bad": "failed"}
    assert fs.exists("results/run1/good.zarr.report.json") and fs.exists("results/run1/good.zarr.tissue.geojson")
    # state lives locally, status reads only it
    st = subprocess.run(
        [
            sys.executable,
            "-m",
            "wsi_histosge.cli.app",
            "status",
            "s3://results/run1",
            "--state-dir",
            str(state),
            "--json",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert {s["id"]: s["status"] for s in json.loads(st.stdout)} == {"good": "done", "bad": "failed"}
    # a rerun recomputes nothing that is complete
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
    rows = {r["id"]: r for r in json.loads(proc.stdout)["slides"]}
    assert rows["good"]["result"] == "already-complete"
    # verify and open from the object store
    v = subprocess.run(
        [sys.executable, "-m", "wsi_histosge.cli.app", "verify", "s3://results/run1/good.zarr"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert v.returncode == 0, v.stderr
