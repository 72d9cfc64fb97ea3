"""What a cube's metadata must hold before anything in it is decoded.

Reads metadata documents only (``zarr.json``, and the Zarr v2 ``.zarray``/``.zgroup``/``.zattrs`` where a
store has them), never a chunk: codecs and data types against allow-lists (decoding a chunk must never
run code from the file), this tool's attributes, and the shapes, data types and chunk grids of the
arrays that readers rely on. Every problem is a :class:`DataFormatError` naming the document and the fix.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from . import config
from .errors import DataFormatError

#: Key of this tool's entry in the cube group's attributes.
ATTR_KEY = "wsi_histosge"

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

#: Zarr v3 data types of the tissue and done-mark arrays.
INTEGER_DTYPES = {"bool", *(f"{k}{b}" for k in ("int", "uint") for b in (8, 16, 32, 64))}

#: Zarr v3 data types of the expression array.
EXPRESSION_DTYPES = {"float16", "float32", "float64"}

#: Zarr v3 data types a cube may declare (plain numbers only).
NUMERIC_DTYPES = {*INTEGER_DTYPES, *EXPRESSION_DTYPES, "complex64", "complex128"}

#: Largest zarr.json we parse (bytes): ours are a few kB; anything huge is not a cube of this tool.
MAX_METADATA_BYTES = 16 * 2**20

#: The end of every message about malformed metadata: what to do about it.
DAMAGED = "the cube's metadata is damaged; rerun `wsi-histosge infer` with --overwrite"

#: Metadata documents a node may have (Zarr v3, then v2).
_NODE_DOCUMENTS = ("zarr.json", ".zarray", ".zgroup", ".zattrs")

#: Deepest folder walked below the cube: ours are one level deep; the bound also stops symlink loops.
_MAX_DEPTH = 8

#: Deepest nesting of codec lists (shards inside shards) that is read.
_MAX_CODEC_NESTING = 4


def read_metadata(fs: Any, path: str) -> Any:
    """Parse one metadata document; DataFormatError naming it when it is unreadable."""
    try:
        if fs.size(path) > MAX_METADATA_BYTES:
            raise DataFormatError(
                f"{path}: metadata larger than {MAX_METADATA_BYTES >> 20} MiB; not a cube of this tool"
            )
        return json.loads(fs.cat_file(path))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise DataFormatError(f"{path}: not valid JSON ({type(exc).__name__}: {exc}); {DAMAGED}") from exc


# -- codecs and data types -------------------------------------------------------------------------
def _codec_names(codecs: Any, where: str, depth: int = 0) -> list[str]:
    """Names of ``codecs`` and of every codec nested in them (a shard's inner and index codecs)."""
    if codecs is None:
        return []
    if not isinstance(codecs, list) or depth > _MAX_CODEC_NESTING:
        raise DataFormatError(f"{where}: malformed codec list; {DAMAGED}")
    names: list[str] = []
    for codec in codecs:
        names += _names_in_codec(codec, where, depth)
    return names


def _names_in_codec(codec: Any, where: str, depth: int) -> list[str]:
    """One codec's name, then those of the codecs a shard nests inside it."""
    if isinstance(codec, str):
        return [codec]
    if not isinstance(codec, dict):
        return [repr(codec)]
    name = codec.get("name")
    names = [name if isinstance(name, str) else repr(name)]
    if name != "sharding_indexed":
        return names
    conf = codec.get("configuration")
    if not isinstance(conf, dict):
        raise DataFormatError(f"{where}: sharding_indexed codec without a configuration; {DAMAGED}")
    for key in ("codecs", "index_codecs"):
        names += _codec_names(conf.get(key), where, depth + 1)
    return names


def _v2_codec_names(doc: dict[str, Any]) -> list[str]:
    """Codec ids of Zarr v2 metadata: one ``compressor`` and a list of ``filters``."""
    names: list[str] = []
    for key in ("compressor", "filters"):
        val = doc.get(key)
        for c in val if isinstance(val, list) else [val] if val else []:
            names.append(str(c.get("id", "")) if isinstance(c, dict) else str(c))
    return names


def _is_numeric_v2_dtype(dtype: Any) -> bool:
    """A Zarr v2 ``dtype`` such as ``'<f4'``: bool, signed or unsigned integer, float or complex."""
    return isinstance(dtype, str) and dtype.lstrip("<>|=")[:1] in ("b", "i", "u", "f", "c")


def _dtype_problems(doc: dict[str, Any]) -> list[str]:
    """The node's data type (v3 ``data_type``, v2 ``dtype``) when it is not a plain number."""
    bad = []
    if doc.get("node_type") == "array" and doc.get("data_type") not in NUMERIC_DTYPES:
        bad.append(f"data type {doc.get('data_type')!r}")
    dtype = doc.get("dtype")
    if dtype is not None and not _is_numeric_v2_dtype(dtype):
        bad.append(f"dtype {dtype!r}")
    return bad


def _consolidated_entries(doc: dict[str, Any]) -> list[tuple[str, Any]]:
    """(name, metadata) of the child nodes a group's consolidated metadata carries."""
    consolidated = doc.get("consolidated_metadata")
    if isinstance(consolidated, dict) and isinstance(consolidated.get("metadata"), dict):
        return list(consolidated["metadata"].items())
    return []


def _node_problems(doc: Any, where: str) -> list[str]:
    """Codecs and data types of one node's metadata (v3 zarr.json or v2 .zarray) outside the allow-lists."""
    if not isinstance(doc, dict):
        raise DataFormatError(f"{where}: metadata is not a JSON object; {DAMAGED}")
    names = _codec_names(doc.get("codecs"), where) + _v2_codec_names(doc)
    bad = [n for n in names if n not in SAFE_CODECS] + _dtype_problems(doc)
    for child, child_doc in _consolidated_entries(doc):
        bad += _node_problems(child_doc, f"{where} (consolidated entry {child!r})")
    return bad


def _is_group(document: str, doc: Any) -> bool:
    return document == ".zgroup" or (
        document == "zarr.json" and isinstance(doc, dict) and doc.get("node_type") == "group"
    )


def _subfolders(fs: Any, folder: str) -> list[str]:
    """The folders directly inside ``folder`` (never ``folder`` itself, which some stores list)."""
    return [
        str(e["name"]).rstrip("/")
        for e in fs.ls(folder, detail=True)
        if e.get("type") == "directory" and str(e["name"]).rstrip("/") != folder
    ]


def refuse_unsafe_nodes(fs: Any, root: str) -> None:
    """DataFormatError for the first node below ``root`` whose metadata declares a codec (also inside a
    shard) or a data type outside the numeric allow-lists (e.g. pickle, object).

    Walks the metadata of every group and array (never lists chunks)."""
    todo = [(root, 0)]
    while todo:
        folder, depth = todo.pop()
        for document in _NODE_DOCUMENTS:
            meta = f"{folder}/{document}"
            if not fs.isfile(meta):
                continue
            doc = read_metadata(fs, meta)
            bad = _node_problems(doc, meta)
            if bad:
                raise DataFormatError(
                    f"{meta}: declares codec(s) {bad} that this tool does not decode (pickle/object codecs could "
                    "run code); only plain numeric Zarr arrays are read"
                )
            if _is_group(document, doc) and depth < _MAX_DEPTH:
                todo += [(sub, depth + 1) for sub in _subfolders(fs, folder)]


# -- attributes ------------------------------------------------------------------------------------
def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_positive(v: Any) -> bool:
    return _is_number(v) and v > 0


def _is_numbers(v: Any, n: int) -> bool:
    return isinstance(v, list) and len(v) == n and all(_is_number(x) for x in v)


def _is_gene_list(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(g, str) for g in v)


def _is_matrix_3x3(v: Any) -> bool:
    return isinstance(v, list) and len(v) == 3 and all(_is_numbers(row, 3) for row in v)


def _is_slide_ref(v: Any) -> bool:
    dims = v.get("dimensions") if isinstance(v, dict) else None
    return (
        isinstance(v, dict)
        and isinstance(v.get("path"), str)
        and isinstance(dims, list)
        and len(dims) == 2
        and all(isinstance(n, int) and n > 0 for n in dims)
    )


def _is_str(v: Any) -> bool:
    return isinstance(v, str)


def _is_object_or_absent(v: Any) -> bool:
    return v is None or isinstance(v, dict)


_Rule = tuple[str, Callable[[Any], bool], str]

#: The attributes readers use: (dotted path, rule its value must pass, what it must be).
_ATTR_RULES: tuple[_Rule, ...] = (
    ("genes", _is_gene_list, "must be a non-empty list of gene names"),
    ("units", _is_str, "must be a string"),
    *((k, _is_positive, "must be a positive number") for k in ("stride_um", "spot_um", "context_um")),
    ("origin_um", lambda v: _is_numbers(v, 2), "must be [x, y] in µm"),
    ("affine_level0", _is_matrix_3x3, "must be a 3x3 matrix"),
)

#: Checked in turn once every rule in ``_ATTR_RULES`` holds.
_LATER_ATTR_RULES: tuple[_Rule, ...] = (
    (f"{ATTR_KEY}.mpp.x", _is_positive, "must be a positive number"),
    (f"{ATTR_KEY}.slide", _is_slide_ref, "must hold the slide's path and [width, height]"),
    ("completed", _is_object_or_absent, "must be an object"),
    # what the per-cell arrays mean (infer's trust attributes); readers look into these objects
    ("trust", _is_object_or_absent, "must be an object"),
    *((f"trust.{k}", _is_object_or_absent, "must be an object") for k in ("novelty", "uncertainty", "qc")),
)


def _lookup(attrs: dict[str, Any], path: str) -> Any:
    """The value at a dotted path, None where a step is missing or not an object."""
    value: Any = attrs
    for step in path.split("."):
        value = value.get(step) if isinstance(value, dict) else None
    return value


def declared_trust(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """The cube's ``trust`` attribute ({} for cubes without one): what its per-cell arrays mean. Its shape
    (an object of objects) is checked with the other attributes (:func:`attr_problem`)."""
    trust = attrs.get("trust")
    return trust if isinstance(trust, dict) else {}


def attr_problem(attrs: dict[str, Any]) -> str | None:
    """What is wrong with a cube's attributes (the ones readers use), or None."""
    # Every rule of _ATTR_RULES is evaluated before the first failure is reported, the later ones only up
    # to the first failure, as these checks always were: a value that makes a rule raise (an integer too
    # large for a float) raises in the same cases.
    first = [(path, rule(_lookup(attrs, path)), what) for path, rule, what in _ATTR_RULES]
    later = ((path, rule(_lookup(attrs, path)), what) for path, rule, what in _LATER_ATTR_RULES)
    for path, ok, what in itertools.chain(first, later):
        if not ok:
            return f"attribute {path!r} {what}"
    return None


# -- arrays ----------------------------------------------------------------------------------------
def _is_dims(v: Any, ndim: int, low: int) -> bool:
    return isinstance(v, list) and len(v) == ndim and all(isinstance(n, int) and n >= low for n in v)


def _regular_chunk_shape(grid: Any) -> Any:
    """The chunk shape of a regular chunk grid; None for anything else."""
    if not isinstance(grid, dict):
        return None
    chunks = (grid.get("configuration") or {}).get("chunk_shape")
    return chunks if grid.get("name") == "regular" else None


def _is_known_key_encoding(enc: Any) -> bool:
    """Chunk keys we can name: ``default`` (``c/0/1``) or ``v2`` (``0.1``), with a '/' or '.' separator."""
    sep = (enc.get("configuration") or {}).get("separator") if isinstance(enc, dict) else None
    return isinstance(enc, dict) and enc.get("name") in ("default", "v2") and sep in (None, "/", ".")


def _array_problem(doc: Any, ndim: int, dtypes: set[str]) -> str | None:
    """What is wrong with one array's metadata for a reader, or None."""
    chunks = _regular_chunk_shape(doc.get("chunk_grid")) if isinstance(doc, dict) else None
    if not (isinstance(doc, dict) and doc.get("node_type") == "array" and doc.get("zarr_format") == 3):
        return "not Zarr v3 array metadata"
    if not (_is_dims(doc.get("shape"), ndim, 0) and _is_dims(chunks, ndim, 1)):
        return f"'shape'/'chunk_grid' missing or not {ndim}-d"
    if doc.get("data_type") not in dtypes:
        return f"data type {doc.get('data_type')!r}, expected one of {sorted(dtypes)}"
    enc = doc.get("chunk_key_encoding", {"name": "default"})
    if not _is_known_key_encoding(enc):
        return f"unsupported chunk_key_encoding {enc!r}"
    return None


def array_meta(fs: Any, root: str, name: str, ndim: int, dtypes: set[str]) -> dict[str, Any]:
    """One array's metadata, checked for what readers rely on: shape, data type, regular chunk grid."""
    meta = f"{root}/{name}/zarr.json"
    if not fs.isfile(meta):
        raise DataFormatError(f"{meta}: missing (the cube has no {name!r} array); {DAMAGED}")
    doc = read_metadata(fs, meta)
    problem = _array_problem(doc, ndim, dtypes)
    if problem:
        raise DataFormatError(f"{meta}: {problem}; {DAMAGED}")
    return dict(doc)


@dataclass(frozen=True)
class CubeLayout:
    """How a cube's expression is stored, checked against its tissue and done-mark arrays."""

    #: The expression array's zarr.json.
    expression: dict[str, Any]
    #: (genes, y, x) cells of one stored expression object (a shard when sharded).
    outer_chunk: list[int]
    #: (y, x) cells of one (inner) expression chunk: what one done mark stands for.
    chunk_cells: tuple[int, int]


def _sharding_codec(expression: dict[str, Any]) -> dict[str, Any] | None:
    """The expression array's sharding codec (always its first codec), None when it is not sharded."""
    codecs = expression.get("codecs") or []
    first = codecs[0] if codecs else None
    return first if isinstance(first, dict) and first.get("name") == "sharding_indexed" else None


def _inner_chunk_shape(expression: dict[str, Any], root: str) -> Any:
    """The chunk shape inside a shard, or the array's chunk shape when it is not sharded."""
    shard = _sharding_codec(expression)
    if shard is None:
        return expression["chunk_grid"]["configuration"]["chunk_shape"]
    inner = (shard.get("configuration") or {}).get("chunk_shape")
    if not _is_dims(inner, 3, 1):
        raise DataFormatError(f"{root}/expression/zarr.json: malformed sharding chunk_shape; {DAMAGED}")
    return inner


def cube_layout(fs: Any, root: str, n_genes: int) -> CubeLayout:
    """Check the cube's three arrays against each other and the gene list; DataFormatError if they disagree."""
    expr = array_meta(fs, root, "expression", 3, EXPRESSION_DTYPES)
    tissue_meta = array_meta(fs, root, "tissue", 2, INTEGER_DTYPES)
    done_meta = array_meta(fs, root, "chunk_done", 2, INTEGER_DTYPES)
    g_n, ny, nx = expr["shape"]
    inner = _inner_chunk_shape(expr, root)
    ch, cw = int(inner[1]), int(inner[2])
    grid = (-(-ny // ch), -(-nx // cw))
    if g_n != n_genes or tissue_meta["shape"] != [ny, nx] or tuple(done_meta["shape"]) != grid:
        raise DataFormatError(
            f"{root}: array shapes disagree (expression {expr['shape']}, {n_genes} genes, tissue "
            f"{tissue_meta['shape']}, chunk_done {done_meta['shape']}); {DAMAGED}"
        )
    if ny * nx > config.MAX_LATTICE_CELLS:
        raise DataFormatError(f"{root}: a lattice of {ny} x {nx} cells is beyond any slide; not a cube of this tool")
    return CubeLayout(expr, expr["chunk_grid"]["configuration"]["chunk_shape"], (ch, cw))
