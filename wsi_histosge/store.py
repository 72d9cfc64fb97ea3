"""The output cube: one Zarr v3 group per slide, written chunk by chunk, resumable.

Layout::

    slide.zarr/
      expression      (gene, y, x) float16, chunks (genes, 64, 64), zstd; NaN = not predicted
      tissue          (y, x) uint8: 1 where a spot was predicted
      tissue_fraction (y, x) float16
      chunk_done      (cy, cx) uint8, one object per mark: 1 once that expression chunk is written
      novelty, uncertainty, qc
                      (y, x) per-cell trust arrays (``CELL_ARRAYS``), chunked like the expression; every
                      chunk over tissue is stored, also a qc chunk without flags (``CELL_CHUNKS_KEY``)
      zarr.json       attributes: genes, units, geometry, provenance, OME-NGFF metadata, and last of
                      all ``completed`` with the run fingerprint

Order of writes: the group's zarr.json with all our attributes and ``state: creating`` first (so a
half-created folder is recognisably ours and a rerun may replace it), then the arrays, then the state
is dropped; then chunk data, each followed by its done mark; the completion marker after every mark.
A missing chunk reads as NaN (the fill value), never as expression; readers (:func:`read_cube`) refuse
a cube whose chunks (of the expression or of a per-cell array) are missing or unwritten unless asked for
what is there, and per-cell values infer never writes (:func:`read_cells`). What a cube's metadata
must hold (safe codecs, our attributes, consistent arrays) is checked by :mod:`.cube_checks` first.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, ZstdCodec

from . import config
from .cube_checks import (
    ATTR_KEY,
    DAMAGED,
    CubeLayout,
    array_meta,
    attr_problem,
    cube_layout,
    declared_trust,
    read_metadata,
    refuse_unsafe_nodes,
)
from .errors import CubeIncompleteError, DataFormatError, InputNotFoundError, OutputExistsError, UsageError

#: Value of ``attrs[ATTR_KEY]["state"]`` while the group's arrays are being created.
STATE_CREATING = "creating"

#: ``attrs[ATTR_KEY][CELL_CHUNKS_KEY] == CELL_CHUNKS_ALWAYS``: every per-cell chunk of a done chunk over tissue
#: is stored, also one that holds only its fill value (a ``qc`` chunk without flags). Cubes created before
#: lack it: zarr skipped those chunks, so there an absent ``qc`` chunk may mean "no flags" and is not damage.
CELL_CHUNKS_KEY = "cell_chunks"
CELL_CHUNKS_ALWAYS = "always stored"


def run_fingerprint(parts: dict[str, Any]) -> str:
    """Stable hash of everything that determines the cube's content."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


#: How each run parameter (``infer._fingerprint_parts``) is named to a user.
_PARAMETER_NAMES = {
    "slide": "another slide (its contents)",
    "model": "another model (--model)",
    "encoder": "other encoder weights",
    "mpp": "another pixel size (--mpp)",
    "stride_um": "--stride-um",
    "spot_um": "--spot-um",
    "context_um": "--context-um",
    "origin_um": "--origin-um",
    "min_tissue_fraction": "--min-tissue-fraction",
    "tissue_mask": "another tissue mask (--tissue-mask or detection)",
    "precision": "--precision",
    "genes": "another gene count (model)",
    "on_bad_tile": "--on-bad-tile",
    "novelty_threshold": "--novelty-threshold",
    "qc": "other quality-flag rules (another version of this tool)",
}


def parameter_differences(before: Any, now: Any) -> str:
    """'other parameters: --stride-um (100 there, 50 now), ...' from two runs' parameters (older cubes lack
    theirs: then the generic 'other parameters, model or slide')."""
    if not isinstance(before, dict) or not isinstance(now, dict):
        return "other parameters, model or slide"
    diffs = []
    for key in sorted(
        set(before) | set(now), key=lambda k: list(_PARAMETER_NAMES).index(k) if k in _PARAMETER_NAMES else 99
    ):
        a, b = before.get(key), now.get(key)
        if a == b or (key == "origin_um" and before.get("stride_um") != now.get("stride_um")):
            continue  # the lattice origin follows the stride unless given
        name = _PARAMETER_NAMES.get(key, key)
        if name.startswith("--") and not isinstance(a, (dict, list)) and not isinstance(b, (dict, list)):
            diffs.append(f"{name} {a} (this run: {b})")
        else:
            diffs.append(name)
    return "other parameters: " + ", ".join(diffs) if diffs else "other parameters, model or slide"


@dataclass
class OpenState:
    status: str  # "new", "resume", "complete"
    chunks_done: int = 0


def is_url(path: str | Path) -> bool:
    return "://" in str(path)


def filesystem(path: str | Path) -> tuple[Any, str]:
    """The fsspec filesystem holding ``path`` (local, s3://, gs://, ...) and the path within it."""
    from fsspec.core import url_to_fs

    try:
        fs, root = url_to_fs(str(path))
    except (ValueError, ImportError) as exc:  # unknown protocol, or its fsspec backend not installed
        raise UsageError(
            f"{path}: cannot open this location ({exc}); give a local path or an s3:// / gs:// URL"
        ) from exc
    return fs, str(root).rstrip("/")


def sidecar(out: str | Path, suffix: str) -> str:
    """A file next to the cube (``OUT.zarr`` + suffix), as a string so URLs keep their ``//``."""
    return str(out).rstrip("/") + suffix


def write_text_atomic(path: str | Path, text: str) -> None:
    """Local: temporary file + rename (the temporary is removed if writing fails). Object stores: one PUT."""
    if is_url(path):
        fs, p = filesystem(path)
        fs.pipe_file(p, text.encode())
        return
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        tmp.write_text(text)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _group_attrs(fs: Any, root: str) -> dict[str, Any] | None:
    """The attributes of the group at ``root`` if its zarr.json is a readable JSON object, else None."""
    meta = f"{root}/zarr.json"
    try:
        doc = json.loads(fs.cat_file(meta)) if fs.isfile(meta) else None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        return None
    attrs = doc.get("attributes") if isinstance(doc, dict) else None
    return attrs if isinstance(attrs, dict) else None


class CubeStore:
    """A Zarr v3 expression cube on a local path or any fsspec URL that zarr supports."""

    def __init__(self, path: str | Path, group: zarr.Group) -> None:
        self.path = str(path)
        self.group = group
        self.expression: zarr.Array = group["expression"]  # type: ignore[assignment]
        self.done: zarr.Array = group["chunk_done"]  # type: ignore[assignment]
        # zarr skips a chunk that holds only the fill value (a qc chunk without flags); stored anyway, an
        # absent chunk of a done chunk is always damage (readers check it: CELL_CHUNKS_KEY)
        with zarr.config.set({"array.write_empty_chunks": True}):
            self.cells: dict[str, zarr.Array] = {n: group[n] for n in CELL_ARRAYS if n in group}  # type: ignore[misc]

    # -- opening ------------------------------------------------------------------------------
    @staticmethod
    def inspect(path: str | Path) -> dict[str, Any] | None:
        """Our attributes if ``path`` is a cube written (or being created) by this tool, None if absent.

        Raises OutputExistsError when the path exists but holds something else.
        """
        fs, root = filesystem(path)
        if not fs.exists(root):
            return None
        if fs.isdir(root) and not fs.ls(root):
            return None
        attrs = _group_attrs(fs, root)
        if not attrs or not isinstance(attrs.get(ATTR_KEY), dict):
            raise OutputExistsError(
                f"{path}: exists and is not a wsi-histosge output; choose another --out (nothing was changed)"
            )
        return dict(attrs)

    @classmethod
    def open_for_run(
        cls,
        path: str | Path,
        *,
        fingerprint: str,
        shape: tuple[int, int, int],
        attrs: dict[str, Any],
        tissue: np.ndarray,
        tissue_fraction: np.ndarray,
        overwrite: bool = False,
        compressor: str = "zstd",
        cell_arrays: tuple[tuple[str, str], ...] = (),
    ) -> tuple[CubeStore, OpenState]:
        """Open the cube for writing: new, resumed (same fingerprint), or already complete.

        A half-created cube (creation failed, e.g. disk full) is recreated; expression chunks that are
        marked done but missing on disk are unmarked (and the completion marker dropped) so that the run
        recomputes them."""
        existing = cls.inspect(path)
        if existing is not None:
            previous = existing[ATTR_KEY].get("run_fingerprint")
            creating = existing[ATTR_KEY].get("state") == STATE_CREATING
            if previous == fingerprint and not creating:
                group = zarr.open_group(str(path), mode="r+", use_consolidated=False)
                store = cls(path, group)
                store._remove_stray_writes()
                store._unmark_missing_chunks()
                completed = store.group.attrs.get("completed")
                if isinstance(completed, dict) and completed.get("run_fingerprint") == fingerprint:
                    return store, OpenState("complete", store.chunks_done())
                return store, OpenState("resume", store.chunks_done())
            if previous != fingerprint and not overwrite:
                before = existing[ATTR_KEY].get("run_parameters")
                now = attrs.get(ATTR_KEY, {}).get("run_parameters")
                raise OutputExistsError(
                    f"{path}: holds a run with {parameter_differences(before, now)}; rerun with the parameters that "
                    "made it, choose another --out, or replace it (`infer --overwrite`; for `batch`, delete that "
                    "cube first)"
                )
            fs, root = filesystem(path)
            fs.rm(root, recursive=True)
        store = cls._create(path, fingerprint, shape, attrs, tissue, tissue_fraction, compressor, cell_arrays)
        return store, OpenState("new")

    @classmethod
    def _create(
        cls,
        path: str | Path,
        fingerprint: str,
        shape: tuple[int, int, int],
        attrs: dict[str, Any],
        tissue: np.ndarray,
        tissue_fraction: np.ndarray,
        compressor: str,
        cell_arrays: tuple[tuple[str, str], ...] = (),
    ) -> CubeStore:
        n_genes, ny, nx = shape
        c = config.CHUNK_CELLS
        codec = ZstdCodec(level=3) if compressor == "zstd" else BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")
        meta = {
            **attrs.get(ATTR_KEY, {}),
            "run_fingerprint": fingerprint,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            CELL_CHUNKS_KEY: CELL_CHUNKS_ALWAYS,
        }
        # The group's zarr.json, with our attributes, is the first thing written (one atomic write): if
        # anything after it fails, the folder is still recognisably ours and a rerun replaces it.
        full = {**attrs, ATTR_KEY: {**meta, "state": STATE_CREATING}}
        group = zarr.open_group(str(path), mode="w", zarr_format=3, attributes=full)
        group.create_array(
            "expression",
            shape=shape,
            chunks=(n_genes, c, c),
            dtype=config.EXPRESSION_DTYPE,
            fill_value=np.nan,
            compressors=[codec],
            dimension_names=["gene", "y", "x"],
        )
        for name, values, dtype in (("tissue", tissue, "uint8"), ("tissue_fraction", tissue_fraction, "float16")):
            arr = group.create_array(
                name,
                shape=(ny, nx),
                chunks=(min(ny, 1024), min(nx, 1024)),
                dtype=dtype,
                fill_value=0,
                compressors=[ZstdCodec(level=3)],
                dimension_names=["y", "x"],
            )
            arr[:] = values.astype(dtype)
        for name, dtype in cell_arrays:  # one value per cell (trust), chunked like the expression
            group.create_array(
                name,
                shape=(ny, nx),
                chunks=(c, c),
                dtype=dtype,
                fill_value=np.nan if np.dtype(dtype).kind == "f" else 0,
                compressors=[ZstdCodec(level=3)],
                dimension_names=["y", "x"],
            )
        ncy, ncx = -(-ny // c), -(-nx // c)
        group.create_array(
            "chunk_done", shape=(ncy, ncx), chunks=(1, 1), dtype="uint8", fill_value=0, dimension_names=["cy", "cx"]
        )
        group.attrs.update({ATTR_KEY: meta})  # replaces the whole entry: the "creating" state is gone
        return cls(path, group)

    def _remove_stray_writes(self) -> None:
        """Temporary files of writes a killed run left half done (zarr's ``<key>.<uuid hex>.partial``, ours
        ``.<name>.<pid>.partial``): the run that resumes holds the cube's lock, so no writer owns them."""
        for stray in Path(self.path).rglob("*.partial"):
            if stray.is_file():
                stray.unlink(missing_ok=True)

    def _unmark_missing_chunks(self) -> None:
        """Chunks marked done whose data is gone (deleted, lost) become work again; the marker goes first."""
        cube = read_cube(self.path)
        if not cube.missing:
            return
        if "completed" in self.group.attrs:
            del self.group.attrs["completed"]
        for cy, cx in cube.missing:
            self.done[cy, cx] = 0

    # -- chunks -------------------------------------------------------------------------------
    def chunk_grid(self) -> tuple[int, int]:
        return tuple(int(v) for v in self.done.shape)  # type: ignore[return-value]

    def done_marks(self) -> np.ndarray:
        return np.asarray(self.done[:], dtype=bool)

    def chunks_done(self) -> int:
        return int(self.done_marks().sum())

    def write_chunk(
        self, cy: int, cx: int, data: np.ndarray | None, cells: dict[str, np.ndarray] | None = None
    ) -> None:
        """Write one whole expression chunk (or nothing for an empty one) and its per-cell arrays, then its
        done mark."""
        c = config.CHUNK_CELLS
        for name, values in (cells or {}).items():
            self.cells[name][cy * c : cy * c + values.shape[0], cx * c : cx * c + values.shape[1]] = values
        if data is not None:
            self.expression[:, cy * c : cy * c + data.shape[1], cx * c : cx * c + data.shape[2]] = data
        self.done[cy, cx] = 1

    def mark_complete(self, fingerprint: str, summary: dict[str, Any]) -> None:
        marks = self.done_marks()
        if not marks.all():
            raise RuntimeError(f"{self.path}: {int((~marks).sum())} chunks not written; not marking complete")
        self.group.attrs.update(
            {"completed": {"run_fingerprint": fingerprint, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **summary}}
        )


# -- reading -------------------------------------------------------------------------------------
def check_codecs(path: str | Path) -> None:
    """Refuse a Zarr group whose nodes declare codecs (also inside a shard) or data types outside the
    numeric allow-lists (e.g. pickle, object): DataFormatError before any chunk is decoded.

    Walks the metadata of every group and array (never lists chunks)."""
    refuse_unsafe_nodes(*filesystem(path))


def cube_attrs(path: str | Path) -> dict[str, Any]:
    """The attributes of the cube at ``path``, checked: InputNotFoundError when there is nothing there,
    DataFormatError when it is not a cube of this tool or its attributes are malformed."""
    fs, root = filesystem(path)
    if not fs.exists(root):
        raise InputNotFoundError(
            f"{path}: no such cube; give the OUT.zarr folder (or URL) written by `wsi-histosge infer`"
        )
    meta = f"{root}/zarr.json"
    if not fs.isfile(meta):
        raise DataFormatError(
            f"{path}: not a wsi-histosge cube (no zarr.json); give the OUT.zarr folder written by `wsi-histosge infer`"
        )
    doc = read_metadata(fs, meta)
    attrs = doc.get("attributes") if isinstance(doc, dict) else None
    if not isinstance(attrs, dict) or not isinstance(attrs.get(ATTR_KEY), dict) or doc.get("node_type") != "group":
        raise DataFormatError(
            f"{meta}: not a cube written by wsi-histosge (no '{ATTR_KEY}' attributes on a Zarr group); "
            "give the OUT.zarr folder written by `wsi-histosge infer`"
        )
    problem = attr_problem(attrs)
    if problem:
        raise DataFormatError(f"{meta}: {problem}; {DAMAGED}")
    return dict(attrs)


def _chunk_key(doc: dict[str, Any], idx: tuple[int, ...]) -> str:
    enc = doc.get("chunk_key_encoding", {"name": "default"})
    sep = (enc.get("configuration") or {}).get("separator")
    if enc.get("name") == "v2":
        return (sep or ".").join(map(str, idx))
    sep = sep or "/"
    return "c" + sep + sep.join(map(str, idx))


#: Per-cell arrays a cube may hold besides the expression (``infer.cell_arrays_of``) and their data kinds.
CELL_ARRAYS = {"novelty": "f", "uncertainty": "f", "qc": "u"}

#: Zarr v3 data types of each kind of per-cell array.
_CELL_DTYPES = {"f": {"float16", "float32", "float64"}, "u": {"uint8", "uint16", "uint32", "uint64"}}

#: What the float per-cell arrays hold on a cell with expression: [lowest, highest] and what that means.
#: Uncertainty is at most sqrt(exp(30)) ~ 3.3e6 (the model clamps its log MSE to ±30): beyond 1e7 it was not
#: written by infer (and its square would overflow float32 in a bin's root mean square).
CELL_RANGES = {
    "novelty": (0.0, 2.0, "1 - a cosine similarity"),
    "uncertainty": (0.0, 1e7, "an expected RMSE"),
}

#: Rounding a novelty may carry past its bounds (float32 cosines of a cell equal to a training spot).
_NOVELTY_ROUNDING = 0.01

#: The end of every message about a damaged array or chunk: what to do about it.
_ARRAY_DAMAGED = "the cube is damaged, rerun `wsi-histosge infer` with --overwrite"


@dataclass
class Cube:
    """A cube opened for reading: checked metadata, its arrays, and which chunks hold what they should.

    ``missing``: chunks marked done that should hold data (tissue) but whose expression or per-cell array
    (``missing_in`` says which) is absent from the store; ``unwritten``: chunks without a done mark (a run
    that stopped early). Cells of either never read as data: :meth:`read_expression` leaves them NaN and
    :func:`read_cells` NaN or 0, as if they were not predicted.
    """

    path: str
    attrs: dict[str, Any]
    group: Any
    tissue: np.ndarray
    marks: np.ndarray
    chunk_cells: tuple[int, int]
    missing: list[tuple[int, int]] = field(default_factory=list)
    #: array name (expression, novelty, uncertainty, qc) -> its chunks marked done but absent from the store
    missing_in: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    #: the per-cell arrays (of CELL_ARRAYS) the cube holds, their metadata checked against the tissue
    cell_arrays: tuple[str, ...] = ()

    @property
    def completed(self) -> bool:
        return "completed" in self.attrs

    @property
    def genes(self) -> list[str]:
        return list(self.attrs["genes"])

    @property
    def unwritten(self) -> list[tuple[int, int]]:
        return [(int(cy), int(cx)) for cy, cx in np.argwhere(~self.marks)]

    def usable_chunks(self) -> np.ndarray:
        """(cy, cx) True where the chunk's data can be read: marked done and not missing."""
        usable = self.marks.copy()
        for cy, cx in self.missing:
            usable[cy, cx] = False
        return usable

    def usable_cells(self) -> np.ndarray:
        """(y, x) True for predicted cells whose chunk can be read."""
        ch, cw = self.chunk_cells
        ny, nx = self.tissue.shape
        usable = np.repeat(np.repeat(self.usable_chunks(), ch, axis=0), cw, axis=1)[:ny, :nx]
        return self.tissue & usable

    def lacking(self) -> list[tuple[int, int]]:
        """Chunks whose expression cannot be read although tissue says there should be some."""
        ch, cw = self.chunk_cells
        out = list(self.missing)
        for cy, cx in self.unwritten:
            if self.tissue[cy * ch : (cy + 1) * ch, cx * cw : (cx + 1) * cw].any():
                out.append((cy, cx))
        return sorted(out)

    def require_complete(self) -> None:
        """CubeIncompleteError naming the cube, what is missing and the fix, unless every chunk is there."""
        fix = (
            "rerun `wsi-histosge infer` with the same options to finish it, or pass --allow-incomplete to use "
            "what is there"
        )
        n = len(self.lacking())
        if not self.completed:
            raise CubeIncompleteError(
                f"{self.path}: the cube is incomplete (no completion marker; {n} of {self.marks.size} expression "
                f"chunks not written): {fix}"
            )
        if self.missing:
            what = ", ".join(
                f"{len(chunks)} of {self.marks.size} {name} chunks" for name, chunks in self.missing_in.items()
            )
            # a chunk that lost a per-cell array is treated as one that lost its expression: not predicted
            also = "" if list(self.missing_in) == ["expression"] else "; their cells count as not predicted"
            raise CubeIncompleteError(
                f"{self.path}: {what} are missing on disk (e.g. {list(self.missing[0])}{also}): "
                f"{fix.replace('finish it', 'recompute them')}"
            )

    def read_expression(self, y0: int, y1: int, x0: int, x1: int, gene: int | None = None) -> np.ndarray:
        """float32 (genes, y, x) or (y, x) for one gene; NaN off tissue and in unreadable chunks.

        Chunks that are missing or not marked done are never decoded."""
        lead = (slice(None),) if gene is None else (gene,)
        data = self.read_usable("expression", y0, y1, x0, x1, lead=lead, dtype=np.float32)
        data[..., ~self.tissue[y0:y1, x0:x1]] = np.nan
        return data

    def read_usable(
        self, name: str, y0: int, y1: int, x0: int, x1: int, *, lead: tuple[Any, ...] = (), dtype: Any = None
    ) -> np.ndarray:
        """Cells y0:y1, x0:x1 of the array ``name`` (``lead`` selects along its leading axes: a gene, or all
        with ``slice(None)``) as ``dtype`` (default: the array's), its fill value (NaN or 0) in chunks that are
        not usable, which are never decoded. DataFormatError naming the array when a chunk does not decode."""
        arr = self.group[name]
        dtype = np.dtype(arr.dtype if dtype is None else dtype)
        ch, cw = self.chunk_cells
        cy0, cy1, cx0, cx1 = y0 // ch, -(-y1 // ch), x0 // cw, -(-x1 // cw)
        usable = self.usable_chunks()[cy0:cy1, cx0:cx1]
        try:
            if usable.all():
                return np.asarray(arr[(*lead, slice(y0, y1), slice(x0, x1))], dtype=dtype)
            shape = [n for n, sel in zip(arr.shape, lead, strict=False) if isinstance(sel, slice)]
            data = np.full((*shape, y1 - y0, x1 - x0), np.nan if dtype.kind == "f" else 0, dtype=dtype)
            for iy, ix in np.argwhere(usable):
                ya, yb = max(y0, (cy0 + iy) * ch), min(y1, (cy0 + iy + 1) * ch)
                xa, xb = max(x0, (cx0 + ix) * cw), min(x1, (cx0 + ix + 1) * cw)
                data[..., ya - y0 : yb - y0, xa - x0 : xb - x0] = arr[(*lead, slice(ya, yb), slice(xa, xb))]
        except (ValueError, RuntimeError, TypeError) as exc:  # a chunk that does not decode
            reason = (str(exc).splitlines() or [""])[0]
            raise DataFormatError(
                f"{self.path}/{name}: cells y {y0}-{y1}, x {x0}-{x1} cannot be decoded ({type(exc).__name__}: "
                f"{reason}); {_ARRAY_DAMAGED}"
            ) from exc
        return data


def read_cells(c: Cube, name: str) -> np.ndarray | None:
    """The cube's per-cell array ``name`` (y, x), or None when the cube has none (older cubes, models without
    trust). Cells that are not usable (no tissue, chunk unwritten or missing) read NaN (float) or 0; their
    chunks are never decoded.

    DataFormatError naming the array when a chunk does not decode or a usable cell holds what infer never
    writes: a novelty outside [0, 2], an uncertainty outside [0, 1e7], an infinite value, NaN on a cell that
    has expression, or ``qc`` bits other than 1, 2 and 4."""
    if name not in c.cell_arrays:
        return None
    ny, nx = c.tissue.shape
    values = c.read_usable(name, 0, ny, 0, nx)
    usable = c.usable_cells()
    problem = _cell_problem(c, name, values, usable)
    if problem:
        raise DataFormatError(f"{c.path}/{name}: {problem}; {_ARRAY_DAMAGED}")
    if values.dtype.kind == "f":
        return np.where(usable, values, np.nan).astype(np.float32)
    return np.where(usable, values, 0).astype(values.dtype)


def _cell_problem(c: Cube, name: str, values: np.ndarray, usable: np.ndarray) -> str | None:
    """What is wrong with the usable cells of the per-cell array ``name``, or None."""
    cells = values[usable]
    if values.dtype.kind != "f":
        from .qc import QC_BLUR, QC_PEN
        from .trust import QC_NOVEL

        defined = np.asarray(QC_PEN | QC_BLUR | QC_NOVEL, dtype=values.dtype)
        undefined = cells[(cells & ~defined) != 0]
        if undefined.size:
            return (
                f"{undefined.size} cell(s) carry undefined quality flag bits (e.g. value {int(undefined[0])}); only "
                f"{QC_PEN} (pen ink), {QC_BLUR} (out of focus) and {QC_NOVEL} (unlike training) are defined"
            )
        return None
    if np.isinf(cells).any():
        return "holds infinite values"
    if name in CELL_RANGES:
        lo, hi, meaning = CELL_RANGES[name]
        slack = _NOVELTY_ROUNDING if name == "novelty" else 0.0
        outside = cells[(cells < lo - slack) | (cells > hi + slack)]  # NaN compares False: checked below
        if outside.size:
            return (
                f"{outside.size} cell(s) hold values outside [{lo:g}, {hi:g}] (e.g. {float(outside[0]):g}), "
                f"impossible for {meaning}"
            )
    nan = usable & np.isnan(values)
    if nan.any():
        n = _cells_with_expression(c, nan)
        if n:
            return f"NaN on {n} cell(s) that have expression (infer gives every predicted cell one)"
    return None


def _cells_with_expression(c: Cube, cells: np.ndarray) -> int:
    """How many of ``cells`` (y, x; usable cells) hold expression for some gene. Reads only the chunks that
    hold one of them: cells never predicted (a corrupt tile skipped) are NaN in every array."""
    ch, cw = c.chunk_cells
    ny, nx = cells.shape
    n = 0
    ys, xs = np.nonzero(cells)
    for cy, cx in np.unique(np.stack([ys // ch, xs // cw], axis=1), axis=0):
        y0, y1, x0, x1 = cy * ch, min(ny, (cy + 1) * ch), cx * cw, min(nx, (cx + 1) * cw)
        expr = c.read_expression(y0, y1, x0, x1)
        n += int((np.isfinite(expr).any(axis=0) & cells[y0:y1, x0:x1]).sum())
    return n


def read_cube(path: str | Path) -> Cube:
    """Open a cube for reading, whatever its state; see :class:`Cube`.

    Raises InputNotFoundError (nothing at ``path``), DataFormatError (not a cube of this tool, malformed
    metadata, unsafe codecs, a per-cell array its attributes describe that is absent or does not fit) and
    CubeIncompleteError (creation was interrupted: there are no arrays yet). Reads metadata, the small tissue
    and done-mark arrays and a listing of the chunks of the expression and each per-cell array."""
    attrs = cube_attrs(path)
    if attrs[ATTR_KEY].get("state") == STATE_CREATING:
        raise CubeIncompleteError(
            f"{path}: the cube's creation was interrupted (no arrays yet); rerun `wsi-histosge infer` with the "
            "same options to create it"
        )
    check_codecs(path)
    fs, root = filesystem(path)
    n_genes = len(attrs["genes"])
    layout = cube_layout(fs, root, n_genes)
    group, tissue, marks = _open_small_arrays(path)
    cells = _cell_array_metas(path, fs, root, attrs, tissue.shape)
    missing_in: dict[str, list[tuple[int, int]]] = {}
    lost = _missing_chunks(fs, root, layout, tissue, marks, n_genes)
    if lost:
        missing_in["expression"] = lost
    every_chunk_stored = attrs[ATTR_KEY].get(CELL_CHUNKS_KEY) == CELL_CHUNKS_ALWAYS
    for name, doc in cells.items():
        if name == "qc" and not every_chunk_stored:  # an older cube: a chunk without flags was never stored
            continue
        lost = _missing_cell_chunks(fs, root, name, doc, layout.chunk_cells, tissue, marks)
        if lost:
            missing_in[name] = lost
    missing = sorted({chunk for chunks in missing_in.values() for chunk in chunks})
    return Cube(str(path), attrs, group, tissue, marks, layout.chunk_cells, missing, missing_in, tuple(cells))


def _open_small_arrays(path: str | Path) -> tuple[Any, np.ndarray, np.ndarray]:
    """The cube's zarr group, its tissue cells and its chunk done marks (both as bool)."""
    try:
        group: Any = zarr.open_group(str(path), mode="r", use_consolidated=False)
        tissue = np.asarray(group["tissue"][:]).astype(bool)
        marks = np.asarray(group["chunk_done"][:]).astype(bool)
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise DataFormatError(f"{path}: zarr cannot read the cube ({type(exc).__name__}: {exc}); {DAMAGED}") from exc
    return group, tissue, marks


def _cell_array_metas(
    path: str | Path, fs: Any, root: str, attrs: dict[str, Any], shape: tuple[int, ...]
) -> dict[str, dict[str, Any]]:
    """Metadata of the per-cell arrays the cube holds or its ``trust`` attribute describes, checked: present,
    2-d Zarr v3 of the tissue's shape and their kind's data types."""
    declared = declared_trust(attrs)
    out: dict[str, dict[str, Any]] = {}
    for name, kind in CELL_ARRAYS.items():
        described = name in declared or (name == "uncertainty" and "novelty" in declared)
        if not fs.isfile(f"{root}/{name}/zarr.json"):
            if described:  # a cube whose attributes describe the array but lacks it was damaged: never "no flags"
                raise DataFormatError(
                    f"{path}/{name}: missing, though the cube's attributes describe it; {_ARRAY_DAMAGED}"
                )
            continue
        doc = array_meta(fs, root, name, 2, _CELL_DTYPES[kind])
        if tuple(doc["shape"]) != tuple(shape):
            raise DataFormatError(
                f"{path}/{name}: shape {tuple(doc['shape'])} does not fit the cube's {tuple(shape)} cells; "
                f"{_ARRAY_DAMAGED}"
            )
        out[name] = doc
    return out


def _stored_keys(fs: Any, root: str, name: str) -> set[str]:
    """The chunk keys stored under the array ``name`` (one listing)."""
    return {p[len(root) + len(name) + 2 :] for p in fs.find(f"{root}/{name}")}


def _missing_chunks(
    fs: Any, root: str, layout: CubeLayout, tissue: np.ndarray, marks: np.ndarray, n_genes: int
) -> list[tuple[int, int]]:
    """Chunks marked done over tissue whose expression objects are absent (one listing of the store)."""
    ch, cw = layout.chunk_cells
    outer = layout.outer_chunk
    present = _stored_keys(fs, root, "expression")
    n_gene_chunks = -(-n_genes // int(outer[0]))
    missing = []
    for cy, cx in np.argwhere(marks):
        if not tissue[cy * ch : (cy + 1) * ch, cx * cw : (cx + 1) * cw].any():
            continue
        oy, ox = cy * ch // outer[1], cx * cw // outer[2]
        if any(_chunk_key(layout.expression, (g, oy, ox)) not in present for g in range(n_gene_chunks)):
            missing.append((int(cy), int(cx)))
    return missing


def _missing_cell_chunks(
    fs: Any,
    root: str,
    name: str,
    doc: dict[str, Any],
    chunk_cells: tuple[int, int],
    tissue: np.ndarray,
    marks: np.ndarray,
) -> list[tuple[int, int]]:
    """Chunks marked done over tissue lacking a stored object of the per-cell array ``name`` over their
    tissue (one listing of the array; its own chunk grid, which infer makes the expression's)."""
    ch, cw = chunk_cells
    ay, ax = (int(n) for n in doc["chunk_grid"]["configuration"]["chunk_shape"])
    present = _stored_keys(fs, root, name)
    missing = []
    for cy, cx in np.argwhere(marks):
        y0, y1, x0, x1 = cy * ch, (cy + 1) * ch, cx * cw, (cx + 1) * cw
        objects = [(oy, ox) for oy in range(y0 // ay, -(-y1 // ay)) for ox in range(x0 // ax, -(-x1 // ax))]
        for oy, ox in objects:
            over = tissue[max(y0, oy * ay) : min(y1, (oy + 1) * ay), max(x0, ox * ax) : min(x1, (ox + 1) * ax)]
            if over.any() and _chunk_key(doc, (oy, ox)) not in present:
                missing.append((int(cy), int(cx)))
                break
    return missing


#: What a chunk that lost a per-cell array reads as, for verify's message.
_LOST_READS_AS = {"expression": "NaN", "novelty": "NaN", "uncertainty": "NaN", "qc": "no flags"}


def verify_cube(path: str | Path) -> dict[str, Any]:
    """Check a cube: completion marker, done marks, and that every chunk that should hold expression and
    per-cell values (novelty, uncertainty, qc) exists.

    Returns a report with ``ok`` and the problems found; reads metadata and directory listings only.
    Raises InputNotFoundError when nothing is at ``path`` and DataFormatError when it is not a cube of
    this tool (or its metadata is malformed, or a per-cell array its attributes describe is absent or does
    not fit)."""
    if cube_attrs(path)[ATTR_KEY].get("state") == STATE_CREATING:
        return {
            "path": str(path),
            "ok": False,
            "problems": [
                "creation was interrupted (no arrays yet); rerun `wsi-histosge infer` with the same options to "
                "create it"
            ],
            "chunks": 0,
            "chunks_done": 0,
            "missing_chunks": [],
            "missing_in": {},
        }
    cube = read_cube(path)
    problems: list[str] = []
    unwritten = cube.unwritten
    if not cube.completed:
        problems.append(
            f"no completion marker: the run stopped early ({len(unwritten)} of {cube.marks.size} chunks not "
            "written); rerun `wsi-histosge infer` with the same options to resume"
        )
    for name, lost in cube.missing_in.items():
        problems.append(
            f"{len(lost)} {name} chunk(s) marked done but missing on disk: "
            f"{lost[:10]}{' ...' if len(lost) > 10 else ''} (they read as {_LOST_READS_AS.get(name, 'NaN')}); rerun "
            "`wsi-histosge infer` with the same options to recompute them"
        )
    if unwritten and cube.completed:
        problems.append(f"{len(unwritten)} chunk(s) without a done mark in a cube marked complete")
    return {
        "path": str(path),
        "ok": not problems,
        "problems": problems,
        "chunks": int(cube.marks.size),
        "chunks_done": int(cube.marks.sum()),
        "missing_chunks": cube.missing,
        "missing_in": cube.missing_in,
    }


def open_cube(path: str | Path) -> Any:
    """Open a finished cube read-only (the zarr group); refuses incomplete ones, missing chunks and unsafe
    codecs.

    An unfinished run or missing chunks raise CubeIncompleteError (exit 13). New readers use
    :func:`read_cube`."""
    cube = read_cube(path)
    if not cube.completed:
        raise CubeIncompleteError(
            f"{path}: the cube is incomplete (a run stopped early); rerun `wsi-histosge infer` "
            "with the same options to finish it"
        )
    cube.require_complete()
    return cube.group
