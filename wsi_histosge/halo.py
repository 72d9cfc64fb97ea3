"""Every cell encoded once: which block encodes each cell, and the ring of features later blocks reuse.

Blocks run in a fixed order, and a block's attention groups need its core cells plus a halo of
neighbouring cells around them. A kept cell is encoded by the first block (in that order) whose halo'd
range holds it; every later block whose range holds it takes its features from the :class:`FeatureRing`.
A cell leaves the ring after the last block whose range holds it, so the ring holds only the strips
shared by neighbouring blocks (about ``2 * halo`` rows of cells across the slide), never a whole block row.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .grid import Block, Grid


@dataclass(frozen=True)
class BlockCells:
    """The cells block ``index`` encodes itself, and the index of the last block that needs each one."""

    iy: np.ndarray
    ix: np.ndarray
    last_use: np.ndarray


class EncodePlan:
    """Which kept cells each block of ``blocks`` (in their processing order) encodes.

    Picklable and cheap to rebuild per block, so loader workers and the consumer agree without sharing
    state: each answer looks only at the few blocks whose halo'd ranges overlap the block's own."""

    def __init__(self, grid: Grid, blocks: list[Block], *, reuse: bool = True) -> None:
        self.grid = grid
        self.blocks = blocks
        self.reuse = reuse
        b = max(1, grid.block_cells)
        self._step = b
        self._reach = 1 + (2 * grid.halo_cells) // b
        self._at = {(blk.y0 // b, blk.x0 // b): i for i, blk in enumerate(blocks)}

    def _neighbours(self, i: int) -> list[int]:
        blk, b, r = self.blocks[i], self._step, self._reach
        py, px = blk.y0 // b, blk.x0 // b
        out = []
        for qy in range(py - r, py + r + 1):
            for qx in range(px - r, px + r + 1):
                j = self._at.get((qy, qx))
                if j is not None and j != i:
                    out.append(j)
        return out

    def cells(self, i: int) -> BlockCells:
        """Kept cells of block ``i``'s halo'd range that no earlier block encodes, with their last use."""
        blk = self.blocks[i]
        keep = self.grid.keep[blk.hy0 : blk.hy1, blk.hx0 : blk.hx1]
        if not self.reuse:
            iy, ix = np.nonzero(keep)
            return BlockCells(iy + blk.hy0, ix + blk.hx0, np.full(len(iy), i, dtype=np.int64))
        before = np.zeros(keep.shape, dtype=bool)
        last = np.full(keep.shape, i, dtype=np.int64)
        for j in self._neighbours(i):
            other = self.blocks[j]
            y0, y1 = max(blk.hy0, other.hy0), min(blk.hy1, other.hy1)
            x0, x1 = max(blk.hx0, other.hx0), min(blk.hx1, other.hx1)
            if y0 >= y1 or x0 >= x1:
                continue
            window = (slice(y0 - blk.hy0, y1 - blk.hy0), slice(x0 - blk.hx0, x1 - blk.hx0))
            if j < i:
                before[window] = True
            else:
                np.maximum(last[window], j, out=last[window])
        own = keep & ~before
        iy, ix = np.nonzero(own)
        return BlockCells(iy + blk.hy0, ix + blk.hx0, last[own])


class FeatureRing:
    """Features of cells encoded by earlier blocks that later blocks still need (see the module doc)."""

    def __init__(self) -> None:
        self._parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, torch.Tensor]] = []

    def __len__(self) -> int:
        return sum(len(p[0]) for p in self._parts)

    def gather(self, block: Block) -> tuple[np.ndarray, np.ndarray, torch.Tensor | None]:
        """(iy, ix, features) of the ring's cells inside the block's halo'd range."""
        ys, xs, fs = [], [], []
        for iy, ix, _last, feats in self._parts:
            inside = (iy >= block.hy0) & (iy < block.hy1) & (ix >= block.hx0) & (ix < block.hx1)
            if inside.any():
                ys.append(iy[inside])
                xs.append(ix[inside])
                fs.append(feats[torch.as_tensor(np.nonzero(inside)[0], device=feats.device)])
        if not ys:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), None
        return np.concatenate(ys), np.concatenate(xs), torch.cat(fs)

    def advance(self, done: int, iy: np.ndarray, ix: np.ndarray, last_use: np.ndarray, feats: torch.Tensor) -> None:
        """Block ``done`` has run: keep its new cells that a later block needs, drop cells no block needs."""
        parts = []
        for piy, pix, plast, pfeats in [*self._parts, (iy, ix, last_use, feats)]:
            alive = plast > done
            if alive.all():
                parts.append((piy, pix, plast, pfeats))
            elif alive.any():
                rows = torch.as_tensor(np.nonzero(alive)[0], device=pfeats.device)
                parts.append((piy[alive], pix[alive], plast[alive], pfeats[rows].clone()))
        self._parts = parts
