"""GPU throughput check: model-only ceiling vs the whole pipeline, in one run on one machine.

Meant for a lent GPU machine (see README, "Throughput"): it writes a random-weight UNI-architecture
encoder (timm vit_large_patch16_224, init_values=1e-5) and a 1000-gene HisToSGE head, generates a
JPEG-tiled slide from real H&E tiles, then measures

* model only: synthetic batches already on the device, bf16 autocast, eager and torch.compile;
* pipeline: `infer` end to end (read -> decode -> device crop/resize/normalise -> encoder -> head -> Zarr)
  with the same encoder, eager and compiled, with per-stage timings;

and prints a table with ratios. Runs on CPU too (``--device cpu --arch tiny``) to check the script itself.

    python benchmarks/gpu_check.py [--slide-px 30000] [--stride-um 27.5] [--batch 256]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

WORK = Path("/tmp/wsi-histosge-gpucheck")


def model_only(arch: str, device: torch.device, batch: int, steps: int, compile_: bool, dtype: torch.dtype) -> float:
    from wsi_histosge.encoders import create_encoder

    enc = create_encoder(arch, weights=WORK / f"{arch}.safetensors" if arch != "tiny-test" else None).to(device)
    mod = torch.compile(enc) if compile_ else enc
    x = torch.randn(batch, 3, enc.cfg.input_px, enc.cfg.input_px, device=device)
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
        for _ in range(3):
            mod(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            mod(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - t0)


def write_models(arch: str, n_genes: int) -> Path:
    from safetensors.torch import save_file

    from wsi_histosge.encoders import create_encoder, get_encoder_cfg
    from wsi_histosge.model import HeadConfig, HisToSGEHead, Model, ModelMeta, save_model

    WORK.mkdir(parents=True, exist_ok=True)
    cfg = get_encoder_cfg(arch)
    weights = None
    if arch != "tiny-test":
        import timm

        weights = WORK / f"{arch}.safetensors"
        if not weights.is_file():
            net = timm.create_model(cfg.architecture, pretrained=False, num_classes=0, **cfg.timm_kwargs)
            save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(weights))
    enc = create_encoder(arch, weights=weights)
    head_cfg = HeadConfig(in_dim=enc.cfg.embed_dim, n_genes=n_genes)
    meta = ModelMeta(
        genes=[f"G{i}" for i in range(n_genes)],
        head=head_cfg.__dict__.copy(),
        encoder=arch,
        encoder_weights_sha256=enc.weights_hash,
        spot_um=55.0,
        context_um=enc.cfg.context_um,
        neighbour_offsets_um=[[0, 0], [-100, 0], [100, 0], [-50, -86.6], [50, -86.6], [-50, 86.6], [50, 86.6]],
        name=f"gpucheck-{arch}",
    )
    path = WORK / f"model-{arch}"
    save_model(Model(meta, HisToSGEHead(head_cfg).eval()), path)
    return path


def write_slide(n: int) -> Path:
    from synthetic_slides import source_pixels, write_repeated_jpeg

    path = WORK / f"slide-{n}.tif"
    if path.is_file():
        return path
    pix, mpp = source_pixels()
    return write_repeated_jpeg(path, n, pix, mpp)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="uni")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--slide-px", type=int, default=30000)
    ap.add_argument("--stride-um", type=float, default=27.5)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()
    from wsi_histosge.infer import InferOptions, infer_slide

    device = torch.device(args.device)
    dtype = torch.bfloat16
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    model = write_models(args.arch, 1000)
    slide = write_slide(args.slide_px)
    rows = []
    for compile_ in (False,) if args.no_compile else (False, True):
        ceiling = model_only(args.arch, device, args.batch, args.steps, compile_, dtype)
        out = WORK / f"out-{int(compile_)}.zarr"
        t0 = time.perf_counter()
        res = infer_slide(
            slide,
            out,
            InferOptions(
                model=model,
                stride_um=args.stride_um,
                device=args.device,
                batch_size=args.batch,
                num_workers=args.workers,
                compile=compile_,
                overwrite=True,
                encoder_weights=WORK / f"{args.arch}.safetensors" if args.arch != "tiny-test" else None,
            ),
        )
        wall = time.perf_counter() - t0
        encoded = res.patches_encoded
        rows.append(
            {
                "compile": compile_,
                "model_only_img_s": ceiling,
                "pipeline_spots_s": res.spots / wall,
                "pipeline_patches_s": encoded / wall,
                "timings": res.timings_s,
                "spots": res.spots,
            }
        )
    print(
        f"device: {name}; encoder {args.arch}; slide {args.slide_px}px; stride {args.stride_um} µm; batch {args.batch}"
    )
    print(f"{'compile':>7} {'model img/s':>11} {'pipe patches/s':>14} {'pipe spots/s':>12} {'ratio':>6}  stages (s)")
    for r in rows:
        st = ", ".join(f"{k} {v:.1f}" for k, v in r["timings"].items() if isinstance(v, float))
        print(
            f"{r['compile']!s:>7} {r['model_only_img_s']:>11.0f} {r['pipeline_patches_s']:>14.0f} "
            f"{r['pipeline_spots_s']:>12.0f} {r['pipeline_patches_s'] / r['model_only_img_s']:>6.2f}  {st}"
        )
    print(json.dumps(rows, default=str))


if __name__ == "__main__":
    main()
