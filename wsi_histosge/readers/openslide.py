"""Everything OpenSlide reads (DICOM series, MRXS, NDPI, SCN, ... via openslide-bin)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import CorruptTileError
from .base import BadRect, ReopensWhenUnpickled, _rgb


class OpenSlideBackend(ReopensWhenUnpickled):
    name = "openslide"
    path: Path  # local files only

    def __init__(self, path: Path) -> None:
        import openslide

        self.path = Path(path)
        self._slide = openslide.OpenSlide(path)
        self.level_dimensions = tuple((int(d[0]), int(d[1])) for d in self._slide.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in self._slide.level_downsamples)
        self.properties = dict(self._slide.properties)
        self.vendor = self.properties.get("openslide.vendor", "unknown")
        self.associated_images = {k: (0, 0) for k in self._slide.associated_images}

    def read_region(
        self,
        location: tuple[int, int],
        level: int,
        size: tuple[int, int],
        bad: list[BadRect] | None = None,
    ) -> np.ndarray:
        import openslide

        try:
            img = self._slide.read_region(location, level, size)
        except openslide.OpenSlideError as exc:
            # OpenSlide errors are sticky: the handle refuses every later read. Reopen it, so one bad level
            # (e.g. cropped edge frames of a DICOM level) does not poison reads of the others.
            try:
                self._slide.close()
                self._slide = openslide.OpenSlide(self.path)
            except openslide.OpenSlideError:
                pass
            raise CorruptTileError(
                f"{self.path}: OpenSlide failed to read level {level} at level-0 {tuple(location)}, size "
                f"{tuple(size)} ({str(exc)[:160]}); the slide is corrupt or truncated, or this level is broken"
            ) from exc
        return _rgb(np.asarray(img))

    def stated_mpp(self) -> tuple[float, float, str] | None:
        mx = self.properties.get("openslide.mpp-x")
        my = self.properties.get("openslide.mpp-y") or mx
        if not mx:
            return None
        return float(mx), float(my or mx), f"{self.vendor} metadata (openslide.mpp-x/y)"

    def close(self) -> None:
        self._slide.close()
