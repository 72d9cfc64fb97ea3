"""The output cube: one Zarr v3 group per slide, written chunk by chunk, resumable.

Layout::

    slide.zarr/
      expression      (gene, y, x) float16, chunks (genes, 64, 64), zstd; NaN = not predicted
      tissue          (y, x) uint8: 1 where a spot was predicted
      tissue_fraction (y, x) float16
      chunk_done      (cy, cx) uint8, one object per mark: 1 once that expression chunk is written
      zarr.json       attributes: genes, units, geometry, provenance, OME-NGFF metadata, and last of
                      all ``completed`` with the run fingerprint

Order of writes: the group's zarr.json with all our attributes and ``state: creating`` first (so a
half-created folder is recognisably ours and a rerun may replace it), then the arrays, then the state
is dropped; then chunk data, each followed by its done mark; the completion marker after every mark.
A missing chunk reads as NaN (the fill value), never as expression; readers (:func:`read_cube`) refuse
a cube whose chunks are missing or unwritten unless asked for what is there. What a cube's metadata
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
    attr_problem,
    cube_layout,
    read_metadata,
    refuse_unsafe_nodes,
)
from .errors import CubeIncompleteError, DataFormatError, InputNotFoundError, OutputExistsError, UsageError

#: Value of ``attrs[ATTR_KEY]["state"]`` while the group's arrays are being created.
STATE_CREATING = "creating"


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
            self.group[name][cy * c : cy * c + values.shape[0], cx * c : cx * c + values.shape[1]] = values  # type: ignore[index]
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


@dataclass
class Cube:
    """A cube opened for reading: checked metadata, its arrays, and which chunks hold what they should.

    ``missing``: chunks marked done that should hold expression (tissue) but are absent from the store;
    ``unwritten``: chunks without a done mark (a run that stopped early). Cells of either never read as
    data: :meth:`read_expression` leaves them NaN.
    """

    path: str
    attrs: dict[str, Any]
    group: Any
    tissue: np.ndarray
    marks: np.ndarray
    chunk_cells: tuple[int, int]
    missing: list[tuple[int, int]] = field(default_factory=list)

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
            raise CubeIncompleteError(
                f"{self.path}: {len(self.missing)} of {self.marks.size} expression chunks are missing on disk "
                f"(e.g. {list(self.missing[0])}): {fix.replace('finish it', 'recompute them')}"
            )

    def read_expression(self, y0: int, y1: int, x0: int, x1: int, gene: int | None = None) -> np.ndarray:
        """float32 (genes, y, x) or (y, x) for one gene; NaN off tissue and in unreadable chunks.

        Chunks that are missing or not marked done are never decoded."""
        ch, cw = self.chunk_cells
        expr = self.group["expression"]
        sel: Any = slice(None) if gene is None else gene
        cy0, cy1, cx0, cx1 = y0 // ch, -(-y1 // ch), x0 // cw, -(-x1 // cw)
        usable = self.usable_chunks()[cy0:cy1, cx0:cx1]
        try:
            if usable.all():
                data = np.asarray(expr[sel, y0:y1, x0:x1], dtype=np.float32)
            else:
                lead = () if gene is not None else (expr.shape[0],)
                data = np.full((*lead, y1 - y0, x1 - x0), np.nan, dtype=np.float32)
                for iy, ix in np.argwhere(usable):
                    ya, yb = max(y0, (cy0 + iy) * ch), min(y1, (cy0 + iy + 1) * ch)
                    xa, xb = max(x0, (cx0 + ix) * cw), min(x1, (cx0 + ix + 1) * cw)
                    data[..., ya - y0 : yb - y0, xa - x0 : xb - x0] = expr[sel, ya:yb, xa:xb]
        except (ValueError, RuntimeError, TypeError) as exc:  # a chunk that does not decode
            raise DataFormatError(
                f"{self.path}/expression: cells y {y0}-{y1}, x {x0}-{x1} cannot be decoded ({type(exc).__name__}: "
                f"{exc}); the cube is damaged, rerun `wsi-histosge infer` with --overwrite"
            ) from exc
        data[..., ~self.tissue[y0:y1, x0:x1]] = np.nan
        return data


#: Per-cell arrays a cube may hold besides the expression (``infer.cell_arrays_of``) and their data kinds.
CELL_ARRAYS = {"novelty": "f", "uncertainty": "f", "qc": "u"}


def read_cells(c: Cube, name: str) -> np.ndarray | None:
    """The cube's per-cell array ``name`` (y, x), or None when the cube has none (older cubes, models without
    trust). Cells that are not usable (no tissue, chunk unwritten or missing) read NaN (float) or 0."""
    declared = c.attrs.get("trust", {})
    if name not in c.group:
        # a cube whose attributes describe the array but lacks it was damaged: never read as "no flags"
        if isinstance(declared, dict) and (name in declared or (name == "uncertainty" and "novelty" in declared)):
            raise DataFormatError(
                f"{c.path}/{name}: missing, though the cube's attributes describe it; the cube is damaged, rerun "
                "`wsi-histosge infer` with --overwrite"
            )
        return None
    arr = c.group[name]
    if tuple(arr.shape) != c.tissue.shape or np.dtype(arr.dtype).kind != CELL_ARRAYS.get(name, "?"):
        raise DataFormatError(
            f"{c.path}/{name}: shape {tuple(arr.shape)} / dtype {arr.dtype} do not fit the cube "
            f"({c.tissue.shape}); the cube is damaged, rerun `wsi-histosge infer` with --overwrite"
        )
    values = np.asarray(arr[:])
    usable = c.usable_cells()
    if values.dtype.kind == "f" and np.isinf(values[usable]).any():
        raise DataFormatError(
            f"{c.path}/{name}: holds infinite values; the cube is damaged, rerun `wsi-histosge infer` with --overwrite"
        )
    if values.dtype.kind == "f":
        return np.where(usable, values, np.nan).astype(np.float32)
    return np.where(usable, values, 0).astype(values.dtype)


def read_cube(path: str | Path) -> Cube:
    """Open a cube for reading, whatever its state; see :class:`Cube`.

    Raises InputNotFoundError (nothing at ``path``), DataFormatError (not a cube of this tool, malformed
    metadata, unsafe codecs) and CubeIncompleteError (creation was interrupted: there are no arrays yet).
    Reads metadata, the small tissue and done-mark arrays and a listing of the expression chunks."""
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
    missing = _missing_chunks(fs, root, layout, tissue, marks, n_genes)
    return Cube(str(path), attrs, group, tissue, marks, layout.chunk_cells, missing)


def _open_small_arrays(path: str | Path) -> tuple[Any, np.ndarray, np.ndarray]:
    """The cube's zarr group, its tissue cells and its chunk done marks (both as bool)."""
    try:
        group: Any = zarr.open_group(str(path), mode="r", use_consolidated=False)
        tissue = np.asarray(group["tissue"][:]).astype(bool)
        marks = np.asarray(group["chunk_done"][:]).astype(bool)
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise DataFormatError(f"{path}: zarr cannot read the cube ({type(exc).__name__}: {exc}); {DAMAGED}") from exc
    return group, tissue, marks


def _missing_chunks(
    fs: Any, root: str, layout: CubeLayout, tissue: np.ndarray, marks: np.ndarray, n_genes: int
) -> list[tuple[int, int]]:
    """Chunks marked done over tissue whose expression objects are absent (one listing of the store)."""
    ch, cw = layout.chunk_cells
    outer = layout.outer_chunk
    present = {p[len(root) + len("/expression/") :] for p in fs.find(f"{root}/expression")}
    n_gene_chunks = -(-n_genes // int(outer[0]))
    missing = []
    for cy, cx in np.argwhere(marks):
        if not tissue[cy * ch : (cy + 1) * ch, cx * cw : (cx + 1) * cw].any():
            continue
        oy, ox = cy * ch // outer[1], cx * cw // outer[2]
        if any(_chunk_key(layout.expression, (g, oy, ox)) not in present for g in range(n_gene_chunks)):
            missing.append((int(cy), int(cx)))
    return missing


def verify_cube(path: str | Path) -> dict[str, Any]:
    """Check a cube: completion marker, done marks, and that every chunk that should hold expression exists.

    Returns a report with ``ok`` and the problems found; reads metadata and directory listings only.
    Raises InputNotFoundError when nothing is at ``path`` and DataFormatError when it is not a cube of
    this tool (or its metadata is malformed)."""
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
        }
    cube = read_cube(path)
    problems: list[str] = []
    unwritten = cube.unwritten
    if not cube.completed:
        problems.append(
            f"no completion marker: the run stopped early ({len(unwritten)} of {cube.marks.size} chunks not "
            "written); rerun `wsi-histosge infer` with the same options to resume"
        )
    missing = cube.missing
    if missing:
        problems.append(
            f"{len(missing)} expression chunk(s) marked done but missing on disk: "
            f"{missing[:10]}{' ...' if len(missing) > 10 else ''} (they read as NaN); rerun `wsi-histosge infer` "
            "with the same options to recompute them"
        )
    if unwritten and cube.completed:
        problems.append(f"{len(unwritten)} chunk(s) without a done mark in a cube marked complete")
    return {
        "path": str(path),
        "ok": not problems,
        "problems": problems,
        "chunks": int(cube.marks.size),
        "chunks_done": int(cube.marks.sum()),
        "missing_chunks": missing,
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
