"""Reader backends for whole-slide images, one module per backend, and :func:`open_backend`, which picks the
first that can read a path.

Every backend follows :class:`~wsi_histosge.readers.base.Backend` and passes the contract tests in
``tests/test_reader_contract.py``: level geometry, white past every edge, same pixels after pickling,
corrupt tiles named by file and level, a stated MPP source, and levels that agree with level 0.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import HistoSGEError, SlideFormatError
from ..remote import SlideURL, not_readable_in_place, require_in_place_format
from .base import Backend
from .dicom import DicomBackend, _has_dicom_preamble, _open_dicom_folder, dicom_series_folder
from .openslide import OpenSlideBackend
from .plain import PLAIN_SUFFIXES, PlainImageBackend
from .tiff import TiffSlideBackend

__all__ = [
    "Backend",
    "DicomBackend",
    "OpenSlideBackend",
    "PlainImageBackend",
    "TiffSlideBackend",
    "dicom_series_folder",
    "open_backend",
]


def _plugin_backends() -> list[Any]:
    """Site reader plugins: ``WSI_HISTOSGE_READER_PLUGINS="pkg.module:opener,..."``; each opener takes a
    path and returns a backend, or None to pass. Tried before the built-in readers."""
    import importlib

    openers = []
    for spec in filter(None, (x.strip() for x in os.environ.get("WSI_HISTOSGE_READER_PLUGINS", "").split(","))):
        module, _, name = spec.partition(":")
        try:
            openers.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError) as exc:
            raise SlideFormatError(
                f"reader plugin {spec!r} cannot be loaded ({exc}); fix WSI_HISTOSGE_READER_PLUGINS"
            ) from exc
    return openers


def open_backend(path: Path | SlideURL) -> Backend:
    """The first reader that opens ``path``: site plugins, a DICOM series folder, a plain image by suffix,
    then tiffslide, OpenSlide, and pydicom for DICOM files. A URL is read in place by tiffslide (TIFF-based
    formats) or refused with the fix; site plugins are given local paths only."""
    if isinstance(path, SlideURL):
        return _open_url(path)
    for opener in _plugin_backends():
        backend = opener(path)
        if backend is not None:
            return backend  # type: ignore[no-any-return]
    if path.is_dir():
        return _open_dicom_folder(path)
    if path.suffix.lower() in PLAIN_SUFFIXES:
        return PlainImageBackend(path)
    errors: list[str] = []
    try:
        return TiffSlideBackend(path)
    except SlideFormatError:
        raise  # a TIFF we refused on purpose (loop, hostile sizes): no other reader gets to guess
    except Exception as exc:
        errors.append(f"tiffslide: {type(exc).__name__}: {str(exc)[:160]}")
    try:
        return OpenSlideBackend(path)
    except Exception as exc:
        errors.append(f"openslide: {type(exc).__name__}: {str(exc)[:160]}")
    if path.suffix.lower() == ".dcm" or _has_dicom_preamble(path):
        try:
            return DicomBackend(path)
        except SlideFormatError as exc:
            errors.append(f"pydicom: {str(exc)[:160]}")
    raise SlideFormatError(
        f"{path}: not a slide any reader can open ({'; '.join(errors)}). "
        "Check that the file is complete and is a supported format (SVS, TIFF/OME-TIFF, NDPI, MRXS, "
        "DICOM WSI, JPEG/PNG)."
    )


def _open_url(url: SlideURL) -> Backend:
    """tiffslide over range reads; formats whose readers need a local file are refused before any request."""
    require_in_place_format(url)
    try:
        return TiffSlideBackend(url)
    except HistoSGEError:
        raise  # a missing object, refused access, a TIFF refused on purpose
    except Exception as exc:
        raise not_readable_in_place(url, exc) from None
