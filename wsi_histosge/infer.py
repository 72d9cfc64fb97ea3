"""Whole-slide inference: slide -> tissue -> lattice -> super-tiles -> encoder -> head -> Zarr cube."""

from __future__ import annotations

import hashlib
import json
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__, config
from .cube_checks import declared_trust
from .encoders import Encoder, create_encoder, encoder_passes
from .errors import HistoSGEError, ModelError, NoTissueError, OutputWriteError, UsageError, check_range
from .grid import Block, Grid, block_cells_for, make_grid
from .halo import FeatureRing
from .loader import BlockDataset, block_loader, cells_clear_of, encode_tile
from .lock import OutputLock
from .model import Model, default_model_path, load_model
from .owned import GENERATOR, require_replaceable
from .qc import BLUR_MAX_TILE_MPP, QC_BLUR, QC_PEN, cell_flags
from .remote import read_stats
from .slide import Slide, SlideURL, open_slide, slide_location
from .store import ATTR_KEY, CubeStore, is_url, run_fingerprint, sidecar, write_text_atomic
from .tissue import TissueMask, detect_tissue, load_tissue_mask, mask_to_geojson, require_tissue
from .trust import DEFAULT_NOVELTY_PERCENTILE, QC_NOVEL


@dataclass
class InferOptions:
    """Options of one inference run; ``None`` means "the library default"."""

    model: str | Path | None = None
    encoder_weights: str | Path | None = None
    allow_download: bool = False
    mpp: float | None = None
    stride_um: float | None = None
    spot_um: float | None = None
    context_um: float | None = None
    origin_um: tuple[float, float] | None = None
    tissue_mask: str | Path | None = None
    min_tissue_fraction: float | None = None
    device: str | None = None
    precision: str | None = None  # "fp32", "bf16", "fp16"; default bf16/fp16 on GPU, fp32 on CPU
    batch_size: int | None = None
    num_workers: int | None = None
    compile: bool = False
    on_bad_tile: str = "fail"  # or "skip": corrupt tiles masked out, their spots left unpredicted and counted
    overwrite: bool = False
    write_geojson: bool = True
    #: Each cell encoded once, its features reused by neighbouring blocks (False: every block encodes its
    #: whole halo'd range again, as earlier versions did; for comparisons).
    reuse_features: bool = True
    #: Cells whose novelty exceeds this percentile of the training calibration get the QC_NOVEL flag (models
    #: with a trust part; None: ``trust.DEFAULT_NOVELTY_PERCENTILE``). Flagged cells are kept and predicted.
    novelty_threshold: float | None = None


@dataclass
class InferResult:
    status: str  # "complete" (computed now), "already-complete", "resumed"
    out: str
    slide: str
    spots: int
    tiles: int
    chunks_written: int
    grid_shape: tuple[int, int]
    stride_um: float
    tissue_area_mm2: float
    mpp: float
    mpp_source: str
    model: str
    encoder: str
    device: str
    precision: str
    timings_s: dict[str, float] = field(default_factory=dict)
    spots_per_s: float = 0.0
    bad_tiles: int = 0
    spots_skipped_bad_tiles: int = 0
    patches_encoded: int = 0  # patches through the encoder: the spots, each once (more with reuse off)
    tta: str = "none"  # the model's test-time augmentation of features
    encoder_passes: int = 0  # trunk forward passes: patches_encoded x the augmentation's turns x the encoder's views
    #: Cells predicted and how many carry each quality flag (the cube's ``qc`` array), the novelty threshold
    #: (training percentile) and the median uncertainty; empty for an interrupted run.
    trust: dict[str, Any] = field(default_factory=dict)
    skipped_levels: dict[int, str] = field(default_factory=dict)  # pyramid levels not used, and why
    #: Marker ink on the slide left out of detected tissue (mm²; 0 with a --tissue-mask): cells under it
    #: are not predicted unless the ink lies inside tissue.
    ink_excluded_mm2: float = 0.0
    #: A slide read from an object store: bytes this run fetched from it (every process, the fingerprint and
    #: tissue detection included; counted as range reads return them) and the object's size. None when local.
    bytes_read: int | None = None
    file_size: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


ProgressFn = Callable[[str, int, int], None]  # (event, advance, total)


def resolve_device(name: str | None) -> torch.device:
    """``None``/``auto``: CUDA when present, else CPU. A named device must exist here (UsageError)."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert name is not None
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise UsageError(f"--device {name!r}: only cpu and cuda[:N] are supported")
    if not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA device is available on this machine; use --device cpu")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(
            f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s) (cuda:0..); pick one of them"
        )
    return device


#: Accepted ranges of the numeric options (inclusive), in the options' own units.
OPTION_RANGES: dict[str, tuple[float, float]] = {
    "mpp": config.MPP_PLAUSIBLE,
    "stride_um": (1.0, 10_000.0),
    "spot_um": (1.0, 10_000.0),
    "context_um": (4.0, 10_000.0),
    "min_tissue_fraction": (0.0, 1.0),
    "batch_size": (1, 65_536),
    "num_workers": (0, 64),
    "novelty_threshold": (0.0, 100.0),
}
#: Option names as the user types them.
OPTION_FLAGS = {"num_workers": "--workers"}
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _flag(name: str) -> str:
    return OPTION_FLAGS.get(name, "--" + name.replace("_", "-"))


def check_number(name: str, value: Any, *, integer: bool = False, flag: str | None = None) -> None:
    """Raise UsageError unless ``value`` is a finite number (an int when ``integer``) in OPTION_RANGES."""
    lo, hi = OPTION_RANGES[name]
    check_range(flag or _flag(name), value, lo, hi, integer=integer)


def validate_options(options: InferOptions, *, flags: dict[str, str] | None = None) -> None:
    """Every option checked (finite, in range, device present) before anything is opened or written.

    ``flags``: option names as the calling command spells them (``batch`` says --slide-workers)."""
    flags = flags or {}
    for name in ("mpp", "stride_um", "spot_um", "context_um", "min_tissue_fraction", "novelty_threshold"):
        value = getattr(options, name)
        if value is not None:
            check_number(name, value, flag=flags.get(name))
    for name in ("batch_size", "num_workers"):
        value = getattr(options, name)
        if value is not None:
            check_number(name, value, integer=True, flag=flags.get(name))
    if options.origin_um is not None:
        import math

        if len(options.origin_um) != 2 or not all(
            isinstance(v, (int, float)) and math.isfinite(v) for v in options.origin_um
        ):
            raise UsageError(f"origin_um must be two finite numbers (x, y) in µm, got {options.origin_um!r}")
    if options.on_bad_tile not in ("fail", "skip"):
        raise UsageError(f"--on-bad-tile must be fail or skip, got {options.on_bad_tile!r}")
    if options.precision not in (None, "auto", *PRECISIONS):
        raise UsageError(f"--precision must be one of auto, {', '.join(PRECISIONS)}; got {options.precision!r}")
    device = resolve_device(options.device)
    if device.type == "cpu" and options.precision in ("bf16", "fp16"):
        raise UsageError(f"--precision {options.precision} needs a CUDA device; on the CPU the run is fp32")


def auto_batch_size(encoder: Encoder, device: torch.device) -> int:
    """Patches per forward pass: fixed on CPU; on a GPU, from its free memory with a generous
    per-image budget (64x the fp32 input: ViT-L activations in bf16 need far less), as a power of two in
    [32, 1024]. `--batch-size` overrides it."""
    if device.type != "cuda":
        return config.CPU_BATCH
    free, _total = torch.cuda.mem_get_info(device)
    per_image = 3 * encoder.cfg.input_px**2 * 4 * 64
    n = max(32, min(1024, int(0.6 * free // per_image)))
    return 1 << (n.bit_length() - 1)


def resolve_precision(device: torch.device, precision: str | None) -> torch.dtype:
    if precision is None or precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if precision not in PRECISIONS:
        raise UsageError(f"--precision must be one of auto, {', '.join(PRECISIONS)}; got {precision!r}")
    return PRECISIONS[precision]


def check_lattice_size(slide: Slide, stride_um: float) -> None:
    """Refuse a lattice too large to hold (a tiny --stride-um on a big slide) before anything is allocated."""
    w_um = slide.dimensions[0] * slide.mpp.x
    h_um = slide.dimensions[1] * slide.mpp.y
    cells = (w_um / stride_um + 1) * (h_um / stride_um + 1)
    if cells > config.MAX_LATTICE_CELLS:
        raise UsageError(
            f"--stride-um {stride_um:g} gives {cells:.3g} lattice cells on {slide.path} "
            f"({w_um / 1000:.1f} x {h_um / 1000:.1f} mm); the limit is {config.MAX_LATTICE_CELLS:.0e}: "
            "use a larger stride"
        )


def neighbour_cells(model: Model, stride_um: float) -> np.ndarray:
    """The model's attention-group offsets as lattice cell offsets (dx, dy); (0, 0) first, unique."""
    cells: list[tuple[int, int]] = []
    for ox, oy in model.meta.neighbour_offsets_um:
        c = (round(ox / stride_um), round(oy / stride_um))
        if c not in cells:
            cells.append(c)
    if not cells or cells[0] != (0, 0):
        raise ModelError(f"{model.source}: neighbour offsets must start with [0, 0]")
    return np.asarray(cells, dtype=np.int64)


def predict_block(
    model: Model,
    grid: Grid,
    feats: torch.Tensor,
    iy: np.ndarray,
    ix: np.ndarray,
    block: Block,
    offsets: np.ndarray,
    device: torch.device,
    n_features: int | None = None,
) -> tuple[np.ndarray, np.ndarray, torch.Tensor, torch.Tensor]:
    """Head predictions for the block's core kept cells, using neighbours from the halo'd range, and the
    columns of ``feats`` after the first ``n_features`` (per-cell values carried with the features) of those
    cells."""
    hh, hw = block.hy1 - block.hy0, block.hx1 - block.hx0
    dim = feats.shape[1]
    dense = torch.zeros(hh * hw + 1, dim, device=device)  # last row: padding for absent neighbours
    lin = (iy - block.hy0) * hw + (ix - block.hx0)
    dense[torch.as_tensor(lin, device=device)] = feats
    present = np.zeros(hh * hw + 1, dtype=bool)
    present[lin] = True
    core = (iy >= block.y0) & (iy < block.y1) & (ix >= block.x0) & (ix < block.x1)
    cy, cx = iy[core], ix[core]
    ny_ = cy[:, None] + offsets[None, :, 1]
    nx_ = cx[:, None] + offsets[None, :, 0]
    inside = (ny_ >= block.hy0) & (ny_ < block.hy1) & (nx_ >= block.hx0) & (nx_ < block.hx1)
    nlin = np.where(inside, (ny_ - block.hy0) * hw + (nx_ - block.hx0), hh * hw)
    valid = present[nlin] & inside
    if model.head.cfg.position_mode == "absolute":
        pos = np.stack([nx_, ny_], axis=-1).astype(np.float32)
    else:
        pos = (offsets[None, :, :] * grid.stride_um).astype(np.float32).repeat(len(cy), axis=0)
    d = dim if n_features is None else n_features
    with torch.inference_mode():
        gathered = dense[torch.as_tensor(nlin, device=device)]
        preds = model.head(
            gathered[..., :d],
            torch.as_tensor(pos, device=device),
            torch.as_tensor(valid, device=device),
        )
    return cy, cx, preds, gathered[:, 0, d:]


#: What the writer gets per block: chunk keys, core cells (y, x), predictions (n, genes), per-cell values
#: (n, len(cell_arrays)) in the order of the cube's cell arrays.
_BlockOut = tuple[list[tuple[int, int]], np.ndarray, np.ndarray, np.ndarray, np.ndarray]


class _ChunkWriter(threading.Thread):
    """Collects block predictions into whole chunks and writes each once complete."""

    def __init__(
        self,
        store: CubeStore,
        n_genes: int,
        shape: tuple[int, int],
        blocks_per_chunk: dict[tuple[int, int], int],
        cell_arrays: tuple[tuple[str, str], ...] = (),
    ):
        super().__init__(daemon=True, name="wsi-histosge-writer")
        self.store = store
        self.n_genes = n_genes
        self.shape = shape
        self.pending = dict(blocks_per_chunk)
        self.cell_arrays = cell_arrays
        self.buffers: dict[tuple[int, int], np.ndarray] = {}
        self.cell_buffers: dict[tuple[int, int], dict[str, np.ndarray]] = {}
        self.q: queue.Queue[_BlockOut | None] = queue.Queue(maxsize=8)
        self.error: BaseException | None = None
        self.chunks_written = 0
        self.write_s = 0.0

    def run(self) -> None:
        c = config.CHUNK_CELLS
        try:
            while True:
                item = self.q.get()
                if item is None:
                    return
                keys, cy, cx, preds, cells = item
                for key in keys:
                    if key not in self.pending:  # written by an earlier run: keep it as it is
                        continue
                    buf = self.buffers.get(key)
                    if buf is None:
                        h = min(c, self.shape[0] - key[0] * c)
                        w = min(c, self.shape[1] - key[1] * c)
                        buf = np.full((self.n_genes, h, w), np.nan, dtype=config.EXPRESSION_DTYPE)
                        self.buffers[key] = buf
                        self.cell_buffers[key] = {
                            name: np.full((h, w), np.nan if np.dtype(dt).kind == "f" else 0, dtype=dt)
                            for name, dt in self.cell_arrays
                        }
                    inside = (cy // c == key[0]) & (cx // c == key[1])
                    ry, rx = cy[inside] - key[0] * c, cx[inside] - key[1] * c
                    buf[:, ry, rx] = preds[inside].T
                    for j, (name, _dt) in enumerate(self.cell_arrays):
                        self.cell_buffers[key][name][ry, rx] = cells[inside, j]
                    self.pending[key] -= 1
                    if self.pending[key] == 0:
                        t0 = time.perf_counter()
                        self.store.write_chunk(key[0], key[1], self.buffers.pop(key), self.cell_buffers.pop(key))
                        self.write_s += time.perf_counter() - t0
                        self.chunks_written += 1
        except BaseException as exc:
            self.error = exc
            while True:  # drain so the producer never blocks forever
                try:
                    if self.q.get_nowait() is None:
                        return
                except queue.Empty:
                    time.sleep(0.01)

    def put(self, item: _BlockOut) -> None:
        if self.error is not None:
            raise self.error
        self.q.put(item)

    def finish(self) -> None:
        self.q.put(None)
        self.join()
        if self.error is not None:
            raise self.error


def _tissue(slide: Slide, options: InferOptions) -> TissueMask:
    mask = load_tissue_mask(options.tissue_mask, slide) if options.tissue_mask is not None else detect_tissue(slide)
    require_tissue(mask, slide)
    return mask


_WRITE_ERRNOS = {28, 122, 27, 13, 30}  # ENOSPC, EDQUOT, EFBIG, EACCES, EROFS


def infer_slide(
    slide_path: str | Path | SlideURL,
    out: str | Path,
    options: InferOptions | None = None,
    *,
    progress: ProgressFn | None = None,
    log: Callable[[str], None] | None = None,
) -> InferResult:
    """Predict the expression cube of one slide (a local path, or the s3:// / gs:// URL of a TIFF-based slide,
    read in place) into ``out`` (a Zarr v3 group); resumable.

    Write failures (disk full, quota, read-only) become :class:`OutputWriteError`: the chunks written so
    far keep their done marks, no completion marker is written, and a rerun resumes."""
    try:
        return _infer_slide(slide_path, out, options, progress=progress, log=log)
    except OSError as exc:
        if isinstance(exc, HistoSGEError) or exc.errno not in _WRITE_ERRNOS:
            raise
        raise OutputWriteError(
            f"{out}: writing failed ({exc.strerror or exc}); free space or fix permissions, then rerun the same "
            "command to resume"
        ) from exc


def _infer_slide(
    slide_path: str | Path | SlideURL,
    out: str | Path,
    options: InferOptions | None = None,
    *,
    progress: ProgressFn | None = None,
    log: Callable[[str], None] | None = None,
) -> InferResult:
    """Predict the expression cube of one slide into ``out`` (a Zarr v3 group); resumable."""
    options = options or InferOptions()
    say = log or (lambda _msg: None)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}

    validate_options(options)
    if not is_url(out):  # files beside the cube: a user's file of the same name is never replaced
        require_replaceable([report_path(out)], "the run report")
        if options.write_geojson:
            require_replaceable([sidecar(out, ".tissue.geojson")], "the run's tissue outline")
    location = slide_location(slide_path)  # a URL is checked here (credentials, protocol) before any request
    bytes_before = read_stats(location).bytes if isinstance(location, SlideURL) else 0
    slide = open_slide(location, mpp=options.mpp, skip_bad_tiles=options.on_bad_tile == "skip")
    model_path = Path(options.model) if options.model is not None else default_model_path()
    model = load_model(model_path)
    if options.model is None:
        say(f"using the built-in model {model.meta.name} ({model.n_genes} genes, encoder {model.meta.encoder})")
    encoder = create_encoder(model.meta.encoder, weights=options.encoder_weights, allow_download=options.allow_download)
    _check_fit(model, encoder)

    t0 = time.perf_counter()
    tissue = _tissue(slide, options)
    timings["tissue"] = time.perf_counter() - t0
    stride = options.stride_um if options.stride_um is not None else model.meta.spot_um / 2.0
    spot = options.spot_um if options.spot_um is not None else model.meta.spot_um
    context = options.context_um if options.context_um is not None else model.meta.context_um
    check_lattice_size(slide, stride)
    offsets = neighbour_cells(model, stride)
    grid = make_grid(
        slide,
        tissue,
        stride_um=stride,
        spot_um=spot,
        context_um=context,
        origin_um=options.origin_um,
        min_tissue_fraction=options.min_tissue_fraction,
        block_cells=block_cells_for(
            stride,
            slide.level_mpp(slide.best_level_for_mpp(encoder.cfg.mpp)),
            margin_um=int(np.abs(offsets).max()) * stride + context / 2,
        ),
    )
    if grid.n_spots == 0:
        raise NoTissueError(
            f"{slide.path}: tissue was found but no spot passes the tissue-fraction threshold; "
            "lower --min-tissue-fraction or check --tissue-mask"
        )
    grid = grid.with_halo(int(np.abs(offsets).max()))

    device = resolve_device(options.device)
    dtype = resolve_precision(device, options.precision)
    precision = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    parts = _fingerprint_parts(slide, model, encoder, grid, tissue, options, precision)
    fingerprint = run_fingerprint(parts)
    attrs = _cube_attributes(slide, model, encoder, grid, tissue, fingerprint, precision)
    attrs[ATTR_KEY]["run_parameters"] = json.loads(json.dumps(parts, default=str))  # named when a rerun differs
    threshold = None
    if model.trust is not None:
        threshold = model.trust.threshold(_novelty_percentile(options))
    elif options.novelty_threshold is not None:
        say(
            f"warning: --novelty-threshold {options.novelty_threshold:g} has no effect: the model {model.meta.name} "
            "has no trust part (trained on one section), so no cell is scored or flagged as unlike training"
        )
    read_mpp = max(slide.mpp.x, slide.mpp.y) * slide.level_downsamples[slide.best_level_for_mpp(encoder.cfg.mpp)]
    attrs["trust"] = trust_attributes(model, _novelty_percentile(options), threshold, read_mpp=read_mpp)
    lock = None if is_url(out) else OutputLock(sidecar(out, ".lock"))
    if lock is not None:
        lock.acquire_or_raise(str(out))
    try:
        plan = _Plan(
            slide,
            model,
            encoder,
            grid,
            tissue,
            offsets,
            fingerprint,
            attrs,
            device,
            dtype,
            precision,
            threshold,
            bytes_before=bytes_before,
        )
        return _run(plan, out, options, progress=progress, say=say, timings=timings, t_start=t_start)
    finally:
        if lock is not None:
            lock.release()


#: Changes when the quality flags' rules change (a cube resumes only under the same rules).
QC_VERSION = "qc/1"


def trust_summary(group: Any) -> dict[str, Any]:
    """Cells predicted, how many carry each quality flag, and (trust models) the novelty threshold and the
    median uncertainty, from a cube's per-cell arrays (whole cube: right after a resume too)."""
    if "qc" not in group:
        return {}
    tissue = np.asarray(group["tissue"][:], dtype=bool)
    flags = np.asarray(group["qc"][:])[tissue]
    out: dict[str, Any] = {
        "cells": int(tissue.sum()),
        "pen_ink": int(((flags & QC_PEN) > 0).sum()),
        "out_of_focus": int(((flags & QC_BLUR) > 0).sum()),
    }
    qc_attrs = group.attrs.get("trust", {}).get("qc", {})
    if isinstance(qc_attrs, dict) and qc_attrs.get("focus_judged") is False:
        out["out_of_focus"] = None  # not checked: never "0 out of focus"
        out["out_of_focus_note"] = str(qc_attrs.get("focus_note", "focus not judged"))
    if "novelty" in group:
        unc = np.asarray(group["uncertainty"][:])[tissue]
        novelty = declared_trust(group.attrs).get("novelty", {})
        out["unlike_training"] = int(((flags & QC_NOVEL) > 0).sum())
        out["unlike_training_share"] = out["unlike_training"] / max(out["cells"], 1)
        out["novelty_threshold_percentile"] = novelty.get("threshold_percentile")
        finite = unc[np.isfinite(unc)]
        out["uncertainty_median"] = float(np.median(finite)) if finite.size else None
    return out


def _novelty_percentile(options: InferOptions) -> float:
    p = options.novelty_threshold
    return DEFAULT_NOVELTY_PERCENTILE if p is None else float(p)


def trust_attributes(
    model: Model, percentile: float, threshold: float | None, *, read_mpp: float | None = None
) -> dict[str, Any]:
    """What the cube's per-cell arrays mean, stored with it (``read_mpp``: µm/px of the level the encoder
    reads; focus is judged only at 1 µm/px or finer)."""
    attrs: dict[str, Any] = {
        "qc": {
            "bits": {str(QC_PEN): "pen ink", str(QC_BLUR): "out of focus", str(QC_NOVEL): "unlike the training tissue"},
            "version": QC_VERSION,
            "note": "flagged cells are predicted and kept; a cell's flags are the sum of its bits",
        }
    }
    if read_mpp is not None and read_mpp > BLUR_MAX_TILE_MPP * 1.01:
        attrs["qc"]["focus_judged"] = False
        attrs["qc"]["focus_note"] = (
            f"focus not judged: the slide is read at {read_mpp:.2f} µm/px, coarser than the "
            f"{BLUR_MAX_TILE_MPP:g} µm/px the out-of-focus check needs"
        )
    if model.trust is not None:
        attrs["novelty"] = {
            "meaning": model.trust.meta()["novelty"]["score"],
            "threshold_percentile": percentile,
            "threshold": threshold,
            "calibration": model.trust.meta()["novelty"]["calibration"],
            "calibration_percentiles": "0 to 100 in steps of 0.5 of held-out training sections' scores",
        }
        attrs["uncertainty"] = {"meaning": model.trust.meta()["uncertainty"]["score"], "units": model.meta.units}
    return attrs


def _fingerprint_parts(
    slide: Slide,
    model: Model,
    encoder: Encoder,
    grid: Grid,
    tissue: TissueMask,
    options: InferOptions,
    precision: str,
) -> dict[str, Any]:
    """What decides the cube's values: a run resumes a cube only when all of these are the same."""
    return {
        "slide": slide.fingerprint,
        "model": model.sha256,
        "encoder": encoder.weights_hash,
        "mpp": [slide.mpp.x, slide.mpp.y],
        "stride_um": grid.stride_um,
        "spot_um": grid.spot_um,
        "context_um": grid.context_um,
        "origin_um": list(grid.origin_um),
        "min_tissue_fraction": options.min_tissue_fraction,
        "tissue_mask": hashlib.sha256(np.packbits(tissue.mask).tobytes()).hexdigest()[:16],
        "precision": precision,
        "genes": len(model.meta.genes),
        "on_bad_tile": options.on_bad_tile,
        "novelty_threshold": _novelty_percentile(options) if model.trust is not None else None,
        "qc": QC_VERSION,
    }


@dataclass
class _Plan:
    """Everything decided before the output is touched."""

    slide: Slide
    model: Model
    encoder: Encoder
    grid: Grid
    tissue: TissueMask
    offsets: np.ndarray
    fingerprint: str
    attrs: dict[str, Any]
    device: torch.device
    dtype: torch.dtype
    precision: str
    novelty_threshold: float | None = None  # the novelty score above which a cell is flagged (QC_NOVEL)
    bytes_before: int = 0  # what this process had read of the slide's object before this run opened it

    @property
    def cell_arrays(self) -> tuple[tuple[str, str], ...]:
        return cell_arrays_of(self.model)


def cell_arrays_of(model: Model) -> tuple[tuple[str, str], ...]:
    """The per-cell arrays a cube of ``model`` holds besides the expression: novelty and uncertainty when the
    model has a trust part, and the quality flags."""
    trust = (("novelty", "float32"), ("uncertainty", "float32")) if model.trust is not None else ()
    return (*trust, ("qc", "uint8"))


def _cell_values(plan: _Plan, feats: torch.Tensor, tile: torch.Tensor, geom: Any, centres: np.ndarray) -> torch.Tensor:
    """(N, len(cell_arrays)) float32 on the features' device: each encoded cell's novelty and uncertainty
    (models with a trust part) and its quality flags (``qc``)."""
    cols = []
    flags = torch.as_tensor(
        cell_flags(tile, geom, centres, plan.grid.mpp, plan.grid.stride_um), device=feats.device
    ).to(torch.int32)
    trust = plan.model.trust
    if trust is not None:
        with torch.inference_mode():
            scores = trust.scores(feats, plan.model.head.standardise(feats.float()))
        cols += [scores[:, 0], scores[:, 1]]
        if plan.novelty_threshold is not None:
            flags = flags | (scores[:, 0] > plan.novelty_threshold).to(torch.int32) * QC_NOVEL
    cols.append(flags.float())
    return torch.stack(cols, 1).float()


@dataclass
class _Counts:
    """What the block loop did, for the report and the completion marker."""

    spots_done: int = 0
    patches: int = 0
    bad_tiles: int = 0
    skipped_spots: int = 0
    t_wait: float = 0.0
    t_enc: float = 0.0
    t_head: float = 0.0
    worker_bytes: int = 0  # bytes DataLoader worker processes fetched from the slide's object


def _run(
    plan: _Plan,
    out: str | Path,
    options: InferOptions,
    *,
    progress: ProgressFn | None,
    say: Callable[[str], None],
    timings: dict[str, float],
    t_start: float,
) -> InferResult:
    """Open (or resume) the cube under the output lock, run every block not done yet, finish."""
    slide, grid = plan.slide, plan.grid
    store, state = CubeStore.open_for_run(
        out,
        fingerprint=plan.fingerprint,
        shape=(plan.model.n_genes, *grid.shape),
        attrs=plan.attrs,
        tissue=grid.keep,
        tissue_fraction=grid.tissue_fraction,
        overwrite=options.overwrite,
        cell_arrays=plan.cell_arrays,
    )
    base = _report_base(plan, out)
    for level, why in base["skipped_levels"].items():
        say(f"{slide.path}: pyramid level {level} not used ({why}); finer levels are read instead")
    if state.status == "complete":
        say(f"{out}: already complete for this slide, model and parameters; nothing to do")
        return InferResult(
            status="already-complete",
            tiles=0,
            chunks_written=0,
            trust=trust_summary(store.group),
            **base,
            **_slide_io(plan, 0),
        )
    if state.status == "resume":
        say(f"{out}: resuming ({state.chunks_done} chunks already written)")
    if options.write_geojson:
        write_text_atomic(sidecar(out, ".tissue.geojson"), json.dumps(mask_to_geojson(plan.tissue)))

    done = store.done_marks()
    all_blocks = list(grid.blocks())
    blocks_per_chunk: dict[tuple[int, int], int] = {}
    for b in all_blocks:
        for key in b.chunk_keys:
            blocks_per_chunk[key] = blocks_per_chunk.get(key, 0) + 1
    todo = [b for b in all_blocks if not all(done[key] for key in b.chunk_keys)]
    for cy, cx in zip(*np.nonzero(~done), strict=True):  # chunks without tissue: nothing to compute, mark them
        if (int(cy), int(cx)) not in blocks_per_chunk:
            store.write_chunk(int(cy), int(cx), None)
    writer = _ChunkWriter(
        store,
        plan.model.n_genes,
        grid.shape,
        {k: v for k, v in blocks_per_chunk.items() if not done[k]},
        plan.cell_arrays,
    )
    counts = _run_blocks(plan, todo, writer, options, progress)
    timings.update(
        {"loader_wait": counts.t_wait, "encoder": counts.t_enc, "head": counts.t_head, "write": writer.write_s}
    )
    elapsed = time.perf_counter() - t_start
    timings["total"] = elapsed
    result = InferResult(
        status="resumed" if state.status == "resume" else "complete",
        tiles=len(todo),
        chunks_written=writer.chunks_written,
        timings_s=timings,
        spots_per_s=counts.spots_done / max(elapsed, 1e-9),
        bad_tiles=counts.bad_tiles,
        spots_skipped_bad_tiles=counts.skipped_spots,
        patches_encoded=counts.patches,
        encoder_passes=counts.patches * encoder_passes(plan.model.meta.tta, plan.encoder.cfg.views),
        trust=trust_summary(store.group),
        **base,
        **_slide_io(plan, counts.worker_bytes),
    )
    store.mark_complete(
        plan.fingerprint,
        {
            "spots": grid.n_spots - counts.skipped_spots,
            "tiles": len(all_blocks),
            "bad_tiles": counts.bad_tiles,
            "spots_skipped_bad_tiles": counts.skipped_spots,
        },
    )
    write_report(result, out)
    return result


def _report_base(plan: _Plan, out: str | Path) -> dict[str, Any]:
    """The run report's fields known before any block runs."""
    mpp, grid = plan.slide.mpp, plan.grid
    return dict(
        out=str(out),
        slide=str(plan.slide.path),
        spots=grid.n_spots,
        grid_shape=grid.shape,
        stride_um=grid.stride_um,
        tissue_area_mm2=plan.tissue.area_um2 / 1e6,
        ink_excluded_mm2=plan.tissue.ink_excluded_um2 / 1e6,
        mpp=mpp.mean,
        mpp_source=mpp.source,
        model=plan.model.meta.name,
        encoder=plan.model.meta.encoder,
        tta=plan.model.meta.tta,
        device=str(plan.device),
        precision=plan.precision,
        skipped_levels=dict(plan.slide.skipped_levels),
    )


def _slide_io(plan: _Plan, worker_bytes: int) -> dict[str, Any]:
    """``bytes_read`` and ``file_size`` of a slide read from an object store: what this process fetched since
    the run opened the slide plus what the DataLoader workers fetched; both None for a local slide."""
    if not isinstance(plan.slide.path, SlideURL):
        return {"bytes_read": None, "file_size": None}
    return {"bytes_read": plan.slide.bytes_read - plan.bytes_before + worker_bytes, "file_size": plan.slide.file_size}


def _run_blocks(
    plan: _Plan, todo: list[Block], writer: _ChunkWriter, options: InferOptions, progress: ProgressFn | None
) -> _Counts:
    """Encode every block's super-tile, run the head, hand the predictions to the writer thread."""
    slide, model, grid, device = plan.slide, plan.model, plan.grid, plan.device
    todo_spots = sum(int(grid.keep[b.y0 : b.y1, b.x0 : b.x1].sum()) for b in todo)
    if progress:
        progress("start", 0, todo_spots)
    level = slide.best_level_for_mpp(plan.encoder.cfg.mpp)
    encoder = plan.encoder.to(device)
    model.head.to(device)
    if model.trust is not None:
        model.trust.to(device)
    enc_module: Any = torch.compile(encoder) if options.compile else encoder
    batch = options.batch_size if options.batch_size is not None else auto_batch_size(encoder, device)
    dataset = BlockDataset(
        slide, grid, todo, level, skip_bad_tiles=options.on_bad_tile == "skip", reuse=options.reuse_features
    )
    ring = FeatureRing()
    counts = _Counts()
    writer.start()
    try:
        t_last = time.perf_counter()
        for item in block_loader(dataset, num_workers=options.num_workers, pin_memory=device.type == "cuda"):
            counts.t_wait += time.perf_counter() - t_last
            if item.pid != os.getpid():  # read in a worker process: this process's count does not hold it
                counts.worker_bytes += item.bytes_read
            block = todo[item.index]
            iy, ix, centres = item.iy, item.ix, item.centres_level0
            last_use = item.last_use if item.last_use is not None else np.full(len(iy), item.index)
            if item.bad:
                clear = cells_clear_of(item, centres, grid.mpp, grid.context_um)
                counts.bad_tiles += len(item.bad)
                iy, ix, centres, last_use = iy[clear], ix[clear], centres[clear], last_use[clear]
            counts.patches += len(centres)
            t1 = time.perf_counter()
            tile = item.tile.to(device, non_blocking=True)  # once: the encoder and the quality flags read it there
            feats = encode_tile(
                enc_module,
                tile,
                item.geom,
                centres,
                grid.mpp,
                grid.context_um,
                batch=batch,
                device=device,
                dtype=plan.dtype,
                tta=model.meta.tta,
            )
            if device.type == "cuda":
                torch.cuda.synchronize()
            t2 = time.perf_counter()
            if plan.cell_arrays:  # per-cell values travel with the features (the ring reuses both)
                feats = torch.cat([feats.float(), _cell_values(plan, feats, tile, item.geom, centres)], 1)
            ry, rx, rfeats = ring.gather(block)
            ring.advance(item.index, iy, ix, last_use, feats)
            if rfeats is not None:
                iy, ix, feats = np.concatenate([iy, ry]), np.concatenate([ix, rx]), torch.cat([feats, rfeats])
            core_y, core_x, preds, cells = predict_block(
                model, grid, feats, iy, ix, block, plan.offsets, device, n_features=plan.encoder.cfg.embed_dim
            )
            counts.skipped_spots += int(grid.keep[block.y0 : block.y1, block.x0 : block.x1].sum()) - len(core_y)
            preds_np = preds.float().cpu().numpy()
            counts.t_enc += t2 - t1
            counts.t_head += time.perf_counter() - t2
            writer.put((block.chunk_keys, core_y, core_x, preds_np, cells.float().cpu().numpy()))
            counts.spots_done += len(core_y)
            if progress:
                progress("advance", len(core_y), todo_spots)
            t_last = time.perf_counter()
        writer.finish()
    except BaseException:
        writer.q.put(None)
        raise
    return counts


def report_path(out: str | Path) -> str:
    return sidecar(out, ".report.json")


def write_report(result: InferResult, out: str | Path) -> str:
    """The run report next to the cube (atomic)."""
    path = report_path(out)
    write_text_atomic(path, json.dumps({"generator": GENERATOR, **result.to_dict()}, indent=1))
    return path


def _check_fit(model: Model, encoder: Encoder) -> None:
    if encoder.cfg.embed_dim != model.head.cfg.in_dim:
        raise ModelError(
            f"{model.source}: the model expects {model.head.cfg.in_dim}-d features but encoder "
            f"{encoder.cfg.name!r} gives {encoder.cfg.embed_dim}-d; use the encoder the model was trained with "
            f"({model.meta.encoder})"
        )
    if model.meta.encoder_weights_sha256 and encoder.weights_hash != model.meta.encoder_weights_sha256:
        raise ModelError(
            f"{model.source}: trained on encoder weights {model.meta.encoder_weights_sha256[:12]}… but the loaded "
            f"weights hash to {encoder.weights_hash[:12]}…; pass the same --encoder-weights as in training"
        )


def _cube_attributes(
    slide: Slide, model: Model, encoder: Encoder, grid: Grid, tissue: TissueMask, fingerprint: str, precision: str
) -> dict[str, Any]:
    ox, oy = grid.origin_um
    s = grid.stride_um
    return {
        ATTR_KEY: {
            "software": "wsi-histosge",
            "version": __version__,
            "slide": {
                "path": str(slide.path.resolve()),
                "fingerprint": slide.fingerprint,
                "dimensions": list(slide.dimensions),
                "backend": slide.backend.name,
                "vendor": slide.vendor,
                "skipped_levels": {str(k): v for k, v in slide.skipped_levels.items()},
            },
            "mpp": {"x": slide.mpp.x, "y": slide.mpp.y, "source": slide.mpp.source},
            "model": {
                "name": model.meta.name,
                "source": model.source,
                "sha256": model.sha256,
                "training": model.meta.training.get("summary", ""),
            },
            "encoder": {
                "name": encoder.cfg.name,
                "weights_sha256": encoder.weights_hash,
                "input_px": encoder.cfg.input_px,
                "mpp": encoder.cfg.mpp,
                "tta": model.meta.tta,
                "passes_per_patch": encoder_passes(model.meta.tta, encoder.cfg.views),
            },
            "tissue": {"source": tissue.source, "area_mm2": tissue.area_um2 / 1e6},
            "precision": precision,
        },
        "genes": list(model.meta.genes),
        "units": model.meta.units,
        "stride_um": s,
        "spot_um": grid.spot_um,
        "context_um": grid.context_um,
        "origin_um": [ox, oy],
        "affine_level0": grid.affine_level0(),
        "min_tissue_fraction": float(grid.keep.any() and grid.tissue_fraction[grid.keep].min()),
        "ome": {
            "version": "0.5",
            "multiscales": [
                {
                    "name": slide.path.stem,
                    "axes": [
                        # named as the array's dimension_names: OME-NGFF 0.5 requires that they match
                        {"name": "gene", "type": "channel"},
                        {"name": "y", "type": "space", "unit": "micrometer"},
                        {"name": "x", "type": "space", "unit": "micrometer"},
                    ],
                    "datasets": [
                        {
                            "path": "expression",
                            "coordinateTransformations": [
                                {"type": "scale", "scale": [1.0, s, s]},
                                {"type": "translation", "translation": [0.0, oy, ox]},
                            ],
                        }
                    ],
                }
            ],
        },
    }
