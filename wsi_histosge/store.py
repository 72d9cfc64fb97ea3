"""The output cube: one Zarr v3 group per slide, written chunk by chunk, resumable.

Layout::

    slide.zarr/
      expression      (gene, y, x) float16, chunks (genes, 64, 64), zstd; NaN = not predicted
      tissue          (y, x) uint8: 1 where a spot was predicted
      tissue_fraction (y, x) float16
      chunk_done      (cy, cx) uint8, one object per mark: 1 once that expression chunk is written
      zarr.json       attributes: genes, units, geometry, provenance, OME-NGFF metadata, and last of
                      all ``completed`` with the run fingerprint

Order of writes: chunk data, then its done mark; the completion marker after every mark. A missing
chunk reads as NaN (the fill value), never as expression.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, ZstdCodec

from . import config
from .errors import DataFormatError, OutputExistsError

ATTR_KEY = "wsi_histosge"


def run_fingerprint(parts: dict[str, Any]) -> str:
    """Stable hash of everything that determines the cube's content."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


@dataclass
class OpenState:
    status: str  # "new", "resume", "complete"
    chunks_done: int = 0


def is_url(path: str | Path) -> bool:
    return "://" in str(path)


def filesystem(path: str | Path) -> tuple[Any, str]:
    """The fsspec filesystem holding ``path`` (local, s3://, gs://, ...) and the path within it."""
    from fsspec.core import url_to_fs

    fs, root = url_to_fs(str(path))
    return fs, str(root).rstrip("/")


def sidecar(out: str | Path, suffix: str) -> str:
    """A file next to the cube (``OUT.zarr`` + suffix), as a string so URLs keep their ``//``."""
    return str(out).rstrip("/") + suffix


def write_text_atomic(path: str | Path, text: str) -> None:
    """Local: temporary file + rename. Object stores: one PUT (atomic per object)."""
    if is_url(path):
        fs, p = filesystem(path)
        fs.pipe_file(p, text.encode())
        return
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.partial")
    tmp.write_text(text)
    os.replace(tmp, target)


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
        """Our attributes if ``path`` is a cube written by this tool, None if absent.

        Raises OutputExistsError when the path exists but holds something else.
        """
        fs, root = filesystem(path)
        if not fs.exists(root):
            return None
        if fs.isdir(root) and not fs.ls(root):
            return None
        meta = f"{root}/zarr.json"
        try:
            attrs = json.loads(fs.cat_file(meta)).get("attributes", {}) if fs.isfile(meta) else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            attrs = None
        if not attrs or ATTR_KEY not in attrs:
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
    ) -> tuple[CubeStore, OpenState]:
        existing = cls.inspect(path)
        if existing is not None:
            previous = existing[ATTR_KEY].get("run_fingerprint")
            if previous == fingerprint:
                group = zarr.open_group(str(path), mode="r+")
                store = cls(path, group)
                if existing.get("completed", {}).get("run_fingerprint") == fingerprint:
                    return store, OpenState("complete", store.chunks_done())
                return store, OpenState("resume", store.chunks_done())
            if not overwrite:
                raise OutputExistsError(
                    f"{path}: holds a run with other parameters, model or slide; pass --overwrite to replace "
                    "it or choose another --out"
                )
            fs, root = filesystem(path)
            fs.rm(root, recursive=True)
        return cls._create(path, fingerprint, shape, attrs, tissue, tissue_fraction, compressor), OpenState("new")

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
    ) -> CubeStore:
        n_genes, ny, nx = shape
        c = config.CHUNK_CELLS
        codec = ZstdCodec(level=3) if compressor == "zstd" else BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")
        group = zarr.open_group(str(path), mode="w", zarr_format=3)
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
        ncy, ncx = -(-ny // c), -(-nx // c)
        group.create_array(
            "chunk_done", shape=(ncy, ncx), chunks=(1, 1), dtype="uint8", fill_value=0, dimension_names=["cy", "cx"]
        )
        full = dict(attrs)
        full[ATTR_KEY] = {
            **attrs.get(ATTR_KEY, {}),
            "run_fingerprint": fingerprint,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        group.attrs.update(full)
        return cls(path, group)

    # -- chunks -------------------------------------------------------------------------------
    def chunk_grid(self) -> tuple[int, int]:
        return tuple(int(v) for v in self.done.shape)  # type: ignore[return-value]

    def done_marks(self) -> np.ndarray:
        return np.asarray(self.done[:], dtype=bool)

    def chunks_done(self) -> int:
        return int(self.done_marks().sum())

    def write_chunk(self, cy: int, cx: int, data: np.ndarray | None) -> None:
        """Write one whole expression chunk (or nothing for an empty one), then its done mark."""
        c = config.CHUNK_CELLS
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


#: Codecs a cube may declare. Anything else (a pickle or object codec above all) is refused before any
#: chunk is read: decoding a chunk must never run code from the file.
SAFE_CODECS = {
    "bytes",
    "zstd",
    "blosc",
    "gzip",
    "crc32c",
    "transpose",
    "sharding_indexed",
    "numcodecs.zstd",
    "numcodecs.blosc",
    "numcodecs.gzip",
    "numcodecs.zlib",
    "numcodecs.lz4",
    "numcodecs.crc32",
}


def check_codecs(path: str | Path) -> None:
    """Refuse a Zarr group whose arrays declare codecs outside :data:`SAFE_CODECS` (e.g. pickle)."""
    fs, root = filesystem(path)
    metas = sorted(p for p in fs.find(root) if p.endswith(("/zarr.json", "/.zarray")))
    for meta in metas:
        try:
            doc = json.loads(fs.cat_file(meta))
        except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
            raise DataFormatError(f"{meta}: unreadable Zarr metadata ({exc})") from exc
        names = [c.get("name", "") if isinstance(c, dict) else str(c) for c in doc.get("codecs", []) or []]
        for key in ("compressor", "filters"):  # Zarr v2 metadata
            val = doc.get(key)
            for c in val if isinstance(val, list) else [val] if val else []:
                names.append(str(c.get("id", "")) if isinstance(c, dict) else str(c))
        if doc.get("dtype") in ("object", "|O", "O"):
            names.append("object dtype")
        bad = [n for n in names if n not in SAFE_CODECS]
        if bad:
            raise DataFormatError(
                f"{meta}: declares codec(s) {bad} that this tool does not decode (pickle/object codecs could run "
                "code); only plain numeric Zarr arrays are read"
            )


def verify_cube(path: str | Path) -> dict[str, Any]:
    """Check a cube: completion marker, done marks, and that every chunk that should hold expression exists.

    Returns a report with ``ok`` and the problems found; reads metadata and directory listings only.
    """
    attrs = CubeStore.inspect(path)
    if attrs is None:
        raise FileNotFoundError(f"{path}: no such cube")
    check_codecs(path)
    group: Any = zarr.open_group(str(path), mode="r")
    fs, root = filesystem(path)
    present = {p[len(root) :] for p in fs.find(f"{root}/expression/c")}
    problems: list[str] = []
    if "completed" not in attrs:
        problems.append("no completion marker: the run stopped early (rerun `infer` with the same options)")
    marks = np.asarray(group["chunk_done"][:], dtype=bool)
    tissue = np.asarray(group["tissue"][:], dtype=bool)
    c = config.CHUNK_CELLS
    missing, unmarked = [], []
    for cy in range(marks.shape[0]):
        for cx in range(marks.shape[1]):
            has_tissue = bool(tissue[cy * c : (cy + 1) * c, cx * c : (cx + 1) * c].any())
            if not marks[cy, cx]:
                unmarked.append((cy, cx))
            elif has_tissue and f"/expression/c/0/{cy}/{cx}" not in present:
                missing.append((cy, cx))
    if missing:
        problems.append(
            f"{len(missing)} expression chunk(s) marked done but missing on disk: "
            f"{missing[:10]}{' ...' if len(missing) > 10 else ''} (they read as NaN); rerun `infer` "
            "with --overwrite to recompute"
        )
    if unmarked and "completed" in attrs:
        problems.append(f"{len(unmarked)} chunk(s) without a done mark in a cube marked complete")
    return {
        "path": str(path),
        "ok": not problems,
        "problems": problems,
        "chunks": int(marks.size),
        "chunks_done": int(marks.sum()),
        "missing_chunks": missing,
    }


def open_cube(path: str | Path) -> Any:
    """Open a finished cube read-only; refuses incomplete ones and unsafe codecs."""
    attrs = CubeStore.inspect(path)
    if attrs is None:
        raise FileNotFoundError(f"{path}: no such cube")
    check_codecs(path)
    if "completed" not in attrs:
        raise OutputExistsError(
            f"{path}: the cube is incomplete (a run stopped early); rerun `wsi-histosge infer` "
            "with the same options to finish it"
        )
    return zarr.open_group(str(path), mode="r")
