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
from dataclasses import MISSING, asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import DataFormatError, InputNotFoundError, ModelError

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


#: Largest model.json we parse (bytes): gene lists and means of ~40k genes are a few MB.
MAX_MODEL_JSON_BYTES = 64 * 2**20
_HEAD_INTS = ("in_dim", "n_genes", "dim", "depth", "heads", "dim_head", "hidden", "n_frequencies")
#: No head field is anywhere near this (the widest encoders are ~2k-d, gene panels ~40k).
_MAX_HEAD_INT = 2**24


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_meta(raw: dict[str, Any], meta_path: Path) -> None:
    """Types and values of a checkpoint's JSON; anything malformed is a :class:`DataFormatError` naming the key."""

    def bad(key: str, what: str) -> DataFormatError:
        return DataFormatError(
            f"{meta_path}: '{key}' {what}; the file is corrupt or was edited by hand "
            "(restore the model.json written by `train`)"
        )

    required = [
        name
        for name, f in ModelMeta.__dataclass_fields__.items()
        if f.default is MISSING and f.default_factory is MISSING
    ]
    missing = [k for k in ("format", *required) if k not in raw]
    if missing:
        raise DataFormatError(f"{meta_path}: lacks the key(s) {', '.join(missing)}; this is not a complete model.json")
    genes = raw["genes"]
    if not isinstance(genes, list) or not genes or not all(isinstance(g, str) and g for g in genes):
        raise bad("genes", "must be a non-empty list of gene names (strings)")
    if len(set(genes)) != len(genes):
        seen: set[str] = set()
        dup = next(g for g in genes if g in seen or seen.add(g))  # type: ignore[func-returns-value]
        raise bad("genes", f"names a gene twice ({dup!r})")
    for key in ("spot_um", "context_um"):
        if not _is_number(raw[key]) or not math.isfinite(raw[key]) or raw[key] <= 0:
            raise bad(key, f"must be a positive number of µm, got {raw[key]!r}")
    for key in ("encoder", "encoder_weights_sha256"):
        if not isinstance(raw[key], str):
            raise bad(key, f"must be a string, got {type(raw[key]).__name__}")
    for key in ("name", "units", "software_version"):
        if key in raw and not isinstance(raw[key], str):
            raise bad(key, f"must be a string, got {type(raw[key]).__name__}")
    for key in ("normalisation", "training", "metrics"):
        if key in raw and not isinstance(raw[key], dict):
            raise bad(key, f"must be an object, got {type(raw[key]).__name__}")
    offsets = raw["neighbour_offsets_um"]
    if (
        not isinstance(offsets, list)
        or not offsets
        or not all(isinstance(o, list) and len(o) == 2 and all(_is_number(v) for v in o) for o in offsets)
        or not all(math.isfinite(v) for o in offsets for v in o)
    ):
        raise bad("neighbour_offsets_um", "must be a non-empty list of finite (x, y) offset pairs in µm")
    if offsets[0] != [0, 0]:
        raise bad("neighbour_offsets_um", f"must start with [0, 0] (the spot itself), starts with {offsets[0]}")
    head = raw["head"]
    if not isinstance(head, dict):
        raise bad("head", f"must be an object, got {type(head).__name__}")
    unknown = sorted(set(head) - set(HeadConfig.__dataclass_fields__))
    if unknown:
        raise bad("head", f"has unknown fields {unknown}")
    for key in (*_HEAD_INTS, "mlp_dim"):
        if key not in head or (key == "mlp_dim" and head[key] is None):  # mlp_dim null: the model width
            continue
        value = head[key]
        if not (isinstance(value, int) and not isinstance(value, bool) and 0 < value <= _MAX_HEAD_INT):
            raise bad(f"head.{key}", f"must be a positive integer up to {_MAX_HEAD_INT}, got {value!r}")
    for key in ("in_dim", "n_genes"):
        if key not in head:
            raise bad("head", f"lacks '{key}'")
    if "dropout" in head and not (_is_number(head["dropout"]) and 0 <= head["dropout"] < 1):
        raise bad("head.dropout", f"must be a number in [0, 1), got {head['dropout']!r}")
    scale = head.get("position_scale_um", 1.0)
    if not (_is_number(scale) and math.isfinite(scale) and scale > 0):
        raise bad("head.position_scale_um", f"must be a positive number, got {scale!r}")
    if head.get("position_mode", POSITION_MODES[0]) not in POSITION_MODES:
        raise bad("head.position_mode", f"must be one of {POSITION_MODES}, got {head.get('position_mode')!r}")
    if head["n_genes"] != len(genes):
        raise bad("head.n_genes", f"is {head['n_genes']} but 'genes' lists {len(genes)} genes")
    means = raw.get("training", {}).get("gene_means")
    if means is not None and (
        not isinstance(means, list)
        or len(means) != len(genes)
        or not all(_is_number(v) and math.isfinite(v) for v in means)
    ):
        raise bad("training.gene_means", f"must be {len(genes)} finite numbers, one per gene")


def _check_tensors(tensors: dict[str, torch.Tensor], cfg: HeadConfig, weights_path: Path, meta_path: Path) -> None:
    """Names and shapes against the head the JSON describes, built on the meta device (nothing allocated, so a
    JSON claiming a gigantic head cannot exhaust memory); values must be finite."""
    try:
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in HisToSGEHead(cfg).state_dict().items()}
    except (RuntimeError, ValueError) as exc:
        raise ModelError(f"{meta_path}: the head it describes cannot be built ({' '.join(str(exc).split())})") from exc
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    wrong = sorted(k for k in expected.keys() & got.keys() if expected[k] != got[k])
    missing, unexpected = sorted(expected.keys() - got.keys()), sorted(got.keys() - expected.keys())
    if wrong or missing or unexpected:
        detail = (
            f"{wrong[0]} is {list(got[wrong[0]])}, the JSON implies {list(expected[wrong[0]])}"
            if wrong
            else f"missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
        raise ModelError(
            f"{weights_path}: tensors do not fit the head described in {meta_path.name} ({detail}); the two files "
            "belong to different models"
        )
    for k, v in tensors.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise ModelError(f"{weights_path}: tensor {k} holds NaN or infinite values; the model is unusable")
    if bool((tensors["feature_std"] <= 0).any()):
        raise ModelError(f"{weights_path}: feature_std has values <= 0; the model is unusable")


def load_model(path: str | Path) -> Model:
    """Load a checkpoint (safetensors + JSON). Never unpickles.

    A missing path raises :class:`InputNotFoundError`; a malformed JSON :class:`DataFormatError`; weights that
    do not fit the JSON, a wrong format or a folder without the two files :class:`ModelError`.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    meta_path, weights_path = _paths(path)
    if not path.exists() and not meta_path.exists():
        raise InputNotFoundError(f"{path}: model not found; pass a folder written by `wsi-histosge train`")
    if not meta_path.is_file() or not weights_path.is_file():
        raise ModelError(
            f"{path}: not a model checkpoint (expected {meta_path.name} and {weights_path.name}); "
            "pass a folder written by `wsi-histosge train`"
        )
    if meta_path.stat().st_size > MAX_MODEL_JSON_BYTES:
        raise DataFormatError(f"{meta_path}: {meta_path.stat().st_size} bytes, too large for a model's JSON")
    try:
        raw = json.loads(meta_path.read_bytes())
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise DataFormatError(
            f"{meta_path}: not valid JSON ({' '.join(str(exc).split())}); restore the model.json written by `train`"
        ) from exc
    if not isinstance(raw, dict):
        raise DataFormatError(f"{meta_path}: holds a JSON {type(raw).__name__}, not a model description (an object)")
    if "format" in raw and raw["format"] != CHECKPOINT_FORMAT:
        raise ModelError(f"{meta_path}: unknown checkpoint format {raw['format']!r}; expected {CHECKPOINT_FORMAT}")
    _check_meta(raw, meta_path)
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
    cfg = HeadConfig(**meta.head)
    _check_tensors(tensors, cfg, weights_path, meta_path)
    head = HisToSGEHead(cfg)
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
