"""Files this tool writes beside its outputs (run reports, tissue outlines, PNGs, cohort summaries) are
replaced only when this tool wrote them: a user's file of the same name is refused, never lost.

Every such file carries a mark: JSON objects a ``"generator": "wsi-histosge"`` member, PNGs a ``Software``
text chunk, the cohort report a ``<meta name=generator>``, AnnData files ``uns['wsi_histosge']``; the CSV
summary is recognised by its header.
Files written before the mark existed are recognised by their exact structure where that is unambiguous
(a run report's keys, a tissue outline's single class).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from .errors import OutputExistsError

GENERATOR = "wsi-histosge"
#: The PNG text chunk ``Software`` of pictures this tool draws.
PNG_SOFTWARE = GENERATOR
#: The cohort report's marker (in its ``<head>``).
HTML_META = f'<meta name=generator content="{GENERATOR}">'
#: Keys every run report of `infer` has held (recognises reports written before the mark).
_REPORT_KEYS = {"status", "out", "slide", "spots", "grid_shape", "stride_um", "model", "encoder"}
#: Header start of `batch`'s summary.csv.
CSV_HEADER = "id,slide,status,"
#: The tissue outline's one class, as `infer` has always written it.
_TISSUE_PROPERTIES = {"objectType": "annotation", "classification": {"name": "Tissue", "color": [80, 160, 80]}}

#: Largest file inspected (ours are far smaller; a larger one is not ours).
_MAX_BYTES = 64 << 20


def _json(path: Path) -> object:
    if path.stat().st_size > _MAX_BYTES:
        return None
    try:
        return json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None


def _is_our_json(path: Path) -> bool:
    doc = _json(path)
    if not isinstance(doc, dict):
        return False
    if doc.get("generator") == GENERATOR:
        return True
    if set(doc) >= _REPORT_KEYS:  # a run report written before the mark
        return True
    if set(doc) >= {"exit_code", "counts", "slides"}:  # batch's summary.json written before the mark
        return True
    features = doc.get("features")
    return (  # a tissue outline written before the mark: polygons of the one class, nothing else
        doc.get("type") == "FeatureCollection"
        and set(doc) == {"type", "features"}
        and isinstance(features, list)
        and all(
            isinstance(f, dict)
            and f.get("properties") == _TISSUE_PROPERTIES
            and set(f) == {"type", "geometry", "properties"}
            for f in features
        )
    )


def _is_our_png(path: Path) -> bool:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.format == "PNG" and im.info.get("Software") == PNG_SOFTWARE
    except (OSError, UnidentifiedImageError, ValueError):
        return False


def is_our_h5ad(path: Path) -> bool:
    """An HDF5 AnnData file carrying this tool's ``uns['wsi_histosge']`` (written by `to-anndata`)."""
    import h5py

    try:
        with h5py.File(path, "r") as h5:
            return "uns" in h5 and "wsi_histosge" in h5["uns"]
    except (OSError, ValueError):
        return False


def _head(path: Path, n: int = 4096) -> str:
    with path.open("rb") as fh:
        return fh.read(n).decode("utf-8", errors="replace")


def written_by_us(path: str | Path) -> bool:
    """Whether the existing file ``path`` carries this tool's mark (see the module docstring)."""
    path = Path(path)
    if not path.is_file() or path.is_symlink():
        return False
    suffix = path.suffix.lower()
    if suffix in (".json", ".geojson"):
        return _is_our_json(path)
    if suffix == ".png":
        return _is_our_png(path)
    if suffix == ".h5ad":
        return is_our_h5ad(path)
    if suffix == ".csv":
        return _head(path).startswith(CSV_HEADER)
    if suffix == ".html":
        head = _head(path)
        return HTML_META in head or "<title>wsi-histosge cohort report:" in head
    return False


def require_replaceable(paths: Iterable[str | Path], why: str) -> None:
    """OutputExistsError (exit 7) naming the first of ``paths`` that exists and was not written by this tool;
    ``why`` says what the command writes there. Checked before anything is written."""
    for p in paths:
        path = Path(p)
        if (path.exists() or path.is_symlink()) and not written_by_us(path):
            raise OutputExistsError(
                f"{path}: exists and was not written by wsi-histosge ({why} goes there); it is left as it is: move "
                "it or choose another --out"
            )
