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
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .encoders import TTA_ROTATIONS, get_encoder_cfg
from .errors import DataFormatError, InputNotFoundError, ModelError
from .trust import TENSOR_PREFIX, Trust, trust_from_checkpoint

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
    tta: str = "none"  # test-time augmentation of features (encoders.TTA_ROTATIONS), used by every run
    normalisation: dict[str, Any] = field(default_factory=lambda: {"kind": "log1p_cp10k", "target_sum": 1e4})
    units: str = "log1p(counts per 10k)"
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    trust: dict[str, Any] = field(default_factory=dict)  # novelty/uncertainty (trust.Trust.meta); {}: none
    software_version: str = ""
    name: str = "model"
    format: str = CHECKPOINT_FORMAT


@dataclass
class Model:
    meta: ModelMeta
    head: HisToSGEHead
    source: str = ""
    sha256: str = ""
    trust: Trust | None = None  # novelty and uncertainty of each cell; None for models trained without

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
    if model.trust is not None:
        tensors.update(model.trust.tensors())
        model.meta.trust = model.trust.meta()
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

#: The keys every model.json must have (the fields of ModelMeta without a default).
_REQUIRED_META = tuple(
    name for name, f in ModelMeta.__dataclass_fields__.items() if f.default is MISSING and f.default_factory is MISSING
)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_finite_positive(value: Any) -> bool:
    return _is_number(value) and math.isfinite(value) and value > 0


def _is_str(value: Any) -> bool:
    return isinstance(value, str)


def _is_object(value: Any) -> bool:
    return isinstance(value, dict)


def _is_offset_list(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(o, list) and len(o) == 2 and all(_is_number(v) for v in o) for o in value)
        and all(math.isfinite(v) for o in value for v in o)
    )


def _is_head_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value <= _MAX_HEAD_INT


#: (key, rule its value must pass, what it must be): ``{value!r}`` and ``{type}`` name what was found.
_Rule = tuple[str, Callable[[Any], bool], str]

#: Top-level fields of model.json, in the order they are checked; those present are checked (the
#: required ones always are).
_META_RULES: tuple[_Rule, ...] = (
    *((k, _is_finite_positive, "must be a positive number of µm, got {value!r}") for k in ("spot_um", "context_um")),
    *(
        (k, _is_str, "must be a string, got {type}")
        for k in ("encoder", "encoder_weights_sha256", "name", "units", "software_version")
    ),
    *((k, _is_object, "must be an object, got {type}") for k in ("normalisation", "training", "metrics", "trust")),
    ("neighbour_offsets_um", _is_offset_list, "must be a non-empty list of finite (x, y) offset pairs in µm"),
    (
        "neighbour_offsets_um",
        lambda offsets: offsets[0] == [0, 0],
        "must start with [0, 0] (the spot itself), starts with {value[0]}",
    ),
    ("head", _is_object, "must be an object, got {type}"),
    (
        "tta",
        lambda v: isinstance(v, str) and v in TTA_ROTATIONS,
        f"must be one of {sorted(TTA_ROTATIONS)}, got {{value!r}}",
    ),
)

_HEAD_INT_WHAT = f"must be a positive integer up to {_MAX_HEAD_INT}, got {{value!r}}"

#: The head's sizes; a null mlp_dim means the model width.
_HEAD_SIZE_RULES: tuple[_Rule, ...] = (
    *((k, _is_head_int, _HEAD_INT_WHAT) for k in _HEAD_INTS),
    ("mlp_dim", lambda v: v is None or _is_head_int(v), _HEAD_INT_WHAT),
)

#: Checked after the sizes and after 'in_dim' and 'n_genes' are known to be there.
_HEAD_OPTION_RULES: tuple[_Rule, ...] = (
    ("dropout", lambda v: _is_number(v) and 0 <= v < 1, "must be a number in [0, 1), got {value!r}"),
    ("position_scale_um", _is_finite_positive, "must be a positive number, got {value!r}"),
    ("position_mode", lambda v: v in POSITION_MODES, f"must be one of {POSITION_MODES}, got {{value!r}}"),
)

_Problem = tuple[str, str] | None


def _first_broken_rule(values: dict[str, Any], rules: tuple[_Rule, ...], prefix: str = "") -> _Problem:
    """(key, what is wrong) for the first rule a present key breaks, or None."""
    for key, rule, what in rules:
        if key in values and not rule(values[key]):
            value = values[key]
            return prefix + key, what.format(value=value, type=type(value).__name__)
    return None


def _genes_problem(genes: Any) -> _Problem:
    """Gene names: a non-empty list of distinct non-empty strings."""
    if not isinstance(genes, list) or not genes or not all(isinstance(g, str) and g for g in genes):
        return "genes", "must be a non-empty list of gene names (strings)"
    if len(set(genes)) != len(genes):
        seen: set[str] = set()
        dup = next(g for g in genes if g in seen or seen.add(g))  # type: ignore[func-returns-value]
        return "genes", f"names a gene twice ({dup!r})"
    return None


def _head_problem(head: dict[str, Any], n_genes: int) -> _Problem:
    """The head's fields: known names, sizes, the two it cannot do without, options, one output per gene."""
    unknown = sorted(set(head) - set(HeadConfig.__dataclass_fields__))
    if unknown:
        return "head", f"has unknown fields {unknown}"
    problem = _first_broken_rule(head, _HEAD_SIZE_RULES, "head.")
    if problem:
        return problem
    for key in ("in_dim", "n_genes"):
        if key not in head:
            return "head", f"lacks '{key}'"
    problem = _first_broken_rule(head, _HEAD_OPTION_RULES, "head.")
    if problem:
        return problem
    if head["n_genes"] != n_genes:
        return "head.n_genes", f"is {head['n_genes']} but 'genes' lists {n_genes} genes"
    return None


def _gene_means_problem(training: dict[str, Any], n_genes: int) -> _Problem:
    """The training set's mean expression, when recorded: one finite number per gene."""
    means = training.get("gene_means")
    if means is not None and (
        not isinstance(means, list)
        or len(means) != n_genes
        or not all(_is_number(v) and math.isfinite(v) for v in means)
    ):
        return "training.gene_means", f"must be {n_genes} finite numbers, one per gene"
    return None


def _tta_problem(raw: dict[str, Any]) -> _Problem:
    """The augmentation a model runs with must be the one it was trained with, when training recorded it: a
    checkpoint whose 'tta' was removed or edited would otherwise run on features it never saw."""
    trained = raw.get("training", {}).get("tta")
    if isinstance(trained, str) and trained != raw.get("tta", "none"):
        found = f"is {raw['tta']!r}" if "tta" in raw else "is missing"
        return "tta", f"{found} but the model was trained with tta {trained!r} (training.tta)"
    return None


def _check_meta(raw: dict[str, Any], meta_path: Path) -> None:
    """Types and values of a checkpoint's JSON; anything malformed is a :class:`DataFormatError` naming the key."""
    missing = [k for k in ("format", *_REQUIRED_META) if k not in raw]
    if missing:
        raise DataFormatError(f"{meta_path}: lacks the key(s) {', '.join(missing)}; this is not a complete model.json")
    genes = raw["genes"]
    problem = (
        _genes_problem(genes)
        or _first_broken_rule(raw, _META_RULES)
        or _head_problem(raw["head"], len(genes))
        or _gene_means_problem(raw.get("training", {}), len(genes))
        or _tta_problem(raw)
    )
    if problem:
        key, what = problem
        raise DataFormatError(
            f"{meta_path}: '{key}' {what}; the file is corrupt or was edited by hand "
            "(restore the model.json written by `train`)"
        )


def _expected_shapes(cfg: HeadConfig, meta_path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of the head ``cfg`` describes, built on the meta device: nothing is allocated, so a JSON
    claiming a gigantic head cannot exhaust memory."""
    try:
        with torch.device("meta"):
            return {k: tuple(v.shape) for k, v in HisToSGEHead(cfg).state_dict().items()}
    except (RuntimeError, ValueError) as exc:
        raise ModelError(f"{meta_path}: the head it describes cannot be built ({' '.join(str(exc).split())})") from exc


def _shape_mismatch(expected: dict[str, tuple[int, ...]], got: dict[str, tuple[int, ...]]) -> str | None:
    """The first tensor of the wrong shape, else the missing and unexpected names; None when all fit."""
    wrong = sorted(k for k in expected.keys() & got.keys() if expected[k] != got[k])
    if wrong:
        return f"{wrong[0]} is {list(got[wrong[0]])}, the JSON implies {list(expected[wrong[0]])}"
    missing, unexpected = sorted(expected.keys() - got.keys()), sorted(got.keys() - expected.keys())
    if missing or unexpected:
        return f"missing {missing[:3]}, unexpected {unexpected[:3]}"
    return None


def _check_tensors(tensors: dict[str, torch.Tensor], cfg: HeadConfig, weights_path: Path, meta_path: Path) -> None:
    """Names and shapes against the head the JSON describes; values must be finite."""
    detail = _shape_mismatch(_expected_shapes(cfg, meta_path), {k: tuple(v.shape) for k, v in tensors.items()})
    if detail:
        raise ModelError(
            f"{weights_path}: tensors do not fit the head described in {meta_path.name} ({detail}); the two files "
            "belong to different models"
        )
    for k, v in tensors.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise ModelError(f"{weights_path}: tensor {k} holds NaN or infinite values; the model is unusable")
    if bool((tensors["feature_std"] <= 0).any()):
        raise ModelError(f"{weights_path}: feature_std has values <= 0; the model is unusable")


def _checkpoint_files(path: Path) -> tuple[Path, Path]:
    """(model.json, model.safetensors) of the checkpoint at ``path``, both present."""
    meta_path, weights_path = _paths(path)
    if not path.exists() and not meta_path.exists():
        raise InputNotFoundError(f"{path}: model not found; pass a folder written by `wsi-histosge train`")
    if not meta_path.is_file() or not weights_path.is_file():
        raise ModelError(
            f"{path}: not a model checkpoint (expected {meta_path.name} and {weights_path.name}); "
            "pass a folder written by `wsi-histosge train`"
        )
    return meta_path, weights_path


def _read_model_json(meta_path: Path) -> dict[str, Any]:
    """The checkpoint's JSON object, refused when too large, not JSON, not an object or of another format."""
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
    return raw


def _load_tensors(weights_path: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors (safetensors never unpickles); ModelError when the file is not one."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelError(f"{weights_path}: not a valid safetensors file ({exc})") from exc


def _build_head(cfg: HeadConfig, tensors: dict[str, torch.Tensor], weights_path: Path, meta_path: Path) -> HisToSGEHead:
    """The head ``cfg`` describes, holding ``tensors`` (checked first), in eval mode."""
    _check_tensors(tensors, cfg, weights_path, meta_path)
    head = HisToSGEHead(cfg)
    try:
        head.load_state_dict({k: v.float() for k, v in tensors.items()})
    except RuntimeError as exc:
        raise ModelError(f"{weights_path}: tensors do not fit the head described in {meta_path.name}: {exc}") from exc
    head.eval()
    return head


def load_model(path: str | Path) -> Model:
    """Load a checkpoint (safetensors + JSON). Never unpickles.

    A missing path raises :class:`InputNotFoundError`; a malformed JSON :class:`DataFormatError`; weights that
    do not fit the JSON, a wrong format or a folder without the two files :class:`ModelError`.
    """
    path = Path(path)
    meta_path, weights_path = _checkpoint_files(path)
    raw = _read_model_json(meta_path)
    _check_meta(raw, meta_path)
    digest = raw.pop("weights_sha256", None)
    actual = _sha256(weights_path)
    if digest is not None and digest != actual:
        raise ModelError(
            f"{weights_path}: weights do not match the hash in {meta_path.name}; the checkpoint is "
            "corrupt or its files were mixed up"
        )
    meta = ModelMeta(**{k: v for k, v in raw.items() if k in ModelMeta.__dataclass_fields__})
    tensors = _load_tensors(weights_path)
    trust_tensors = {k: tensors.pop(k) for k in list(tensors) if k.startswith(TENSOR_PREFIX)}
    cfg = HeadConfig(**meta.head)
    head = _build_head(cfg, tensors, weights_path, meta_path)
    _check_encoder(meta.encoder, cfg, meta_path)
    trust = None
    if meta.trust or trust_tensors:
        trust = trust_from_checkpoint(meta.trust, trust_tensors, cfg.in_dim, str(meta_path))
    # The model's identity covers its weights and everything in its JSON that shapes predictions
    # (genes, neighbour offsets, geometry, encoder): a changed JSON is a different model.
    identity = hashlib.sha256((actual + json.dumps(raw, sort_keys=True)).encode()).hexdigest()
    return Model(meta, head, source=str(path), sha256=identity, trust=trust)


def _check_encoder(name: str, head_cfg: HeadConfig, meta_path: Path) -> None:
    """The encoder model.json names is known and gives the features the head takes (``timm:`` names are checked
    when the encoder is built, as building one here would be slow)."""
    if name.lower().startswith("timm:"):
        return
    try:
        enc = get_encoder_cfg(name)
    except ModelError:
        raise DataFormatError(
            f"{meta_path}: 'encoder' {name!r} is not a known encoder (see `wsi-histosge encoders`); restore "
            "model.json as training wrote it"
        ) from None
    if enc.embed_dim != head_cfg.in_dim:
        raise ModelError(
            f"{meta_path}: names encoder {name!r} ({enc.embed_dim}-d features) but its head takes "
            f"{head_cfg.in_dim}-d features: model.json and model.safetensors do not belong together; restore the "
            "model folder as training wrote it"
        )


def default_model_path() -> Path:
    """The model shipped inside the package (trained on HER2+ breast legacy ST; see examples/)."""
    return Path(__file__).parent / "models" / "her2st-effnetlite0"
