"""Slides read in place from an object store: a real S3 protocol server (moto) on loopback, real s3fs, the CLI
with its default flags (only the tiny test model is given)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from tests.conftest import synthetic_tissue, write_pyramid
from wsi_histosge.remote import COALESCE_BLOCK

BUCKET = "slides"
MiB = 1 << 20


@pytest.fixture(scope="module")
def slide_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A JPEG-tiled 3-level pyramid of about 8 MB: large enough that reading all of it would show."""
    path = tmp_path_factory.mktemp("remote-slides") / "scan-01.tif"
    return write_pyramid(path, synthetic_tissue(4000, 6000, seed=1), levels=3)


def _upload(s3: dict[str, str], local: Path, key: str) -> str:
    import boto3

    client = boto3.client("s3", endpoint_url=s3["AWS_ENDPOINT_URL"])
    if BUCKET not in {b["Name"] for b in client.list_buckets()["Buckets"]}:
        client.create_bucket(Bucket=BUCKET)
    client.upload_file(str(local), BUCKET, key)
    return f"s3://{BUCKET}/{key}"


def _cli(args: list[str], env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "wsi_histosge.cli.app", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def _one_line_error(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in text, text
    return " ".join(lines[0].split())


def _without_credentials(env: dict[str, str]) -> dict[str, str]:
    """The environment of a user whose credentials are gone (none in variables, files or instance metadata)."""
    out = {k: v for k, v in env.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE")}
    out.update(
        AWS_SHARED_CREDENTIALS_FILE="/nonexistent/credentials",
        AWS_CONFIG_FILE="/nonexistent/config",
        AWS_EC2_METADATA_DISABLED="true",
    )
    return out


def _cube(path: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    g = zarr.open_group(str(path), mode="r")
    return np.asarray(g["expression"][:]), np.asarray(g["tissue"][:]), dict(g.attrs)


def test_infer_reads_an_s3_slide_in_place_like_the_local_file_and_resumes(
    s3: dict[str, str], slide_file: Path, tiny_model: Path, tmp_path: Path
) -> None:
    from wsi_histosge.infer import InferOptions, infer_slide

    url = _upload(s3, slide_file, "cohort/scan-01.tif")
    env = {**os.environ, **s3}
    out = tmp_path / "remote.zarr"
    proc = _cli(["infer", url, "--model", str(tiny_model), "--out", str(out)], env)
    assert proc.returncode == 0, proc.stderr
    ref = tmp_path / "local.zarr"
    infer_slide(slide_file, ref, InferOptions(model=tiny_model))

    expr, tissue, attrs = _cube(out)
    ref_expr, ref_tissue, ref_attrs = _cube(ref)
    assert np.isfinite(expr).any()
    assert np.array_equal(expr, ref_expr, equal_nan=True) and np.array_equal(tissue, ref_tissue)
    meta, ref_meta = attrs["wsi_histosge"]["slide"], ref_attrs["wsi_histosge"]["slide"]
    assert meta["path"] == url and meta["fingerprint"] == ref_meta["fingerprint"]
    assert attrs["ome"]["multiscales"][0]["name"] == "scan-01"  # the URL's basename

    report = json.loads(Path(str(out) + ".report.json").read_text())
    size = slide_file.stat().st_size
    assert report["slide"] == url and report["file_size"] == size
    # What is read: the fingerprint (first and last MiB), the structure, a few probe tiles of level 0 (level
    # check), and level 2 (thumbnail, and the tiny encoder's 2 µm/px) in this process and again in the
    # DataLoader worker. Never the whole file, nor even level 0 alone.
    with tifffile.TiffFile(slide_file) as tf:
        level0 = int(np.sum(tf.pages[0].databytecounts))
    assert 2 * MiB < report["bytes_read"] < min(level0, 0.6 * size), (report["bytes_read"], level0, size)
    assert f"{report['bytes_read']:,} of {size:,}" in " ".join(proc.stderr.split())  # the printed summary

    # a complete cube: nothing to do
    again = _cli(["infer", url, "--model", str(tiny_model), "--out", str(out), "--json"], env)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["status"] == "already-complete"
    # the slide's identity is its content: its local copy finds the same cube complete
    assert infer_slide(slide_file, out, InferOptions(model=tiny_model)).status == "already-complete"

    # as a killed run leaves it: no completion marker, some chunks without their done mark
    group_json = out / "zarr.json"
    doc = json.loads(group_json.read_text())
    del doc["attributes"]["completed"]
    group_json.write_text(json.dumps(doc))
    marks = sorted(p for p in (out / "chunk_done" / "c").rglob("*") if p.is_file())
    assert len(marks) >= 2
    for mark in marks[: len(marks) // 2]:
        mark.unlink()
    resumed = _cli(["infer", url, "--model", str(tiny_model), "--out", str(out), "--json"], env)
    assert resumed.returncode == 0, resumed.stderr
    rep = json.loads(resumed.stdout)
    assert rep["status"] == "resumed" and 0 < rep["chunks_written"] <= len(marks) // 2
    assert 0 < rep["bytes_read"] < size
    expr2, _, _ = _cube(out)
    assert np.array_equal(expr2, ref_expr, equal_nan=True)


def test_reads_in_dataloader_workers_are_counted(s3: dict[str, str], slide_file: Path) -> None:
    """Bytes a worker process fetches come back with its items: what a worker reads beyond an in-process
    loader is its own open of the slide (a few coalesced header blocks), and the tiles are counted once."""
    from wsi_histosge.grid import make_grid
    from wsi_histosge.loader import BlockDataset, block_loader
    from wsi_histosge.remote import read_stats
    from wsi_histosge.slide import open_slide
    from wsi_histosge.tissue import TissueMask

    url = _upload(s3, slide_file, "scan-01.tif")
    sums = {}
    for workers in (0, 1):
        slide = open_slide(url)
        th, tw = slide.thumbnail_shape(8.0)
        everything = TissueMask(np.ones((th, tw), bool), 8.0, slide.dimensions[0] / tw, "all")
        grid = make_grid(slide, everything, stride_um=100.0, spot_um=100.0, context_um=64.0).with_halo(0)
        dataset = BlockDataset(slide, grid, list(grid.blocks()), 2)
        before = read_stats(slide.path).bytes
        items = list(block_loader(dataset, num_workers=workers))
        here = read_stats(slide.path).bytes - before
        assert all((it.pid == os.getpid()) == (workers == 0) for it in items)
        sums[workers] = sum(it.bytes_read for it in items)
        # in-process, this process's count holds the items' bytes; with a worker, none of them
        assert here == (sums[workers] if workers == 0 else 0)
        slide.close()
    with tifffile.TiffFile(slide_file) as tf:
        level2 = int(np.sum(tf.pages[2].databytecounts))
    assert sums[0] >= level2  # every tile of level 2 lies under a super-tile
    assert COALESCE_BLOCK <= sums[1] - sums[0] <= 4 * COALESCE_BLOCK  # the worker opened the slide itself


def test_an_object_gone_mid_run_fails_in_one_line_from_a_worker(s3: dict[str, str], slide_file: Path) -> None:
    """A DataLoader worker opens the slide itself; when the object is gone by then, its error reaches the
    caller as the worker raised it (one line naming the URL), not wrapped in the worker's traceback."""
    import boto3

    from wsi_histosge.errors import InputNotFoundError
    from wsi_histosge.grid import make_grid
    from wsi_histosge.loader import BlockDataset, block_loader
    from wsi_histosge.slide import open_slide
    from wsi_histosge.tissue import TissueMask

    url = _upload(s3, slide_file, "scan-01.tif")
    slide = open_slide(url)
    th, tw = slide.thumbnail_shape(8.0)
    everything = TissueMask(np.ones((th, tw), bool), 8.0, slide.dimensions[0] / tw, "all")
    grid = make_grid(slide, everything, stride_um=100.0, spot_um=100.0, context_um=64.0).with_halo(0)
    boto3.client("s3", endpoint_url=s3["AWS_ENDPOINT_URL"]).delete_object(Bucket=BUCKET, Key="scan-01.tif")
    with pytest.raises(InputNotFoundError) as err:
        list(block_loader(BlockDataset(slide, grid, list(grid.blocks()), 2), num_workers=1))
    assert str(err.value).startswith(f"{url}: no such object") and "\n" not in str(err.value)


def test_batch_manifest_of_urls_isolates_a_missing_object_and_the_outputs_reopen_the_slide(
    s3: dict[str, str], slide_file: Path, tiny_model: Path, tmp_path: Path
) -> None:
    good = _upload(s3, slide_file, "scan-01.tif")
    missing = f"s3://{BUCKET}/missing-02.tif"
    manifest = tmp_path / "cohort.csv"
    with open(manifest, "w", newline="") as fh:
        csv.writer(fh).writerows([["slide"], [good], [missing]])
    env = {**os.environ, **s3}
    run = tmp_path / "run"
    proc = _cli(["batch", str(manifest), "--out", str(run), "--model", str(tiny_model), "--json"], env)
    assert proc.returncode == 10, proc.stderr
    rows = {r["id"]: r for r in json.loads(proc.stdout)["slides"]}
    assert rows["scan-01"]["status"] == "done" and rows["scan-01"]["slide"] == good
    assert 0 < rows["scan-01"]["bytes_read"] < rows["scan-01"]["file_size"] == slide_file.stat().st_size
    bad = rows["missing-02"]
    assert bad["status"] == "failed" and bad["exit_code"] == 3
    assert bad["error"].startswith(f"{missing}: no such object") and "\n" not in bad["error"]
    assert (run / "scan-01.zarr").is_dir() and not (run / "missing-02.zarr").exists()
    with open(run / "summary.csv") as fh:
        summary = {r["id"]: r for r in csv.DictReader(fh)}
    assert int(summary["scan-01"]["bytes_read"]) == rows["scan-01"]["bytes_read"]
    html = (run / "report.html").read_text()
    assert html.count("data:image/jpeg;base64,") >= 1  # the good slide's thumbnail, read from the store

    info = _cli(["info", good, "--json"], env)
    assert info.returncode == 0, info.stderr
    from wsi_histosge.slide import open_slide

    assert json.loads(info.stdout)["fingerprint"] == open_slide(slide_file).fingerprint

    cube = str(run / "scan-01.zarr")
    h5ad = tmp_path / "scan-01.h5ad"
    conv = _cli(["to-anndata", cube, "--out", str(h5ad)], env)
    assert conv.returncode == 0, conv.stderr
    import anndata

    adata = anndata.read_h5ad(h5ad)
    images = adata.uns["spatial"]["scan-01"]["images"]
    assert images["hires"].shape[2] == 3 and adata.n_obs > 0
    maps = tmp_path / "maps"
    plot = _cli(["plot", cube, "--genes", "G0", "--out", str(maps)], env)
    assert plot.returncode == 0, plot.stderr
    assert (maps / "G0.png").stat().st_size > 0 and (maps / "qc.png").stat().st_size > 0

    # the credentials are gone: one line naming the URL and the fix, exit 16, nothing written
    gone = _cli(["plot", cube, "--genes", "G0", "--out", str(tmp_path / "maps2")], _without_credentials(env))
    assert gone.returncode == 16, gone.stderr
    line = _one_line_error(gone.stderr)
    assert good in line and "credentials" in line
    assert not (tmp_path / "maps2").exists()


def _gcsfs_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("gcsfs") is not None


@pytest.mark.parametrize(
    ("case", "code", "says"),
    [
        ("missing-key", 3, "s3://slides/nope.tif: no such object"),
        ("missing-bucket", 3, "s3://no-such-bucket/scan-01.tif: no such object"),
        ("no-credentials", 16, "refused access"),
        ("credentials-in-url", 2, "the URL holds credentials"),
        ("presigned", 2, "holds a credential (X-Amz-Signature"),
        ("unknown-protocol", 2, "unknown protocol"),
        ("gs-without-gcsfs", 2, "pip install gcsfs"),
        ("mrxs", 2, "download it first"),
    ],
)
def test_bad_slide_urls_fail_in_one_line_and_write_nothing(
    case: str, code: int, says: str, s3: dict[str, str], slide_file: Path, tiny_model: Path, tmp_path: Path
) -> None:
    if case == "gs-without-gcsfs" and _gcsfs_installed():
        pytest.skip("gcsfs is installed here")
    good = _upload(s3, slide_file, "scan-01.tif")
    env = {**os.environ, **s3}
    url = {
        "missing-key": f"s3://{BUCKET}/nope.tif",
        "missing-bucket": "s3://no-such-bucket/scan-01.tif",
        "no-credentials": good,
        "credentials-in-url": f"s3://AKIAEXAMPLE:wJalrXUtnFEMIsecret@{BUCKET}/scan-01.tif",
        "presigned": f"https://{BUCKET}.example.org/scan-01.tif?X-Amz-Signature=abc123secret&X-Amz-Expires=60",
        "unknown-protocol": f"nosuchproto://{BUCKET}/scan-01.tif",
        "gs-without-gcsfs": "gs://a-bucket/scan-01.tif",
        "mrxs": f"s3://{BUCKET}/scan-01.mrxs",
    }[case]
    if case == "no-credentials":
        env = _without_credentials(env)
    work = tmp_path / "work"
    work.mkdir()
    proc = _cli(["infer", url, "--model", str(tiny_model), "--out", str(work / "out.zarr")], env)
    assert proc.returncode == code, proc.stderr
    line = _one_line_error(proc.stderr)
    assert says in line, line
    shown = proc.stderr + proc.stdout
    assert not any(s in shown for s in ("AKIAEXAMPLE", "wJalrXUtnFEMIsecret", "abc123secret"))  # never shown
    assert not any(work.iterdir())


def test_urls_name_outputs_and_ids_by_their_basename(tmp_path: Path) -> None:
    from wsi_histosge.cohort import collect_jobs
    from wsi_histosge.errors import UsageError
    from wsi_histosge.slide import default_output, slide_location

    where = slide_location("s3://bucket/a/b/scan-07.svs")
    assert default_output(where) == Path("scan-07.svs.zarr")  # in the current folder, not in the bucket
    assert default_output(slide_location(tmp_path / "x.svs")) == tmp_path / "x.svs.zarr"
    assert slide_location(f"file://{tmp_path}/x.svs") == tmp_path / "x.svs"
    manifest = tmp_path / "m.csv"
    manifest.write_text("slide,id\ns3://bucket/a/scan-08.tif,\ns3://bucket/b/scan-09.ndpi,named\n")
    jobs = collect_jobs([str(manifest), "s3://bucket/c/scan-10.svs"])
    assert [(j.id, j.slide) for j in jobs] == [
        ("scan-08", "s3://bucket/a/scan-08.tif"),
        ("named", "s3://bucket/b/scan-09.ndpi"),
        ("scan-10", "s3://bucket/c/scan-10.svs"),
    ]
    # a URL with credentials is refused before any slide runs, and the message does not repeat them
    manifest.write_text("slide\ns3://user:hunter2@bucket/scan-11.tif\n")
    with pytest.raises(UsageError, match="holds credentials") as err:
        collect_jobs([str(manifest)])
    assert "hunter2" not in str(err.value)
    with pytest.raises(UsageError, match="holds credentials") as err:
        collect_jobs(["s3://user:hunter2@bucket/scan-11.tif"])
    assert "hunter2" not in str(err.value)
