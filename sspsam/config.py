"""Model configs: YAML files (one per variant, as open_clip's JSON configs) and the one factory."""

from __future__ import annotations

import copy
import difflib
import types
import typing
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path

import yaml

from sspsam.errors import ConfigError

CONFIG_DIR = Path(str(resources.files("sspsam") / "configs"))


def list_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def load_config(name_or_path: str | Path, _depth: int = 0) -> dict:
    """A bundled variant name ('ssp-sam-vitb') or a YAML path; ``base:`` entries are merged in."""
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIG_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ConfigError(f"no model config '{name_or_path}'; bundled ones: {', '.join(list_configs())}")
    try:
        cfg = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:  # one line: the problem and where, not PyYAML's multi-line excerpt
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path} is not valid YAML: {what}{where}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the model config {path}: {exc}") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path} must hold a mapping")
    _check_size(cfg, str(path))
    if base := cfg.pop("base", None):
        if not isinstance(base, str):
            raise ConfigError(f"{path}: 'base' must be a variant name or a YAML path")
        base_path = Path(base) if Path(base).suffix else CONFIG_DIR / f"{base}.yaml"
        if not base_path.is_absolute() and Path(base).suffix:
            base_path = path.parent / base
        if _depth >= 8:
            raise ConfigError(f"{path}: more than 8 levels of 'base:' (a config that includes itself?)")
        # a variant keeps its own name
        cfg = merge({k: v for k, v in load_config(base_path, _depth + 1).items() if k != "name"}, cfg)
    cfg.setdefault("name", path.stem)
    return cfg


def merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


# The sections every config may have beside its method's own (see ``sspsam.models.registry``).
COMMON_SECTIONS = ("clip", "sam", "train", "loss", "inference")
# Ceilings far above any published variant (SAM ViT-H, CLIP ViT-bigG): a config past them is a
# typo or hostile, and would otherwise allocate until the machine runs out of memory.
_INT_CAPS = {"vocab_size": 1_000_000, "image_size": 4096, "img_size": 4096, "clip_size": 4096,
             "context_length": 4096, "heads": 256, "num_heads": 256, "decoder_heads": 256,
             "layers": 1024, "depth": 1024, "pg_layers": 1024, "blocks": 1024, "vaa_mlp_layers": 1024}
_INT_CAP = 65_536
_WIDTHS = ("width", "embed_dim", "d_model", "dim", "prompt_dim", "pg_ffn", "decoder_mlp_dim", "text_dim", "point_dim")
_DEPTHS = ("layers", "depth", "pg_layers", "blocks", "vaa_mlp_layers")
MAX_PARAMS = 3_000_000_000  # 12 GB of fp32 weights; SAM ViT-H + CLIP ViT-L are ~1 G


def _check_values(node, where: str, name: str) -> int:
    """Types and ranges of every value under an architecture section; returns a rough parameter count."""
    if isinstance(node, dict):
        est, width, depth = 0, 0, 0
        for k, v in node.items():
            if not isinstance(k, str):
                raise ConfigError(f"model config '{name}': key {k!r} in '{where}' is not text")
            est += _check_values(v, f"{where}.{k}", name)
            if k in _WIDTHS and isinstance(v, int):
                width = max(width, v)
            if k in _DEPTHS and isinstance(v, int):
                depth += v
        vocab = node.get("vocab_size", 0) if isinstance(node.get("vocab_size", 0), int) else 0
        return est + 12 * width * width * max(depth, 1) + vocab * width
    if isinstance(node, list):
        if len(node) > 4096:
            raise ConfigError(f"model config '{name}': '{where}' has {len(node)} entries")
        return sum(_check_values(v, f"{where}[{i}]", name) for i, v in enumerate(node))
    if isinstance(node, bool) or node is None or isinstance(node, str):
        return 0
    if isinstance(node, int):
        cap = _INT_CAPS.get(where.rsplit(".", 1)[-1], _INT_CAP)
        if not -1 <= node <= cap:
            raise ConfigError(f"model config '{name}': '{where}' is {node}; expected a whole number from -1 to {cap:,}")
        return 0
    if isinstance(node, float):
        if node != node or node in (float("inf"), float("-inf")):
            raise ConfigError(f"model config '{name}': '{where}' is {node}; expected a finite number")
        return 0
    raise ConfigError(f"model config '{name}': '{where}' is a {type(node).__name__}; expected a number, text, list or mapping")


def _check_size(cfg, name: str, max_nodes: int = 100_000, max_depth: int = 32) -> None:
    """YAML aliases can make a small file a huge (or cyclic) tree: bound it before walking or copying it."""
    stack, seen = [(cfg, 0)], 0
    while stack:
        node, depth = stack.pop()
        seen += 1
        if seen > max_nodes or depth > max_depth:
            raise ConfigError(f"model config '{name}' is too large or too deeply nested (YAML aliases?)")
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)


# ---- typed sections ------------------------------------------------------------------------
# One dataclass per section: its keys, their types and defaults. A key no dataclass names is
# refused with its path; ``None`` in an architecture section means "the model's own default".


@dataclass(frozen=True)
class ClipConfig:
    arch: str | None = None  # an open_clip architecture name, or explicit embed_dim / vision / text
    embed_dim: int | None = None
    vision: dict = field(default_factory=dict)
    text: dict = field(default_factory=dict)
    quick_gelu: bool = True
    surgery_layers: int = 6
    weights: str | None = None  # a `sspsam weights` name: pretrained CLIP from the weights cache


@dataclass(frozen=True)
class SamConfig:
    encoder: str = "vit_b"
    img_size: int = 1024
    prompt_dim: int = 256
    encoder_overrides: dict | None = None
    decoder_mlp_dim: int = 2048
    decoder_heads: int = 8
    image_encoder: bool = True
    weights: str | None = None


@dataclass(frozen=True)
class TrainConfig:
    freeze: list = field(default_factory=list)  # sub-modules kept frozen, e.g. [clip, sam.image_encoder]
    lr: float | None = None  # None: the method's default (registry)
    backbone_lr: float | None = None
    weight_decay: float | None = None
    clip_grad: float | None = None
    grad_clip: float | None = None
    warmup_steps: int | None = None
    total_steps: int | None = None
    split: str = "train"
    augment: bool | None = None
    flip: bool | None = None
    scale_range: list | None = None
    colour_jitter: float | None = None
    schedule: str | dict | None = None
    stages: dict | None = None
    recipe: str | None = None
    loss: str | None = None
    aux_weight: float | None = None


@dataclass(frozen=True)
class LossConfig:
    dice: float = 4.0
    focal: float = 4.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    box_l1: float = 5.0
    box_giou: float = 2.0
    no_target: float = 1.0
    reduction: str = "mean"
    mask_size: int | None = None


@dataclass(frozen=True)
class InferenceConfig:
    mask_threshold: float = 0.0
    no_target_min_pixels: int = 50
    no_target_prob: float = 0.5
    slide_above: float = 1.5
    slide_max_scale: float = 1.67


SECTION_TYPES = {"clip": ClipConfig, "sam": SamConfig, "train": TrainConfig, "loss": LossConfig, "inference": InferenceConfig}


@dataclass(frozen=True)
class ModelConfig:
    """A validated config: ``model`` (its type), the common sections typed, the method's sections in
    ``sections`` (section name → its dataclass) and the checked dict itself in ``raw`` (what the
    model constructors and checkpoints take)."""

    name: str
    model: str
    clip: ClipConfig
    sam: SamConfig
    train: TrainConfig
    loss: LossConfig
    inference: InferenceConfig
    sections: dict
    raw: dict

    def section(self, name: str):
        return self.sections[name]


def _type_ok(value, hint) -> bool:
    if hint is typing.Any or hint is object:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is list:
        return isinstance(value, (list, tuple))
    return isinstance(value, origin or hint)


def _did_you_mean(key: str, known) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def parse_section(schema: type, values, where: str, name: str):
    """``values`` (a mapping) as ``schema``: unknown keys and wrong types refused with their path."""
    if not isinstance(values, dict):
        raise ConfigError(f"model config '{name}': section '{where}' must be a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(schema)
    known = [f.name for f in fields(schema)]
    for key, value in values.items():
        if key not in hints:
            full = [f"{where}.{k}" for k in known]
            raise ConfigError(f"unknown key '{where}.{key}' in config '{name}'" + _did_you_mean(f"{where}.{key}", full))
        if not _type_ok(value, hints[key]):
            raise ConfigError(f"model config '{name}': '{where}.{key}' is {str(value)[:40]!r}; expected {_hint_name(hints[key])}")
    return schema(**values)


def _hint_name(hint) -> str:
    args = typing.get_args(hint)
    if args:
        return " or ".join(_hint_name(a) for a in args)
    return {type(None): "null", float: "a number", int: "a whole number", str: "text", bool: "true/false",
            list: "a list", dict: "a mapping"}.get(hint, getattr(hint, "__name__", str(hint)))


def check_structure(cfg) -> None:
    """What every config must be before its method is looked up: a bounded mapping with a text name."""
    if not isinstance(cfg, dict):
        raise ConfigError(f"a model config must be a mapping, got {type(cfg).__name__}")
    name = cfg.get("name", "?")
    _check_size(cfg, str(name)[:100])
    if not isinstance(name, str):
        raise ConfigError(f"model config 'name' must be text, got {type(name).__name__}")


def typed_config(cfg: dict, model: str, method_sections: dict[str, type], required=("clip", "sam")) -> ModelConfig:
    """A config checked before anything is built — sections and keys (unknown ones refused with
    their path), value types and ranges, and a size estimate — so a bad file is one named error,
    not a traceback or an exhausted machine. ``model``: its method (``sspsam.models.registry``
    looks it up and passes the method's section dataclasses); use
    :func:`sspsam.models.registry.validate`."""
    check_structure(cfg)
    name = cfg.get("name", "?")
    for key in required:
        if key not in cfg:
            raise ConfigError(f"model config '{name}' lacks the '{key}' section")
    schemas = {**SECTION_TYPES, **method_sections}
    for key in cfg:
        if key in ("name", "model"):
            continue
        if key not in schemas:
            raise ConfigError(f"unknown key '{key}' in config '{name}' ({model} configs have sections "
                              f"{', '.join(schemas)})" + _did_you_mean(key, schemas).replace(" (", "; ").rstrip(")"))
    parsed = {key: parse_section(schemas[key], cfg.get(key, {}), key, name) for key in schemas}
    arch = [k for k in cfg if k not in ("name", "model", "train", "loss", "inference")]
    est = sum(_check_values(cfg[k], k, name) for k in arch)
    if est > MAX_PARAMS:
        raise ConfigError(f"model config '{name}' describes about {est:,} parameters, over the {MAX_PARAMS:,} limit")
    for key, value in cfg.get("inference", {}).items():  # thresholds and scales: plain finite numbers
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or abs(value) == float("inf"):
            raise ConfigError(f"model config '{name}': 'inference.{key}' is {str(value)[:40]!r}; expected a number")
    return ModelConfig(name=str(name), model=model, clip=parsed.pop("clip"), sam=parsed.pop("sam"), train=parsed.pop("train"),
                       loss=parsed.pop("loss"), inference=parsed.pop("inference"), sections=parsed, raw=cfg)


def apply_overrides(cfg: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """``--set section.key=value`` (repeatable; the value read as a YAML scalar, e.g. 1e-3, true,
    [a, b]) on a copy of ``cfg``; the result is validated like a file."""
    out = copy.deepcopy(cfg)
    for item in overrides or ():
        key, eq, text = str(item).partition("=")
        key = key.strip()
        if not eq or not key or any(not p.strip() for p in key.split(".")):
            raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. --set train.lr=1e-4")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML") from None
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as text: a number was meant
            try:
                value = float(value) if value.strip().lower() not in ("nan", "inf", "-inf", "+inf", "infinity") else value
            except ValueError:
                pass
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: '{p}' is not a section")
        node[parts[-1]] = value
    return out
