"""Reader hardening: DICOM series folders, pyramid levels checked against level 0, read errors that name
file and level, and large plain images read with bounded memory."""

from __future__ import annotations

import pickle
import shutil
import struct
import subprocess
import sys
import textwrap
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

import wsi_histosge.slide as slide_mod
from tests.conftest import ROOT, need_shared, synthetic_tissue, write_pyramid
from wsi_histosge.errors import CorruptTileError, SlideFormatError
from wsi_histosge.slide import OpenSlideBackend, dicom_series_folder, open_slide
from wsi_histosge.tissue import detect_tissue


# -- DICOM series folders -------------------------------------------------------------------------
def _dicom_folder(tmp_path: Path, *names: str) -> Path:
    folder = tmp_path / "slide-dicom"
    folder.mkdir()
    for name in names:
        shutil.copy(need_shared("wsi-samples", name), folder / Path(name).name)
    return folder


@pytest.mark.realdata
def test_multi_file_dicom_series_folder_is_one_slide(tmp_path: Path) -> None:
    folder = _dicom_folder(tmp_path, "openslide-synthetic/boxes_0.dcm", "openslide-synthetic/boxes_1.dcm")
    assert dicom_series_folder(folder)
    s = open_slide(folder)
    assert s.path == folder and s.backend.name == "openslide"
    assert s.mpp.source == "dicom metadata (openslide.mpp-x/y)"
    single = open_slide(need_shared("wsi-samples", "openslide-synthetic", "boxes_0.dcm"))
    assert s.dimensions == single.dimensions
    np.testing.assert_array_equal(s.read_region((0, 0), 0, s.dimensions), single.read_region((0, 0), 0, s.dimensions))
    # fingerprint over the folder's files, not the folder inode; stable, and it changes with the series
    fp = s.fingerprint
    assert fp == open_slide(folder).fingerprint and fp != single.fingerprint
    s2 = pickle.loads(pickle.dumps(s))
    assert s2._backend is None and s2.path == folder and s2.fingerprint == fp
    np.testing.assert_array_equal(s2.read_region((0, 0), 0, (8, 8)), s.read_region((0, 0), 0, (8, 8)))
    (folder / "boxes_1.dcm").unlink()
    assert open_slide(folder).fingerprint != fp
    info = s.info()
    assert info["path"] == str(folder) and info["level_check"][0]["ok"]


@pytest.mark.realdata
def test_single_file_dicom_folder_opens_through_pydicom(tmp_path: Path) -> None:
    folder = _dicom_folder(tmp_path, "pathml_small_dicom.dcm")
    assert dicom_series_folder(folder)
    s = open_slide(folder)
    assert s.backend.name == "pydicom" and s.dimensions == (3236, 2638)
    img = s.read_region((1000, 1000), 0, (64, 64))
    ref = open_slide(need_shared("wsi-samples", "pathml_small_dicom.dcm")).read_region((1000, 1000), 0, (64, 64))
    np.testing.assert_array_equal(img, ref)


@pytest.mark.realdata
def test_folder_with_two_dicom_series_is_refused(tmp_path: Path) -> None:
    folder = _dicom_folder(
        tmp_path, "openslide-synthetic/boxes_0.dcm", "openslide-synthetic/boxes_1.dcm", "pathml_small_dicom.dcm"
    )
    assert not dicom_series_folder(folder)
    with pytest.raises(SlideFormatError) as err:
        open_slide(folder)
    msg = str(err.value)
    assert str(folder) in msg and "2 DICOM WSI series" in msg and "one folder per slide" in msg
    assert "\n" not in msg and err.value.exit_code == 4


@pytest.mark.realdata
def test_folder_without_one_dicom_slide_says_what_a_folder_may_hold(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not a slide")
    with pytest.raises(SlideFormatError, match=r"a folder may hold only the \.dcm files of one DICOM WSI series"):
        open_slide(empty)
    assert not dicom_series_folder(empty)
    not_dicom = tmp_path / "fake"
    not_dicom.mkdir()
    (not_dicom / "a.dcm").write_bytes(b"not dicom" * 100)
    with pytest.raises(SlideFormatError, match="not readable as DICOM"):
        open_slide(not_dicom)
    # a cohort folder (a slide file beside a DICOM file) is not one slide
    mixed = _dicom_folder(tmp_path, "pathml_small_dicom.dcm")
    shutil.copy(need_shared("wsi-samples", "CMU-1-Small-Region.svs"), mixed)
    assert not dicom_series_folder(mixed)
    with pytest.raises(SlideFormatError, match=r"CMU-1-Small-Region\.svs"):
        open_slide(mixed)
    assert not dicom_series_folder(need_shared("wsi-samples", "pathml_small_dicom.dcm"))  # a file


# -- pyramid levels checked against level 0 ------------------------------------------------------
def _box_pyramid(img: np.ndarray, levels: int) -> list[np.ndarray]:
    out = [img]
    for _ in range(1, levels):
        h, w = out[-1].shape[:2]
        out.append(np.asarray(Image.fromarray(out[-1]).resize((w // 2, h // 2), Image.Resampling.BOX)))
    return out


def _write_levels(path: Path, levels: list[np.ndarray], mpp: float = 0.499) -> Path:
    with tifffile.TiffWriter(path) as tw:
        for i, level in enumerate(levels):
            res = 1e4 / (mpp * 2**i)
            tw.write(
                level,
                tile=(256, 256),
                compression="jpeg",
                photometric="rgb",
                subfiletype=0 if i == 0 else 1,
                resolution=(res, res),
                resolutionunit="CENTIMETER",
            )
    return path


@pytest.fixture(scope="module")
def cmu_pyramids(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """CMU-1's real pixels as a 4-level pyramid: a correct one; one whose level 1 has red and blue swapped and
    whose level 2 holds YCbCr shown as RGB (a decoder's colour-space mix-up; level 3 correct); level 0 alone."""
    svs = open_slide(need_shared("wsi-samples", "CMU-1-Small-Region.svs"))
    levels = _box_pyramid(svs.read_region((0, 0), 0, svs.dimensions), 4)
    folder = tmp_path_factory.mktemp("levels")
    good = _write_levels(folder / "good.tif", levels)
    ycbcr = np.asarray(Image.fromarray(levels[2]).convert("YCbCr"))
    bad = _write_levels(folder / "bad.tif", [levels[0], levels[1][..., ::-1].copy(), ycbcr, levels[3]])
    return good, bad, _write_levels(folder / "level0.tif", levels[:1])


@pytest.mark.realdata
def test_bad_levels_are_found_and_skipped(cmu_pyramids: tuple[Path, Path, Path]) -> None:
    good, bad = open_slide(cmu_pyramids[0]), open_slide(cmu_pyramids[1])
    assert good.best_level_for_mpp(1.0) == 1 and good.skipped_levels == {}
    # the bad file really is bad where it matters: its level 1 differs from the good level 1
    g1 = good.read_region((1000, 1400), 1, (400, 400)).astype(int)
    b1 = bad.read_region((1000, 1400), 1, (400, 400)).astype(int)
    assert np.abs(g1 - b1).mean(axis=(0, 1))[[0, 2]].min() > 8  # red and blue, over tissue
    assert bad.best_level_for_mpp(1.0, verified=False) == 1
    assert bad.best_level_for_mpp(1.0) == 0  # level 1 fails its check: level 0 instead
    assert bad.best_level_for_mpp(2.0) == 0  # level 2 fails too, and so does level 1 below it
    assert bad.best_level_for_mpp(4.0) == 3  # a correct coarser level is still used
    assert set(bad.skipped_levels) == {1, 2}
    assert "differ from level 0" in bad.skipped_levels[1]
    checks = bad.info()["level_check"]
    assert [c["ok"] for c in checks] == [True, False, False, True]
    assert checks[1]["difference"] > slide_mod.LEVEL_CHECK_MAX_DIFF
    assert [c["ok"] for c in good.info()["level_check"]] == [True] * 4
    assert max(c["difference"] or 0 for c in good.level_check()) < slide_mod.LEVEL_CHECK_MAX_DIFF / 2
    # verdicts travel with the slide to DataLoader workers
    assert pickle.loads(pickle.dumps(bad)).skipped_levels == bad.skipped_levels


@pytest.mark.realdata
def test_thumbnail_and_tissue_come_from_level_0_when_levels_are_bad(cmu_pyramids: tuple[Path, Path, Path]) -> None:
    good, bad, level0 = (open_slide(p) for p in cmu_pyramids)
    gt, gmpp = good.thumbnail(1.0)
    bt, bmpp = bad.thumbnail(1.0)
    assert gt.shape == bt.shape and gmpp == pytest.approx(bmpp)
    np.testing.assert_array_equal(bt, level0.thumbnail(1.0)[0])  # made from level 0
    assert 1 in bad.skipped_levels
    # same colours as the good file's level 1 (the swapped level is 6 units off in red and blue)
    assert np.abs(gt.reshape(-1, 3).mean(0) - bt.reshape(-1, 3).mean(0)).max() < 1
    swapped = bad.read_region((0, 0), 1, bad.level_dimensions[1])
    assert np.abs(swapped.reshape(-1, 3).mean(0) - gt.reshape(-1, 3).mean(0)).max() > 4
    gm = detect_tissue(good, mpp=2.0).mask
    bm = detect_tissue(bad, mpp=2.0).mask
    assert gm.shape == bm.shape and gm.mean() > 0.2
    assert (gm == bm).mean() > 0.98  # from the unchecked level 2 it is 0.42 (the wrong colours read as tissue)
    assert 2 in bad.skipped_levels


@pytest.mark.parametrize(
    "damage,ok",
    [
        (lambda a: a, True),
        (lambda a: a[..., ::-1].copy(), False),  # BGR
        (lambda a: 255 - a, False),  # inverted
        (np.zeros_like, False),  # black
        (lambda a: np.full_like(a, 255), False),  # blank
    ],
    ids=["correct", "bgr", "inverted", "black", "blank"],
)
def test_level_check_on_generated_pyramid(tmp_path: Path, damage: Callable[[np.ndarray], np.ndarray], ok: bool) -> None:
    levels = _box_pyramid(synthetic_tissue(1536, 2048), 2)
    path = _write_levels(tmp_path / "s.tif", [levels[0], damage(levels[1])])
    s = open_slide(path)
    assert s.level_check()[1]["ok"] is ok
    assert s.best_level_for_mpp(1.0) == (1 if ok else 0)


def test_level_whose_read_fails_is_skipped(tmp_path: Path) -> None:
    path = write_pyramid(tmp_path / "broken-level.tif", synthetic_tissue(2048, 2048), levels=2)
    with tifffile.TiffFile(path) as tf:
        page = tf.pages[1]
        offsets, counts = list(page.dataoffsets), list(page.databytecounts)
    data = bytearray(path.read_bytes())
    for off, n in zip(offsets, counts, strict=True):
        data[off : off + n] = b"\x00" * n  # every tile of level 1 fails to decode
    path.write_bytes(bytes(data))
    s = open_slide(path)
    with pytest.raises(CorruptTileError, match=r"of level 1 failed to decode"):
        s.read_region((0, 0), 1, (64, 64))
    assert s.best_level_for_mpp(1.0) == 0
    assert "read failed" in s.skipped_levels[1] and "level 1" in s.skipped_levels[1]
    thumb, _ = s.thumbnail(1.0)
    ref = np.asarray(Image.fromarray(s.read_region((0, 0), 0, (2048, 2048))).resize((1024, 1024), Image.Resampling.BOX))
    assert np.abs(thumb.astype(int) - ref.astype(int)).mean() < 1


@pytest.mark.realdata
@pytest.mark.parametrize(
    "name",
    ["CMU-1-Small-Region.ome.tif", "openslide-synthetic/boxes.tiff", "openslide-synthetic/pathml_small_HE_levels.tiff"],
)
def test_real_pyramids_pass_their_level_check(name: str) -> None:
    import time

    s = open_slide(need_shared("wsi-samples", name))
    t0 = time.perf_counter()
    checks = s.level_check()
    assert time.perf_counter() - t0 < 5
    assert all(c["ok"] for c in checks), checks
    assert max(c["difference"] or 0 for c in checks) < slide_mod.LEVEL_CHECK_MAX_DIFF / 2  # with margin
    assert s.skipped_levels == {}


# -- read errors name file and level -------------------------------------------------------------
def test_openslide_read_error_names_file_and_level_and_the_handle_recovers(tmp_path: Path) -> None:
    path = write_pyramid(tmp_path / "os.tif", synthetic_tissue(1024, 1024), levels=2)
    with tifffile.TiffFile(path) as tf:
        page = tf.pages[1]
        off, n = int(page.dataoffsets[0]), int(page.databytecounts[0])
    data = bytearray(path.read_bytes())
    data[off : off + n] = b"\x00" * n
    path.write_bytes(bytes(data))
    backend = OpenSlideBackend(path)
    with pytest.raises(CorruptTileError) as err:
        backend.read_region((0, 0), 1, (128, 128))
    assert str(path) in str(err.value) and "level 1" in str(err.value)
    assert backend.read_region((0, 0), 0, (64, 64)).shape == (64, 64, 3)  # not stuck in OpenSlide's error state


def test_low_level_read_errors_get_file_and_level(tmp_path: Path) -> None:
    path = tmp_path / "float.tif"
    pixels = np.random.default_rng(0).random((512, 512, 3)).astype(np.float32)
    tifffile.imwrite(
        path, pixels, tile=(256, 256), photometric="rgb", resolution=(2e4, 2e4), resolutionunit="CENTIMETER"
    )
    s = open_slide(path)
    for read in (lambda: s.read_region((0, 0), 0, (10, 10)), lambda: s.thumbnail(4.0)):
        with pytest.raises(SlideFormatError) as err:
            read()
        msg = str(err.value)
        assert msg.startswith(f"{path}: ") and "level 0" in msg and "8-bit RGB" in msg and "\n" not in msg


# -- large plain images ---------------------------------------------------------------------------
def write_white_png(path: Path, width: int, height: int, colour: tuple[int, int, int] = (200, 120, 180)) -> Path:
    """A white RGB PNG with a coloured band across its middle fifth, written without holding the image:
    each run of identical rows is deflated once and repeated (a full flush makes runs independent)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    def deflate(raw: bytes, final: bool) -> bytes:
        c = zlib.compressobj(9, zlib.DEFLATED, -15)
        return c.compress(raw) + (c.flush() if final else c.flush(zlib.Z_FULL_FLUSH))

    x0, x1, y0, y1 = 2 * width // 5, 3 * width // 5, 2 * height // 5, 3 * height // 5
    rows = {
        "white": b"\x00" + b"\xff" * (3 * width),
        "band": b"\x00" + b"\xff" * (3 * x0) + bytes(colour) * (x1 - x0) + b"\xff" * (3 * (width - x1)),
    }
    done: dict[tuple[str, int, bool], bytes] = {}
    adler = 1
    with open(path, "wb") as fh:
        fh.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)))
        fh.write(chunk(b"IDAT", b"\x78\xda"))
        y = 0
        while y < height:
            stop = y0 if y < y0 else y1 if y < y1 else height
            n = min(64, stop - y)
            kind = "band" if y0 <= y < y1 else "white"
            raw = rows[kind] * n
            key = (kind, n, y + n == height)
            if key not in done:
                done[key] = deflate(raw, y + n == height)
            adler = zlib.adler32(raw, adler)
            fh.write(chunk(b"IDAT", done[key]))
            y += n
        fh.write(chunk(b"IDAT", struct.pack(">I", adler)) + chunk(b"IEND", b""))
    return path


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="peak RSS read from /proc (Linux)")
def test_large_png_is_read_in_strips_with_bounded_memory(tmp_path: Path) -> None:
    side = 16000  # 256 Mpx: 768 MB of RGB when decoded whole
    path = write_white_png(tmp_path / "big.png", side, side)
    assert path.stat().st_size < 5 << 20
    code = textwrap.dedent(
        f"""
        from wsi_histosge.slide import open_slide
        s = open_slide({str(path)!r}, mpp=0.5)
        assert s.backend.properties["plain-image.read"] == "row strips"
        thumb, _ = s.thumbnail(8.0)
        h, w = thumb.shape[:2]
        assert tuple(thumb[h // 2, w // 2]) == (200, 120, 180) and tuple(thumb[2, 2]) == (255, 255, 255)
        assert tuple(s.read_region((7900, 7900), 0, (200, 200))[100, 100]) == (200, 120, 180)
        corner = s.read_region(({side} - 100, {side} - 100), 0, (200, 200))
        assert (corner == 255).all()
        assert tuple(s.read_region((0, 6500), 0, (64, 64))[0, 0]) == (255, 255, 255)  # back up: from a checkpoint
        # VmHWM: the peak of this process image only (ru_maxrss would count the forked pytest parent's pages)
        with open("/proc/self/status") as fh:
            print(next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:")) // 1024)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    peak_mb = int(proc.stdout.split()[-1])
    assert peak_mb < 450, f"peak RSS {peak_mb} MB for a {side}x{side} PNG (whole decode is > 768 MB)"


@pytest.mark.parametrize("mode", ["RGB", "L", "LA", "RGBA"])
def test_png_strips_match_a_whole_decode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    import imagecodecs

    # small strips and few checkpoints, so reads cross many strips and restart from checkpoints
    monkeypatch.setattr(slide_mod, "PNG_STRIPS_ABOVE_PIXELS", 0)
    monkeypatch.setattr(slide_mod._PngStrips, "STRIP_BYTES", 20_000)
    monkeypatch.setattr(slide_mod._PngStrips, "CHECKPOINT_BYTES", 200_000)
    rng = np.random.default_rng(1)
    img = np.cumsum(rng.integers(0, 255, (700, 513, len(mode)), dtype=np.uint8), axis=1, dtype=np.uint8)
    path = tmp_path / f"{mode}.png"
    Image.fromarray(img[..., 0] if mode == "L" else img, mode).save(path)
    ref = slide_mod._rgb(np.asarray(imagecodecs.imread(str(path))))
    s = open_slide(path, mpp=1.0)
    assert s.backend.properties["plain-image.read"] == "row strips"
    for _ in range(40):
        x, y = (int(v) for v in rng.integers(-50, 600, 2))
        w, h = (int(v) for v in rng.integers(1, 300, 2))
        want = np.full((h, w, 3), 255, np.uint8)
        sx0, sy0, sx1, sy1 = max(x, 0), max(y, 0), min(513, x + w), min(700, y + h)
        if sx1 > sx0 and sy1 > sy0:
            want[sy0 - y : sy1 - y, sx0 - x : sx1 - x] = ref[sy0:sy1, sx0:sx1]
        np.testing.assert_array_equal(s.read_region((x, y), 0, (w, h)), want)


def test_truncated_png_read_names_file_and_level(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(slide_mod, "PNG_STRIPS_ABOVE_PIXELS", 0)
    rng = np.random.default_rng(2)
    path = tmp_path / "trunc.png"
    Image.fromarray(rng.integers(0, 255, (600, 400, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    s = open_slide(path, mpp=1.0)
    with pytest.raises(CorruptTileError) as err:
        s.read_region((0, 500), 0, (50, 50))
    assert str(path) in str(err.value) and "level 0" in str(err.value) and err.value.exit_code == 4


def _jpeg_claiming(tmp_path: Path, width: int, height: int) -> Path:
    """A real small JPEG whose frame header claims ``width`` x ``height``."""
    path = tmp_path / "huge.jpg"
    Image.fromarray(np.full((16, 16, 3), 200, np.uint8)).save(path, quality=90)
    data = bytearray(path.read_bytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    path.write_bytes(bytes(data))
    return path


def test_huge_jpeg_and_interlaced_png_are_refused_from_the_header(tmp_path: Path) -> None:
    with pytest.raises(SlideFormatError) as err:
        open_slide(_jpeg_claiming(tmp_path, 30000, 30000), mpp=0.5)
    msg = str(err.value)
    assert "900,000,000 px" in msg and f"{slide_mod.PLAIN_DECODE_MAX_PIXELS:,} px" in msg
    assert "tiled pyramidal TIFF" in msg and "\n" not in msg and err.value.exit_code == 4
    # the full-resolution H&E of a Visium run still opens (decoded whole, on demand)
    assert open_slide(_jpeg_claiming(tmp_path, 20000, 20000), mpp=0.5).dimensions == (20000, 20000)
    png = tmp_path / "interlaced.png"
    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 1)
    png.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + struct.pack(">I", 13)
        + b"IHDR"
        + ihdr
        + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
        + struct.pack(">I", 0)
        + b"IDAT"
        + struct.pack(">I", zlib.crc32(b"IDAT"))
    )
    with pytest.raises(SlideFormatError, match="interlaced"):
        open_slide(png, mpp=0.5)


def _read_in_child(slide: slide_mod.Slide, ys: list[int], queue: object) -> None:
    inherited = slide._backend
    regions = {y: slide.read_region((0, y), 0, (300, 40)).tobytes() for y in ys}
    queue.put((inherited is not None and slide._backend is not inherited, regions))  # type: ignore[attr-defined]


@pytest.mark.skipif(sys.platform != "linux", reason="fork start method")
def test_forked_workers_open_their_own_reader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """DataLoader workers forked from a process that has read the slide must not share its open files."""
    import multiprocessing

    monkeypatch.setattr(slide_mod, "PNG_STRIPS_ABOVE_PIXELS", 0)
    rng = np.random.default_rng(3)
    path = tmp_path / "fork.png"
    Image.fromarray(rng.integers(0, 255, (800, 300, 3), dtype=np.uint8)).save(path)
    s = open_slide(path, mpp=1.0)
    ys = list(range(0, 800, 40))
    want = {y: s.read_region((0, y), 0, (300, 40)).tobytes() for y in ys}
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    children = [ctx.Process(target=_read_in_child, args=(s, order, queue)) for order in (ys, ys[::-1])]
    for child in children:
        child.start()
    results = [queue.get(timeout=60) for _ in children]
    for child in children:
        child.join(timeout=60)
    assert all(reopened for reopened, _ in results)
    assert all(regions == want for _, regions in results)
