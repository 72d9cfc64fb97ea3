"""Streaming pixels to the encoder: one super-tile read per block, patches cut on the device.

``BlockDataset`` is picklable (it holds a :class:`Slide`, which reopens lazily in each worker) and
yields one uint8 super-tile per block: the region covering the block's cells and their halo plus half
the context on every side, read at the pyramid level just finer than the encoder's pixel size. The
consumer moves it to the device, cuts every spot's context patch with ``roi_align`` (crop + resize
in one op, bilinear with area sampling when shrinking), and normalises there. Each pixel is decoded
about once per block, whatever the ratio of context to stride.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .encoders import Encoder
from .errors import HistoSGEError
from .grid import Block, Grid
from .runtime import keep_freed_memory, release_free_memory
from .slide import Slide


@dataclass(frozen=True)
class TileGeometry:
    """Where a super-tile sits: level-0 top-left, level read, its downsample, size, and its top-left pixel
    on the level's own pixel grid (``level_xy``).

    Super-tiles start on the level's pixel grid (``level0_xy`` is ``ceil(level_xy * downsample)``, which
    readers floor back to ``level_xy``), and patch positions are taken relative to ``level_xy``: a cell's
    patch samples the same level pixels at the same positions whichever super-tile it is cut from."""

    level0_xy: tuple[int, int]
    level: int
    downsample: float
    size: tuple[int, int]  # (w, h) at `level`
    level_xy: tuple[int, int] = (0, 0)

    def to_tile_px(self, centres_level0: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(x, y) of level-0 points in this tile's pixels (float)."""
        ds = self.downsample
        return centres_level0[:, 0] / ds - self.level_xy[0], centres_level0[:, 1] / ds - self.level_xy[1]


def tile_for_points(slide: Slide, centres_level0: np.ndarray, context_um: float, level: int) -> TileGeometry:
    """The region at ``level`` that holds the context patch of every centre, snapped to the level's pixels."""
    ds = slide.level_downsamples[level]
    half_x = context_um / 2.0 / slide.mpp.x / ds
    half_y = context_um / 2.0 / slide.mpp.y / ds
    lx0 = int(np.floor(centres_level0[:, 0].min() / ds - half_x)) - 2
    ly0 = int(np.floor(centres_level0[:, 1].min() / ds - half_y)) - 2
    lx1 = int(np.ceil(centres_level0[:, 0].max() / ds + half_x)) + 2
    ly1 = int(np.ceil(centres_level0[:, 1].max() / ds + half_y)) + 2
    x0, y0 = int(np.ceil(lx0 * ds)), int(np.ceil(ly0 * ds))
    return TileGeometry((x0, y0), level, ds, (max(1, lx1 - lx0), max(1, ly1 - ly0)), (lx0, ly0))


def read_tile(slide: Slide, geom: TileGeometry, bad: list[tuple[int, int, int, int]] | None = None) -> np.ndarray:
    """The super-tile's pixels; where it leaves the slide, backends return white (glass).

    ``bad`` collects the rectangles (tile px) of corrupt tiles under the skip policy."""
    return slide.read_region(geom.level0_xy, geom.level, geom.size, bad)


def cut_patches(
    tile: torch.Tensor,
    geom: TileGeometry,
    centres_level0: np.ndarray,
    context_px_level0: tuple[float, float],
    out_px: int,
    encoder: Encoder,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Crop + resize + normalise every centre's patch from a (h, w, 3) uint8 tile on its device.

    Only the part of the tile these patches cover (plus 2 px for bilinear neighbours) is converted to
    float, so memory follows the sub-batch, not the super-tile; sample positions are unchanged."""
    from torchvision.ops import roi_align

    device = tile.device
    ds = geom.downsample
    cx, cy = geom.to_tile_px(centres_level0)
    hx = context_px_level0[0] / 2.0 / ds
    hy = context_px_level0[1] / 2.0 / ds
    h, w = tile.shape[0], tile.shape[1]
    x0 = max(0, int(np.floor((cx - hx).min())) - 2)
    y0 = max(0, int(np.floor((cy - hy).min())) - 2)
    x1 = min(w, int(np.ceil((cx + hx).max())) + 3)
    y1 = min(h, int(np.ceil((cy + hy).max())) + 3)
    crop = tile if (x0, y0, x1, y1) == (0, 0, w, h) else tile[y0:y1, x0:x1]
    img = crop.permute(2, 0, 1).unsqueeze(0).to(torch.float32).div_(255.0)
    cx, cy = cx - x0, cy - y0
    boxes = np.stack([np.zeros_like(cx), cx - hx, cy - hy, cx + hx, cy + hy], axis=1)
    rois = torch.as_tensor(boxes, dtype=torch.float32, device=device)
    patches = roi_align(img, rois, output_size=(out_px, out_px), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    return encoder.normalise(patches).to(dtype)


@dataclass
class TileItem:
    """One super-tile and the lattice cells whose patches it holds."""

    index: int
    tile: torch.Tensor  # (h, w, 3) uint8
    geom: TileGeometry
    iy: np.ndarray
    ix: np.ndarray
    centres_level0: np.ndarray  # (N, 2) of the cells, computed once in the worker
    bad: list[tuple[int, int, int, int]] = field(default_factory=list)  # corrupt-tile rects, tile px
    last_use: np.ndarray | None = None  # per cell: the last block that needs its features
    #: Bytes the process that made this item fetched from the slide's object for it (URLs; opening the
    #: slide in a new worker included), and that process: the consumer adds up what other processes read.
    bytes_read: int = 0
    pid: int = 0


class BlockDataset(Dataset[TileItem]):
    """One item per block: its super-tile (uint8 tensor) and the cells it encodes: the kept cells of its
    halo'd range that no earlier block encodes (``halo.EncodePlan``; all of them with ``reuse=False``).
    The super-tile covers only those cells' patches; a block with none reads nothing."""

    def __init__(
        self,
        slide: Slide,
        grid: Grid,
        blocks: list[Block],
        level: int,
        *,
        skip_bad_tiles: bool = False,
        reuse: bool = True,
    ) -> None:
        from .halo import EncodePlan

        self.slide = slide
        self.grid = grid
        self.blocks = blocks
        self.level = level
        self.skip_bad_tiles = skip_bad_tiles
        self.plan = EncodePlan(grid, blocks, reuse=reuse)

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> TileItem:
        before = self.slide.bytes_read
        item = self._item(i)
        item.bytes_read, item.pid = self.slide.bytes_read - before, os.getpid()
        return item

    def _item(self, i: int) -> TileItem:
        cells = self.plan.cells(i)
        centres = self.grid.centres_level0(cells.iy, cells.ix)
        if len(centres) == 0:
            geom = TileGeometry((0, 0), self.level, self.slide.level_downsamples[self.level], (0, 0))
            return TileItem(
                i, torch.zeros(0, 0, 3, dtype=torch.uint8), geom, cells.iy, cells.ix, centres, [], cells.last_use
            )
        geom = tile_for_points(self.slide, centres, self.grid.context_um, self.level)
        bad: list[tuple[int, int, int, int]] | None = [] if self.skip_bad_tiles else None
        tile = read_tile(self.slide, geom, bad)
        return TileItem(i, torch.from_numpy(tile), geom, cells.iy, cells.ix, centres, bad or [], cells.last_use)


def _collate_one(items: list[TileItem]) -> TileItem:
    return items[0]


def default_workers() -> int:
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(8, n - 1))


def can_start_processes() -> bool:
    """False inside a daemonic process (a dask worker, a multiprocessing pool worker), which may not
    have children: DataLoader worker processes would fail there with "daemonic processes are not allowed
    to have children"."""
    import multiprocessing

    return not multiprocessing.current_process().daemon


def block_loader(
    dataset: BlockDataset, *, num_workers: int | None = None, pin_memory: bool = False, prefetch: int = 2
) -> Iterator[TileItem]:
    """Iterate super-tiles in block order with background workers and prefetch.

    Worker processes where the process may have children; inside a daemonic process (dask workers)
    one reader thread instead, which keeps reads overlapped with encoding (decoding releases the GIL)."""
    workers = default_workers() if num_workers is None else num_workers
    if workers > 0 and not can_start_processes():
        yield from _threaded_loader(dataset, pin_memory=pin_memory, prefetch=max(1, prefetch * workers))
        return
    kwargs: dict[str, Any] = {}
    if workers > 0:
        kwargs = {"prefetch_factor": prefetch, "persistent_workers": False}
    loader = DataLoader(
        dataset,
        batch_size=1,
        shuffle=False,
        num_workers=workers,
        collate_fn=_collate_one,
        pin_memory=pin_memory,
        **kwargs,
    )  # type: ignore[arg-type]
    try:
        yield from loader
    except HistoSGEError as exc:
        trimmed = _one_line(exc)
        if trimmed is exc:
            raise
        raise trimmed from None


def _one_line(exc: HistoSGEError) -> HistoSGEError:
    """A worker's error as it was raised there: DataLoader re-raises it with the worker's traceback in the
    message ("Caught X in DataLoader worker process 0. Original Traceback ..."); our messages are one line
    (e.g. an object store that fails mid-run names the URL and the fix)."""
    text = str(exc)
    marker = f"{type(exc).__module__}.{type(exc).__qualname__}: "
    at = text.rfind(marker)
    if not text.startswith("Caught ") or at < 0:
        return exc
    return type(exc)(text[at + len(marker) :].strip())


def _threaded_loader(dataset: BlockDataset, *, pin_memory: bool, prefetch: int) -> Iterator[TileItem]:
    """Items in order from one background reader thread, at most ``prefetch`` ahead; a read error is
    raised in the consumer at the item where it happened."""
    import contextlib
    import queue
    import threading

    q: queue.Queue[tuple[TileItem | None, BaseException | None]] = queue.Queue(maxsize=prefetch)
    stop = threading.Event()

    def produce() -> None:
        try:
            for i in range(len(dataset)):
                if stop.is_set():
                    return
                item = dataset[i]
                if pin_memory:
                    item.tile = item.tile.pin_memory()
                q.put((item, None))
            q.put((None, None))
        except BaseException as exc:
            q.put((None, exc))

    thread = threading.Thread(target=produce, name="wsi-histosge-reader", daemon=True)
    thread.start()
    try:
        while True:
            item, error = q.get()
            if error is not None:
                raise error
            if item is None:
                return
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            with contextlib.suppress(queue.Empty):
                q.get(timeout=0.05)


@torch.inference_mode()
def encode_tile(
    encoder: Encoder,
    tile: torch.Tensor,
    geom: TileGeometry,
    centres_level0: np.ndarray,
    mpp: tuple[float, float],
    context_um: float,
    *,
    batch: int,
    device: torch.device,
    dtype: torch.dtype,
    tta: str = "none",
) -> torch.Tensor:
    """Features (N, D) of every centre's patch in a tile, in fixed sub-batches (deterministic), averaged over
    the test-time augmentation ``tta`` (``encoders.TTA_ROTATIONS``)."""
    if device.type == "cpu":
        keep_freed_memory()  # once per process: activation buffers reused, not re-mapped every batch
    tile = tile.to(device, non_blocking=True)
    ctx = (context_um / mpp[0], context_um / mpp[1])
    feats = []
    autocast = device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
    for start in range(0, len(centres_level0), batch):
        patches = cut_patches(
            tile,
            geom,
            centres_level0[start : start + batch],
            ctx,
            encoder.cfg.input_px,
            encoder,
            torch.float32 if autocast else dtype,
        )
        with torch.autocast(device.type, dtype=dtype, enabled=autocast):
            feats.append(encoder.embed(patches, tta))
    out = torch.cat(feats) if feats else torch.zeros(0, encoder.cfg.embed_dim, device=device)
    if device.type == "cpu":
        del tile, feats
        release_free_memory()  # the tile's buffers go back to the OS; the next tile may differ in size
    return out


def encode_points(
    slide: Slide,
    centres_level0: np.ndarray,
    encoder: Encoder,
    *,
    context_um: float,
    device: torch.device | None = None,
    batch: int = 64,
    tile_um: float = 2000.0,
    tta: str = "none",
) -> np.ndarray:
    """Features of arbitrary points (e.g. measured spots), read as super-tiles of about ``tile_um``, under the
    test-time augmentation ``tta``."""
    device = device or torch.device("cpu")
    level = slide.best_level_for_mpp(encoder.cfg.mpp)
    out = np.zeros((len(centres_level0), encoder.cfg.embed_dim), dtype=np.float32)
    cell = tile_um / slide.mpp.x
    keys = np.floor(centres_level0 / cell).astype(np.int64)
    order = np.lexsort((keys[:, 0], keys[:, 1]))
    groups: dict[tuple[int, int], list[int]] = {}
    for i in order:
        groups.setdefault((int(keys[i, 1]), int(keys[i, 0])), []).append(int(i))
    encoder = encoder.to(device)
    for idx in groups.values():
        pts = centres_level0[idx]
        geom = tile_for_points(slide, pts, context_um, level)
        tile = torch.from_numpy(read_tile(slide, geom))
        f = encode_tile(
            encoder,
            tile,
            geom,
            pts,
            (slide.mpp.x, slide.mpp.y),
            context_um,
            batch=batch,
            device=device,
            dtype=torch.float32,
            tta=tta,
        )
        out[idx] = f.cpu().numpy()
    return out


def cells_clear_of(
    item: TileItem, centres_level0: np.ndarray, mpp: tuple[float, float], context_um: float
) -> np.ndarray:
    """Which cells' context patches avoid every corrupt-tile rectangle of the item (bool per cell)."""
    ok = np.ones(len(centres_level0), dtype=bool)
    if not item.bad:
        return ok
    ds = item.geom.downsample
    cx, cy = item.geom.to_tile_px(centres_level0)
    hx = context_um / mpp[0] / 2 / ds
    hy = context_um / mpp[1] / 2 / ds
    for x0, y0, x1, y1 in item.bad:
        hit = (cx + hx > x0) & (cx - hx < x1) & (cy + hy > y0) & (cy - hy < y1)
        ok &= ~hit
    return ok
