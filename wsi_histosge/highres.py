"""High-resolution consistency: a section predicted by the whole-slide pipeline at several times the
assay's spot density, its sub-spots aggregated back into each measured spot (linear space) and compared
with the spot-level prediction and the measurement (``evaluate --highres``).

It sits above inference (it runs ``infer_slide``) and the training data layer; evaluation does not import it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .dataset import make_sets
from .encoders import create_encoder
from .infer import InferOptions, infer_slide
from .metrics import pearson_per_gene
from .model import Model
from .stdata import STSection
from .store import open_cube
from .train import measured_genes, predict_set


def highres_consistency(
    model: Model, section: STSection, workdir: Path, *, density: int = 4, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Predict the section at ``density`` x the spot density with the whole-slide pipeline, aggregate the
    sub-spots inside each measured spot (linear space), and correlate with the spot-level prediction."""
    stride = model.meta.spot_um / np.sqrt(density)
    cube = workdir / f"{section.name}-highres.zarr"
    infer_slide(
        section.image,
        cube,
        InferOptions(
            model=model.source,
            mpp=section.mpp,
            stride_um=stride,
            overwrite=True,
            write_geojson=False,
        ),
        log=log,
    )
    g = open_cube(cube)
    expr = np.asarray(g["expression"][:], dtype=np.float64)
    affine = np.asarray(g.attrs["affine_level0"])
    ny, nx = expr.shape[1:]
    iy, ix = np.mgrid[0:ny, 0:nx]
    centres = (affine @ np.stack([ix.ravel(), iy.ravel(), np.ones(ix.size)]))[:2].T
    radius_px = model.meta.spot_um / 2 / section.mpp
    lin = np.expm1(expr.reshape(expr.shape[0], -1))
    agg = np.full((len(section.centres_level0), expr.shape[0]), np.nan)
    for i, c in enumerate(section.centres_level0):
        inside = np.nonzero(((centres - c) ** 2).sum(1) <= radius_px**2)[0]
        vals = lin[:, inside]
        vals = vals[:, np.isfinite(vals).all(0)]
        if vals.shape[1]:
            agg[i] = np.log1p(vals.mean(1))
    genes = measured_genes([section], list(model.meta.genes), log=log)
    position = {g: i for i, g in enumerate(model.meta.genes)}
    cols = np.array([position[g] for g in genes], dtype=np.int64)
    agg = agg[:, cols]
    ok = np.isfinite(agg).all(1)
    enc = create_encoder(model.meta.encoder)
    spot = make_sets([section], genes, enc, log=log, tta=model.meta.tta)[0]
    spot_pred = predict_set(model.head, spot)[:, cols]
    r_vs_spot = pearson_per_gene(agg[ok], spot_pred[ok])
    r_vs_measured_agg = pearson_per_gene(agg[ok], spot.targets[ok])
    r_vs_measured_spot = pearson_per_gene(spot_pred[ok], spot.targets[ok])
    return {
        "section": section.name,
        "genes_compared": len(genes),
        "density": density,
        "stride_um": float(stride),
        "spots_compared": int(ok.sum()),
        "mean_r_aggregated_vs_spot_prediction": float(np.nanmean(r_vs_spot)),
        "median_r_aggregated_vs_spot_prediction": float(np.nanmedian(r_vs_spot)),
        "mean_r_aggregated_vs_measured": float(np.nanmean(r_vs_measured_agg)),
        "mean_r_spot_prediction_vs_measured": float(np.nanmean(r_vs_measured_spot)),
    }
