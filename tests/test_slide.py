from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import need_shared, synthetic_tissue, write_pyramid
from wsi_histosge.errors import CorruptTileError, MPPMissingError, SlideFormatError, SlideNotFoundError
from wsi_histosge.slide import open_slide


def test_generated_pyramid_levels_and_mpp(pyramid_slide: Path) -> None:
    s = open_slide(pyramid_slide)
    assert s.dimensions == (4000, 3000)
    assert s.level_count == 3
    assert s.mpp.x == pytest.approx(0.5)
    assert s.mpp.source == "TIFF resolution tags"
    assert s.best_level_for_mpp(1.0) == 1
    assert s.best_level_for_mpp(0.9) == 0
    region = s.read_region((1900, 1400), 0, (200, 200))
    assert region.shape == (200, 200, 3) and region.dtype == np.uint8
    # the pixels written there (up to JPEG; one pixel off differs by ~20), and level 1 addressed in level-0 px
    img = synthetic_tissue().astype(np.int16)
    assert np.abs(region - img[1400:1600, 1900:2100]).mean() < 5
    assert np.abs(s.read_region((1900, 1400), 1, (100, 100)) - img[::2, ::2][700:800, 950:1050]).mean() < 5


def test_slide_pickles_without_its_handle(pyramid_slide: Path) -> None:
    s = open_slide(pyramid_slide)
    s2 = pickle.loads(pickle.dumps(s))
    assert s2._backend is None
    np.testing.assert_array_equal(s2.read_region((0, 0), 1, (64, 64)), s.read_region((0, 0), 1, (64, 64)))


def test_no_mpp_is_a_clear_error(tmp_path: Path) -> None:
    path = write_pyramid(tmp_path / "nompp.tif", synthetic_tissue(512, 512), mpp=None, levels=1)
    s = open_slide(path)
    with pytest.raises(MPPMissingError, match="--mpp"):
        _ = s.mpp
    assert open_slide(path, mpp=0.25).mpp.source == "user override (--mpp)"


@pytest.mark.parametrize("content", [b"", b"this is not a slide\n" * 100])
def test_not_a_slide(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "fake.svs"
    path.write_bytes(content)
    with pytest.raises(SlideFormatError, match=str(path)):
        open_slide(path)


def test_directory_and_missing(tmp_path: Path) -> None:
    (tmp_path / "dir.svs").mkdir()
    with pytest.raises(SlideFormatError, match="directory"):
        open_slide(tmp_path / "dir.svs")
    with pytest.raises(SlideNotFoundError):
        open_slide(tmp_path / "nope.svs")


@pytest.mark.realdata
def test_truncated_real_svs(tmp_path: Path) -> None:
    src = need_shared("wsi-samples", "CMU-1-Small-Region.svs")
    data = src.read_bytes()
    path = tmp_path / "truncated.svs"
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(SlideFormatError):
        s = open_slide(path)
        s.read_region((0, 0), 0, s.dimensions)


@pytest.mark.realdata
@pytest.mark.parametrize(
    "name,mpp_source",
    [
        ("CMU-1-Small-Region.svs", "aperio image description (MPP)"),
        ("CMU-1-Small-Region.ome.tif", "OME-XML PhysicalSizeX/Y"),
        ("openslide-synthetic/small.svs", "aperio image description (MPP)"),
        ("openslide-synthetic/boxes_0.dcm", "dicom metadata (openslide.mpp-x/y)"),
        ("openslide-synthetic/boxes_1.dcm", "dicom metadata (openslide.mpp-x/y)"),
    ],
)
def test_real_samples_open(name: str, mpp_source: str) -> None:
    s = open_slide(need_shared("wsi-samples", name))
    assert s.mpp.source == mpp_source
    w, h = s.dimensions
    assert s.read_region((0, 0), 0, (min(w, 32), min(h, 32))).shape[2] == 3


@pytest.mark.realdata
@pytest.mark.parametrize("name", ["openslide-synthetic/boxes.tiff", "openslide-synthetic/pathml_small_HE_levels.tiff"])
def test_72dpi_tiffs_need_mpp(name: str) -> None:
    s = open_slide(need_shared("wsi-samples", name))
    with pytest.raises(MPPMissingError, match="72-dpi"):
        _ = s.mpp
    assert s.level_count == 4


@pytest.mark.realdata
def test_minimal_dicom_opens_through_pydicom_with_the_right_frame_order() -> None:
    """OpenSlide refuses this single-file DICOM WSI (no organisation, no pixel spacing); pydicom reads it.
    Its frames are column-major: the assembled image must continue across frame edges."""
    path = need_shared("wsi-samples", "pathml_small_dicom.dcm")
    s = open_slide(path)
    assert s.backend.name == "pydicom" and s.dimensions == (3236, 2638)
    assert s.backend.properties["dicom.frame-order"].startswith("column-major")
    with pytest.raises(MPPMissingError, match="--mpp"):
        _ = s.mpp
    img = s.read_region((0, 0), 0, (2500, 2000)).astype(np.int16)
    across = np.abs(img[:, 499] - img[:, 500]).mean() + np.abs(img[499] - img[500]).mean()
    within = np.abs(img[:, 249] - img[:, 250]).mean() + np.abs(img[249] - img[250]).mean()
    assert across < 2 * within + 2  # seams would be many times larger


@pytest.mark.realdata
def test_real_svs_and_ome_agree() -> None:
    svs = open_slide(need_shared("wsi-samples", "CMU-1-Small-Region.svs"))
    ome = open_slide(need_shared("wsi-samples", "CMU-1-Small-Region.ome.tif"))
    a = svs.read_region((1000, 1000), 0, (64, 64)).astype(int)
    b = ome.read_region((1000, 1000), 0, (64, 64)).astype(int)
    assert np.abs(a - b).mean() < 8  # same pixels, re-encoded


@pytest.mark.realdata
def test_her2st_jpeg_needs_mpp_then_reads() -> None:
    path = need_shared("her2st", "ST-imgs", "C", "C2", "5714_HE_BT_C2.jpg")
    with pytest.raises(MPPMissingError):
        _ = open_slide(path).mpp
    s = open_slide(path, mpp=0.688)
    assert s.dimensions == (9274, 9911)
    assert s.read_region((4000, 4000), 0, (100, 100)).shape == (100, 100, 3)


def test_pil_global_limit_untouched(pyramid_slide: Path) -> None:
    from PIL import Image

    before = Image.MAX_IMAGE_PIXELS
    import wsi_histosge.infer  # noqa: F401

    open_slide(pyramid_slide).thumbnail(8.0)
    assert before == Image.MAX_IMAGE_PIXELS


def _tile_offsets(path: Path) -> tuple[list[int], list[int]]:
    import tifffile

    with tifffile.TiffFile(path) as tf:
        page = tf.pages[0]
        return list(page.dataoffsets), list(page.databytecounts)


def test_corrupt_jpeg_tile_names_its_position(tmp_path: Path) -> None:
    path = write_pyramid(tmp_path / "corrupt.tif", synthetic_tissue(1024, 1024), levels=1)
    offsets, counts = _tile_offsets(path)
    data = bytearray(path.read_bytes())
    k = 5  # tile (col 1, row 1) of a 4x4 grid of 256 px tiles
    data[offsets[k] : offsets[k] + counts[k]] = b"\x00" * counts[k]
    path.write_bytes(bytes(data))
    s = open_slide(path)
    s.read_region((0, 0), 0, (256, 256))  # an intact tile still reads
    with pytest.raises(CorruptTileError, match=r"tile \(col 1, row 1\) of level 0 failed to decode"):
        s.read_region((200, 200), 0, (200, 200))


def test_direct_reads_match_tiffslide(pyramid_slide: Path) -> None:
    import tiffslide

    ours = open_slide(pyramid_slide)
    ref = tiffslide.TiffSlide(pyramid_slide)
    for level in range(ours.level_count):
        for loc, size in [((0, 0), (300, 200)), ((1234, 567), (513, 259))]:
            np.testing.assert_array_equal(
                ours.read_region(loc, level, size), ref.read_region(loc, level, size, as_array=True)
            )


def test_every_read_path_returns_glass_outside_the_slide(pyramid_slide: Path) -> None:
    """Direct tiled reads and tiffslide's own path agree, including regions past every edge (white there)."""
    direct = open_slide(pyramid_slide)
    fallback = open_slide(pyramid_slide)
    fallback.backend._direct = [None] * fallback.level_count  # type: ignore[attr-defined]
    for level in range(direct.level_count):
        for loc, size in [((-300, -200), (500, 400)), ((3800, 2900), (400, 300)), ((1500, 1000), (256, 256))]:
            a = direct.read_region(loc, level, size)
            np.testing.assert_array_equal(a, fallback.read_region(loc, level, size))
        corner = direct.read_region((-300, -200), level, (100, 50))
        assert (corner == 255).all()
