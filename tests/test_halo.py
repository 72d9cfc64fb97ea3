"""Every cell encoded once: the block plan, the feature ring, and a whole run against encoding every halo."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from wsi_histosge.grid import Grid
from wsi_histosge.halo import EncodePlan, FeatureRing
from wsi_histosge.infer import InferOptions, infer_slide
from wsi_histosge.store import open_cube


def _grid(keep: np.ndarray, block: int, halo: int) -> Grid:
    return Grid(
        stride_um=50.0,
        spot_um=100.0,
        context_um=112.0,
        origin_um=(25.0, 25.0),
        mpp=(0.5, 0.5),
        shape=keep.shape,
        tissue_fraction=keep.astype(np.float32),
        keep=keep,
        block_cells=block,
        halo_cells=halo,
    )


@pytest.mark.parametrize(("block", "halo"), [(8, 2), (8, 4), (8, 9), (16, 1)])
def test_each_cell_is_encoded_once_and_kept_until_its_last_block(block: int, halo: int) -> None:
    rng = np.random.default_rng(block * 10 + halo)
    keep = rng.random((70, 90)) < 0.6
    keep[30:40] = False  # a gap: some blocks are missing, so neighbours are not all present
    grid = _grid(keep, block, halo)
    blocks = list(grid.blocks())
    plan = EncodePlan(grid, blocks)
    owner = np.full(keep.shape, -1)
    for i in range(len(blocks)):
        cells = plan.cells(i)
        assert (owner[cells.iy, cells.ix] == -1).all(), "a cell encoded twice"
        owner[cells.iy, cells.ix] = i
        # the true last user: the last block whose halo'd range holds the cell
        for y, x, last in zip(cells.iy, cells.ix, cells.last_use, strict=True):
            users = [j for j, b in enumerate(blocks) if b.hy0 <= y < b.hy1 and b.hx0 <= x < b.hx1]
            assert users[0] == i and last == users[-1]
    needed = np.zeros(keep.shape, dtype=bool)
    for b in blocks:
        needed[b.hy0 : b.hy1, b.hx0 : b.hx1] = True
    assert ((owner >= 0) == (keep & needed)).all()
    # without reuse every block encodes its whole halo'd range: more patches than cells
    again = EncodePlan(grid, blocks, reuse=False)
    assert sum(len(again.cells(i).iy) for i in range(len(blocks))) > int((owner >= 0).sum())


def test_the_ring_hands_each_block_its_halo_and_then_empties() -> None:
    rng = np.random.default_rng(3)
    keep = rng.random((64, 64)) < 0.8
    grid = _grid(keep, 8, 3)
    blocks = list(grid.blocks())
    plan = EncodePlan(grid, blocks)
    ring = FeatureRing()
    code = torch.arange(keep.size, dtype=torch.float32).view(keep.shape)  # a cell's "feature": its index
    widest = 0
    for i, b in enumerate(blocks):
        cells = plan.cells(i)
        feats = code[cells.iy, cells.ix][:, None].clone()
        ry, rx, rfeats = ring.gather(b)
        ring.advance(i, cells.iy, cells.ix, cells.last_use, feats)
        widest = max(widest, len(ring))
        iy = np.concatenate([cells.iy, ry])
        ix = np.concatenate([cells.ix, rx])
        got = torch.cat([feats, rfeats]) if rfeats is not None else feats
        sub = keep[b.hy0 : b.hy1, b.hx0 : b.hx1]
        assert len(iy) == int(sub.sum())  # every kept cell of the range, once
        assert torch.equal(got[:, 0], code[iy, ix])  # and the features are that cell's own
    assert len(ring) == 0
    # bounded: the strips shared with later blocks, far below the whole lattice
    assert widest <= (2 * 3 + 8) * 64 + 2 * 3 * 8 * 2
    assert widest < keep.sum() / 2


def test_reused_features_give_the_cube_of_encoding_every_halo(
    pyramid_slide: Path, tiny_model: Path, tmp_path: Path
) -> None:
    """A multi-block run: each spot encoded once, and the cube equals the one where every block encodes its
    whole halo again (super-tiles start on the level's pixel grid, so a reused feature is the one the
    neighbouring block would have computed)."""
    runs = {}
    for reuse in (True, False):
        out = tmp_path / f"reuse-{reuse}.zarr"
        runs[reuse] = infer_slide(
            pyramid_slide, out, InferOptions(model=tiny_model, stride_um=10.0, reuse_features=reuse)
        )
    assert runs[True].tiles >= 2
    assert runs[True].patches_encoded == runs[True].spots
    assert runs[False].patches_encoded > runs[False].spots
    a = np.asarray(open_cube(tmp_path / "reuse-True.zarr")["expression"][:], dtype=np.float32)
    b = np.asarray(open_cube(tmp_path / "reuse-False.zarr")["expression"][:], dtype=np.float32)
    assert (np.isfinite(a) == np.isfinite(b)).all()
    np.testing.assert_allclose(a[np.isfinite(a)], b[np.isfinite(b)], rtol=0, atol=1e-5)
