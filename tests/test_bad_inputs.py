"""The bad-input corpus: each case generated here, run through the CLI, with its expected outcome.

Cases are numbered as in the project's bad-input issue; the README's "Failure behaviour" section lists
the exit codes these tests hold the tool to.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from typer.testing import CliRunner

from tests.conftest import need_shared, synthetic_tissue, write_pyramid
from wsi_histosge.cli.app import app

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


def _infer(slide: Path, out: Path, *extra: str) -> tuple[int, str]:
    res = runner.invoke(app, ["infer", str(slide), "--out", str(out), *extra])
    return res.exit_code, res.output


def _cli(args: list[str], env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "wsi_histosge.cli.app", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


# 1 -------------------------------------------------------------------------------------------------
@pytest.mark.realdata
@pytest.mark.parametrize("case", ["truncated-third", "truncated-90pct", "zero-byte", "text", "directory"])
def test_01_not_a_usable_slide(case: str, tmp_path: Path, tiny_model: Path) -> None:
    src = need_shared("wsi-samples", "CMU-1-Small-Region.svs").read_bytes()
    slide = tmp_path / "bad.svs"
    if case == "truncated-third":
        slide.write_bytes(src[: len(src) // 3])
    elif case == "truncated-90pct":
        slide.write_bytes(src[: int(len(src) * 0.9)])
    elif case == "zero-byte":
        slide.write_bytes(b"")
    elif case == "text":
        slide.write_text("patient notes, not a slide\n" * 50)
    else:
        slide.mkdir()
    out = tmp_path / "bad.zarr"
    code, output = _infer(slide, out, "--model", str(tiny_model))
    assert code == 4, output
    assert "bad.svs" in output and "Traceback" not in output
    marker = out / "zarr.json"
    assert not marker.exists() or "completed" not in json.loads(marker.read_text())["attributes"]


# 2, 3 ----------------------------------------------------------------------------------------------
def _corrupt_tile(path: Path, k: int, mode: str) -> None:
    with tifffile.TiffFile(path) as tf:
        page = tf.pages[0]
        off, cnt = int(page.dataoffsets[k]), int(page.databytecounts[k])
        count_tag_offset = page.tags["TileByteCounts"].valueoffset
        count_type = page.tags["TileByteCounts"].dtype
    data = bytearray(path.read_bytes())
    if mode == "garbage":
        data[off : off + cnt] = np.random.default_rng(k).integers(0, 256, cnt, dtype=np.uint8).tobytes()
    elif mode == "truncated":
        data[off + cnt // 3 : off + cnt] = b"\0" * (cnt - cnt // 3)
    elif mode == "zero-count":  # what a writer that died leaves: tifffile would zero-fill and only log
        size = 8 if int(count_type) == 16 else 4
        fmt = "<Q" if size == 8 else "<I"
        data[count_tag_offset + k * size : count_tag_offset + (k + 1) * size] = struct.pack(fmt, 0)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("codec", ["jpeg", "jpeg2000", "zlib", "lzw"])
@pytest.mark.parametrize("mode", ["garbage", "truncated", "zero-count"])
def test_02_03_corrupt_tile_fails_with_its_position_or_is_skipped(
    codec: str, mode: str, tmp_path: Path, tiny_model: Path
) -> None:
    slide = write_pyramid(tmp_path / f"{codec}.tif", synthetic_tissue(1536, 1536), levels=1, compression=codec)
    _corrupt_tile(slide, 6 * 3 + 3, mode)  # tile (col 3, row 3): inside the tissue blob
    code, output = _infer(slide, tmp_path / "fail.zarr", "--model", str(tiny_model), "--stride-um", "20")
    assert code == 4, output
    assert "tile (col 3, row 3) of level 0" in output
    res = runner.invoke(
        app,
        [
            "infer",
            str(slide),
            "--out",
            str(tmp_path / "skip.zarr"),
            "--workers",
            "0",
            "--model",
            str(tiny_model),
            "--stride-um",
            "20",
            "--on-bad-tile",
            "skip",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout[res.stdout.index("{") :])
    assert report["bad_tiles"] >= 1 and report["spots_skipped_bad_tiles"] > 0
    g = zarr.open_group(str(tmp_path / "skip.zarr"), mode="r")
    expr = np.asarray(g["expression"][0], dtype=np.float32)
    # the cells over the bad tile (level-0 px 768..1024) are not predicted: NaN, never white-tile features
    affine = np.asarray(g.attrs["affine_level0"])
    ix = round((896 - affine[0, 2]) / affine[0, 0])
    iy = round((896 - affine[1, 2]) / affine[1, 1])
    assert np.isnan(expr[iy, ix])
    assert np.isfinite(expr).sum() == report["spots"] - report["spots_skipped_bad_tiles"]


# 4 -------------------------------------------------------------------------------------------------
def test_04_ifd_loop_errors_quickly(tmp_path: Path, tiny_model: Path) -> None:
    slide = write_pyramid(tmp_path / "loop.tif", synthetic_tissue(512, 512), levels=2, compression="zlib")
    data = bytearray(slide.read_bytes())
    first = struct.unpack("<I", data[4:8])[0]
    n = struct.unpack("<H", data[first : first + 2])[0]
    second = struct.unpack("<I", data[first + 2 + 12 * n : first + 6 + 12 * n])[0]
    n2 = struct.unpack("<H", data[second : second + 2])[0]
    data[second + 2 + 12 * n2 : second + 6 + 12 * n2] = struct.pack("<I", first)  # IFD 1 -> IFD 0 -> ...
    slide.write_bytes(bytes(data))
    # a reader that follows the loop never returns: subprocess.TimeoutExpired after 60 s fails the test
    proc = _cli(["infer", str(slide), "--out", str(tmp_path / "o.zarr"), "--model", str(tiny_model)], timeout=60)
    assert proc.returncode == 4, proc.stderr
    assert "circular" in proc.stderr or "malformed" in proc.stderr


# 5 -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tag", ["ImageWidth", "TileWidth"])
def test_05_hostile_dimensions_refused_before_allocating(tag: str, tmp_path: Path, tiny_model: Path) -> None:
    slide = write_pyramid(tmp_path / "huge.tif", synthetic_tissue(512, 512), levels=1, compression="zlib")
    with tifffile.TiffFile(slide) as tf:
        t = tf.pages[0].tags[tag]
        offset, dtype = t.valueoffset, int(t.dtype)
    data = bytearray(slide.read_bytes())
    if dtype == 3:  # SHORT
        data[offset : offset + 2] = struct.pack("<H", 65535)
    else:
        data[offset : offset + 4] = struct.pack("<I", 4_000_000_000)
    slide.write_bytes(bytes(data))
    code = (
        "import resource, sys\n"
        "from typer.testing import CliRunner\n"
        "from wsi_histosge.cli.app import app\n"
        f"r = CliRunner().invoke(app, ['infer', {str(slide)!r}, '--out', {str(tmp_path / 'o.zarr')!r}, '--model', "
        f"{str(tiny_model)!r}, '--workers', '0'])\n"
        "print(r.exit_code, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
        "print(r.output)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    exit_code, rss_kb = (int(v) for v in proc.stdout.split()[:2])
    assert exit_code == 4, proc.stdout + proc.stderr
    assert rss_kb < 2_000_000  # nothing of the claimed size was allocated
    assert "huge.tif" in proc.stdout


# 6 -------------------------------------------------------------------------------------------------
def _plugin_env() -> dict[str, str]:
    return {
        "WSI_HISTOSGE_READER_PLUGINS": "tests.plugins.crashing_reader:opener",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }


@pytest.mark.parametrize("kind,sig", [("segv", 11), ("abort", 6)])
def test_06_reader_crash_fails_that_slide_only(kind: str, sig: int, tmp_path: Path, tiny_model: Path) -> None:
    good = write_pyramid(tmp_path / "good.tif", synthetic_tissue(800, 800), levels=1)
    bad = tmp_path / f"bad.{kind}"
    bad.write_bytes(b"crash me")
    out = tmp_path / "out"
    proc = _cli(
        [
            "batch",
            str(good),
            str(bad),
            "--out",
            str(out),
            "--model",
            str(tiny_model),
            "--stride-um",
            "40",
            "--slide-workers",
            "0",
            "--json",
        ],
        env=_plugin_env(),
    )
    assert proc.returncode == 10, proc.stdout + proc.stderr
    states = {s["id"]: s for s in json.loads((out / "summary.json").read_text())["slides"]}
    assert states["good"]["status"] == "done"
    assert states["bad"]["status"] == "failed" and f"signal {sig}" in states["bad"]["error"]


def test_06_reader_crash_on_a_dask_cluster(tmp_path: Path, tiny_model: Path) -> None:
    good = write_pyramid(tmp_path / "good.tif", synthetic_tissue(800, 800), levels=1)
    bad = tmp_path / "bad.segv"
    bad.write_bytes(b"crash me")
    out = tmp_path / "out"
    env = {**_plugin_env(), "DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "1"}
    proc = _cli(
        [
            "batch",
            str(good),
            str(bad),
            "--out",
            str(out),
            "--model",
            str(tiny_model),
            "--stride-um",
            "40",
            "--slide-workers",
            "0",
            "--workers",
            "2",
            "--retries",
            "0",
        ],
        env=env,
    )
    assert proc.returncode == 10, proc.stdout + proc.stderr
    states = {s["id"]: s for s in json.loads((out / "summary.json").read_text())["slides"]}
    assert states["good"]["status"] == "done"
    assert states["bad"]["status"] == "failed" and "worker lost" in states["bad"]["error"]


# 8 -------------------------------------------------------------------------------------------------
def test_08_deleted_chunk_is_reported_and_never_read_as_data(tmp_path: Path, tiny_model: Path) -> None:
    slide = write_pyramid(tmp_path / "s.tif", synthetic_tissue(3000, 3000), levels=2)
    out = tmp_path / "s.zarr"
    assert _infer(slide, out, "--model", str(tiny_model), "--stride-um", "10")[0] == 0
    res = runner.invoke(app, ["verify", str(out)])
    assert res.exit_code == 0, res.output
    chunk = out / "expression" / "c" / "0" / "1" / "1"
    assert chunk.is_file()
    chunk.unlink()
    res = runner.invoke(app, ["verify", str(out), "--json"])
    assert res.exit_code == 13
    assert json.loads(res.stdout)["missing_chunks"] == [[1, 1]]
    expr = np.asarray(zarr.open_group(str(out), mode="r")["expression"][:, 64:128, 64:128], dtype=np.float32)
    assert np.isnan(expr).all()  # missing reads as NaN, not zeros


# 9 -------------------------------------------------------------------------------------------------
def test_09_changed_model_refuses_then_overwrite_recomputes(tmp_path: Path, tiny_model: Path) -> None:
    slide = write_pyramid(tmp_path / "s.tif", synthetic_tissue(800, 800), levels=1)
    out = tmp_path / "s.zarr"
    assert _infer(slide, out, "--model", str(tiny_model), "--stride-um", "20")[0] == 0
    other = tmp_path / "other"
    shutil.copytree(tiny_model, other)
    meta = json.loads((other / "model.json").read_text())
    meta["name"] = "other"
    meta["neighbour_offsets_um"] = meta["neighbour_offsets_um"][:3]
    (other / "model.json").write_text(json.dumps(meta))
    code, output = _infer(slide, out, "--model", str(other), "--stride-um", "20")
    assert code == 7 and "--overwrite" in output
    assert _infer(slide, out, "--model", str(other), "--stride-um", "20", "--overwrite")[0] == 0


# 10 ------------------------------------------------------------------------------------------------
def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    return (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
        ).returncode
        == 0
    )


def test_10_disk_full_mid_write_then_resume(tmp_path: Path, tiny_model: Path) -> None:
    slide = write_pyramid(tmp_path / "s.tif", synthetic_tissue(4000, 4000, seed=2), levels=2)
    disk = tmp_path / "disk"
    mounted = _mount_tmpfs(disk, "24m")
    try:
        out = disk / "s.zarr"
        ballast = disk / "ballast"
        if not mounted:
            pytest.skip("needs a tmpfs mount (root): the disk-full case cannot be produced here")
        ballast.write_bytes(b"\0" * (24 * 2**20 - 160 * 2**10))  # room for a few chunks only
        proc = _cli(
            ["infer", str(slide), "--out", str(out), "--model", str(tiny_model), "--stride-um", "10", "--workers", "0"]
        )
        assert proc.returncode == 14, proc.stderr
        assert "free space" in proc.stderr and "Traceback" not in proc.stderr
        attrs = json.loads((out / "zarr.json").read_text())["attributes"]
        assert "completed" not in attrs
        ballast.unlink(missing_ok=True)
        proc = _cli(
            [
                "infer",
                str(slide),
                "--out",
                str(out),
                "--model",
                str(tiny_model),
                "--stride-um",
                "10",
                "--workers",
                "0",
                "--json",
            ]
        )
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["status"] in ("resumed", "complete")
        assert runner.invoke(app, ["verify", str(out)]).exit_code == 0
    finally:
        if mounted:
            subprocess.run(["umount", str(disk)], check=False)


# 13 ------------------------------------------------------------------------------------------------
def test_13_cube_declaring_a_pickle_codec_is_refused(tmp_path: Path, tiny_model: Path) -> None:
    slide = write_pyramid(tmp_path / "s.tif", synthetic_tissue(800, 800), levels=1)
    out = tmp_path / "s.zarr"
    assert _infer(slide, out, "--model", str(tiny_model), "--stride-um", "20")[0] == 0
    meta_path = out / "expression" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["codecs"].insert(0, {"name": "numcodecs.pickle", "configuration": {"protocol": 5}})
    meta_path.write_text(json.dumps(meta))
    res = runner.invoke(app, ["to-anndata", str(out), "--out", str(tmp_path / "a.h5ad")])
    assert res.exit_code == 9 and "pickle" in res.output
    assert not (tmp_path / "a.h5ad").exists()


# 14 ------------------------------------------------------------------------------------------------
def test_14_hf_token_never_leaks(tmp_path: Path, tiny_model: Path) -> None:
    token = "hf_" + "Zq7" * 12
    env = {"HF_TOKEN": token, "HF_HUB_CACHE": str(tmp_path / "hub")}
    slide = write_pyramid(tmp_path / "s.tif", synthetic_tissue(800, 800), levels=1)
    outputs = []
    proc = _cli(["infer", str(slide), "--out", str(tmp_path / "a.zarr"), "--model", str(tiny_model), "--json"], env=env)
    outputs += [proc.stdout, proc.stderr]
    gated = tmp_path / "gated"
    shutil.copytree(tiny_model, gated)
    meta = json.loads((gated / "model.json").read_text())
    meta["encoder"] = "uni"
    (gated / "model.json").write_text(json.dumps(meta))
    proc = _cli(["infer", str(slide), "--out", str(tmp_path / "b.zarr"), "--model", str(gated), "--debug"], env=env)
    assert proc.returncode != 0
    outputs += [proc.stdout, proc.stderr]
    proc = _cli(
        ["batch", str(slide), "--out", str(tmp_path / "batch"), "--model", str(tiny_model), "--workers", "1", "--json"],
        env=env,
    )
    outputs += [proc.stdout, proc.stderr]
    files = [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix in (".json", ".csv", ".geojson")]
    outputs += [p.read_text(errors="ignore") for p in files]
    assert files and all(token not in text for text in outputs)


# 15 ------------------------------------------------------------------------------------------------
@pytest.mark.realdata
def test_15_pil_limit_untouched_and_associated_images_not_decoded() -> None:
    code = (
        "from PIL import Image; before = Image.MAX_IMAGE_PIXELS; import wsi_histosge.cli.app, wsi_histosge.infer;"
        "from wsi_histosge.slide import open_slide;"
        f"s = open_slide({str(need_shared('wsi-samples', 'CMU-1-Small-Region.svs'))!r}); s.info();"
        "print(before == Image.MAX_IMAGE_PIXELS)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "True", proc.stderr


# 16 ------------------------------------------------------------------------------------------------
def test_16_sigterm_during_batch_then_resume(tmp_path: Path, tiny_model: Path) -> None:
    slides = [write_pyramid(tmp_path / f"s{i}.tif", synthetic_tissue(4000, 5000, seed=i), levels=2) for i in range(2)]
    out = tmp_path / "out"
    args = [
        sys.executable,
        "-m",
        "wsi_histosge.cli.app",
        "batch",
        *map(str, slides),
        "--out",
        str(out),
        "--model",
        str(tiny_model),
        "--stride-um",
        "10",
        "--slide-workers",
        "0",
    ]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    marks = out / "s0.zarr" / "chunk_done" / "c"
    deadline = time.time() + 180
    while time.time() < deadline and not (marks.exists() and sum(1 for _ in marks.rglob("*")) >= 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    state = json.loads((out / "state" / "s0.json").read_text())
    assert state["status"] == "interrupted"
    assert not (out / "state" / "s0.lock").exists()
    assert "completed" not in json.loads((out / "s0.zarr" / "zarr.json").read_text())["attributes"]
    proc2 = subprocess.run([*args, "--json"], capture_output=True, text=True, timeout=300)
    assert proc2.returncode == 0, proc2.stderr
    rows = {r["id"]: r for r in json.loads(proc2.stdout)["slides"]}
    assert rows["s0"]["result"] == "resumed" and rows["s1"]["status"] == "done"


# Option values, through the real entry point (one-line errors, exit 2, nothing created) -------------
SAMPLE = ROOT / "wsi_histosge" / "samples" / "cmu1-skin-crop.tif"


def _main(args: list[str]) -> tuple[int, str]:
    """Run the installed entry point in-process: (exit code, stdout + stderr)."""
    import contextlib
    import io

    from wsi_histosge.cli.app import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        try:
            main(args)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        else:
            code = 0
    return code, buf.getvalue()


def _one_line_error(text: str) -> bool:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in text


@pytest.mark.parametrize(
    "extra",
    [
        ["--mpp", "inf"],
        ["--mpp", "1e9"],
        ["--mpp", "0"],
        ["--mpp", "-0.5"],
        ["--stride-um", "nan"],
        ["--stride-um", "0"],
        ["--stride-um", "-50"],
        ["--spot-um", "0"],
        ["--context-um", "0"],
        ["--context-um", "inf"],
        ["--batch-size", "-1"],
        ["--batch-size", "0"],
        ["--workers", "-3"],
        ["--device", "banana"],
        ["--device", "cuda:7"],
        ["--precision", "fp8"],
        ["--min-tissue-fraction", "2"],
        ["--min-tissue-fraction", "nan"],
        ["--on-bad-tile", "ignore"],
        ["--stride-um", "abc"],
    ],
    ids=lambda e: " ".join(e),
)
def test_20_option_values_exit_2_naming_the_option_and_write_nothing(extra: list[str], tmp_path: Path) -> None:
    out = tmp_path / "cube.zarr"
    code, text = _main(["infer", str(SAMPLE), "--out", str(out), *extra])
    assert code == 2, text
    assert _one_line_error(text), text
    assert extra[0] in text
    assert list(tmp_path.iterdir()) == []  # no cube, no sidecar, no lock: the corrected command just runs


def test_20b_precision_that_needs_a_gpu_is_refused_on_cpu(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    code, text = _main(["infer", str(SAMPLE), "--out", str(tmp_path / "c.zarr"), "--precision", "bf16"])
    assert code == 2 and "--precision bf16 needs a CUDA device" in text, text


# Property: any value of a numeric option gets the documented answer ----------------------------------
_INFER_RANGES = {
    "--mpp": (0.05, 50.0, False),
    "--stride-um": (1.0, 10_000.0, False),
    "--spot-um": (1.0, 10_000.0, False),
    "--context-um": (4.0, 10_000.0, False),
    "--min-tissue-fraction": (0.0, 1.0, False),
    "--batch-size": (1, 65_536, True),
    "--workers": (0, 64, True),
}
_BATCH_RANGES = {
    "--workers": (1, 1024, True),
    "--retries": (0, 100, True),
    "--stride-um": (1.0, 10_000.0, False),
    "--mpp": (0.05, 50.0, False),
    "--slide-workers": (0, 64, True),
}


def _valid(value: object, lo: float, hi: float, integer: bool) -> bool | None:
    """The oracle: True/False for numbers, None for strings (only the shape of the answer is checked)."""
    import math

    if isinstance(value, str):
        return None
    if integer and not isinstance(value, int):
        return False
    assert isinstance(value, (int, float))
    return math.isfinite(value) and lo <= value <= hi


def _values(integer: bool):  # type: ignore[no-untyped-def]
    from hypothesis import strategies as st

    numbers = st.integers(min_value=-(10**12), max_value=10**12)
    if not integer:
        numbers = numbers | st.floats(allow_nan=True, allow_infinity=True)
    return numbers | st.text(min_size=1, max_size=12).filter(lambda t: not t.startswith("-"))


def _check_answer(value: object, valid: bool | None, code: int, text: str, ok_code: int, flag: str) -> None:
    from wsi_histosge.errors import EXIT_CODES

    assert code in EXIT_CODES, (value, code, text)
    assert "Traceback" not in text and "internal error" not in text, (value, text)
    if valid is False:
        assert code == 2 and _one_line_error(text) and flag in text, (value, code, text)
    elif valid is True:
        assert code == ok_code, (value, code, text)
    else:
        assert code in (2, ok_code), (value, code, text)
        if code == 2:
            assert _one_line_error(text), (value, text)


def _arg(value: object) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def test_21_every_numeric_option_of_infer_and_batch_gets_the_documented_answer(tmp_path: Path) -> None:
    """infer on a missing slide: a bad value exits 2 before the slide is looked at, a good one reaches the
    slide (exit 3); batch on a glob matching nothing: bad value 2, good value 12. Nothing is created."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    missing = tmp_path / "missing.svs"
    out = tmp_path / "out"

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.data())
    def run(data: st.DataObject) -> None:
        command = data.draw(st.sampled_from(["infer", "batch"]))
        ranges = _INFER_RANGES if command == "infer" else _BATCH_RANGES
        flag = data.draw(st.sampled_from(sorted(ranges)))
        lo, hi, integer = ranges[flag]
        value = data.draw(_values(integer))
        if command == "infer":
            args = ["infer", str(missing), "--out", str(out), flag, _arg(value)]
            ok = 3
        else:
            args = ["batch", str(tmp_path / "none-*.svs"), "--out", str(out), flag, _arg(value)]
            ok = 12
        code, text = _main(args)
        _check_answer(value, _valid(value, lo, hi, integer), code, text, ok, flag)
        assert sorted(p.name for p in tmp_path.iterdir()) == [], text

    run()


@pytest.fixture(scope="module")
def small_cube(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Path:
    slide = write_pyramid(tmp_path_factory.mktemp("s") / "s.tif", synthetic_tissue(1200, 1600, seed=3), levels=2)
    out = tmp_path_factory.mktemp("c") / "s.zarr"
    res = runner.invoke(app, ["infer", str(slide), "--out", str(out), "--model", str(tiny_model)])
    assert res.exit_code == 0, res.output
    return out


def test_21b_every_bin_size_of_to_anndata_gets_the_documented_answer(small_cube: Path, tmp_path: Path) -> None:
    """--bin-um: not a finite positive number -> 2 and no file; a number -> a .h5ad (0) or a one-line 2
    (not a multiple of the stride) and no file; never a huge allocation or a traceback."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    h5 = tmp_path / "x.h5ad"

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        st.floats(allow_nan=True, allow_infinity=True) | st.integers(-(10**9), 10**9) | st.text(min_size=1, max_size=8)
    )
    def run(value: object) -> None:
        if isinstance(value, str) and value.startswith("-"):
            value = " " + value
        code, text = _main(["to-anndata", str(small_cube), "--out", str(h5), "--bin-um", _arg(value)])
        import math

        assert "Traceback" not in text and "internal error" not in text, (value, text)
        if isinstance(value, (int, float)) and not (math.isfinite(value) and value > 0):
            assert code == 2 and _one_line_error(text) and "--bin-um" in text, (value, code, text)
        assert code in (0, 2), (value, code, text)
        if code == 2:
            assert _one_line_error(text), (value, text)
            assert not h5.exists()
        else:
            assert h5.is_file()
            h5.unlink()
        assert [p.name for p in tmp_path.iterdir() if p.name != "x.h5ad"] == []

    run()


# Locks, signals -------------------------------------------------------------------------------------
def test_22_a_second_infer_on_the_same_output_is_refused_while_the_first_runs(
    small_cube: Path, tmp_path: Path, tiny_model: Path
) -> None:
    from wsi_histosge.lock import OutputLock

    slide = write_pyramid(tmp_path / "s.tif", synthetic_tissue(1200, 1600, seed=4), levels=2)
    out = tmp_path / "s.zarr"
    first = OutputLock(str(out) + ".lock")
    assert first.acquire()  # as a running `infer` holds it
    code, text = _main(["infer", str(slide), "--out", str(out), "--model", str(tiny_model)])
    assert code == 15 and _one_line_error(text) and "another run" in text and str(out) in text, text
    assert not out.exists()
    first.release()
    code, text = _main(["infer", str(slide), "--out", str(out), "--model", str(tiny_model)])
    assert code == 0, text
    assert not Path(str(out) + ".lock").exists()


def test_23_sigterm_to_infer_exits_130_with_the_resume_hint_and_the_rerun_resumes(
    tmp_path: Path, tiny_model: Path
) -> None:
    slide = write_pyramid(tmp_path / "big.tif", synthetic_tissue(4000, 5000, seed=6), levels=3)
    out = tmp_path / "big.zarr"
    args = ["infer", str(slide), "--out", str(out), "--model", str(tiny_model), "--stride-um", "10"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "wsi_histosge.cli.app", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    marks = out / "chunk_done" / "c"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if marks.exists() and sum(1 for p in marks.rglob("*") if p.is_file()) >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be stopped"
    proc.send_signal(signal.SIGTERM)
    _stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "rerun the same command to resume" in stderr
    assert not Path(str(out) + ".lock").exists()
    res = _cli([*args, "--json"])
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["status"] == "resumed"
    assert _cli(["verify", str(out)]).returncode == 0


# The one exit-code table ----------------------------------------------------------------------------
def test_24_readme_failure_table_is_the_code_table() -> None:
    import re

    from wsi_histosge.errors import EXIT_CODES, HistoSGEError

    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Failure behaviour") :]
    rows = dict(re.findall(r"^\| (\d+) \| (.+?) \|$", section, re.M))
    assert {int(k) for k in rows} == set(EXIT_CODES), "README failure table and errors.EXIT_CODES differ"
    for code, meaning in EXIT_CODES.items():
        assert rows[str(code)] == meaning, (code, rows[str(code)], meaning)

    def subclasses(cls: type) -> list[type]:
        return [cls, *(s for c in cls.__subclasses__() for s in subclasses(c))]

    for cls in subclasses(HistoSGEError):
        assert cls.exit_code in EXIT_CODES, cls
    from wsi_histosge import cohort

    for name in ("EXIT_ALL_OK", "EXIT_PARTIAL", "EXIT_ALL_FAILED", "EXIT_NO_SLIDES", "EXIT_LOCKED", "EXIT_INTERRUPTED"):
        assert getattr(cohort, name) in EXIT_CODES
    code, text = _main(["exit-codes"])
    assert code == 0 and all(meaning in " ".join(text.split()) for meaning in EXIT_CODES.values())


# A broken pyramid level is never used unchecked --------------------------------------------------------
def test_25_a_level_with_wrong_colours_is_skipped_and_said_so(tmp_path: Path, tiny_model: Path) -> None:
    img = synthetic_tissue(2400, 3200, seed=7)
    good = write_pyramid(tmp_path / "good.tif", img, levels=3)
    bad = tmp_path / "bad.tif"
    with tifffile.TiffWriter(bad) as tw:  # levels 1-2 decoded with the wrong colours (channels reversed)
        for i in range(3):
            level = img[:: 2**i, :: 2**i]
            level = level if i == 0 else np.ascontiguousarray(255 - level[..., ::-1])
            res = 1e4 / (0.5 * 2**i)
            tw.write(
                level,
                tile=(256, 256),
                compression="jpeg",
                photometric="rgb",
                subfiletype=int(i > 0),
                resolution=(res, res),
                resolutionunit="CENTIMETER",
            )
    reports = {}
    for name, slide in (("good", good), ("bad", bad)):
        res = _cli(["infer", str(slide), "--out", str(tmp_path / f"{name}.zarr"), "--model", str(tiny_model), "--json"])
        assert res.returncode == 0, res.stderr
        reports[name] = json.loads(res.stdout)
    assert reports["good"]["skipped_levels"] == {}
    assert set(reports["bad"]["skipped_levels"]) == {"1", "2"}, reports["bad"]["skipped_levels"]
    # tissue came from level 0, not from the wrong colours: the spots of the good file (whose thumbnail
    # comes from level 2, so resampling may move a border spot or two)
    assert abs(reports["bad"]["spots"] - reports["good"]["spots"]) <= 0.01 * reports["good"]["spots"]
    info = _cli(["info", str(bad), "--json"])
    checks = {c["level"]: c["ok"] for c in json.loads(info.stdout)["level_check"]}
    assert checks == {0: True, 1: False, 2: False}
    assert "NOT USED" in _cli(["info", str(bad)]).stdout


# A DICOM slide given as its folder is one slide, everywhere ------------------------------------------
@pytest.mark.realdata
def test_26_dicom_series_folder_through_info_infer_to_anndata_and_batch(tmp_path: Path, tiny_model: Path) -> None:
    folder = tmp_path / "cohort" / "case-7"
    folder.mkdir(parents=True)
    shutil.copy(need_shared("wsi-samples", "pathml_small_dicom.dcm"), folder / "1.2.3.dcm")
    res = _cli(["info", str(folder), "--json"])
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["dimensions"] == [3236, 2638]
    out = tmp_path / "case-7.zarr"
    args = ["infer", str(folder), "--out", str(out), "--model", str(tiny_model), "--mpp", "0.5", "--json"]
    res = _cli(args)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["spots"] > 50
    res = _cli(["to-anndata", str(out), "--out", str(tmp_path / "case-7.h5ad")])
    assert res.returncode == 0, res.stderr
    res = _cli(
        [
            "batch",
            str(tmp_path / "cohort"),
            "--out",
            str(tmp_path / "runs"),
            "--model",
            str(tiny_model),
            "--mpp",
            "0.5",
            "--json",
        ]
    )
    summary = json.loads(res.stdout)
    assert res.returncode == 0, summary
    assert [(r["id"], r["status"]) for r in summary["slides"]] == [("case-7", "done")]


def test_27_messages_keep_brackets_in_paths(tmp_path: Path) -> None:
    slide = tmp_path / "scan [a]" / "case [1].svs"
    code, text = _main(["infer", str(slide), "--out", str(tmp_path / "x.zarr")])
    assert code == 3 and _one_line_error(text) and str(slide) in text, text


# What a first-time user ran into (fresh-clone trial) ---------------------------------------------------
def test_28_batch_with_no_slides_says_why_and_writes_nothing(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    code, text = _main(["batch", str(tmp_path / "empty"), "--out", str(tmp_path / "out")])
    assert code == 12 and _one_line_error(text) and "holds no slides" in text, text
    manifest = tmp_path / "m.csv"
    manifest.write_text("slide,id\n")
    code, text = _main(["batch", str(manifest), "--out", str(tmp_path / "out")])
    assert code == 12 and _one_line_error(text) and "lists no slides" in text, text
    assert not (tmp_path / "out").exists()


def test_29_outputs_that_are_files_and_missing_models_are_refused_up_front(small_cube: Path, tmp_path: Path) -> None:
    afile = tmp_path / "afile.txt"
    afile.write_text("mine")
    code, text = _main(["batch", str(SAMPLE), "--out", str(afile)])
    assert code == 2 and _one_line_error(text) and "is a file" in text, text
    code, text = _main(["plot", str(small_cube), "--out", str(afile)])
    assert code == 2 and _one_line_error(text) and "is a file" in text, text
    assert afile.read_text() == "mine"
    code, text = _main(["batch", str(SAMPLE), "--out", str(tmp_path / "o"), "--model", str(tmp_path / "nope")])
    assert code == 3 and _one_line_error(text) and "nope" in text, text
    assert not (tmp_path / "o").exists()


def test_30_a_corrected_option_runs_a_slide_that_failed_under_the_old_one(tmp_path: Path, tiny_model: Path) -> None:
    from PIL import Image

    png = tmp_path / "he.png"  # plain images carry no pixel size: the first run fails for want of --mpp
    Image.fromarray(synthetic_tissue(800, 1000, seed=8)).save(png)
    out = tmp_path / "out"
    code, text = _main(["batch", str(png), "--out", str(out), "--model", str(tiny_model)])
    assert code == 11, text
    code, text = _main(["batch", str(png), "--out", str(out), "--model", str(tiny_model), "--json"])
    row = json.loads(text)["slides"][0]
    assert code == 11 and "--retry-failed" in row["error"], row  # the same command does not repeat the failure
    code, text = _main(["batch", str(png), "--out", str(out), "--model", str(tiny_model), "--mpp", "0.5"])
    assert code == 0, text


def test_31_info_mpp_is_checked_like_infer_and_warnings_are_one_line(tmp_path: Path) -> None:
    for value in ("inf", "nan", "0", "1e9"):
        code, text = _main(["info", str(SAMPLE), "--mpp", value])
        assert code == 2 and _one_line_error(text) and "--mpp" in text, (value, text)
    res = _cli(["info", str(SAMPLE), "--mpp", "0.25"])
    assert res.returncode == 0, res.stderr
    assert res.stderr.startswith("warning:") and len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_32_an_unreachable_scheduler_is_a_usage_error_and_leaves_nothing(tmp_path: Path) -> None:
    import dask
    import distributed  # noqa: F401  (its config defaults must be loaded before one of them is overridden)

    out = tmp_path / "out"
    with dask.config.set({"distributed.comm.timeouts.connect": "2s"}):
        code, text = _main(["batch", str(SAMPLE), "--out", str(out), "--scheduler", "tcp://127.0.0.1:9"])
    assert code == 2 and _one_line_error(text) and "--scheduler" in text, text
    assert not out.exists()


@pytest.mark.realdata
def test_33_a_sub_folder_mixing_two_dicom_slides_is_reported_not_dropped(tmp_path: Path, tiny_model: Path) -> None:
    mixed = tmp_path / "cohort" / "mixed"
    mixed.mkdir(parents=True)
    shutil.copy(need_shared("wsi-samples", "openslide-synthetic", "boxes_0.dcm"), mixed)
    shutil.copy(need_shared("wsi-samples", "pathml_small_dicom.dcm"), mixed)
    shutil.copy(SAMPLE, tmp_path / "cohort" / "sample.tif")
    res = _cli(["batch", str(tmp_path / "cohort"), "--out", str(tmp_path / "o"), "--model", str(tiny_model), "--json"])
    rows = {r["id"]: r for r in json.loads(res.stdout)["slides"]}
    assert res.returncode == 10, rows
    assert rows["sample"]["status"] == "done"
    assert rows["mixed"]["status"] == "failed" and "2 DICOM WSI series" in rows["mixed"]["error"]


def test_34_slides_under_holds_for_every_input_and_resolves_links(tmp_path: Path) -> None:
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "link.tif").symlink_to(SAMPLE)  # points outside the allowed folder
    for inputs in ([str(allowed)], [str(allowed / "link.tif")], [str(allowed / "*.tif")]):
        code, text = _main(["batch", *inputs, "--out", str(tmp_path / "o"), "--slides-under", str(allowed)])
        assert code == 2 and _one_line_error(text) and "outside --slides-under" in text, (inputs, text)
    assert not (tmp_path / "o").exists()
