"""One contract every reader backend passes (the model: zarr-python's ``StoreTests``).

:class:`ReaderContract` holds the tests; each ``Test*`` subclass opens a sample with one backend (directly,
not through :func:`open_backend`, so the backend under test is the one that reads) and says what to expect.
A new backend gets its subclass here.
"""

from __future__ import annotations

import itertools
import pickle
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import tifffile
from PIL import Image

from tests.conftest import need_shared, synthetic_tissue, write_pyramid
from wsi_histosge.errors import CorruptTileError, SlideFormatError
from wsi_histosge.readers import DicomBackend, OpenSlideBackend, PlainImageBackend, TiffSlideBackend, plain
from wsi_histosge.readers.base import Backend

#: Mean absolute difference (8-bit units, per channel, over cells of CELL_PX level px) allowed between a level
#: and level 0 resampled to it: JPEG re-encoding and resampling stay below ~3, a level with red and blue
#: swapped is over 12 (see LEVEL_CHECK_MAX_DIFF in wsi_histosge.slide).
LEVEL_TOLERANCE = 6.0
CELL_PX = 8
#: Width of the band read outside each edge (level px).
MARGIN = 16


def _zero_tile(path: Path, page_index: int, tile: int = 0) -> None:
    """Overwrite one tile of a generated TIFF with zeros: it no longer decodes."""
    with tifffile.TiffFile(path) as tf:
        page = tf.pages[page_index]
        off, n = int(page.dataoffsets[tile]), int(page.databytecounts[tile])
    data = bytearray(path.read_bytes())
    data[off : off + n] = b"\x00" * n
    path.write_bytes(bytes(data))


def _cells(img: np.ndarray) -> np.ndarray:
    h, w = img.shape[:2]
    grid = (max(1, w // CELL_PX), max(1, h // CELL_PX))
    return np.asarray(Image.fromarray(img).resize(grid, Image.Resampling.BOX), np.float32).reshape(-1, 3)


class ReaderContract:
    """What every backend must do. Subclasses provide :meth:`open` and the ``sample`` fixture."""

    #: What ``stated_mpp()`` gives as its source; None: the backend states no pixel size for this sample.
    mpp_source: ClassVar[str | None]
    #: The error a corrupt tile raises (a file decoded whole has no tiles: its decode error is the report).
    corrupt_error: ClassVar[type[Exception]] = CorruptTileError

    #: The backend under test (every backend in ``wsi_histosge.readers`` has a subclass here).
    backend_class: ClassVar[type]

    def open(self, path: Path) -> Backend:
        return self.backend_class(path)  # type: ignore[no-any-return]

    @pytest.fixture
    def sample(self) -> Path:
        raise NotImplementedError

    def corrupt_sample(self, tmp_path: Path) -> tuple[Path, int, tuple[int, int]] | None:
        """A generated file with a tile that cannot be decoded: (path, level, level-0 location inside that
        tile); None where this backend has no tiles that can be corrupted in a generated file."""
        return None

    @pytest.fixture
    def backend(self, sample: Path) -> Any:
        backend = self.open(sample)
        yield backend
        backend.close()

    # -- the contract ------------------------------------------------------------------------------
    def test_level_geometry(self, backend: Backend) -> None:
        dims, downsamples = backend.level_dimensions, backend.level_downsamples
        assert len(dims) == len(downsamples) >= 1
        assert downsamples[0] == 1.0
        assert all(a < b for a, b in itertools.pairwise(downsamples)), downsamples
        w0, h0 = dims[0]
        assert w0 > 0 and h0 > 0
        for (w, h), ds in zip(dims, downsamples, strict=True):
            assert isinstance(w, int) and isinstance(h, int) and w > 0 and h > 0
            assert abs(w0 / ds - w) <= 1 and abs(h0 / ds - h) <= 1, (w, h, ds)

    def test_white_past_every_edge(self, backend: Backend) -> None:
        w0, h0 = backend.level_dimensions[0]
        for level, ((lw, lh), ds) in enumerate(zip(backend.level_dimensions, backend.level_downsamples, strict=True)):
            side = 2 * MARGIN
            before = -round(MARGIN * ds)  # level px -MARGIN (one px more where ds is not an integer)
            after_x, after_y = round((lw - MARGIN) * ds), round((lh - MARGIN) * ds)
            for loc in [(before, before), (after_x, after_y), (before, after_y), (after_x, before)]:
                region = backend.read_region(loc, level, (side, side))
                assert region.shape == (side, side, 3) and region.dtype == np.uint8
                outside_x = region[:, : MARGIN - 1] if loc[0] < 0 else region[:, MARGIN + 2 :]
                outside_y = region[: MARGIN - 1] if loc[1] < 0 else region[MARGIN + 2 :]
                assert (outside_x == 255).all() and (outside_y == 255).all(), (level, loc)
            for loc in [(-10 * w0, 0), (0, -10 * h0), (2 * w0, 0), (0, 2 * h0)]:
                assert (backend.read_region(loc, level, (20, 12)) == 255).all(), (level, loc)

    def test_pickled_backend_reopens_with_the_same_pixels(self, backend: Backend) -> None:
        again = pickle.loads(pickle.dumps(backend))
        try:
            assert type(again) is type(backend)
            assert again.level_dimensions == backend.level_dimensions
            assert again.level_downsamples == backend.level_downsamples
            for level, (lw, lh) in enumerate(backend.level_dimensions):
                ds = backend.level_downsamples[level]
                loc = (round(lw * ds / 3), round(lh * ds / 3))
                size = (min(lw, 96), min(lh, 64))
                np.testing.assert_array_equal(
                    again.read_region(loc, level, size), backend.read_region(loc, level, size)
                )
        finally:
            again.close()

    def test_corrupt_tile_names_file_and_level(self, tmp_path: Path) -> None:
        corrupt = self.corrupt_sample(tmp_path)
        if corrupt is None:
            pytest.skip(f"{type(self).__name__}: no tiles to corrupt in a generated file")
        path, level, location = corrupt
        backend = self.open(path)
        try:
            with pytest.raises(self.corrupt_error) as err:
                backend.read_region(location, level, (32, 32))
        finally:
            backend.close()
        msg = str(err.value)
        assert str(path) in msg and f"level {level}" in msg, msg

    def test_mpp_source_stated(self, backend: Backend) -> None:
        stated = backend.stated_mpp()
        if self.mpp_source is None:
            assert stated is None
            return
        assert stated is not None
        x, y, source = stated
        assert x > 0 and y > 0 and source == self.mpp_source

    def test_every_level_shows_level_0(self, backend: Backend) -> None:
        """Each level, compared with level 0 resampled to it, over a central region of up to 128 level px."""
        w0, h0 = backend.level_dimensions[0]
        for level in range(1, len(backend.level_dimensions)):
            lw, lh = backend.level_dimensions[level]
            sx, sy = w0 / lw, h0 / lh
            pw, ph = min(lw, 128), min(lh, 128)
            x, y = (lw - pw) // 2, (lh - ph) // 2
            ds = backend.level_downsamples[level]
            patch = backend.read_region((int(np.ceil(x * ds)), int(np.ceil(y * ds))), level, (pw, ph))
            ref = backend.read_region((round(x * sx), round(y * sy)), 0, (round(pw * sx), round(ph * sy)))
            ref = np.asarray(Image.fromarray(ref).resize((pw, ph), Image.Resampling.BOX))
            diff = np.abs(_cells(patch) - _cells(ref)).mean(axis=0).max()
            assert diff < LEVEL_TOLERANCE, (level, diff)


# -- generated samples ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def generated_pyramid(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_pyramid(tmp_path_factory.mktemp("contract") / "pyramid.tif", synthetic_tissue(1536, 2048))


def _corrupt_pyramid(tmp_path: Path) -> tuple[Path, int, tuple[int, int]]:
    path = write_pyramid(tmp_path / "corrupt.tif", synthetic_tissue(1024, 1024), levels=2)
    _zero_tile(path, page_index=1)  # level 1, tile (0, 0)
    return path, 1, (0, 0)


class TestTiffDirect(ReaderContract):
    """tiffslide for the structure, tiles read and decoded by the direct reader (every level)."""

    mpp_source = "TIFF resolution tags"
    backend_class = TiffSlideBackend

    def open(self, path: Path) -> Backend:
        backend = TiffSlideBackend(path)
        assert all(backend._direct), "the generated pyramid must go through the direct tiled reader"
        return backend

    @pytest.fixture
    def sample(self, generated_pyramid: Path) -> Path:
        return generated_pyramid

    def corrupt_sample(self, tmp_path: Path) -> tuple[Path, int, tuple[int, int]]:
        return _corrupt_pyramid(tmp_path)


class TestTiffViaTiffslide(TestTiffDirect):
    """The same files with every level read through tiffslide's own reader (``direct=False``)."""

    def open(self, path: Path) -> Backend:
        return TiffSlideBackend(path, direct=False)


class TestOpenSlideGenerated(ReaderContract):
    mpp_source = "generic-tiff metadata (openslide.mpp-x/y)"
    backend_class = OpenSlideBackend

    @pytest.fixture
    def sample(self, generated_pyramid: Path) -> Path:
        return generated_pyramid

    def corrupt_sample(self, tmp_path: Path) -> tuple[Path, int, tuple[int, int]]:
        return _corrupt_pyramid(tmp_path)


@pytest.fixture(scope="module")
def generated_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("contract") / "tissue.png"
    Image.fromarray(synthetic_tissue(700, 900)).save(path)
    return path


class TestPlainPngStrips(ReaderContract):
    """A PNG read in row strips (the reader for large PNGs, forced on a small one)."""

    mpp_source = None  # PNG densities are screen DPI, never a microscope's pixel size
    backend_class = PlainImageBackend

    @pytest.fixture(autouse=True)
    def _strips_for_every_png(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(plain, "PNG_STRIPS_ABOVE_PIXELS", 0)

    def open(self, path: Path) -> Backend:
        backend = PlainImageBackend(path)
        assert backend.properties["plain-image.read"] == "row strips"
        return backend

    @pytest.fixture
    def sample(self, generated_png: Path) -> Path:
        return generated_png

    def corrupt_sample(self, tmp_path: Path) -> tuple[Path, int, tuple[int, int]]:
        path = tmp_path / "truncated.png"
        Image.fromarray(np.random.default_rng(2).integers(0, 255, (600, 400, 3), dtype=np.uint8)).save(path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        return path, 0, (0, 500)


class TestPlainJpeg(ReaderContract):
    """A JPEG decoded whole."""

    mpp_source = None
    corrupt_error = SlideFormatError  # no tiles: the whole image fails to decode
    backend_class = PlainImageBackend

    def open(self, path: Path) -> Backend:
        backend = PlainImageBackend(path)
        assert backend.properties["plain-image.read"] == "whole"
        return backend

    @pytest.fixture
    def sample(self, tmp_path_factory: pytest.TempPathFactory) -> Path:
        path = tmp_path_factory.mktemp("contract") / "tissue.jpg"
        Image.fromarray(synthetic_tissue(600, 800)).save(path, quality=90)
        return path

    def corrupt_sample(self, tmp_path: Path) -> tuple[Path, int, tuple[int, int]]:
        path = tmp_path / "bad-huffman.jpg"
        Image.fromarray(synthetic_tissue(300, 400)).save(path, quality=90)
        data = bytearray(path.read_bytes())
        dht = data.index(b"\xff\xc4")
        data[dht + 4 : dht + 30] = b"\xff" * 26  # a Huffman table no decoder accepts
        path.write_bytes(bytes(data))
        return path, 0, (10, 10)


# -- real samples ------------------------------------------------------------------------------------
@pytest.mark.realdata
class TestTiffRealOme(TestTiffDirect):
    """A real 5-level OME-TIFF (JPEG tiles, non-integer downsamples)."""

    mpp_source = "OME-XML PhysicalSizeX/Y"

    @pytest.fixture
    def sample(self) -> Path:
        return need_shared("wsi-samples", "CMU-1-Small-Region.ome.tif")


@pytest.mark.realdata
class TestOpenSlideReal(TestOpenSlideGenerated):
    """OpenSlide on a real 4-level generic TIFF."""

    @pytest.fixture
    def sample(self) -> Path:
        return need_shared("wsi-samples", "openslide-synthetic", "boxes.tiff")


@pytest.mark.realdata
class TestPydicom(ReaderContract):
    """The pydicom reader on a single-file DICOM WSI (JPEG frames, column-major, no PixelSpacing)."""

    mpp_source = None
    backend_class = DicomBackend

    @pytest.fixture
    def sample(self) -> Path:
        return need_shared("wsi-samples", "pathml_small_dicom.dcm")

    def corrupt_sample(self, tmp_path: Path) -> tuple[Path, int, tuple[int, int]]:
        import pydicom
        from pydicom.encaps import generate_frames

        src = need_shared("wsi-samples", "pathml_small_dicom.dcm")
        ds = pydicom.dcmread(src)
        # the last frame: tile (last col, last row) in either frame order, and outside the tiles the frame
        # order is inferred from when opening
        *_, last = generate_frames(ds.PixelData, number_of_frames=int(ds.NumberOfFrames))
        data = bytearray(src.read_bytes())
        start = data.rindex(last)
        data[start : start + len(last)] = b"\x00" * len(last)
        path = tmp_path / "corrupt.dcm"
        path.write_bytes(bytes(data))
        w, h = int(ds.TotalPixelMatrixColumns), int(ds.TotalPixelMatrixRows)
        tw, th = int(ds.Columns), int(ds.Rows)
        return path, 0, ((w - 1) // tw * tw, (h - 1) // th * th)


def _all_subclasses(cls: type[ReaderContract]) -> list[type[ReaderContract]]:
    out: list[type[ReaderContract]] = []
    for sub in cls.__subclasses__():
        out += [sub, *_all_subclasses(sub)]
    return out


def test_every_backend_runs_the_contract() -> None:
    """A backend added to the readers package without a subclass here fails this test."""
    import wsi_histosge.readers as readers

    backends = {getattr(readers, name) for name in readers.__all__ if name.endswith("Backend") and name != "Backend"}
    assert backends == {sub.backend_class for sub in _all_subclasses(ReaderContract)}
