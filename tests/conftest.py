"""Shared fixtures: generated pyramidal TIFFs, a tiny model, an S3 server on loopback, and the real data folder."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tifffile

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("WSI_HISTOSGE_SHARED_DATA", ROOT.parent / "shared" / "data"))


def need_shared(*parts: str) -> Path:
    """A path in ../shared/data; in CI a missing file is a failure, elsewhere a skip."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"real data missing in CI: {path}")
        pytest.skip(f"real data not available: {path}")
    return path


def write_pyramid(
    path: Path, img: np.ndarray, mpp: float | None = 0.5, levels: int = 3, compression: str = "jpeg", tile: int = 256
) -> Path:
    """A tiled pyramidal TIFF with resolution tags (or none when ``mpp`` is None)."""
    with tifffile.TiffWriter(path) as tw:
        for i in range(levels):
            level = img[:: 2**i, :: 2**i]
            kwargs = {}
            if mpp is not None:
                res = 1e4 / (mpp * 2**i)
                kwargs = {"resolution": (res, res), "resolutionunit": "CENTIMETER"}
            tw.write(
                level,
                tile=(tile, tile),
                compression=compression,
                photometric="rgb",
                subfiletype=0 if i == 0 else 1,
                **kwargs,
            )
    return path


def synthetic_tissue(h: int = 3000, w: int = 4000, seed: int = 0) -> np.ndarray:
    """White glass with one elliptical, textured, H&E-coloured blob in the middle."""
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 242, np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    blob = ((yy - h / 2) / (h / 3)) ** 2 + ((xx - w / 2) / (w / 2.8)) ** 2 < 1
    noise = rng.integers(0, 80, (h, w, 1), dtype=np.uint8)
    base = np.array([190, 100, 165], np.uint8)
    img[blob] = np.clip(base.astype(np.int16) - noise[blob], 0, 255).astype(np.uint8)
    # a few dark "nuclei" stripes so features vary across the tissue
    img[blob & ((xx // 37 + yy // 53) % 5 == 0)] = (70, 40, 120)
    return img


@pytest.fixture(scope="session")
def pyramid_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("slides") / "synthetic.tif"
    return write_pyramid(path, synthetic_tissue())


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real HisToSGE head on the tiny test encoder, with seeded random weights (fast on CPU)."""
    import torch

    from wsi_histosge.encoders import create_encoder
    from wsi_histosge.model import HeadConfig, HisToSGEHead, Model, ModelMeta, save_model

    torch.manual_seed(0)
    enc = create_encoder("tiny-test")
    cfg = HeadConfig(in_dim=enc.cfg.embed_dim, n_genes=12, dim=32, hidden=64, dropout=0.0)
    head = HisToSGEHead(cfg)
    with torch.no_grad():
        head.gene_head[-1].bias.fill_(1.0)  # keep outputs away from the ReLU floor
    pitch = 80.0
    meta = ModelMeta(
        genes=[f"G{i}" for i in range(12)],
        head=cfg.__dict__.copy(),
        encoder="tiny-test",
        encoder_weights_sha256=enc.weights_hash,
        spot_um=40.0,
        context_um=enc.cfg.context_um,
        neighbour_offsets_um=[[dx * pitch, dy * pitch] for dx, dy in [(0, 0), (-1, 0), (1, 0), (0, -1), (0, 1)]],
        name="tiny-test-model",
    )
    path = tmp_path_factory.mktemp("models") / "tiny"
    save_model(Model(meta, head.eval()), path)
    return path


@pytest.fixture(scope="session")
def cmu_cube(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """CMU-1-Small-Region.svs through the default model (real slide, real model), once per session."""
    from wsi_histosge.infer import InferOptions, infer_slide

    slide = need_shared("wsi-samples", "CMU-1-Small-Region.svs")
    out = tmp_path_factory.mktemp("cubes") / "cmu.zarr"
    infer_slide(slide, out, InferOptions(num_workers=1))
    return out


@pytest.fixture()
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """A real S3 protocol server (moto) on loopback with a ``results`` bucket; the environment points s3fs at it
    (credentials, region, ``AWS_ENDPOINT_URL``), and the same variables are yielded for subprocesses."""
    boto3 = pytest.importorskip("boto3")
    pytest.importorskip("s3fs")
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not one log line per range request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).create_bucket(Bucket="results")
    yield env
    server.stop()
