"""The HisToSGE feature-learning module and its checkpoint format.

The module follows the reference: features plus a positional embedding go through a pre-norm
transformer (depth 1, 4 heads of 64 dims, MLP width = model width by default) and a gene head
Linear-ReLU-LayerNorm-Linear with a ReLU on the output. Two changes make it a tool:

* each spot attends to its *neighbourhood* (itself first, then the spots at the training lattice's
  neighbour offsets), so predictions do not depend on where a block boundary falls;
* positions are continuous µm offsets from the centre spot (``relative-um``, default), or the
  reference's learned embeddings of integer array indices < 512 (``absolute``).

Input features are standardised with training statistics and clipped to |z| <= 5: some channels of
ImageNet encoders are near-constant on training tissue and explode on a new section otherwise.

A checkpoint is a folder (or ``name.json`` + ``name.safetensors`` pair) of safetensors weights and
JSON metadata; loading never unpickles.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ModelError

CHECKPOINT_FORMAT = "wsi-histosge-checkpoint/1"
POSITION_MODES = ("relative-um", "absolute")


@dataclass
class HeadConfig:
    in_dim: int
    n_genes: int
    dim: int = 128  # model width after the input projection (reference: in_dim, no projection)
    depth: int = 1
    heads: int = 4
    dim_head: int = 64
    mlp_dim: int | None = None  # reference: = dim
    hidden: int = 512  # gene head width (reference: 2048)
    dropout: float = 0.3
    position_mode: str = "relative-um"
    position_scale_um: float = 100.0
    n_frequencies: int = 8

    def __post_init__(self) -> None:
        if self.position_mode not in POSITION_MODES:
            raise ModelError(f"position mode must be one of {POSITION_MODES}, got {self.position_mode!r}")


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, dropout: float) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_qkv = nn.Linear(dim, inner * 3, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout))
        self.dropout = dropout

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.to_qkv(x).chunk(3, dim=-1)
        q, k, v = (t.view(b, n, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        mask = valid[:, None, None, :]  # keys that exist
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class _FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim), nn.Dropout(dropout)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x)
        return out


class HisToSGEHead(nn.Module):
    """Neighbourhood attention + gene head. ``forward(features, positions, valid) -> (B, n_genes)``.

    ``features`` (B, G, in_dim): token 0 is the spot being predicted, tokens 1.. its neighbours.
    ``positions`` (B, G, 2): µm offsets (x, y) from the centre spot (relative-um) or integer array
    indices (absolute). ``valid`` (B, G) bool: which neighbour tokens exist (token 0 always does).
    """

    feature_mean: torch.Tensor
    feature_std: torch.Tensor
    freqs: torch.Tensor

    def __init__(self, cfg: HeadConfig) -> None:
        super().__init__()
        self.cfg = cfg
        dim = cfg.dim
        self.register_buffer("feature_mean", torch.zeros(cfg.in_dim))
        self.register_buffer("feature_std", torch.ones(cfg.in_dim))
        self.proj = nn.Linear(cfg.in_dim, dim) if dim != cfg.in_dim else nn.Identity()
        if cfg.position_mode == "absolute":
            self.x_embed = nn.Embedding(512, dim)
            self.y_embed = nn.Embedding(512, dim)
        else:
            self.pos = nn.Linear(4 * cfg.n_frequencies, dim)
            freqs = 2.0 ** torch.arange(cfg.n_frequencies, dtype=torch.float32) * math.pi / 8.0
            self.register_buffer("freqs", freqs, persistent=False)
        self.layers = nn.ModuleList()
        for _ in range(cfg.depth):
            self.layers.append(
                nn.ModuleList(
                    [
                        nn.LayerNorm(dim),
                        _Attention(dim, cfg.heads, cfg.dim_head, cfg.dropout),
                        nn.LayerNorm(dim),
                        _FeedForward(dim, cfg.mlp_dim or dim, cfg.dropout),
                    ]
                )
            )
        self.gene_head = nn.Sequential(
            nn.Linear(dim, cfg.hidden),
            nn.ReLU(),
            nn.LayerNorm(cfg.hidden),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.hidden, cfg.n_genes),
        )

    def standardise(self, features: torch.Tensor) -> torch.Tensor:
        z = (features - self.feature_mean) / self.feature_std
        return z.clamp(-5.0, 5.0)

    def position_embedding(self, positions: torch.Tensor) -> torch.Tensor:
        if self.cfg.position_mode == "absolute":
            idx = positions.long()
            if (idx < 0).any() or (idx >= 512).any():
                raise ModelError(
                    "absolute position mode needs array indices in [0, 512); use a relative-um model for large slides"
                )
            return self.x_embed(idx[..., 0]) + self.y_embed(idx[..., 1])  # type: ignore[no-any-return]
        scaled = positions.float()[..., None] / self.cfg.position_scale_um * self.freqs  # (B, G, 2, F)
        enc = torch.cat([scaled.sin(), scaled.cos()], dim=-1).flatten(-2)
        return self.pos(enc)  # type: ignore[no-any-return]

    def forward(self, features: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        x = self.proj(self.standardise(features.float()))
        x = x + self.position_embedding(positions)
        valid = valid.bool()
        for layer in self.layers:
            norm1, attn, norm2, ff = (layer[i] for i in range(4))  # type: ignore[index]
            x = attn(norm1(x), valid) + x
            x = ff(norm2(x)) + x
        return F.relu(self.gene_head(x[:, 0]))


@dataclass
class ModelMeta:
    """Everything about a trained model except its tensors."""

    genes: list[str]
    head: dict[str, Any]
    encoder: str
    encoder_weights_sha256: str
    spot_um: float
    context_um: float
    neighbour_offsets_um: list[list[float]]  # (x, y) offsets of the attention group; [0, 0] first
    normalisation: dict[str, Any] = field(default_factory=lambda: {"kind": "log1p_cp10k", "target_sum": 1e4})
    units: str = "log1p(counts per 10k)"
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    software_version: str = ""
    name: str = "model"
    format: str = CHECKPOINT_FORMAT


@dataclass
class Model:
    meta: ModelMeta
    head: HisToSGEHead
    source: str = ""
    sha256: str = ""

    @property
    def n_genes(self) -> int:
        return len(self.meta.genes)


def _paths(path: Path) -> tuple[Path, Path]:
    if path.is_dir() or path.suffix == "":
        return path / "model.json", path / "model.safetensors"
    stem = path.with_suffix("")
    return stem.with_suffix(".json"), stem.with_suffix(".safetensors")


def save_model(model: Model, path: str | Path, *, half: bool = False) -> Path:
    """Write ``path/model.json`` + ``path/model.safetensors`` (weights optionally as float16)."""
    from safetensors.torch import save_file

    from . import __version__

    path = Path(path)
    if path.suffix == "":
        path.mkdir(parents=True, exist_ok=True)
    meta_path, weights_path = _paths(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.head.state_dict().items()}
    if half:
        tensors = {
            k: (v.half() if v.is_floating_point() and not k.startswith("feature_") else v) for k, v in tensors.items()
        }
    model.meta.software_version = __version__
    save_file(tensors, str(weights_path), metadata={"format": CHECKPOINT_FORMAT})
    meta = asdict(model.meta)
    meta["weights_sha256"] = _sha256(weights_path)
    meta_path.write_text(json.dumps(meta, indent=1))
    return path


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_model(path: str | Path) -> Model:
    """Load a checkpoint (safetensors + JSON). Never unpickles."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    meta_path, weights_path = _paths(path)
    if not meta_path.is_file() or not weights_path.is_file():
        raise ModelError(
            f"{path}: not a model checkpoint (expected {meta_path.name} and {weights_path.name}); "
            "pass a folder written by `wsi-histosge train`"
        )
    try:
        raw = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{meta_path}: invalid JSON ({exc})") from exc
    if raw.get("format") != CHECKPOINT_FORMAT:
        raise ModelError(f"{meta_path}: unknown checkpoint format {raw.get('format')!r}; expected {CHECKPOINT_FORMAT}")
    digest = raw.pop("weights_sha256", None)
    actual = _sha256(weights_path)
    if digest is not None and digest != actual:
        raise ModelError(
            f"{weights_path}: weights do not match the hash in {meta_path.name}; the checkpoint is "
            "corrupt or its files were mixed up"
        )
    meta = ModelMeta(**{k: v for k, v in raw.items() if k in ModelMeta.__dataclass_fields__})
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelError(f"{weights_path}: not a valid safetensors file ({exc})") from exc
    head = HisToSGEHead(HeadConfig(**meta.head))
    try:
        head.load_state_dict({k: v.float() for k, v in tensors.items()})
    except RuntimeError as exc:
        raise ModelError(f"{weights_path}: tensors do not fit the head described in {meta_path.name}: {exc}") from exc
    head.eval()
    # The model's identity covers its weights and everything in its JSON that shapes predictions
    # (genes, neighbour offsets, geometry, encoder): a changed JSON is a different model.
    identity = hashlib.sha256((actual + json.dumps(raw, sort_keys=True)).encode()).hexdigest()
    return Model(meta, head, source=str(path), sha256=identity)


def default_model_path() -> Path:
    """The model shipped inside the package (trained on HER2+ breast legacy ST; see examples/)."""
    return Path(__file__).parent / "models" / "her2st-effnetlite0"
