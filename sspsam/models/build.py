"""Building models: from a config (random init), from an sspsam or official SSP-SAM checkpoint
(weights, frozen backbones from the weights cache) and the training-free zeroshot model.

Why a module of its own: config parsing (``sspsam.config``) stays free of model code, and the
methods (``sspsam.models.*``) stay free of file formats; every loader above them comes here.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from sspsam.config import load_config, validate_config
from sspsam.errors import CheckpointError, ConfigError
from sspsam.io.checkpoint import FORMAT_VERSION, _check_crc, _unwrap, load_into, torch_load
from sspsam.models.ssp_sam.official_checkpoint import (CLIP_PREFIX, SAM_ENCODER_PREFIX, _few, convert, normalise_layout,
                                                       variant)

#: the model types that do referring segmentation (phrases); the others do OVSS (class names)
RES_MODELS = ("ssp-sam",)


def build_model(cfg: dict | str | Path):
    """Build an untrained model (random init) from a config dict, variant name or YAML path."""
    if not isinstance(cfg, dict):
        cfg = load_config(cfg)
    validate_config(cfg)
    try:
        model = _build(cfg)
    except ConfigError:
        raise
    except (AssertionError, ValueError, TypeError, KeyError, IndexError, AttributeError, ZeroDivisionError,
            RuntimeError) as exc:  # a value the checks above let through that the constructors refuse
        raise ConfigError(f"model config '{cfg.get('name')}' cannot build a model ({type(exc).__name__}: {str(exc)[:200]})") from None
    import sspsam.backbones.runtime as runtime

    return runtime.contiguous_attention(model)


# The initialisers every module here reaches through ``torch.nn.init`` (nn.Linear, nn.Conv2d, open_clip,
# TinyViT, the SSP head): the random draws a strict checkpoint load overwrites at once.
_INITIALISERS = ("uniform_", "normal_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
                 "xavier_normal_", "orthogonal_", "constant_", "zeros_", "ones_")


@contextlib.contextmanager
def _no_random_init():
    """Build with parameters left as allocated: drawing ~250M random numbers took 2.4 of the 3.5 s
    an ``ssp-sam-vitb`` build costs (one thread), only for a strict load to overwrite them (as
    transformers' ``no_init_weights``). Only for a load that sets every parameter and buffer."""
    saved = {name: getattr(nn.init, name) for name in _INITIALISERS}
    try:
        for name in _INITIALISERS:
            setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


def _build(cfg: dict):
    arch = cfg.get("model", "ssp-sam")
    from sspsam.backbones.clip import CLIPBackbone
    from sspsam.backbones.sam import SAMBackbone

    clip = CLIPBackbone.from_config({k: v for k, v in cfg["clip"].items() if k != "weights"})
    sam = SAMBackbone.from_config(cfg["sam"])
    if arch == "ssp-sam":
        from sspsam.models.ssp_sam.model import SSPSAM

        return SSPSAM(clip, sam, cfg.get("ssp", {}), config=cfg)
    if arch == "escnet":
        from sspsam.models.escnet.escnet import ESCNet

        return ESCNet(clip, sam, cfg.get("escnet", {}), config=cfg)
    if arch == "sam-mi":
        from sspsam.models.sam_mi.sam_mi import SAMMI

        return SAMMI(clip, sam, cfg.get("sam_mi", {}), config=cfg)
    if arch == "zeroshot":
        from sspsam.models.zeroshot.pipeline import ZeroShot

        return ZeroShot(clip, sam, cfg.get("zeroshot", {}), config=cfg)
    raise ConfigError(f"unknown model type '{arch}' in config '{cfg.get('name')}'")


def read_sspsam_checkpoint(path: str | os.PathLike, sam_image_encoder: bool = True) -> dict:
    """An sspsam checkpoint, or an official SSP-SAM one converted to it (see ``sspsam/models/ssp_sam/official_checkpoint.py``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"model checkpoint not found: {path}")
    _check_crc(path)
    obj = _read_safetensors(path) if path.suffix == ".safetensors" else torch_load(path, "model checkpoint")
    if isinstance(obj, Mapping) and "sspsam" not in obj:
        import sspsam.models.ssp_sam.official_checkpoint as official_checkpoint

        try:
            sd = _unwrap(obj)
        except CheckpointError:
            sd = None
        if sd is not None and official_checkpoint.is_official(sd):
            try:
                return to_sspsam_checkpoint(sd, sam_image_encoder=sam_image_encoder)
            except CheckpointError as exc:
                raise CheckpointError(f"{path}: {exc}") from None
    if not isinstance(obj, Mapping) or "sspsam" not in obj or "config" not in obj:
        raise CheckpointError(
            f"{path} is not an sspsam model checkpoint (no 'sspsam'/'config' entries); "
            "nor an official SSP-SAM one; backbone files (SAM .pth, CLIP .pt) go through `sspsam weights import`"
        )
    return validate_checkpoint(dict(obj), path)


def _read_safetensors(path: Path) -> dict:
    """A .safetensors file holds a bare state dict (how authors often re-upload weights)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return dict(load_file(str(path)))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"model checkpoint {path} is truncated or corrupt ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:200] if str(exc) else ''})") from None


def validate_checkpoint(ckpt: dict, path: str | os.PathLike) -> dict:
    """The entries of an sspsam checkpoint, checked by type before any model is built from them."""
    from sspsam.config import validate_config  # config imports nothing of ours: no cycle, but keep the import local
    from sspsam.errors import ConfigError

    version = ckpt["sspsam"]
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CheckpointError(f"{path}: format version {version!r} is not a positive integer; the file is damaged or not sspsam's")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path} was written by a newer sspsam (format {version}); upgrade sspsam")
    if "state_dict" not in ckpt:
        raise CheckpointError(f"{path} has no 'state_dict' entry (the weights)")
    sd = ckpt["state_dict"]
    if not isinstance(sd, Mapping):
        raise CheckpointError(f"{path}: 'state_dict' is a {type(sd).__name__}, not a mapping of names to tensors")
    for k, v in sd.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{path}: 'state_dict' entry {str(k)[:80]!r} is a {type(v).__name__}, not a tensor")
    external = ckpt.get("external_backbones", [])
    if not isinstance(external, (list, tuple)) or not all(e in ("clip", "sam") for e in external):
        raise CheckpointError(f"{path}: 'external_backbones' must list 'clip' and/or 'sam', got {external!r}"[:300])
    try:
        validate_config(ckpt["config"])
    except ConfigError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    for part in external:
        if not isinstance(ckpt["config"][part].get("weights"), str):
            raise CheckpointError(f"{path}: backbone '{part}' is external but its config names no 'weights'")
    return ckpt


def _model_from_checkpoint(path: Path, task: tuple[str, ...] | None = None, sam_image_encoder: bool = True):
    return _model_and_meta(path, task, sam_image_encoder)[0]


def _model_and_meta(path: Path, task: tuple[str, ...] | None = None, sam_image_encoder: bool = True):
    """(model, the checkpoint's meta dict) — the meta says e.g. what data the model knows.

    ``task``: the model types the caller can run; another type is refused before anything is built."""
    ckpt = read_sspsam_checkpoint(path, sam_image_encoder=sam_image_encoder)
    kind = ckpt["config"].get("model", "ssp-sam")
    if task is not None and kind not in task:
        raise CheckpointError(
            f"{path} holds a '{kind}' model, "
            + ("not an OVSS model: it does referring segmentation (phrases); use `sspsam segment` / Segmenter"
               if kind in RES_MODELS else
               "not a referring model: it does open-vocabulary semantic segmentation (class names); use `sspsam ovss` / OVSS")
        )
    sd = ckpt["state_dict"]
    external = ckpt.get("external_backbones", [])
    files = {}
    if external:  # frozen backbones are not copied into every checkpoint: load them from the weights cache
        from sspsam.io.weights import ensure_all

        # found (or downloaded on first use, unless offline) before a large model is built; one
        # error names every missing file
        files = dict(zip(external, ensure_all([ckpt["config"][part].get("weights") for part in external])))
    # every key comes from the file (load_into is strict); external backbones may load non-strictly, so keep their init
    with contextlib.nullcontext() if external else _no_random_init():
        model = build_model(ckpt["config"])
    if external:
        for part in external:
            getattr(model, part).load_checkpoint(files[part])
        sd = {**{k: v for k, v in model.state_dict().items() if k.split(".")[0] in external}, **sd}
    load_into(model, sd, what=f"model checkpoint {path}")
    meta = ckpt.get("meta")
    return model, dict(meta) if isinstance(meta, dict) else {}


def _check_complete(cfg: dict, sd: Mapping[str, torch.Tensor], external: list[str]) -> None:
    """Name the sspsam keys an official file leaves unset, before any large model is built."""
    with torch.device("meta"):
        model = build_model(cfg)
    own = model.state_dict()
    missing = [k for k in own if k not in sd and k.split(".")[0] not in external]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in sd.items()
              if k in own and tuple(v.shape) != tuple(own[k].shape)]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} keys: {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} keys: {_few(unexpected)}")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatches: {_few(shapes, 3)}")
    if problems:
        raise CheckpointError(f"official SSP-SAM checkpoint ({cfg['name']}) does not fit: " + "; ".join(problems))


def load_official(path: str | os.PathLike, sam_image_encoder: bool = True, device: str = "cpu"):
    """Build the paper variant an official SSP-SAM checkpoint file belongs to and load it."""
    return _model_from_checkpoint(Path(path), sam_image_encoder=sam_image_encoder).to(device)


def load_zeroshot(name_or_cfg: str | Path | dict):
    """A zeroshot config (name, path or dict) with CLIP and SAM weights from the weights cache.

    Missing files are downloaded first (unless SSPSAM_OFFLINE=1); offline or unreachable, it fails
    before anything is built, with the ``sspsam weights fetch/import`` commands to run. A config without ``weights`` entries (the tiny
    test config) keeps its random initialisation.
    """
    from sspsam.config import load_config
    from sspsam.io.weights import ensure_all

    cfg = name_or_cfg if isinstance(name_or_cfg, dict) else load_config(name_or_cfg)
    if cfg.get("model") != "zeroshot":
        raise ConfigError(f"config '{cfg.get('name')}' is not a zeroshot config (model: {cfg.get('model')})")
    parts = [part for part in ("clip", "sam") if cfg.get(part, {}).get("weights")]
    # downloaded on first use unless offline; one error names every missing file at once
    files = dict(zip(parts, ensure_all([cfg[part]["weights"] for part in parts])))
    model = build_model(cfg)
    for part, path in files.items():
        getattr(model, part).load_checkpoint(path)
    model.random_init = [part for part in ("clip", "sam") if part not in files]  # read by the predictors' warnings
    return model.eval()


def to_sspsam_checkpoint(state_dict: Mapping[str, torch.Tensor], sam_image_encoder: bool = True) -> dict:
    """An official state dict (either layout, see ``official_checkpoint``) → an in-memory sspsam
    checkpoint (config + renamed weights), as the official ``test.py`` loads it.

    CLIP is external (the file's ``encoder.*`` keys are dropped; the weights cache's OpenAI CLIP of
    the variant is loaded instead). Without ``sam.image_encoder.*`` keys SAM is external too
    (``sam-vit-h`` from the weights cache) unless ``sam_image_encoder=False`` builds no encoder at all.
    """
    from sspsam.config import load_config

    state_dict, layout = normalise_layout(state_dict)
    name = variant(state_dict)
    cfg = load_config(name)
    clip_keys = [k for k in state_dict if k.startswith(CLIP_PREFIX)]
    sd, dropped = convert({k: v for k, v in state_dict.items() if not k.startswith(CLIP_PREFIX)})
    has_encoder = any(k.startswith(SAM_ENCODER_PREFIX) for k in sd)
    external = ["clip"]
    if not sam_image_encoder:
        cfg["sam"]["image_encoder"] = False
        sd = {k: v for k, v in sd.items() if not k.startswith(SAM_ENCODER_PREFIX)}
    elif not has_encoder:
        external.append("sam")
    _check_complete(cfg, sd, external=external)
    official = {"variant": name, "layout": layout, "dropped": dropped, "clip": cfg["clip"]["weights"],
                "clip_keys_dropped": len(clip_keys)}
    return {"sspsam": 1, "config": cfg, "state_dict": sd, "official": official, "external_backbones": external}
