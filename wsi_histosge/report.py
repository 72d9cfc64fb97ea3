"""Cohort report: one self-contained HTML page per `batch` run (``OUT/report.html``).

One row per slide, failed slides first (then interrupted, locked, and done, each group in the run's order):
status and reason, a thumbnail of the slide with the tissue outline drawn over it, spots, tissue area, time,
and small maps of a few genes. The page needs nothing else: pictures are inline (base64 JPEG/PNG), the CSS is
inline, there is no script, and a Content-Security-Policy forbids any load that is not inline, so it opens
offline, from a mail attachment, or from an archive years later.

Gene maps of every slide share one colour scale per gene (the 1st-99th percentile of values pooled over the
cohort), so a slide that is high in a gene looks high next to the others. Maps are block means of the cube
(linear-space, as ``to-anndata``) no finer than the thumbnail, read in chunk-aligned windows of bounded
memory; their arrays wait in a temporary folder between the two passes, so memory does not grow with the
cohort. Picture sizes shrink with the number of slides so that all pictures together stay about
:data:`PICTURE_BUDGET_MB`.

Slides are read for thumbnails in one child process (a reader that crashes the interpreter fails one row of
the report, not the batch), rows are rendered one after another, and the page is written under a temporary
name and renamed.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import tempfile
import time
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UsageError
from .owned import HTML_META

REPORT_NAME = "report.html"
#: Genes mapped when none are asked for: breast-cancer markers the built-in model predicts (HER2, epithelium,
#: stroma), those a model has, else its first genes.
PREFERRED_GENES = ("ERBB2", "EPCAM", "COL1A1")
DEFAULT_N_GENES = 3
MAX_GENES = 8
#: All pictures of a report together (thumbnails and maps, as base64) stay about this size.
PICTURE_BUDGET_MB = 32.0
#: Long side of a thumbnail, in px, whatever the cohort size.
MAX_SIDE, MIN_SIDE = 256, 64
#: Bytes per pixel of an H&E thumbnail as JPEG (quality 80) plus base64 (measured on the packaged sample).
_BYTES_PER_PX = 0.45
#: A row whose rendering takes longer than this is given up (its reader hangs) and the next one is rendered.
ROW_TIMEOUT_S = 900.0
#: Values per gene and slide kept to set the cohort's colour scales.
_SAMPLES = 2000
_STATUS_ORDER = {"failed": 0, "interrupted": 1, "unknown": 2, "locked": 3, "running": 4, "done": 5}
_OUTLINE_RGB = (20, 200, 60)
_CMAP = "magma"


# -- genes ------------------------------------------------------------------------------------------
def default_report_genes(genes: list[str]) -> list[str]:
    """The genes mapped by default: :data:`PREFERRED_GENES` a model predicts, else its first three."""
    preferred = [g for g in PREFERRED_GENES if g in genes]
    return preferred or list(genes[:DEFAULT_N_GENES])


def parse_report_genes(text: str) -> list[str]:
    """``--report-genes A,B``: names in order, without duplicates; an empty value maps no gene."""
    names = list(dict.fromkeys(g.strip() for g in text.split(",") if g.strip()))
    if len(names) > MAX_GENES:
        raise UsageError(f"--report-genes: at most {MAX_GENES} genes (small maps of a few), got {len(names)}")
    return names


def check_report_genes(names: list[str], model: str | Path | None) -> None:
    """UsageError naming a gene the model (default: the built-in one) does not predict; nothing is read for
    a model given as a URL."""
    if model is not None and "://" in str(model):
        return
    from .model import _checkpoint_files, _read_model_json, default_model_path

    meta_path, _ = _checkpoint_files(Path(model) if model is not None else default_model_path())
    genes = _read_model_json(meta_path).get("genes")
    if not isinstance(genes, list):
        return  # a malformed model.json: the run says so, with its own message
    for gene in names:
        if gene not in genes:
            close = [g for g in genes if isinstance(g, str) and g.upper().startswith(gene.upper()[:3])][:5]
            raise UsageError(
                f"--report-genes: {gene!r} is not among the model's {len(genes)} genes"
                + (f" (similar: {', '.join(close)})" if close else "")
            )


# -- one row: thumbnail, tissue outline, gene maps (runs in the child process) ------------------------
def _one_line(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:300]


def _thumbnail(slide: Any, side: int) -> np.ndarray:
    """RGB thumbnail with ``side`` px on its long side; without a pixel size, from the coarsest level when
    that level is small enough to read whole."""
    from PIL import Image

    from .errors import MPPMissingError

    w0, h0 = slide.dimensions
    try:
        mpp = slide.mpp.x
    except MPPMissingError:
        level = slide.level_count - 1
        lw, lh = slide.level_dimensions[level]
        if lw * lh > 64_000_000:
            raise
        img = Image.fromarray(slide.read_region((0, 0), level, (lw, lh)))
        img.thumbnail((side, side), Image.Resampling.BOX)
        return np.asarray(img.convert("RGB"))
    thumb, _ = slide.thumbnail(max(mpp, max(w0, h0) * mpp / side))
    return np.ascontiguousarray(thumb[..., :3])


def _sidecar_polygons(output: str) -> list[np.ndarray]:
    """Tissue polygons (level-0 px) of the ``.tissue.geojson`` that `infer` writes next to a cube."""
    path = Path(output.rstrip("/") + ".tissue.geojson")
    if "://" in output or not path.is_file() or path.stat().st_size > 32 * 2**20:
        return []
    doc = json.loads(path.read_text())
    rings = []
    for feature in doc.get("features", []):
        geometry = feature.get("geometry") or {}
        if geometry.get("type") == "Polygon":
            rings += [np.asarray(r, dtype=np.float64) for r in geometry.get("coordinates", [])[:1]]
    return rings


def _detected_polygons(slide: Any) -> list[np.ndarray]:
    """Tissue polygons (level-0 px) from tissue detection, for a slide without a cube."""
    from .tissue import detect_tissue, mask_to_geojson

    doc = mask_to_geojson(detect_tissue(slide))
    return [np.asarray(f["geometry"]["coordinates"][0], dtype=np.float64) for f in doc["features"]]


def _draw_outline(thumb: np.ndarray, rings: list[np.ndarray], scale: tuple[float, float]) -> np.ndarray:
    from PIL import Image, ImageDraw

    img = Image.fromarray(thumb)
    draw = ImageDraw.Draw(img)
    width = max(1, round(max(thumb.shape[:2]) / 120))
    for ring in rings:
        pts = [(float(x) / scale[0], float(y) / scale[1]) for x, y in ring[:, :2]]
        if len(pts) >= 3:
            draw.line([*pts, pts[0]], fill=_OUTLINE_RGB, width=width, joint="curve")
    return np.asarray(img)


def _block_means(cube: Any, gene_idx: list[int], k: int, budget_mb: float = 64.0) -> np.ndarray:
    """(genes, ny/k, nx/k) float32: linear-space means of ``k`` x ``k`` lattice cells, NaN where none has a
    value; the cube is read in chunk-aligned windows of every gene within ``budget_mb``."""
    from .convert import _bin_sum, _spans

    cells = cube.usable_cells()
    ny, nx = cells.shape
    ch, cw = cube.chunk_cells
    n_all = len(cube.genes)
    window_cols = max(cw, int(budget_mb * 2**20 // (n_all * 12 * ch)) // cw * cw)
    sums = np.zeros((len(gene_idx), -(-ny // k), -(-nx // k)), dtype=np.float64)
    counts = np.zeros(sums.shape, dtype=np.int32)
    for ys, ye in _spans(0, ny, ch, ch):
        for xs, xe in _spans(0, nx, cw, window_cols):
            if not cells[ys:ye, xs:xe].any():
                continue
            lin = np.expm1(cube.read_expression(ys, ye, xs, xe)[gene_idx])
            finite = np.isfinite(lin)
            lin[~finite] = 0.0
            r = slice(ys // k, (ye - 1) // k + 1)
            c = slice(xs // k, (xe - 1) // k + 1)
            sums[:, r, c] += _bin_sum(lin, (ys, xs), k, np.float64)
            counts[:, r, c] += _bin_sum(finite, (ys, xs), k, np.int32)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.log1p(sums / counts).astype(np.float32)


def _project(cube: Any, blocks: np.ndarray, k: int, shape: tuple[int, int], scale: tuple[float, float]) -> np.ndarray:
    """Block means drawn on the thumbnail's pixel grid (genes, h, w), NaN off the lattice and off tissue."""
    affine = np.asarray(cube.attrs["affine_level0"], dtype=np.float64)
    h, w = shape
    ny, nx = cube.tissue.shape

    def index(n_px: int, axis: int, n_cells: int) -> tuple[np.ndarray, np.ndarray]:
        level0 = (np.arange(n_px) + 0.5) * scale[axis]
        cell = np.floor((level0 - affine[axis, 2]) / affine[axis, axis] + 0.5).astype(np.int64)
        inside = (cell >= 0) & (cell < n_cells)
        return np.clip(cell, 0, n_cells - 1) // k, inside

    rows, in_y = index(h, 1, ny)
    cols, in_x = index(w, 0, nx)
    out = blocks[:, rows[:, None], cols[None, :]]
    out[:, ~(in_y[:, None] & in_x[None, :])] = np.nan
    return out


def _jpeg(img: np.ndarray, quality: int = 80) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality, optimize=True)
    return buf.getvalue()


def _render_row(task: dict[str, Any]) -> dict[str, Any]:
    """Thumbnail with tissue outline (JPEG bytes) and the gene maps on its grid (saved as .npy in the
    task's folder), with a sample of their values; a note says what could not be drawn and why."""
    from .slide import open_slide
    from .store import ATTR_KEY, read_cube

    result: dict[str, Any] = {"thumb": None, "note": "", "maps": {}, "map_notes": {}, "samples": {}}
    cube = None
    if task["status"] == "done" and task.get("output"):
        try:
            cube = read_cube(task["output"])
        except Exception as exc:
            result["note"] = f"cube not readable: {_one_line(exc)}"
    mpp = float(cube.attrs[ATTR_KEY]["mpp"]["x"]) if cube is not None else task.get("mpp")
    try:
        with open_slide(task["slide"], mpp=mpp) as slide:
            thumb = _thumbnail(slide, task["side"])
            w0, h0 = slide.dimensions
            scale = (w0 / thumb.shape[1], h0 / thumb.shape[0])
            try:
                rings = _sidecar_polygons(task["output"]) if cube is not None else []
                rings = rings or _detected_polygons(slide)
                thumb = _draw_outline(thumb, rings, scale)
            except Exception as exc:
                result["note"] = f"no tissue outline: {_one_line(exc)}"
    except Exception as exc:
        # a failed slide that does not open: its reason is already in the row
        failed = task["status"] != "done" and str(exc)[:80] in str(task.get("error", ""))
        result["note"] = f"no thumbnail ({type(exc).__name__})" if failed else f"no thumbnail: {_one_line(exc)}"
        return result
    result["thumb"] = _jpeg(thumb)
    if cube is None or not task["genes"]:
        return result
    index = {g: i for i, g in enumerate(cube.genes)}
    genes = [g for g in task["genes"] if g in index]
    for g in task["genes"]:
        if g not in index:
            result["map_notes"][g] = "not predicted by this slide's model"
    if not genes:
        return result
    ny, nx = cube.tissue.shape
    k = max(1, math.ceil(max(ny / thumb.shape[0], nx / thumb.shape[1])))
    maps = _project(cube, _block_means(cube, [index[g] for g in genes], k), k, thumb.shape[:2], scale)
    rng = np.random.default_rng(0)
    for g, m in zip(genes, maps, strict=True):
        path = Path(task["tmp"]) / f"{task['n']}-{len(result['maps'])}.npy"
        np.save(path, m.astype(np.float16))
        result["maps"][g] = str(path)
        values = m[np.isfinite(m)]
        result["samples"][g] = rng.choice(values, min(_SAMPLES, values.size), replace=False) if values.size else values
    return result


# -- running rows in a child process ------------------------------------------------------------------
def _worker(conn: Any) -> None:
    while True:
        task = conn.recv()
        if task is None:
            return
        try:
            conn.send(_render_row(task))
        except Exception as exc:  # a row's failure is reported in the row
            conn.send({"thumb": None, "note": f"not rendered: {_one_line(exc)}", "maps": {}, "map_notes": {}})


class _Renderer:
    """Renders rows in one spawned child (or in this process when not ``isolate``), starting a new child when
    one crashes or a row times out."""

    def __init__(self, isolate: bool, timeout_s: float = ROW_TIMEOUT_S) -> None:
        self.isolate = isolate
        self.timeout_s = timeout_s
        self.proc: Any = None
        self.conn: Any = None

    def render(self, task: dict[str, Any]) -> dict[str, Any]:
        if not self.isolate:
            return _render_row(task)
        if self.proc is None:
            import multiprocessing as mp

            ctx = mp.get_context("spawn")
            self.conn, child = ctx.Pipe()
            self.proc = ctx.Process(target=_worker, args=(child,), name="wsi-histosge-report", daemon=True)
            self.proc.start()
            child.close()
        self.conn.send(task)
        if not self.conn.poll(self.timeout_s):
            self.close(kill=True)
            return {"thumb": None, "note": f"gave up after {self.timeout_s:g} s (the slide's reader hangs?)"}
        try:
            return dict(self.conn.recv())
        except (EOFError, OSError):
            self.proc.join(timeout=10)
            code = self.proc.exitcode
            self.close(kill=True)
            how = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
            return {"thumb": None, "note": f"reading the slide crashed the report's reader process ({how})"}

    def close(self, *, kill: bool = False) -> None:
        if self.proc is None:
            return
        if kill:
            self.proc.kill()
        else:
            try:
                self.conn.send(None)
            except OSError:
                self.proc.kill()
        self.proc.join(timeout=30)
        self.conn.close()
        self.proc = self.conn = None


# -- the page ---------------------------------------------------------------------------------------
def _ordered(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Failed first, then interrupted, locked, ..., done; the run's order within each group."""
    indexed = list(enumerate(rows))
    indexed.sort(key=lambda ir: (_STATUS_ORDER.get(str(ir[1].get("status")), 2), ir[0]))
    return [r for _, r in indexed]


def picture_sides(n_rows: int, n_genes: int) -> tuple[int, int]:
    """(thumbnail, map) long sides in px such that all pictures stay about :data:`PICTURE_BUDGET_MB`."""
    per_row = PICTURE_BUDGET_MB * 2**20 / max(1, n_rows) / _BYTES_PER_PX
    side = math.sqrt(per_row / (1 + n_genes * 0.5625))  # maps are 3/4 of the thumbnail's side
    side = int(min(MAX_SIDE, max(MIN_SIDE, side)))
    return side, max(MIN_SIDE * 3 // 4, side * 3 // 4)


def _lut() -> np.ndarray:
    from matplotlib import colormaps

    return (colormaps[_CMAP](np.linspace(0.0, 1.0, 256))[:, :3] * 255).round().astype(np.uint8)


def _map_picture(thumb_jpeg: bytes, values: np.ndarray, lo: float, hi: float, side: int, lut: np.ndarray) -> bytes:
    """The gene's values in colour over the faded thumbnail, ``side`` px on the long side, as JPEG."""
    from PIL import Image

    base = np.asarray(Image.open(io.BytesIO(thumb_jpeg)).convert("RGB"), dtype=np.float32)
    base = 0.45 * base + 0.55 * 255.0
    finite = np.isfinite(values)
    level = np.clip((np.nan_to_num(values.astype(np.float32)) - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
    colour = lut[(level * 255).round().astype(np.int64)].astype(np.float32)
    base[finite] = 0.15 * base[finite] + 0.85 * colour[finite]
    img = Image.fromarray(base.round().astype(np.uint8))
    img.thumbnail((side, side), Image.Resampling.BOX)
    return _jpeg(np.asarray(img))


def _colour_bar(lut: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.repeat(lut[None], 10, axis=0)).resize((160, 10)).save(buf, format="PNG")
    return buf.getvalue()


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _scales(samples: dict[str, list[np.ndarray]]) -> dict[str, tuple[float, float]]:
    out = {}
    for gene, parts in samples.items():
        values = np.concatenate(parts) if parts else np.zeros(0)
        if values.size:
            lo, hi = np.percentile(values.astype(np.float64), [1, 99])
            out[gene] = (float(lo), float(max(hi, lo + 1e-3)))
    return out


_CSS = """
body{font:14px/1.35 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:16px;color:#222}
h1{font-size:20px;margin:0 0 6px}
.facts{color:#444;margin:0 0 10px}
.legend{display:flex;gap:18px;flex-wrap:wrap;margin:6px 0 12px}
.legend div{font-size:12px}
.legend img{display:block;border:1px solid #999}
table{border-collapse:collapse}
th,td{border:1px solid #ccc;padding:4px 6px;vertical-align:top;text-align:left}
th{background:#f0f0f0;position:sticky;top:0}
tr.failed,tr.interrupted,tr.unknown{background:#fff0f0}
tr.locked,tr.running{background:#fff8e0}
.status{font-weight:bold;text-transform:uppercase;font-size:12px}
tr.failed .status,tr.interrupted .status,tr.unknown .status{color:#b00}
tr.done .status{color:#070}
.reason{color:#900;max-width:420px;white-space:pre-wrap;word-break:break-word;font-size:12px}
.note{color:#666;font-size:11px;max-width:260px;word-break:break-word}
.path{color:#666;font-size:11px;word-break:break-all;max-width:260px}
td.num{text-align:right;white-space:nowrap}
img.pic{display:block}
.warn{color:#a40;font-weight:bold}
"""


def _cell(value: Any, fmt: str = "{}") -> str:
    if value in (None, ""):
        return "-"
    try:
        return html.escape(fmt.format(float(value)) if fmt != "{}" else str(value))
    except (TypeError, ValueError):
        return html.escape(str(value))


def _trust_cell(row: dict[str, Any]) -> str:
    """How far to trust the slide's cells (summary.csv's trust columns): share unlike the training tissue,
    cells flagged pen ink / out of focus, median expected error; '-' where the slide has none."""
    lines = []
    share = row.get("unlike_training_share")
    if share not in (None, ""):
        try:
            value = float(share)
        except (TypeError, ValueError):
            value = math.nan
        cls = " class=warn" if value > 0.5 else ""
        lines.append(f"<div{cls}>unlike training {_cell(value * 100, '{:.1f}')}%</div>")
    for key, label in (("pen_ink_cells", "pen ink"), ("out_of_focus_cells", "out of focus")):
        if row.get(key) not in (None, ""):
            lines.append(f"<div>{label} {_cell(row.get(key))}</div>")
        elif key == "out_of_focus_cells" and lines:
            lines.append("<div>out of focus: not judged</div>")  # a slide read coarser than 1 µm/px
    if row.get("uncertainty_median") not in (None, ""):
        lines.append(f"<div>error ~{_cell(row.get('uncertainty_median'), '{:.2f}')}</div>")
    return "".join(lines) or "-"


def _row_html(n: int, row: dict[str, Any], res: dict[str, Any], genes: list[str], maps: dict[str, bytes]) -> str:
    status = str(row.get("status", "unknown"))
    result = row.get("result") if status == "done" else None
    reason = str(row.get("error") or "")[:2000]
    parts = [f'<tr class="{html.escape(status)}" id="row-{n}">', f"<td class=num>{n}</td>"]
    slide_cell = (
        f"<b>{html.escape(str(row.get('id', '')))}</b><div class=path>{html.escape(str(row.get('slide', '')))}</div>"
    )
    parts.append(f"<td>{slide_cell}</td>")
    status_cell = f"<span class=status>{html.escape(status)}</span>"
    if result:
        status_cell += f"<div class=note>{html.escape(str(result))}</div>"
    if reason:
        code = row.get("exit_code")
        status_cell += f"<div class=reason>{html.escape(reason)}" + (f" (exit {int(code)})" if code else "") + "</div>"
    parts.append(f"<td>{status_cell}</td>")
    if res.get("thumb"):
        alt = f"thumbnail of {html.escape(str(row.get('id', '')))} with tissue outline"
        thumb = f'<img class=pic alt="{alt}" src="{_data_uri(res["thumb"], "image/jpeg")}">'
    else:
        thumb = "<div class=note>no picture</div>"
    if res.get("note"):
        thumb += f"<div class=note>{html.escape(res['note'])}</div>"
    parts.append(f"<td>{thumb}</td>")
    parts.append(f"<td class=num>{_cell(row.get('spots'))}</td>")
    parts.append(f"<td class=num>{_cell(row.get('tissue_area_mm2'), '{:.2f}')}</td>")
    parts.append(f"<td class=num>{_cell(row.get('seconds'), '{:.1f}')}</td>")
    parts.append(f"<td>{_trust_cell(row)}</td>")
    for gene in genes:
        if gene in maps:
            alt = f"{html.escape(gene)} on {html.escape(str(row.get('id', '')))}"
            parts.append(f'<td><img class=pic alt="{alt}" src="{_data_uri(maps[gene], "image/jpeg")}"></td>')
        else:
            note = (res.get("map_notes") or {}).get(gene, "")
            parts.append(f"<td><div class=note>{html.escape(note)}</div></td>")
    parts.append("</tr>\n")
    return "".join(parts)


def write_report(
    run_dir: str | Path,
    rows: list[dict[str, Any]],
    *,
    genes: list[str] | None = None,
    seconds: float | None = None,
    exit_code: int | None = None,
    mpp: float | None = None,
    isolate: bool = True,
    title: str | None = None,
) -> Path:
    """Write ``run_dir/report.html`` for the slides of ``rows`` (the states `batch` returns); see the module
    docstring. ``genes``: the genes to map (default :func:`default_report_genes` of the first readable cube);
    ``mpp``: the pixel size for slides that carry none (the run's --mpp)."""
    from .store import read_cube

    run_dir = Path(run_dir)
    ordered = _ordered(rows)
    if genes is None:
        genes = []
        for row in ordered:
            if row.get("status") == "done" and row.get("output"):
                try:
                    genes = default_report_genes(read_cube(str(row["output"])).genes)
                    break
                except Exception:
                    continue
    genes = list(genes)[:MAX_GENES]
    side, map_side = picture_sides(len(ordered), len(genes))
    renderer = _Renderer(isolate)
    results: list[dict[str, Any]] = []
    samples: dict[str, list[np.ndarray]] = {g: [] for g in genes}
    with tempfile.TemporaryDirectory(prefix=".report-", dir=run_dir) as tmp:
        try:
            for n, row in enumerate(ordered):
                task = {
                    "n": n,
                    "status": row.get("status"),
                    "slide": str(row.get("slide", "")),
                    "output": str(row.get("output") or ""),
                    "error": str(row.get("error") or ""),
                    "mpp": mpp,
                    "genes": genes,
                    "side": side,
                    "tmp": tmp,
                }
                res = renderer.render(task)
                for g, values in (res.get("samples") or {}).items():
                    samples[g].append(np.asarray(values, dtype=np.float32))
                res.pop("samples", None)
                results.append(res)
        finally:
            renderer.close()
        scales = _scales(samples)
        return _write_page(run_dir, ordered, results, genes, scales, map_side, seconds, exit_code, title)


def _write_page(
    run_dir: Path,
    ordered: list[dict[str, Any]],
    results: list[dict[str, Any]],
    genes: list[str],
    scales: dict[str, tuple[float, float]],
    map_side: int,
    seconds: float | None,
    exit_code: int | None,
    title: str | None,
) -> Path:
    from .errors import EXIT_CODES

    lut = _lut()
    counts: dict[str, int] = {}
    for row in ordered:
        counts[str(row.get("status", "unknown"))] = counts.get(str(row.get("status", "unknown")), 0) + 1
    title = title or f"wsi-histosge cohort report: {run_dir.resolve().name}"
    facts = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items(), key=lambda kv: _STATUS_ORDER.get(kv[0], 2)))
    facts = f"{len(ordered)} slide{'s' if len(ordered) != 1 else ''} ({facts})"
    if exit_code is not None:
        facts += f"; exit code {exit_code}: {EXIT_CODES.get(exit_code, '')}"
    if seconds is not None:
        facts += f"; run time {seconds:.1f} s"
    facts += f"; written {time.strftime('%Y-%m-%d %H:%M:%S %z')}; folder {run_dir.resolve()}"
    bar = _data_uri(_colour_bar(lut), "image/png")
    legend = []
    for gene in genes:
        if gene in scales:
            lo, hi = scales[gene]
            legend.append(
                f'<div><b>{html.escape(gene)}</b><img alt="colour scale of {html.escape(gene)}" src="{bar}">'
                f"{lo:.2f} to {hi:.2f} log1p(CP10k), same scale on every slide</div>"
            )
    head = (
        "<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
        "<meta http-equiv=Content-Security-Policy content=\"default-src 'none'; img-src data:; "
        "style-src 'unsafe-inline'\">"
        + HTML_META
        + f'<meta name=viewport content="width=device-width"><title>{html.escape(title)}</title>'
        f"<style>{_CSS}</style></head><body>\n<h1>{html.escape(title)}</h1>\n"
        f"<p class=facts>{html.escape(facts)}</p>\n"
        + (f"<div class=legend>{''.join(legend)}</div>\n" if legend else "")
        + "<table>\n<thead><tr><th>#</th><th>slide</th><th>status and reason</th><th>thumbnail, tissue outline</th>"
        "<th>spots</th><th>tissue mm²</th><th>time s</th><th>trust (cells)</th>"
        + "".join(f"<th>{html.escape(g)}</th>" for g in genes)
        + "</tr></thead>\n<tbody>\n"
    )
    out = run_dir / REPORT_NAME
    tmp = run_dir / f".{REPORT_NAME}.{os.getpid()}.partial"
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(head)
            for n, (row, res) in enumerate(zip(ordered, results, strict=True)):
                maps = {}
                for gene, path in (res.get("maps") or {}).items():
                    if gene in scales and res.get("thumb"):
                        maps[gene] = _map_picture(res["thumb"], np.load(path), *scales[gene], map_side, lut)
                fh.write(_row_html(n + 1, row, res, genes, maps))
            fh.write("</tbody></table>\n</body></html>\n")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def write_batch_report(run_dir: str | Path, rows: list[dict[str, Any]], **kwargs: Any) -> Path | None:
    """:func:`write_report` for the end of `batch`: the run's results stand whatever happens to the report,
    so a report that cannot be written is a one-line warning, not an error."""
    try:
        return write_report(run_dir, rows, **kwargs)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:
        warnings.warn(f"{Path(run_dir) / REPORT_NAME}: report not written ({_one_line(exc)})", stacklevel=2)
        return None


__all__ = [
    "REPORT_NAME",
    "check_report_genes",
    "default_report_genes",
    "parse_report_genes",
    "picture_sides",
    "write_batch_report",
    "write_report",
]
