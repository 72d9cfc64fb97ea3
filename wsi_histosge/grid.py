"""The spot lattice: physical geometry in µm, blocks of cells as units of work.

Cell (iy, ix) has its centre at ``origin_um + (ix, iy) * stride_um`` (µm from the slide's top-left
corner), i.e. level-0 px ``origin_level0 + (ix, iy) * stride_level0``. The lattice covers every
position inside the slide. Blocks are ``block_cells`` square; each block is read as one super-tile
that also holds a halo of neighbouring cells, so attention groups never end at a block edge.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from . import config
from .errors import UsageError
from .slide import Slide
from .tissue import TissueMask


@dataclass(frozen=True)
class Block:
    """Core cells [y0, y1) x [x0, x1) of the lattice and the halo'd range read with them."""

    index: int
    y0: int
    x0: int
    y1: int
    x1: int
    hy0: int
    hx0: int
    hy1: int
    hx1: int

    @property
    def chunk_keys(self) -> list[tuple[int, int]]:
        """The output chunks this block's core cells fall in (one, or several for blocks > a chunk)."""
        c = config.CHUNK_CELLS
        return [
            (cy, cx)
            for cy in range(self.y0 // c, (self.y1 - 1) // c + 1)
            for cx in range(self.x0 // c, (self.x1 - 1) // c + 1)
        ]


@dataclass(frozen=True)
class Grid:
    stride_um: float
    spot_um: float
    context_um: float
    origin_um: tuple[float, float]  # (x, y) of cell (0, 0) centre
    mpp: tuple[float, float]  # level-0 µm/px (x, y)
    shape: tuple[int, int]  # (ny, nx)
    tissue_fraction: np.ndarray  # (ny, nx) float32
    keep: np.ndarray  # (ny, nx) bool: spots predicted
    block_cells: int = config.BLOCK_CELLS
    halo_cells: int = 0

    # -- geometry -----------------------------------------------------------------------------
    @property
    def stride_level0(self) -> tuple[float, float]:
        return (self.stride_um / self.mpp[0], self.stride_um / self.mpp[1])

    @property
    def origin_level0(self) -> tuple[float, float]:
        return (self.origin_um[0] / self.mpp[0], self.origin_um[1] / self.mpp[1])

    def centres_level0(self, iy: np.ndarray, ix: np.ndarray) -> np.ndarray:
        """(N, 2) level-0 (x, y) px of the given cells."""
        ox, oy = self.origin_level0
        sx, sy = self.stride_level0
        return np.stack([ox + np.asarray(ix) * sx, oy + np.asarray(iy) * sy], axis=1)

    def affine_level0(self) -> list[list[float]]:
        """3x3 matrix mapping (ix, iy, 1) to level-0 (x, y, 1)."""
        ox, oy = self.origin_level0
        sx, sy = self.stride_level0
        return [[sx, 0.0, ox], [0.0, sy, oy], [0.0, 0.0, 1.0]]

    @property
    def n_spots(self) -> int:
        return int(self.keep.sum())

    # -- blocks -------------------------------------------------------------------------------
    def blocks(self) -> Iterator[Block]:
        """Blocks with at least one kept spot, region by region (a region is a chunk, or a block when
        blocks are bigger than chunks), so chunks complete one at a time."""
        ny, nx = self.shape
        b, h = self.block_cells, self.halo_cells
        c = max(b, config.CHUNK_CELLS)
        index = 0
        for cy in range(0, ny, c):
            for cx in range(0, nx, c):
                for y0 in range(cy, min(cy + c, ny), b):
                    for x0 in range(cx, min(cx + c, nx), b):
                        y1, x1 = min(y0 + b, ny, cy + c), min(x0 + b, nx, cx + c)
                        if not self.keep[y0:y1, x0:x1].any():
                            continue
                        yield Block(
                            index, y0, x0, y1, x1, max(0, y0 - h), max(0, x0 - h), min(ny, y1 + h), min(nx, x1 + h)
                        )
                        index += 1

    def with_halo(self, halo_cells: int) -> Grid:
        return Grid(
            self.stride_um,
            self.spot_um,
            self.context_um,
            self.origin_um,
            self.mpp,
            self.shape,
            self.tissue_fraction,
            self.keep,
            self.block_cells,
            halo_cells,
        )


def block_cells_for(stride_um: float, read_mpp: float, margin_um: float = 0.0) -> int:
    """The largest block (128, 64, ..., 8 cells) whose super-tile side (cells plus ``margin_um`` of halo and
    context on each side) fits config.MAX_SUPERTILE_PX at ``read_mpp``; bigger blocks re-encode fewer halo
    cells at their edges."""
    cells = config.BLOCK_CELLS
    while cells > 8 and (cells * stride_um + 2 * margin_um) / read_mpp > config.MAX_SUPERTILE_PX:
        cells //= 2
    return cells


def _block_cells(block_cells: int | None) -> int:
    """The block size (default config.BLOCK_CELLS); it must tile the output chunks, or be tiled by them."""
    block = block_cells or config.BLOCK_CELLS
    if config.CHUNK_CELLS % block and block % config.CHUNK_CELLS:
        raise UsageError(f"block size {block} must divide, or be a multiple of, the chunk size {config.CHUNK_CELLS}")
    return block


def _cells_inside(extent_um: float, origin_um: float, stride_um: float) -> int:
    """How many cells along one axis have their centre inside the slide."""
    if origin_um < extent_um:
        return max(0, int(np.floor((extent_um - origin_um) / stride_um - 1e-9)) + 1)
    return 0


def make_grid(
    slide: Slide,
    tissue: TissueMask,
    *,
    stride_um: float,
    spot_um: float,
    context_um: float,
    origin_um: tuple[float, float] | None = None,
    min_tissue_fraction: float | None = None,
    block_cells: int | None = None,
) -> Grid:
    """Lay the lattice over ``slide`` and keep the spots whose tissue fraction passes the threshold."""
    if stride_um <= 0 or spot_um <= 0 or context_um <= 0:
        raise UsageError(f"stride, spot and context must be positive µm (got {stride_um}, {spot_um}, {context_um})")
    threshold = config.MIN_TISSUE_FRACTION if min_tissue_fraction is None else min_tissue_fraction
    block = _block_cells(block_cells)
    mppx, mppy = slide.mpp.x, slide.mpp.y
    w_um, h_um = slide.dimensions[0] * mppx, slide.dimensions[1] * mppy
    ox, oy = origin_um if origin_um is not None else (stride_um / 2.0, stride_um / 2.0)
    nx, ny = _cells_inside(w_um, ox, stride_um), _cells_inside(h_um, oy, stride_um)
    if nx == 0 or ny == 0:
        raise UsageError(f"{slide.path}: the lattice (origin {ox, oy} µm, stride {stride_um} µm) misses the slide")
    iy, ix = np.mgrid[0:ny, 0:nx]
    grid = Grid(
        stride_um,
        spot_um,
        context_um,
        (ox, oy),
        (mppx, mppy),
        (ny, nx),
        np.zeros((ny, nx), np.float32),
        np.zeros((ny, nx), bool),
        block,
    )
    centres = grid.centres_level0(iy.ravel(), ix.ravel())
    frac = tissue.fraction_within(centres, (spot_um / 2.0) / mppx).reshape(ny, nx)
    keep = frac >= threshold if threshold > 0 else frac > 0  # 0 means 'any tissue', never 'everything'
    return Grid(stride_um, spot_um, context_um, (ox, oy), (mppx, mppy), (ny, nx), frac, keep, block)
