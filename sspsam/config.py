"""Model configs: YAML files (one per variant, as open_clip's JSON configs) and the one factory."""

from __future__ import annotations

import copy
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


MODEL_TYPES = ("ssp-sam", "escnet", "sam-mi", "zeroshot")
_SECTIONS = ("clip", "sam", "ssp", "escnet", "sam_mi", "zeroshot", "train", "loss", "inference")
_ARCH_SECTIONS = ("clip", "sam", "ssp", "escnet", "sam_mi", "zeroshot")
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


def validate_config(cfg) -> dict:
    """A config checked before anything is built: model type, section types, value types and ranges,
    and a size estimate — so a bad file is one named error, not a traceback or an exhausted machine."""
    if not isinstance(cfg, dict):
        raise ConfigError(f"a model config must be a mapping, got {type(cfg).__name__}")
    name = cfg.get("name", "?")
    _check_size(cfg, str(name)[:100])
    if not isinstance(name, str):
        raise ConfigError(f"model config 'name' must be text, got {type(name).__name__}")
    arch = cfg.get("model", "ssp-sam")
    if not isinstance(arch, str) or arch not in MODEL_TYPES:
        raise ConfigError(f"unknown model type {arch!r} in config '{name}' (known: {', '.join(MODEL_TYPES)})")
    for key in ("clip", "sam"):
        if key not in cfg:
            raise ConfigError(f"model config '{name}' lacks the '{key}' section")
    for key in _SECTIONS:
        if key in cfg and not isinstance(cfg[key], dict):
            raise ConfigError(f"model config '{name}': section '{key}' must be a mapping, got {type(cfg[key]).__name__}")
    est = sum(_check_values(cfg[k], k, name) for k in _ARCH_SECTIONS if k in cfg)
    if est > MAX_PARAMS:
        raise ConfigError(f"model config '{name}' describes about {est:,} parameters, over the {MAX_PARAMS:,} limit")
    for key, value in cfg.get("inference", {}).items():  # thresholds and scales: plain finite numbers
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or abs(value) == float("inf"):
            raise ConfigError(f"model config '{name}': 'inference.{key}' is {str(value)[:40]!r}; expected a number")
    for key in ("weights", "arch", "encoder"):
        for sec in ("clip", "sam"):
            if key in cfg[sec] and not isinstance(cfg[sec][key], str):
                raise ConfigError(f"model config '{name}': '{sec}.{key}' must be text")
    return cfg
