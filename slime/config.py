"""Configuration: one frozen, keyword-only dataclass per component, nested into one run config.

YAML is only the serialisation: defaults <- YAML <- ``key=value`` overrides (dotted keys). An unknown
key is an error naming the key; ``__post_init__`` errors name the field.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

ConnectorKind = Literal["mlp", "sti", "sci", "dci"]
GlobalKind = Literal["mlp", "moa"]
SelectionKind = Literal["topk", "nucleus"]
ScoreKind = Literal["mean", "sum"]
SelectorText = Literal["instruction", "prompt"]
NoiseKind = Literal["relative", "absolute"]
CompressorKind = Literal["local", "upstream"]
TilingKind = Literal["area", "grid"]
GlobalViewKind = Literal["resize", "pad"]
VisualMode = Literal["global", "local", "both"]
TemplateName = Literal["plain", "vicuna_v1", "llama3", "llama3_dc", "chatml"]
OverflowPolicy = Literal["drop", "truncate_prompt"]


@dataclass(frozen=True, kw_only=True)
class VisionConfig:
    """Frozen vision tower. ``path`` (local dir or s3://) loads HF weights; without it the tower is
    built from the architecture fields below (random init, used by the tiny preset and tests)."""

    kind: Literal["clip", "siglip"] = "clip"
    path: str | None = None
    image_size: int = 336
    patch_size: int = 14
    hidden_dim: int = 1024
    intermediate_dim: int = 4096
    num_layers: int = 24  # blocks actually run (SigLIP: after its last block is removed)
    num_heads: int = 16
    select_layer: int = -2  # HF hidden_states index of the base feature (CLIP -2, SigLIP -1)

    def __post_init__(self) -> None:
        # No divisibility check: the patch conv floors, e.g. SigLIP-so400m 384 / 14 -> 27 x 27 = 729 patches.
        if self.image_size < self.patch_size:
            raise ValueError(f"vision.image_size {self.image_size} is smaller than vision.patch_size {self.patch_size}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def base_index(self) -> int:
        """Non-negative hidden_states index of the base feature V_L (hidden_states has num_layers+1 entries)."""
        return self.select_layer % (self.num_layers + 1)


@dataclass(frozen=True, kw_only=True)
class ConnectorConfig:
    """Dense Connector fusion of tapped layers (MODEL_SPEC B1-B2). ``mlp`` = base layer only."""

    kind: ConnectorKind = "mlp"
    extra_layers: tuple[int, ...] = (7, 15)  # HF hidden_states indices for STI/SCI (paper layers 8, 16)
    sti_pool: int = 8  # 1-D average pool kernel = stride along the raster token axis
    dci_groups: int = 2

    def __post_init__(self) -> None:
        if self.sti_pool < 1:
            raise ValueError(f"connector.sti_pool must be >= 1, got {self.sti_pool}")
        if self.dci_groups < 1:
            raise ValueError(f"connector.dci_groups must be >= 1, got {self.dci_groups}")


@dataclass(frozen=True, kw_only=True)
class GlobalConfig:
    """Global branch: ``moa`` = mixture of adapters (MLP expert + attention expert, per-token gate)."""

    kind: GlobalKind = "moa"
    num_heads: int = 8
    gate_noise: bool = True  # noisy gating in training (softplus(x W_g) + 0.01 scale, MODEL_SPEC A2)


@dataclass(frozen=True, kw_only=True)
class LocalConfig:
    """Local branch: QueryCompressor per crop + TextGuidedSelector (slime/local.py says why the defaults)."""

    num_queries: int = 144
    num_heads: int = 8
    compressor: CompressorKind = "local"  # local: each query starts on its own cell; upstream: no prior
    gamma: float = 1.0  # kept fraction of local tokens
    selection: SelectionKind = "topk"
    score: ScoreKind = "mean"  # mean cosine over instruction tokens (paper) or their sum (upstream code)
    # which text tokens the selector scores against: the user's question (default, no answer leakage) or
    # the whole prompt but the image and the answers (upstream: system prompt, role markup and question)
    text: SelectorText = "instruction"
    noise: NoiseKind = "relative"  # relative: noise_std * std of the scores; absolute: noise_std itself
    noise_std: float = 0.1
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if math.isqrt(self.num_queries) ** 2 != self.num_queries:
            raise ValueError(f"local.num_queries must be a perfect square (a query grid), got {self.num_queries}")
        if not 0.0 < self.gamma <= 1.0:
            raise ValueError(f"local.gamma must be in (0, 1], got {self.gamma}")
        if self.noise_std < 0:
            raise ValueError(f"local.noise_std must be >= 0, got {self.noise_std}")


@dataclass(frozen=True, kw_only=True)
class TilingConfig:
    """``area`` = released code's rule (2-7 crops, global view resized); ``grid`` = paper's m x n search."""

    kind: TilingKind = "area"
    global_view: GlobalViewKind = "resize"
    min_crops: int = 2
    max_crops: int = 7
    max_grid: int = 6  # paper grid search: m, n in 1..max_grid
    max_pixels: int = 40_000_000  # decode refuses larger images (decompression bombs)

    def __post_init__(self) -> None:
        if not 1 <= self.min_crops <= self.max_crops:
            raise ValueError(f"tiling.min_crops/max_crops must satisfy 1 <= min <= max, got {self.min_crops}/{self.max_crops}")

    @property
    def max_tiles(self) -> int:
        """Tiles per sample including the global view (batches are padded to this)."""
        return 1 + (self.max_crops if self.kind == "area" else self.max_grid * self.max_grid)


@dataclass(frozen=True, kw_only=True)
class LLMConfig:
    """Any HF causal LM. ``path`` loads a checkpoint; otherwise built from these fields."""

    kind: Literal["llama", "qwen2"] = "llama"
    path: str | None = None
    hidden_dim: int = 4096
    intermediate_dim: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    vocab_size: int = 32000
    max_position: int = 4096
    attn_implementation: str = "sdpa"


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    global_branch: GlobalConfig = field(default_factory=GlobalConfig)
    local: LocalConfig = field(default_factory=LocalConfig)
    tiling: TilingConfig = field(default_factory=TilingConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    tokenizer_path: str | None = None  # default: the LLM path
    template: TemplateName = "vicuna_v1"
    separator: str = ","  # its word embedding separates the global and local blocks
    max_length: int = 2048
    overflow: OverflowPolicy = "drop"  # a too-long sample is dropped and counted; answers are never cut
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # which visual tokens serving, evaluation and explain feed unless a request or config says otherwise
    # (a converted Dense Connector release: "global", it has no trained local branch)
    visual_mode: VisualMode = "both"

    def __post_init__(self) -> None:
        if self.max_length < 16:
            raise ValueError(f"max_length must be >= 16, got {self.max_length}")


# --------------------------------------------------------------------------- (de)serialisation


def to_dict(cfg: Any) -> Any:
    """Dataclass -> plain YAML-able dict (tuples become lists)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


class _Scalar(str):
    """A YAML scalar as written (``1.10``, ``2024``, ``007``) beside what YAML makes of it: a ``str`` field
    keeps the text, every other type takes the parsed value."""

    parsed: Any

    def __new__(cls, text: str, parsed: Any) -> "_Scalar":
        obj = super().__new__(cls, text)
        obj.parsed = parsed
        return obj


def _yaml_keeping_text(text: str) -> Any:
    """``yaml.safe_load`` whose unquoted non-string scalars remember their text (see ``_Scalar``)."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        return None if node is None else _wrap(loader, node)
    finally:
        loader.dispose()


def _wrap(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)  # YAML merge keys (<<)
        return {loader.construct_object(k, deep=True): _wrap(loader, v) for k, v in node.value}
    if isinstance(node, yaml.SequenceNode):
        return [_wrap(loader, v) for v in node.value]
    parsed = loader.construct_object(node, deep=True)
    return parsed if isinstance(parsed, str) or node.style else _Scalar(node.value, parsed)


def _plain(value: Any) -> Any:
    """Strip ``_Scalar`` wrappers (for untyped fields, which are stored and dumped as they are)."""
    if isinstance(value, _Scalar):
        return value.parsed
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return value


def _wants_text(tp: Any) -> bool:
    if tp is str:
        return True
    if typing.get_origin(tp) is Literal:
        return all(isinstance(a, str) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return str in typing.get_args(tp)
    return False


def _coerce(tp: Any, value: Any, name: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if isinstance(value, _Scalar):
        keep = _wants_text(tp) and not (value.parsed is None and type(None) in args)
        value = str(value) if keep else value.parsed
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"{name}: expected a mapping, got {value!r}")
        return from_dict(tp, value, prefix=f"{name}.")
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{name}: {value!r} is not one of {list(args)}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, name)
            except (ValueError, TypeError) as e:
                errors.append(str(e))
        raise ValueError(f"{name}: {value!r} does not match {tp} ({'; '.join(errors)})")
    if origin in (tuple, list):
        if isinstance(value, str):
            value = _yaml_keeping_text(value)
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{name}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:  # fixed length: tuple[float, float]
            if len(value) != len(args):
                raise ValueError(f"{name}: expected {len(args)} items, got {len(value)} ({value!r})")
            return tuple(_coerce(t, v, f"{name}[{i}]") for i, (t, v) in enumerate(zip(args, value)))
        inner = args[0] if args else Any
        items = [_coerce(inner, v, f"{name}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{name}: expected a mapping, got {value!r}")
        return _plain(dict(value))
    if tp is Any:
        return _plain(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ValueError(f"{name}: expected a boolean, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ValueError(f"{name}: expected an integer, got {value!r}")
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name}: expected an integer, got {value!r}") from None
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name}: expected a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ValueError(f"{name}: expected a string, got {value!r}")
        return str(value)
    return _plain(value)


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping; unknown keys are errors that name the key."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown config key {prefix}{unknown[0]!s} (valid keys of {cls.__name__}: {sorted(names)})")
    kwargs = {k: _coerce(hints[k], v, f"{prefix}{k}") for k, v in data.items()}
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError(f"missing required config key {prefix}{missing[0]}")
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        child = node.get(p)
        if child is None:
            child = node[p] = {}
        if not isinstance(child, dict):
            raise ValueError(f"override {key}: {p} is not a section")
        node = child
    node[parts[-1]] = value


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), _yaml_keeping_text(raw) if raw else "")
    return tree


def load_config(cls: type, path: str | None = None, overrides: list[str] | None = None,
                base: dict[str, Any] | None = None) -> Any:
    """defaults <- ``base`` <- YAML file <- ``key=value`` overrides."""
    data: dict[str, Any] = dict(base or {})
    if path:
        with open(path) as f:
            loaded = _yaml_keeping_text(f.read()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: top level must be a mapping")
        data = merge(data, loaded)
    data = merge(data, parse_overrides(overrides or []))
    return from_dict(cls, data)


def replace(cfg: Any, **changes: Any) -> Any:
    return dataclasses.replace(cfg, **changes)
