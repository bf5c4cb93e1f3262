"""Model configs: YAML files (one per variant, as open_clip's JSON configs) and the one factory."""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path

import yaml

from .errors import ConfigError

CONFIG_DIR = Path(str(resources.files("sspsam") / "configs"))


def list_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def load_config(name_or_path: str | Path) -> dict:
    """A bundled variant name ('ssp-sam-vitb') or a YAML path; ``base:`` entries are merged in."""
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIG_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ConfigError(f"no model config '{name_or_path}'; bundled ones: {', '.join(list_configs())}")
    try:
        cfg = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path} must hold a mapping")
    if base := cfg.pop("base", None):
        base_path = Path(base) if Path(base).suffix else CONFIG_DIR / f"{base}.yaml"
        if not base_path.is_absolute() and Path(base).suffix:
            base_path = path.parent / base
        cfg = merge({k: v for k, v in load_config(base_path).items() if k != "name"}, cfg)  # a variant keeps its own name
    cfg.setdefault("name", path.stem)
    return cfg


def merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def build_model(cfg: dict | str | Path):
    """Build an untrained model (random init) from a config dict, variant name or YAML path."""
    if not isinstance(cfg, dict):
        cfg = load_config(cfg)
    arch = cfg.get("model", "ssp-sam")
    for key in ("clip", "sam"):
        if key not in cfg:
            raise ConfigError(f"model config '{cfg.get('name')}' lacks the '{key}' section")
    from .backbones.clip import CLIPBackbone
    from .backbones.sam import SAMBackbone

    clip = CLIPBackbone.from_config({k: v for k, v in cfg["clip"].items() if k != "weights"})
    sam = SAMBackbone.from_config(cfg["sam"])
    if arch == "ssp-sam":
        from .ssp.model import SSPSAM

        return SSPSAM(clip, sam, cfg.get("ssp", {}), config=cfg)
    if arch == "escnet":
        from .ovss.escnet import ESCNet

        return ESCNet(clip, sam, cfg.get("escnet", {}), config=cfg)
    if arch == "sam-mi":
        from .ovss.sam_mi import SAMMI

        return SAMMI(clip, sam, cfg.get("sam_mi", {}), config=cfg)
    if arch == "zeroshot":
        from .zeroshot.pipeline import ZeroShot

        return ZeroShot(clip, sam, cfg.get("zeroshot", {}), config=cfg)
    raise ConfigError(f"unknown model type '{arch}' in config '{cfg.get('name')}'")
