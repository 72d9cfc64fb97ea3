from __future__ import annotations

import json
import pickle
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from wsi_histosge.encoders import create_encoder, get_encoder_cfg, list_encoders
from wsi_histosge.errors import EncoderWeightsError, ModelError
from wsi_histosge.model import HeadConfig, HisToSGEHead, Model, default_model_path, load_model, save_model


def _fixed_inputs(model: Model) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features, the model's own neighbour offsets and a validity mask with some neighbours absent."""
    gen = torch.Generator().manual_seed(0)
    offsets = torch.tensor(model.meta.neighbour_offsets_um)
    n, g = 6, len(offsets)
    feats = torch.randn(n, g, model.head.cfg.in_dim, generator=gen) * 2.0
    pos = offsets.expand(n, g, 2).clone()
    valid = torch.rand(n, g, generator=gen) > 0.3
    valid[:, 0] = True  # the spot itself always exists
    return feats, pos, valid


def _predict(model: Model, inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    with torch.inference_mode():
        return model.head(*inputs)


def test_checkpoint_round_trip(tiny_model: Path, tmp_path: Path) -> None:
    """save -> load gives the same predictions (bit-for-bit in float32, within fp16 rounding with
    ``half=True``) and the same metadata."""
    m = load_model(tiny_model)
    assert m.n_genes == 12 and m.meta.encoder == "tiny-test"
    inputs = _fixed_inputs(m)
    before = _predict(m, inputs)
    assert before.shape == (6, 12)
    assert (before.std(dim=0) > 0).all()  # the rows differ: a constant head would make equality vacuous

    full = load_model(save_model(m, tmp_path / "full"))
    torch.testing.assert_close(_predict(full, inputs), before, rtol=0, atol=0)
    assert asdict(full.meta) == asdict(m.meta)
    assert full.sha256 == m.sha256  # same weights and JSON: the same model identity

    half = load_model(save_model(m, tmp_path / "half", half=True))
    with safe_open(str(tmp_path / "half" / "model.safetensors"), "pt") as fh:
        assert fh.get_tensor("gene_head.4.weight").dtype == torch.float16  # really stored as fp16
    after_half = _predict(half, inputs)
    torch.testing.assert_close(after_half, before, rtol=2e-3, atol=2e-3)
    assert not torch.equal(after_half, before)
    assert asdict(half.meta) == asdict(m.meta)


def test_masked_neighbours_are_ignored() -> None:
    torch.manual_seed(0)
    head = HisToSGEHead(HeadConfig(in_dim=8, n_genes=4, dim=16, hidden=16, dropout=0.0)).eval()
    feats = torch.randn(1, 3, 8)
    pos = torch.tensor([[[0.0, 0.0], [100.0, 0.0], [0.0, 100.0]]])
    valid = torch.tensor([[True, True, False]])
    a = head(feats, pos, valid)
    feats2 = feats.clone()
    feats2[0, 2] = 1e3  # garbage in an absent token must not matter
    assert torch.allclose(a, head(feats2, pos, valid))
    assert not torch.allclose(a, head(feats, pos, torch.ones(1, 3, dtype=torch.bool)))


def test_absolute_mode_refuses_large_indices() -> None:
    head = HisToSGEHead(HeadConfig(in_dim=8, n_genes=4, dim=16, hidden=16, position_mode="absolute")).eval()
    with pytest.raises(ModelError, match="512"):
        head(torch.randn(1, 1, 8), torch.tensor([[[600.0, 3.0]]]), torch.ones(1, 1, dtype=torch.bool))


class _Sentinel:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path.write_text, (Path(self.path), "pwned"))


def test_pickle_checkpoint_is_refused(tiny_model: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(tiny_model, bad)
    sentinel = tmp_path / "sentinel"
    (bad / "model.safetensors").write_bytes(pickle.dumps(_Sentinel(str(sentinel))))
    meta = json.loads((bad / "model.json").read_text())
    meta.pop("weights_sha256")
    (bad / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError):
        load_model(bad)
    assert not sentinel.exists()


def test_tampered_weights_fail_the_hash(tiny_model: Path, tmp_path: Path) -> None:
    bad = tmp_path / "tampered"
    shutil.copytree(tiny_model, bad)
    data = bytearray((bad / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (bad / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ModelError, match="do not match"):
        load_model(bad)


def test_default_model_ships_and_fits_its_encoder() -> None:
    m = load_model(default_model_path())
    enc = create_encoder(m.meta.encoder)
    assert enc.cfg.embed_dim == m.head.cfg.in_dim
    assert enc.weights_hash == m.meta.encoder_weights_sha256
    assert len(m.meta.genes) == 795 and "FN1" in m.meta.genes and m.meta.genes[-10:][0] == "ERBB2"
    (fold,) = m.meta.metrics["folds"]  # scores recomputed by test_train_eval::test_the_built_in_model_is_what...
    assert fold["section"] == "C6" and set(fold["scores"]) == {"head", "ridge", "training_mean"}
    assert (default_model_path() / "model.safetensors").stat().st_size < 5 * 2**20


def test_registry_entries() -> None:
    names = {c.name for c in list_encoders()}
    assert {
        "uni",
        "uni2-h",
        "h-optimus-0",
        "virchow2",
        "phikon-v2",
        "prov-gigapath",
        "conch",
        "efficientnet-lite0",
    } <= names
    assert get_encoder_cfg("uni").context_um == pytest.approx(112.0)
    assert get_encoder_cfg("timm:resnet18").embed_dim == 512


def test_gated_encoder_without_weights_says_how(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    token = "hf_" + "x" * 34
    monkeypatch.setenv("HF_TOKEN", token)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(EncoderWeightsError, match="--encoder-weights") as info:
        create_encoder("uni")
    assert token not in str(info.value)


def test_efficientnet_features_are_deterministic() -> None:
    enc = create_encoder("efficientnet-lite0")
    x = enc.normalise(torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0)))
    with torch.inference_mode():
        a, b = enc(x), enc(x)
    assert a.shape == (2, 1280)
    np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_the_two_scale_encoder_is_the_one_encoder_seen_twice() -> None:
    """efficientnet-lite0-ms (the default): a 224 µm input at 0.5 µm/px gives the final and stage pools of
    its central 112 µm (equal to efficientnet-lite0's features there), then the same of the whole input at
    1.0 µm/px (a 2x2 mean), each view's result independent of the other and of the batch."""
    from wsi_histosge.config import DEFAULT_ENCODER
    from wsi_histosge.encoders import stage_pools

    assert DEFAULT_ENCODER == "efficientnet-lite0-ms"
    ms, single = create_encoder("efficientnet-lite0-ms"), create_encoder("efficientnet-lite0")
    assert ms.cfg.context_um == pytest.approx(224.0) and ms.cfg.input_px == 448 and ms.cfg.mpp == 0.5
    assert ms.weights_hash == single.weights_hash
    x01 = torch.rand(3, 3, 448, 448, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        f = ms(ms.normalise(x01))
        centre = single(single.normalise(x01[..., 112:336, 112:336]))
        whole = single(single.normalise(torch.nn.functional.avg_pool2d(x01, 2)))
        alone = ms(ms.normalise(x01[1:2]))
        stages = stage_pools(single.trunk, single.normalise(x01[..., 112:336, 112:336]))
    assert f.shape == (3, ms.cfg.embed_dim) == (3, 3968)
    np.testing.assert_allclose(f[:, :1280].numpy(), centre.numpy(), atol=1e-4)
    np.testing.assert_allclose(f[:, 1984 : 1984 + 1280].numpy(), whole.numpy(), atol=1e-4)
    np.testing.assert_allclose(f[:, :1984].numpy(), stages.numpy(), atol=1e-4)
    np.testing.assert_allclose(alone.numpy(), f[1:2].numpy(), atol=1e-4)
    assert not np.allclose(f[:, 1280:1984].numpy(), f[:, 1984 + 1280 :].numpy(), atol=1e-2)
    with pytest.raises(ModelError, match="multiple of 4"):
        ms(torch.zeros(1, 3, 446, 446))
