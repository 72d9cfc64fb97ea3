"""`infer` vs a per-patch peer pipeline on the same spots, same encoder, same CPU, in one run.

    python benchmarks/peer_per_patch.py                # full: 10240 px generated slide, 3 rounds
    python benchmarks/peer_per_patch.py --quick        # works? under 2 min on 2 cores: packaged crop, 1 round
    python benchmarks/peer_per_patch.py --slide PATH [--rounds 5] [--stride-um 50] [--workers N]

A (infer): ``wsi_histosge.infer.infer_slide`` with the built-in model on the CPU at the given stride, other
options at their defaults (super-tile per block, patches cut by ``roi_align``, attention head, Zarr cube).
Timed end to end around the library call, so it also pays for tissue detection, the head and the writes.

B (peer, the way patch-per-spot tools do it): the cube's kept cells (centres from its ``affine_level0``
attribute and its ``tissue`` array), one ``read_region`` per spot of the model's context at the level infer
reads (OpenSlide, else tiffslide), torchvision ``Resize`` + ``ToTensor`` + ``Normalize`` with the encoder's
mean/std in a DataLoader with as many workers as infer uses, batches of 64 (``--peer-batch``) into the same
network and weights, run as plain PyTorch runs it: NCHW, glibc's default allocator, in its own process.
Timed from building the encoder to the last batch's features.

C (``--tuned-peer``, optional): the same peer with this tool's CPU settings (channels_last encoder,
``runtime.keep_freed_memory``, infer's CPU batch): what is left of the ratio is the pipeline itself.

Rounds are interleaved (A B A B ...) after an untimed warm-up of the encoder and ``roi_align``; printed: min
and median per side, the ratio of median spots/s, infer's patches encoded per spot (1 when each cell is
encoded once; more where halo cells are encoded again), and the cosine similarity of the two sides'
features on a sample of spots, infer's from ``wsi_histosge.loader.encode_points`` (the same ``cut_patches``
path):

* as each side cuts (infer: a box of context / mpp px centred on the spot, sampled by ``roi_align`` at
  sub-pixel positions; the peer: an integer top-left and size, exact pixels); target > 0.98;
* on the peer's own boxes: infer's cutting given exactly the peer's pixels, so ~1.0 unless colour, channel
  order, resizing or normalisation differ;
* the peer's box against the same box one pixel to the right (exact pixels both): how far a one-pixel move
  of the crop moves this encoder's features, the yardstick for the first number.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rounds import interleave, load_line, min_median
from torch.utils.data import DataLoader, Dataset

import wsi_histosge
from wsi_histosge import config
from wsi_histosge.encoders import Encoder, create_encoder
from wsi_histosge.infer import InferOptions, InferResult, infer_slide
from wsi_histosge.loader import default_workers, encode_points
from wsi_histosge.model import default_model_path, load_model
from wsi_histosge.slide import open_slide
from wsi_histosge.store import ATTR_KEY, read_cube

QUICK_SLIDE = Path(wsi_histosge.__file__).resolve().parent / "samples" / "cmu1-skin-crop.tif"
FULL_SIZE_PX = 10240  # 2 x 2 blocks of 64 cells at a 50 µm stride with the built-in model
COSINE_TARGET = 0.98


@dataclass(frozen=True)
class Spots:
    """The cube's kept cells and the geometry the peer needs to cut the same patches."""

    centres_level0: np.ndarray  # (N, 2) x, y
    mpp: tuple[float, float]
    context_um: float
    level: int


def generated_slide(size_px: int) -> Path:
    """A JPEG-tiled pyramid of real H&E pixels (CMU-1-Small-Region repeated), written once to /tmp."""
    from synthetic_slides import source_pixels, tiled, write_pyramid

    path = Path(f"/tmp/wsi-histosge-bench-{size_px}.tif")  # the name read_path.py --generate uses
    if not path.is_file():
        print(f"writing {path} ...", flush=True)
        pix, mpp = source_pixels()
        write_pyramid(path, tiled(pix, size_px), mpp, downsamples=(1, 2, 4))
    return path


def cube_spots(cube_path: Path, slide_path: Path, encoder_mpp: float) -> Spots:
    cube = read_cube(cube_path)
    affine = np.asarray(cube.attrs["affine_level0"], dtype=np.float64)
    iy, ix = np.nonzero(cube.tissue)
    xy1 = affine @ np.stack([ix, iy, np.ones_like(ix)]).astype(np.float64)
    mpp = cube.attrs[ATTR_KEY]["mpp"]
    level = open_slide(slide_path).best_level_for_mpp(encoder_mpp)  # the level infer reads
    return Spots(xy1[:2].T.copy(), (float(mpp["x"]), float(mpp["y"])), float(cube.attrs["context_um"]), level)


def peer_box(spots: Spots, i: int, downsample: float) -> tuple[tuple[int, int], tuple[int, int]]:
    """The peer's read_region arguments for spot ``i``: level-0 integer top-left, integer size at the level."""
    ctx_x, ctx_y = spots.context_um / spots.mpp[0], spots.context_um / spots.mpp[1]  # level-0 px
    cx, cy = spots.centres_level0[i]
    return (round(cx - ctx_x / 2), round(cy - ctx_y / 2)), (round(ctx_x / downsample), round(ctx_y / downsample))


def open_reader(path: Path) -> tuple[str, Any]:
    """OpenSlide when it is installed (and opens the file), else tiffslide: (name and version, handle)."""
    try:
        import openslide

        return f"OpenSlide {openslide.__library_version__}", openslide.OpenSlide(str(path))
    except Exception:  # not installed, or a format it refuses
        import tiffslide

        return f"tiffslide {tiffslide.__version__}", tiffslide.TiffSlide(path)


class PeerPatches(Dataset[torch.Tensor]):
    """One read_region per spot, then torchvision transforms; the reader opens lazily in each worker."""

    def __init__(self, slide_path: Path, spots: Spots, encoder: Encoder) -> None:
        from torchvision import transforms as T

        self.slide_path = slide_path
        self.spots = spots
        self.transform = T.Compose(
            [
                T.Resize((encoder.cfg.input_px, encoder.cfg.input_px), antialias=True),
                T.ToTensor(),
                T.Normalize(encoder.cfg.mean, encoder.cfg.std),
            ]
        )
        self._reader: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_reader": None}

    def __len__(self) -> int:
        return len(self.spots.centres_level0)

    def __getitem__(self, i: int) -> torch.Tensor:
        from PIL import Image

        if self._reader is None:
            self._reader = open_reader(self.slide_path)[1]
        level = self.spots.level
        location, size = peer_box(self.spots, i, float(self._reader.level_downsamples[level]))
        region = self._reader.read_region(location, level, size)
        if region.mode == "RGBA":  # off the slide OpenSlide returns transparent black; infer reads white (glass)
            white = Image.new("RGB", region.size, (255, 255, 255))
            white.paste(region, mask=region.getchannel("A"))
            region = white
        return self.transform(region)


def run_peer(
    slide_path: Path, spots: Spots, encoder_name: str, workers: int, batch: int, *, tuned: bool = False
) -> tuple[float, np.ndarray]:
    t0 = time.perf_counter()
    encoder = create_encoder(encoder_name)
    if tuned:
        from wsi_histosge.runtime import keep_freed_memory

        keep_freed_memory()
    elif encoder.channels_last:  # plain PyTorch: the network as loaded, NCHW
        encoder.trunk.to(memory_format=torch.contiguous_format)
        encoder.channels_last = False
    loader = DataLoader(PeerPatches(slide_path, spots, encoder), batch_size=batch, num_workers=workers)
    feats = []
    with torch.inference_mode():
        for images in loader:
            feats.append(encoder(images).float().numpy())
    seconds = time.perf_counter() - t0
    return seconds, np.concatenate(feats)


def run_peer_process(
    slide_path: Path, spots: Spots, encoder_name: str, workers: int, batch: int, tmp: Path, *, tuned: bool
) -> tuple[float, np.ndarray]:
    """The peer in a fresh process, so none of this process's settings (allocator, threads) leak into it."""
    import subprocess
    import sys

    spec = tmp / "spots.npz"
    np.savez(
        spec, centres=spots.centres_level0, mpp=np.asarray(spots.mpp), context_um=spots.context_um, level=spots.level
    )
    feats_out = tmp / "peer-features.npy"
    args = [
        sys.executable,
        __file__,
        "--peer-child",
        str(slide_path),
        str(spec),
        encoder_name,
        str(workers),
        str(batch),
    ]
    proc = subprocess.run([*args, str(feats_out), "tuned" if tuned else "plain"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"peer process failed:\n{proc.stderr[-3000:]}")
    return float(proc.stdout.strip().splitlines()[-1]), np.load(feats_out)


def peer_child(argv: list[str]) -> None:
    slide_path, spec, encoder_name, workers, batch, feats_out, mode = argv
    z = np.load(spec)
    spots = Spots(z["centres"], (float(z["mpp"][0]), float(z["mpp"][1])), float(z["context_um"]), int(z["level"]))
    seconds, feats = run_peer(Path(slide_path), spots, encoder_name, int(workers), int(batch), tuned=mode == "tuned")
    np.save(feats_out, feats)
    print(seconds)


def run_infer(slide_path: Path, out: Path, stride_um: float, workers: int | None) -> tuple[float, InferResult]:
    options = InferOptions(stride_um=stride_um, device="cpu", num_workers=workers, write_geojson=False)
    t0 = time.perf_counter()
    result = infer_slide(slide_path, out, options)
    return time.perf_counter() - t0, result


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)


def warm_up(encoder: Encoder) -> None:
    """First-call costs of this process (torch thread pools, kernels, torchvision ops) out of round 1."""
    from wsi_histosge.loader import TileGeometry, cut_patches

    px = encoder.cfg.input_px
    tile = torch.full((2 * px, 2 * px, 3), 200, dtype=torch.uint8)
    geom = TileGeometry((0, 0), 0, 1.0, (2 * px, 2 * px))
    with torch.inference_mode():
        patches = cut_patches(tile, geom, np.array([[px, px], [px + 1.5, px]]), (px, px), px, encoder, torch.float32)
        encoder(patches)


def feature_check(
    slide_path: Path, spots: Spots, encoder: Encoder, peer_feats: np.ndarray, n_check: int, batch: int
) -> None:
    """Cosine of the peer's features with infer's on a sample of spots, plus the two yardsticks."""
    slide = open_slide(slide_path)
    ds = float(open_reader(slide_path)[1].level_downsamples[spots.level])
    rng = np.random.default_rng(0)
    sample = np.sort(rng.choice(len(spots.centres_level0), size=min(len(spots.centres_level0), n_check), replace=False))
    pts = spots.centres_level0[sample]

    def tool(centres: np.ndarray, context_um: float) -> np.ndarray:
        return encode_points(slide, centres, encoder, context_um=context_um, batch=batch)

    as_cut = tool(pts, spots.context_um)
    boxes = [peer_box(spots, int(i), ds) for i in sample]
    box_centres = np.array([(x + w * ds / 2, y + h * ds / 2) for (x, y), (w, h) in boxes])
    box_um = boxes[0][1][0] * ds * spots.mpp[0]  # square boxes; their y size follows mpp.y
    same_box = tool(box_centres, box_um)
    one_px = tool(box_centres + np.array([ds, 0.0]), box_um)
    rows = [
        ("infer vs peer, as each side cuts", cosine(as_cut, peer_feats[sample])),
        ("infer on the peer's boxes vs peer", cosine(same_box, peer_feats[sample])),
        ("peer's box vs the box 1 px right (yardstick)", cosine(same_box, one_px)),
    ]
    print(f"\nfeature cosine on {len(sample)} spots{'':<13} {'median':>7} {'5th pct':>8} {'min':>7}")
    for name, cos in rows:
        print(f"{name:<47} {np.median(cos):>7.4f} {np.percentile(cos, 5):>8.4f} {cos.min():>7.4f}")
    med_cut, med_box, med_px = (float(np.median(c)) for _, c in rows)
    if med_cut > COSINE_TARGET:
        print(f"features agree: median cosine {med_cut:.4f} > {COSINE_TARGET}")
    elif med_box > COSINE_TARGET and med_cut >= med_px - 0.01:
        print(
            f"features below the {COSINE_TARGET} target as cut ({med_cut:.4f}) but identical on the same boxes "
            f"({med_box:.4f}); moving a crop by one pixel gives {med_px:.4f}: the gap is where each side places "
            "and resamples the patch (sub-pixel roi_align vs integer crop), not a different input"
        )
    else:
        print(f"FEATURES DISAGREE (median {med_cut:.4f}, same boxes {med_box:.4f}): the comparison is void")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slide", type=Path, default=None, help=f"default: a generated {FULL_SIZE_PX} px slide")
    ap.add_argument("--quick", action="store_true", help="the packaged 1280 x 1536 px crop, 1 round, 32 spots checked")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved A/B rounds (default 3; 1 with --quick)")
    ap.add_argument("--stride-um", type=float, default=50.0)
    ap.add_argument("--workers", type=int, default=None, help="DataLoader workers of both sides (default: infer's)")
    ap.add_argument("--peer-batch", type=int, default=64, help="peer's batch size (default 64)")
    ap.add_argument("--tuned-peer", action="store_true", help="also time the peer with this tool's CPU settings")
    ap.add_argument("--check-spots", type=int, default=None, help="spots for the cosine check (default 256)")
    args = ap.parse_args()
    rounds = args.rounds or (1 if args.quick else 3)
    check_spots = args.check_spots or (32 if args.quick else 256)
    slide_path = args.slide or (QUICK_SLIDE if args.quick else generated_slide(FULL_SIZE_PX))
    workers = default_workers() if args.workers is None else args.workers
    infer_batch = config.CPU_BATCH  # what infer uses on the CPU without --batch-size
    peer_batch = args.peer_batch

    print(load_line("start"), flush=True)
    model = load_model(default_model_path())
    encoder_name = model.meta.encoder
    warm = create_encoder(encoder_name)
    warm_up(warm)
    slide = open_slide(slide_path)
    reader_name = open_reader(slide_path)[0]
    print(
        f"slide {slide_path} ({slide.dimensions[0]} x {slide.dimensions[1]} px, mpp {slide.mpp.x:g}); "
        f"model {model.meta.name}, encoder {encoder_name} ({warm.cfg.input_px} px at {warm.cfg.mpp:g} µm/px), "
        f"context {model.meta.context_um:g} µm, stride {args.stride_um:g} µm; CPU, torch threads "
        f"{torch.get_num_threads()}, DataLoader workers {workers} on both sides, batch {infer_batch} (infer) and "
        f"{peer_batch} (peer); peer reads with {reader_name} in its own process",
        flush=True,
    )

    with tempfile.TemporaryDirectory(prefix="wsi-histosge-peer-") as tmp:
        state: dict[str, Any] = {"infer": [], "peer": []}

        def side_infer() -> float:
            k = len(state["infer"])
            seconds, result = run_infer(slide_path, Path(tmp) / f"round{k}.zarr", args.stride_um, args.workers)
            if k == 0:
                state["spots"] = cube_spots(Path(tmp) / "round0.zarr", slide_path, warm.cfg.mpp)
            state["infer"].append(result)
            return seconds

        def side_peer(tuned: bool = False) -> float:
            batch = infer_batch if tuned else peer_batch
            seconds, feats = run_peer_process(
                slide_path, state["spots"], encoder_name, workers, batch, Path(tmp), tuned=tuned
            )
            state["peer"].append(len(feats))
            state["peer_feats"] = feats
            return seconds

        sides = {"A infer (super-tiles)": side_infer, "B peer (per-patch read_region)": side_peer}
        if args.tuned_peer:
            sides["C peer, this tool's CPU settings"] = lambda: side_peer(tuned=True)
        seconds = interleave(sides, rounds)

    spots: Spots = state["spots"]
    results: list[InferResult] = state["infer"]
    n = len(spots.centres_level0)
    if {r.spots for r in results} != {n} or set(state["peer"]) != {n}:
        raise SystemExit(f"spot counts differ: cube {n}, infer {[r.spots for r in results]}, peer {state['peer']}")

    print(f"\nspots: {n} (the cube's kept cells, both sides); level read: {spots.level}")
    print(f"{'side':<34} {'min s':>8} {'median s':>9} {'spots/s (median)':>17} {'spots/s (best)':>15}")
    rates = {}
    for name, values in seconds.items():
        lo, med = min_median(values)
        rates[name] = (n / med, n / lo)
        print(f"{name:<34} {lo:>8.2f} {med:>9.2f} {n / med:>17.1f} {n / lo:>15.1f}")
    (a_med, a_best), (b_med, b_best), *tuned = rates.values()
    print(f"ratio infer / peer, spots/s: {a_med / b_med:.2f}x (medians), {a_best / b_best:.2f}x (best rounds)")
    if tuned:
        c_med, c_best = tuned[0]
        print(f"ratio infer / tuned peer: {a_med / c_med:.2f}x (medians), {a_best / c_best:.2f}x (best rounds)")
    patches = results[0].patches_encoded
    print(f"infer patches_encoded / spots: {patches} / {results[0].spots} = {patches / results[0].spots:.3f}")
    t = results[int(np.argsort(seconds["A infer (super-tiles)"])[len(results) // 2])].timings_s
    print("infer timings, median round (s): " + ", ".join(f"{k} {v:.2f}" for k, v in t.items()))

    feature_check(slide_path, spots, warm, state["peer_feats"], check_spots, peer_batch)
    print(load_line("end"))


if __name__ == "__main__":
    import sys

    if len(sys.argv) > 1 and sys.argv[1] == "--peer-child":
        peer_child(sys.argv[2:])
    else:
        main()
