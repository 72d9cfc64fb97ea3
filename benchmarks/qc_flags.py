"""Artefact flags (``wsi_histosge.qc``): precision and recall against hand-drawn and synthetic truth, and cost.

Cell level. A cell is a square box of ``--boxes`` µm on a lattice of the same step from the slide's top-left
(what infer judges with ``box_um`` = stride); it is positive when >= 50% of its box lies in a truth region,
negative when none of it does (cells in between are not scored).

- Pen: ``pathml_small_dicom.dcm`` (real H&E with green/blue/black marker; no MPP in the file, ``--dicom-mpp``
  4 µm/px assumed) against ``tests/fixtures/pathml_small_dicom.pen.geojson``. Left half (x < 1618 px) is where
  ``PEN_FRACTION`` was chosen, right half is held out. Cells touching the black margin dye are not scored.
- Pen on ordinary tissue: CMU-1-Small-Region and the packaged crop (no marker; CMU-1 has green margin dye).
- Blur: real H&E with a Gaussian-filtered rectangle (sigma 1, 2, 4, 8 µm; blended into the sharp pixels over
  a 20 µm ramp so the rectangle has no artificial edge), written as a JPEG-tiled pyramid, and a sharp copy
  written the same way. Positive: >= 50% of the box inside the fully blurred core; negative: box clear of the
  blended rectangle. The packaged crop is where ``BLUR_MAX_SHARPNESS`` was chosen; the part of
  CMU-1-Small-Region above the crop (y < 1400 px) is held out. Baseline in the same run: the variance of the
  Laplacian over tissue pixels at 1 µm/px (no normalisation), thresholded by the same rule.
- Cost: ms per cell of ``cell_measures`` vs the default encoder on the same super-tile (CPU, one thread).

    python benchmarks/qc_flags.py [--data ../shared/data] [--boxes 100,50]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile
import torch
from scipy import ndimage

from wsi_histosge import config, qc
from wsi_histosge.slide import Slide, open_slide

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "pathml_small_dicom.pen.geojson"
CROP = ROOT / "wsi_histosge" / "samples" / "cmu1-skin-crop.tif"
SIGMAS_UM = (1.0, 2.0, 4.0, 8.0)
RAMP_UM = 20.0
#: Blurred rectangles (level-0 px, x0, y0, x1, y1): the crop's middle (tuning), and CMU-1 above the crop.
CROP_RECT = (320, 384, 960, 1152)
CMU_RECT = (1000, 450, 1550, 1100)
CMU_HELD_OUT_MAX_Y = 1400  # the packaged crop starts at y = 1400 px of CMU-1-Small-Region


def write_blurred(
    src: Path,
    out: Path,
    rect: tuple[int, int, int, int],
    sigma_um: float,
    *,
    pale: bool = False,
    max_y: int | None = None,
) -> Path:
    """``src``'s level 0 (rows above ``max_y``) with ``rect`` Gaussian-filtered (``sigma_um``; 0 = a sharp
    copy), blended over ``RAMP_UM``, as a 2-level JPEG-tiled TIFF with the same MPP. ``pale``: every pixel
    halfway to white (a faded or weakly stained slide: half the contrast, same focus)."""
    slide = open_slide(src)
    w, h = slide.dimensions
    img = slide.read_region((0, 0), 0, (w, min(h, max_y or h)))
    mpp = slide.mpp.x
    if sigma_um > 0:
        sp = sigma_um / mpp
        soft = np.stack([ndimage.gaussian_filter(img[..., c].astype(np.float32), sp) for c in range(3)], -1)
        x0, y0, x1, y1 = rect
        ramp = RAMP_UM / mpp
        yy = np.arange(img.shape[0])[:, None] + 0.5
        xx = np.arange(img.shape[1])[None, :] + 0.5
        wx = np.clip(np.minimum(xx - x0, x1 - xx) / ramp + 0.5, 0, 1)
        wy = np.clip(np.minimum(yy - y0, y1 - yy) / ramp + 0.5, 0, 1)
        wgt = (wx * wy)[..., None]
        img = np.clip(np.rint(wgt * soft + (1 - wgt) * img), 0, 255).astype(np.uint8)
    if pale:
        img = (255 - (255 - img.astype(np.int16)) // 2).astype(np.uint8)
    with tifffile.TiffWriter(out) as tw:
        for i, step in enumerate((1, 4)):
            res = 1e4 / (mpp * step)
            tw.write(
                img[::step, ::step],
                tile=(256, 256),
                compression="jpeg",
                compressionargs={"level": 85},
                photometric="rgb",
                subfiletype=int(i > 0),
                resolution=(res, res),
                resolutionunit="CENTIMETER",
            )
    return out


def box_fraction_in_rect(centres: np.ndarray, half: float, rect: tuple[float, float, float, float]) -> np.ndarray:
    x0, y0, x1, y1 = rect
    ox = np.clip(np.minimum(centres[:, 0] + half, x1) - np.maximum(centres[:, 0] - half, x0), 0, None)
    oy = np.clip(np.minimum(centres[:, 1] + half, y1) - np.maximum(centres[:, 1] - half, y0), 0, None)
    return ox * oy / (2 * half) ** 2


def prf(flag: np.ndarray, pos: np.ndarray, neg: np.ndarray) -> str:
    tp, fp, fn = int((flag & pos).sum()), int((flag & neg).sum()), int((~flag & pos).sum())
    p = tp / (tp + fp) if tp + fp else float("nan")
    r = tp / (tp + fn) if tp + fn else float("nan")
    return f"{p:9.3f} {r:7.3f} {tp:5d} {fp:5d} {fn:5d} {int(pos.sum()):5d} {int(neg.sum()):6d}"


HEAD = f"{'precision':>9} {'recall':>7} {'TP':>5} {'FP':>5} {'FN':>5} {'pos':>5} {'neg':>6}"


# -- pen ---------------------------------------------------------------------------------------------------
def pen_section(data: Path, boxes: list[float], dicom_mpp: float) -> None:
    dicom = open_slide(data / "wsi-samples" / "pathml_small_dicom.dcm", mpp=dicom_mpp)
    w, h = dicom.dimensions
    print(
        f"\n## Pen ink: pathml_small_dicom.dcm at {dicom_mpp} µm/px vs {FIXTURE.name} (PEN_FRACTION {qc.PEN_FRACTION})"
    )
    print(f"{'box µm':>6} {'part':<22} {HEAD}   clean-rect FP   margin-dye cells flagged")
    for box in boxes:
        c = qc.lattice_centres(dicom, box)
        t0 = time.perf_counter()
        m = qc.slide_cell_measures(dicom, c, box, tile_um=4000.0)
        dt = time.perf_counter() - t0
        side = box / dicom_mpp
        pen = qc.annotation_fraction(FIXTURE, "pen", c, side, (h, w))
        margin = qc.annotation_fraction(FIXTURE, "margin-ink", c, side, (h, w))
        clean = qc.annotation_fraction(FIXTURE, "clean", c, side, (h, w)) >= 1.0
        pos, neg = pen >= 0.5, (pen == 0) & (margin == 0)
        flag = m.ink_fraction >= qc.PEN_FRACTION
        left = c[:, 0] < w / 2
        for name, part in [("left (tuning)", left), ("right (held out)", ~left), ("whole slide", left | ~left)]:
            cf = f"{int((flag & clean & part).sum())}/{int((clean & part).sum())}"
            md = int((flag & (margin > 0) & (pen == 0) & part).sum())
            print(f"{box:6.0f} {name:<22} {prf(flag, pos & part, neg & part)}   {cf:>13}   {md:>6}")
        # the rule PEN_FRACTION came from: F1 on the tuning half at a few candidates
        cands = [0.1, 0.15, 0.2, 0.25, 0.3]
        f1 = []
        for t in cands:
            f = m.ink_fraction >= t
            tp, fp, fn = (f & pos & left).sum(), (f & neg & left).sum(), (~f & pos & left).sum()
            f1.append(f"{t}: {2 * tp / max(2 * tp + fp + fn, 1):.3f}")
        print(
            f"{'':6} tuning-half F1 by threshold: {', '.join(f1)}   ({1e3 * dt / len(c):.2f} ms/cell, {len(c)} cells)"
        )


def pen_on_ordinary_tissue(data: Path, boxes: list[float]) -> None:
    print(f"\n## Pen flags on ordinary tissue (no marker), cells with >= 10% tissue (PEN_FRACTION {qc.PEN_FRACTION})")
    cols = f"{'box µm':>6} {'slide':<34} {'flagged':>8} {'cells':>6} {'rate':>6}"
    print(f"{cols}   max ink fraction   smallest zero-FP threshold")
    for box in boxes:
        for name, path in [
            ("CMU-1-Small-Region.svs", data / "wsi-samples" / "CMU-1-Small-Region.svs"),
            ("packaged crop (tuning)", CROP),
        ]:
            slide = open_slide(path)
            c = qc.lattice_centres(slide, box)
            m = qc.slide_cell_measures(slide, c, box)
            t = m.tissue_fraction >= 0.1
            f = (m.ink_fraction >= qc.PEN_FRACTION) & t
            top = float(m.ink_fraction[t].max()) if t.any() else 0.0
            print(
                f"{box:6.0f} {name:<34} {int(f.sum()):8d} {int(t.sum()):6d} {f.sum() / max(t.sum(), 1):6.3f}   "
                f"{top:16.3f}   > {top:.3f}"
            )
    print("       (CMU-1's flagged cells lie on the green margin dye along its cut edge: true ink, not pen)")


# -- blur --------------------------------------------------------------------------------------------------
_LAPLACIAN: dict[str, tuple[np.ndarray, np.ndarray, int]] = {}


def laplacian_variance(slide: Slide, centres: np.ndarray, box_um: float) -> np.ndarray:
    """Baseline: variance of the Laplacian of grey over tissue pixels (chroma >= 18) of each box at ~1 µm/px
    (2x2 averaging of a 0.5 µm/px slide); NaN with < 25% tissue."""
    if str(slide.path) not in _LAPLACIAN:
        img = slide.read_region((0, 0), 0, slide.dimensions).astype(np.float32)
        step = max(1, round(qc.MEASURE_MPP / slide.mpp.x))
        hh, ww = img.shape[0] // step * step, img.shape[1] // step * step
        img = img[:hh, :ww].reshape(hh // step, step, ww // step, step, 3).mean(axis=(1, 3))
        grey = img @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        _LAPLACIAN[str(slide.path)] = (ndimage.laplace(grey), img.max(-1) - img.min(-1) >= qc.TISSUE_MIN_CHROMA, step)
    lap, tissue, step = _LAPLACIAN[str(slide.path)]
    half = box_um / 2 / (slide.mpp.x * step)
    out = np.full(len(centres), np.nan, dtype=np.float32)
    for i, (x, y) in enumerate(centres / step):
        ys = slice(max(0, round(y - half)), round(y + half))
        xs = slice(max(0, round(x - half)), round(x + half))
        t = tissue[ys, xs]
        if t.size and t.mean() >= qc.MIN_TISSUE_FRACTION:
            out[i] = float(lap[ys, xs][t].var())
    return out


def blur_section(data: Path, boxes: list[float], tmp: Path) -> None:
    mpp = open_slide(CROP).mpp.x
    ramp_px = RAMP_UM / mpp
    sets = [
        ("packaged crop (tuning)", CROP, CROP_RECT, None),
        (
            "CMU-1 above the crop (held out)",
            data / "wsi-samples" / "CMU-1-Small-Region.svs",
            CMU_RECT,
            CMU_HELD_OUT_MAX_Y,
        ),
    ]
    print(f"\n## Out of focus: Gaussian-filtered rectangle in real H&E (BLUR_MAX_SHARPNESS {qc.BLUR_MAX_SHARPNESS})")
    rules: dict[float, list[str]] = {}
    baseline: dict[float, float] = {}  # Laplacian-variance threshold per box size, from the tuning crop
    for name, src, rect, max_y in sets:
        x0, y0, x1, y1 = rect
        core = (x0 + ramp_px / 2, y0 + ramp_px / 2, x1 - ramp_px / 2, y1 - ramp_px / 2)
        outer = (x0 - ramp_px / 2, y0 - ramp_px / 2, x1 + ramp_px / 2, y1 + ramp_px / 2)
        paths = {s: write_blurred(src, tmp / f"{src.stem}-s{s:g}.tif", rect, s, max_y=max_y) for s in (0.0, *SIGMAS_UM)}
        pale_path = write_blurred(src, tmp / f"{src.stem}-pale.tif", rect, 0.0, pale=True, max_y=max_y)
        for box in boxes:
            slide0 = open_slide(paths[0.0])
            c = qc.lattice_centres(slide0, box)
            half = box / 2 / mpp
            if max_y is not None:
                c = c[c[:, 1] + half <= max_y]
            pos_all = box_fraction_in_rect(c, half, core) >= 0.5
            neg_all = box_fraction_in_rect(c, half, outer) == 0
            sharp0 = qc.slide_cell_measures(slide0, c, box).sharpness
            lap0 = laplacian_variance(slide0, c, box)
            j0 = np.isfinite(sharp0)
            print(
                f"\n{name}, {box:.0f} µm boxes: sharp copy: {int(j0.sum())} of {len(c)} cells judged, "
                f"{int((sharp0 < qc.BLUR_MAX_SHARPNESS).sum())} flagged (sharpness 1st percentile "
                f"{np.nanpercentile(sharp0, 1):.3f}, min {np.nanmin(sharp0):.3f})"
            )
            stats_col = f"{'sharpness of positives (median, p99)':>36}"
            print(f"  {'sigma µm':>8} {HEAD}   {stats_col}   baseline Laplacian variance: recall, FP on sharp copy")
            res = {}
            for s in SIGMAS_UM:
                sl = open_slide(paths[s])
                sh = qc.slide_cell_measures(sl, c, box).sharpness
                judged = np.isfinite(sh)
                pos, neg = pos_all & judged, neg_all & judged
                res[s] = (sh, pos, neg, laplacian_variance(sl, c, box))
            # the same threshold rule for both measures: geometric mean of the sharp copy's 1st percentile and
            # the 2 µm positives' 99th percentile (lower = blurred for both)
            sh2, pos2, _, lap2 = res[2.0]
            rule = float(np.sqrt(np.nanpercentile(sharp0, 1) * np.nanpercentile(sh2[pos2], 99)))
            lap_pos2 = lap2[pos2 & np.isfinite(lap2)]
            lap_t = (
                float(np.sqrt(np.nanpercentile(lap0, 1) * np.nanpercentile(lap_pos2, 99)))
                if lap_pos2.size
                else float("nan")
            )
            if max_y is None:
                rules[box] = [f"sharpness {rule:.3f}", f"baseline {lap_t:.1f}"]
                baseline[box] = lap_t
            baseline_t = baseline[box]
            for s in SIGMAS_UM:
                sh, pos, neg, lap = res[s]
                flag = sh < qc.BLUR_MAX_SHARPNESS
                lp = pos & np.isfinite(lap)
                lrec = float((lap[lp] < baseline_t).mean()) if lp.any() else float("nan")
                lfp = f"{int((lap0 < baseline_t).sum())}/{int(np.isfinite(lap0).sum())}"
                stats = f"{np.nanmedian(sh[pos]):.3f}, {np.nanpercentile(sh[pos], 99):.3f}" if pos.any() else "-"
                print(f"  {s:8.0f} {prf(flag, pos, neg)}   {stats:>36}   {lrec:.3f}, {lfp}")
            pale = open_slide(pale_path)
            sp, lp0 = qc.slide_cell_measures(pale, c, box).sharpness, laplacian_variance(pale, c, box)
            print(
                f"  pale sharp copy (half the contrast): flagged {int((sp < qc.BLUR_MAX_SHARPNESS).sum())}/"
                f"{int(np.isfinite(sp).sum())} judged; baseline flags {int((lp0 < baseline_t).sum())}/"
                f"{int(np.isfinite(lp0).sum())}"
            )
    for box, r in rules.items():
        print(
            f"threshold rule on the tuning crop, {box:.0f} µm boxes: {', '.join(r)} (constant: {qc.BLUR_MAX_SHARPNESS})"
        )


# -- cost --------------------------------------------------------------------------------------------------
def cost_section(boxes: list[float]) -> None:
    from wsi_histosge.encoders import create_encoder
    from wsi_histosge.loader import encode_tile, read_tile, tile_for_points

    slide = open_slide(CROP)
    encoder = create_encoder(config.DEFAULT_ENCODER).eval()
    context_um = encoder.cfg.context_um
    step_um = 50.0
    c = qc.lattice_centres(slide, step_um)
    c = c[(c[:, 0] > 300) & (c[:, 0] < 1000) & (c[:, 1] > 400) & (c[:, 1] < 1000)][:48]
    level = slide.best_level_for_mpp(encoder.cfg.mpp)
    geom = tile_for_points(slide, c, context_um + 2 * max(boxes), level)
    tile = torch.from_numpy(read_tile(slide, geom))
    mpp = (slide.mpp.x, slide.mpp.y)
    cpu, f32 = torch.device("cpu"), torch.float32
    encode_tile(encoder, tile, geom, c[:16], mpp, context_um, batch=16, device=cpu, dtype=f32)  # warm-up
    t0 = time.perf_counter()
    encode_tile(encoder, tile, geom, c, mpp, context_um, batch=16, device=cpu, dtype=f32)
    enc_ms = 1e3 * (time.perf_counter() - t0) / len(c)
    where = f"{len(c)} cells of the packaged crop, tile at {slide.level_mpp(level):.3f} µm/px"
    print(f"\n## Cost on the tile's device (CPU, 1 thread; {where})")
    print(f"encoder {encoder.cfg.name}: {enc_ms:.1f} ms/cell ({encoder.cfg.input_px} px patches)")
    for box in boxes:
        qc.cell_measures(tile, geom, c[:8], mpp, box)  # warm-up
        t0 = time.perf_counter()
        for _ in range(3):
            qc.cell_measures(tile, geom, c, mpp, box)
        ms = 1e3 * (time.perf_counter() - t0) / (3 * len(c))
        print(f"qc.cell_measures, {box:.0f} µm boxes: {ms:.2f} ms/cell = {ms / enc_ms:.3f} x the encoder")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--boxes", default="100,50", help="box sides in µm (comma-separated)")
    ap.add_argument(
        "--dicom-mpp", type=float, default=4.0, help="µm/px assumed for the DICOM sample (none in the file)"
    )
    args = ap.parse_args()
    boxes = [float(b) for b in args.boxes.split(",")]
    torch.set_num_threads(1)  # small tensors: OpenMP threads cost more than they give (and the timing is per thread)
    t0 = time.perf_counter()
    print(f"data: {args.data}; torch threads: 1")
    pen_section(args.data, boxes, args.dicom_mpp)
    pen_on_ordinary_tissue(args.data, boxes)
    t1 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        blur_section(args.data, boxes, Path(tmp))
    t2 = time.perf_counter()
    cost_section(boxes)
    print(f"(pen {t1 - t0:.0f} s, blur {t2 - t1:.0f} s, cost {time.perf_counter() - t2:.0f} s)")
    print(f"\n({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
