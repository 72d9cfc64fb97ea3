"""Cohorts on a real dask LocalCluster and in-process: failures isolated, state resumable."""

from __future__ import annotations

import csv
import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from tests.conftest import need_shared, synthetic_tissue, write_pyramid
from wsi_histosge.cohort import (
    EXIT_ALL_OK,
    EXIT_NO_SLIDES,
    EXIT_PARTIAL,
    RunConfig,
    SlideJob,
    SlideLock,
    collect_jobs,
    read_manifest,
    read_states,
    run_batch,
)
from wsi_histosge.errors import UsageError


def _cfg(out: Path, model: Path, **kw: object) -> RunConfig:
    """The run options a user would give: a model and a stride; slide workers at their default."""
    return RunConfig(out=str(out), options={"model": str(model), "stride_um": 10.0, **kw})


def test_manifest_validation_reports_every_bad_row(tmp_path: Path) -> None:
    (tmp_path / "a.svs").write_bytes(b"x")
    m = tmp_path / "m.csv"
    m.write_text("slide,id,mpp\na.svs,ok,0.5\na.svs,../evil,\n/etc/passwd,x,\nb.svs,ok,\nc.svs,c,abc\nd.svs,d,inf\n")
    with pytest.raises(UsageError) as info:
        read_manifest(m)
    text = str(info.value)
    assert "\n" not in text
    assert "row 3" in text and "../evil" in text
    assert "row 4" not in text  # an absolute path is the user's intent, allowed by default
    assert "duplicate id 'ok'" in text
    assert "row 6" in text and "'abc' is not a pixel size" in text
    assert "row 7" in text and "'inf'" in text
    with pytest.raises(UsageError, match="row 4: slide /etc/passwd is outside --slides-under"):
        read_manifest(m, slides_under=[tmp_path])
    m.write_text("slide,id\nsub/a.svs,a\n")
    assert read_manifest(m)[0].slide == str(tmp_path / "sub" / "a.svs")  # relative to the manifest
    m.write_bytes(b"slide,id\na.svs,a\x00b\n")
    with pytest.raises(UsageError, match="NUL"):
        read_manifest(m)


def test_globs_and_folders(tmp_path: Path) -> None:
    for name in ("x.svs", "y.tif", "notes.txt"):
        (tmp_path / name).write_bytes(b"1")
    jobs = collect_jobs([str(tmp_path)])
    assert [j.id for j in jobs] == ["x", "y"]
    assert [j.id for j in collect_jobs([str(tmp_path / "*.svs")])] == ["x"]
    with pytest.raises(UsageError, match="duplicate"):
        collect_jobs([str(tmp_path / "x.svs"), str(tmp_path / "x.svs")])


def test_stale_lock_is_reclaimed_live_lock_is_not(tmp_path: Path) -> None:
    lock = SlideLock(tmp_path, "s")
    assert lock.acquire()
    assert not SlideLock(tmp_path, "s").acquire()  # held by us (alive)
    lock.path.write_text(json.dumps({"pid": 999_999_999, "host": os.uname().nodename}))
    assert SlideLock(tmp_path, "s").acquire()  # dead pid: reclaimed


@pytest.mark.realdata
def test_local_cluster_cohort_with_bad_slides(tiny_model: Path, tmp_path: Path) -> None:
    good = need_shared("wsi-samples", "CMU-1-Small-Region.svs")
    ome = need_shared("wsi-samples", "CMU-1-Small-Region.ome.tif")
    corrupt = tmp_path / "corrupt.svs"
    corrupt.write_bytes(good.read_bytes()[:200_000])
    jobs = [
        SlideJob(str(good), "cmu"),
        SlideJob(str(ome), "cmu-ome"),
        SlideJob(str(corrupt), "corrupt"),
        SlideJob(str(tmp_path / "missing.svs"), "missing"),
    ]
    out = tmp_path / "out"
    summary = run_batch(jobs, _cfg(out, tiny_model, stride_um=50.0), workers=2)
    status = {r["id"]: r for r in summary.rows}
    assert summary.exit_code == EXIT_PARTIAL
    assert status["cmu"]["status"] == "done" and status["cmu-ome"]["status"] == "done"
    assert status["corrupt"]["status"] == "failed" and "corrupt.svs" in status["corrupt"]["error"]
    assert status["missing"]["status"] == "failed" and "no such file" in status["missing"]["error"]
    assert (out / "summary.csv").read_text().count("\n") == 5
    written = {r["id"]: r for r in csv.DictReader((out / "summary.csv").open())}
    assert written["corrupt"]["output"] == "" and not (out / "corrupt.zarr").exists()  # nothing claimed
    assert written["cmu"]["output"] and Path(written["cmu"]["output"]).exists()
    assert {s["id"] for s in read_states(out)} == {"cmu", "cmu-ome", "corrupt", "missing"}
    # a rerun skips the done slides and does not retry failures unless asked
    again = run_batch(jobs, _cfg(out, tiny_model, stride_um=50.0))
    st = {r["id"]: r for r in again.rows}
    assert st["cmu"]["result"] == "already-complete"
    assert "retry-failed" in st["corrupt"].get("skipped", "")


def _big_slide(tmp_path: Path) -> Path:
    return write_pyramid(tmp_path / "big.tif", synthetic_tissue(4000, 5000, seed=5), levels=3)


def test_killed_worker_is_rescheduled_and_the_cube_is_identical(tiny_model: Path, tmp_path: Path) -> None:
    slide = _big_slide(tmp_path)
    ref_out = tmp_path / "ref"
    ref = run_batch([SlideJob(str(slide), "big")], _cfg(ref_out, tiny_model), isolate=False)
    assert ref.exit_code == EXIT_ALL_OK
    out = tmp_path / "out"
    killed: dict[str, int] = {}

    def killer() -> None:
        state = out / "state" / "big.json"
        marks = out / "big.zarr" / "chunk_done" / "c"
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                st = json.loads(state.read_text())
            except (OSError, json.JSONDecodeError):
                st = {}
            if st.get("status") == "running" and marks.exists() and sum(1 for _ in marks.rglob("*")) >= 4:
                killed["pid"] = st["pid"]
                os.kill(st["pid"], signal.SIGKILL)
                return
            time.sleep(0.02)

    t = threading.Thread(target=killer)
    t.start()
    summary = run_batch([SlideJob(str(slide), "big")], _cfg(out, tiny_model), workers=1, retries=2)
    t.join()
    assert "pid" in killed, "the worker was never caught mid-slide"
    assert summary.exit_code == EXIT_ALL_OK, summary.rows
    assert summary.rows[0]["result"] == "resumed"
    a = np.asarray(zarr.open_group(str(ref_out / "big.zarr"), mode="r")["expression"][:])
    b = np.asarray(zarr.open_group(str(out / "big.zarr"), mode="r")["expression"][:])
    np.testing.assert_array_equal(a, b)


def test_rerun_after_killing_the_batch_recomputes_nothing_done(tiny_model: Path, tmp_path: Path) -> None:
    slides = [write_pyramid(tmp_path / f"s{i}.tif", synthetic_tissue(1500, 2000, seed=i), levels=2) for i in range(3)]
    jobs = [SlideJob(str(p), p.stem) for p in slides]
    out = tmp_path / "out"
    first = run_batch(jobs[:2], _cfg(out, tiny_model), isolate=False)  # as if killed after two slides
    assert first.exit_code == EXIT_ALL_OK
    before = {p: p.stat().st_mtime_ns for p in out.glob("s[01].zarr/expression/c/**/*") if p.is_file()}
    second = run_batch(jobs, _cfg(out, tiny_model), isolate=False)
    st = {r["id"]: r["result"] for r in second.rows}
    assert st == {"s0": "already-complete", "s1": "already-complete", "s2": "complete"}
    after = {p: p.stat().st_mtime_ns for p in before}
    assert before == after  # not one chunk of a completed slide rewritten


def test_no_slides_exit_code(tmp_path: Path, tiny_model: Path) -> None:
    assert run_batch([], _cfg(tmp_path, tiny_model)).exit_code == EXIT_NO_SLIDES


SAMPLE = Path(__file__).resolve().parents[1] / "wsi_histosge" / "samples" / "cmu1-skin-crop.tif"


def _two_sample_slides(tmp_path: Path) -> list[Path]:
    import shutil

    slides = [tmp_path / "slides" / f"sample{i}.tif" for i in (1, 2)]
    slides[0].parent.mkdir()
    for p in slides:
        shutil.copy(SAMPLE, p)
    return slides


def test_batch_workers_with_default_flags(tmp_path: Path) -> None:
    """`batch FOLDER --out OUT --workers 2` exactly as the README shows it: the built-in model, default
    slide workers (DataLoader workers inside daemonic dask workers must not fail)."""
    from typer.testing import CliRunner

    from wsi_histosge.cli.app import app

    _two_sample_slides(tmp_path)
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["batch", str(tmp_path / "slides"), "--out", str(out), "--workers", "2", "--json"])
    summary = json.loads(res.stdout)
    assert res.exit_code == 0, summary
    assert [r["status"] for r in summary["slides"]] == ["done", "done"], summary
    assert all(r["spots"] > 100 for r in summary["slides"])
    for i in (1, 2):
        assert CliRunner().invoke(app, ["verify", str(out / f"sample{i}.zarr")]).exit_code == 0


def test_batch_on_an_external_scheduler_with_default_slide_workers(tiny_model: Path, tmp_path: Path) -> None:
    """`dask scheduler` + `dask worker` processes (daemonic workers), the slide options at their defaults."""
    import socket
    import subprocess
    import sys

    from typer.testing import CliRunner

    from wsi_histosge.cli.app import app

    _two_sample_slides(tmp_path)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "distributed.cli.dask_scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--no-dashboard",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    ]
    try:
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "distributed.cli.dask_worker",
                    address,
                    "--nworkers",
                    "1",
                    "--nthreads",
                    "1",
                    "--no-dashboard",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        from dask.distributed import Client

        with Client(address, timeout=60) as client:
            client.wait_for_workers(1, timeout=60)
        out = tmp_path / "out"
        res = CliRunner().invoke(
            app,
            [
                "batch",
                str(tmp_path / "slides"),
                "--out",
                str(out),
                "--scheduler",
                address,
                "--model",
                str(tiny_model),
                "--json",
            ],
        )
        summary = json.loads(res.stdout)
        assert res.exit_code == 0, summary
        assert [r["status"] for r in summary["slides"]] == ["done", "done"], summary
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            p.wait(timeout=30)


def test_glob_matching_nothing_exits_12_and_names_it(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from wsi_histosge.cli.app import app

    pattern = str(tmp_path / "*.svs")
    res = CliRunner().invoke(app, ["batch", pattern, "--out", str(tmp_path / "out")])
    assert res.exit_code == 12, res.output
    assert "matched no file" in res.output and pattern in res.output
    assert not (tmp_path / "out").exists()


def test_status_on_a_missing_folder_exits_3(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from wsi_histosge.cli.app import app

    res = CliRunner().invoke(app, ["status", str(tmp_path / "nope")])
    assert res.exit_code == 3 and "nope" in res.output


def test_absolute_manifest_paths_are_the_users_intent(tiny_model: Path, tmp_path: Path) -> None:
    slides = _two_sample_slides(tmp_path)
    elsewhere = tmp_path / "manifests"
    elsewhere.mkdir()
    m = elsewhere / "cohort.csv"
    m.write_text(f"slide,id,site\n{slides[0]},a,x\n../slides/{slides[1].name},b,y\n")
    jobs = collect_jobs([str(m)])
    assert [(j.id, Path(j.slide).resolve()) for j in jobs] == [("a", slides[0]), ("b", slides[1].resolve())]
    with pytest.raises(UsageError, match="outside --slides-under"):
        collect_jobs([str(m)], slides_under=[elsewhere])
    assert len(collect_jobs([str(m)], slides_under=[tmp_path / "slides"])) == 2


def test_a_locked_slide_is_reported_as_locked_not_failed(tiny_model: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from wsi_histosge.cli.app import app

    slides = _two_sample_slides(tmp_path)
    out = tmp_path / "out"
    holder = SlideLock(out, "sample1")
    assert holder.acquire()  # as another running batch on this output would
    res = CliRunner().invoke(app, ["batch", str(slides[0]), "--out", str(out), "--model", str(tiny_model)])
    assert res.exit_code == 15, res.output
    assert "another run" in res.output and "every slide failed" not in res.output
    holder.release()
    res = CliRunner().invoke(app, ["batch", str(slides[0]), "--out", str(out), "--model", str(tiny_model)])
    assert res.exit_code == 0, res.output


def test_a_truncated_state_file_does_not_stop_the_batch(tiny_model: Path, tmp_path: Path) -> None:
    slides = _two_sample_slides(tmp_path)
    out = tmp_path / "out"
    (out / "state").mkdir(parents=True)
    (out / "state" / "sample1.json").write_text('{"id": "sample1", "status": "fail')  # cut mid-write
    summary = run_batch([SlideJob(str(p), p.stem) for p in slides], _cfg(out, tiny_model, stride_um=50.0))
    assert summary.exit_code == EXIT_ALL_OK, summary.rows
    assert json.loads((out / "state" / "sample1.json").read_text())["status"] == "done"


@pytest.mark.realdata
def test_a_dicom_series_folder_is_one_slide(tmp_path: Path) -> None:
    import shutil

    series = tmp_path / "cohort" / "boxes"
    series.mkdir(parents=True)
    for name in ("boxes_0.dcm", "boxes_1.dcm"):
        shutil.copy(need_shared("wsi-samples", "openslide-synthetic", name), series / name)
    shutil.copy(SAMPLE, tmp_path / "cohort" / "sample.tif")
    assert [(j.id, j.slide) for j in collect_jobs([str(series)])] == [("boxes", str(series))]
    jobs = collect_jobs([str(tmp_path / "cohort")])
    assert sorted(j.id for j in jobs) == ["boxes", "sample"]


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--workers", "0"),
        ("--workers", "-3"),
        ("--retries", "-1"),
        ("--stride-um", "nan"),
        ("--mpp", "inf"),
        ("--device", "banana"),
        ("--slide-workers", "-1"),
    ],
)
def test_batch_option_values_are_checked_before_anything_is_written(tmp_path: Path, flag: str, value: str) -> None:
    from typer.testing import CliRunner

    from wsi_histosge.cli.app import app

    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["batch", str(SAMPLE), "--out", str(out), flag, value])
    assert res.exit_code == 2, res.output
    assert flag in res.output and len(res.output.strip().splitlines()) == 1
    assert not out.exists()


def test_a_rerun_keeps_the_row_of_the_run_that_made_the_cube(tmp_path: Path, tiny_model: Path) -> None:
    """`batch` run twice with its defaults: the second run computes nothing, and summary.csv keeps the first
    run's time, tiles and speed (a new user saw them replaced by the no-op's 0 tiles and 2.8 s)."""
    from typer.testing import CliRunner

    from wsi_histosge.cli.app import app

    slide = write_pyramid(tmp_path / "s.tif", synthetic_tissue(1200, 1200, seed=5), levels=2)
    out = tmp_path / "results"
    rows = []
    for _ in range(2):
        res = CliRunner().invoke(app, ["batch", str(slide), "--model", str(tiny_model), "--out", str(out)])
        assert res.exit_code == 0, res.output
        rows.append(next(csv.DictReader((out / "summary.csv").open())))
    first, second = rows
    assert first["result"] == "complete" and second["result"] == "already-complete"
    assert int(second["tiles"]) == int(first["tiles"]) > 0
    assert second["seconds"] == first["seconds"] and second["spots_per_s"] == first["spots_per_s"]
