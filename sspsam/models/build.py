"""Building models: from a config (random init), from an sspsam or official SSP-SAM checkpoint
(weights, frozen backbones from the weights cache) and the training-free zeroshot model.

Why a module of its own: config parsing (``sspsam.config``) stays free of model code, and the
methods (``sspsam.models.*``) stay free of file formats; every loader above them comes here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from sspsam.config import load_config
from sspsam.errors import CheckpointError, ConfigError
import sspsam.io.checkpoint as checkpoint_io
from sspsam.io.checkpoint import FORMAT_VERSION, load_into, torch_load
from sspsam.models import registry
from sspsam.models.ssp_sam.official_checkpoint import CLIP_PREFIX, SAM_ENCODER_PREFIX, convert, normalise_layout, variant

# TODO(io owner, engineer C): public names for these two; until then read off the module
check_crc = checkpoint_io._check_crc
unwrap_state_dict = checkpoint_io._unwrap


def few(keys: list[str], n: int = 6) -> str:
    """The first ``n`` of a list of keys, and how many more."""
    return ", ".join(keys[:n]) + (f" … (+{len(keys) - n} more)" if len(keys) > n else "")


def validate_config(cfg):
    """A config dict checked against its method's schema; returns the typed
    :class:`sspsam.config.ModelConfig` (see :func:`sspsam.models.registry.validate`)."""
    return registry.validate(cfg)


def build_model(cfg: dict | str | Path):
    """Build an untrained model (random init) from a config dict, variant name or YAML path.

    Under ``with torch.device("meta")`` the model is built without memory (parameter shapes only),
    as :func:`model_and_meta` does before it loads a checkpoint into it."""
    if not isinstance(cfg, dict):
        cfg = load_config(cfg)
    method = registry.get(registry.validate(cfg).model)
    try:
        model = _build(cfg, method)
    except ConfigError:
        raise
    except (AssertionError, ValueError, TypeError, KeyError, IndexError, AttributeError, ZeroDivisionError,
            RuntimeError) as exc:  # a value the checks above let through that the constructors refuse
        raise ConfigError(f"model config '{cfg.get('name')}' cannot build a model ({type(exc).__name__}: {str(exc)[:200]})") from None
    import sspsam.backbones.runtime as runtime

    return runtime.contiguous_attention(model)


def _build(cfg: dict, method: registry.Method):
    """The method's class on the backbones it takes: ``Class(clip, sam, section, config=cfg)``."""
    clip = sam = None
    if "clip" in method.backbones:
        from sspsam.backbones.clip import CLIPBackbone

        clip = CLIPBackbone.from_config({k: v for k, v in cfg["clip"].items() if k != "weights"})
    if "sam" in method.backbones:
        from sspsam.backbones.sam import SAMBackbone

        sam = SAMBackbone.from_config(cfg["sam"])
    section = cfg.get(method.section, {}) if method.section else {}
    return method.model_class()(clip, sam, section, config=cfg)


def read_sspsam_checkpoint(path: str | os.PathLike, sam_image_encoder: bool = True) -> dict:
    """An sspsam checkpoint, or an official SSP-SAM one converted to it (see ``sspsam/models/ssp_sam/official_checkpoint.py``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"model checkpoint not found: {path}")
    check_crc(path)
    obj = _read_safetensors(path) if path.suffix == ".safetensors" else torch_load(path, "model checkpoint")
    if isinstance(obj, Mapping) and "sspsam" not in obj:
        import sspsam.models.ssp_sam.official_checkpoint as official_checkpoint

        try:
            sd = unwrap_state_dict(obj)
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
        registry.validate(ckpt["config"])
    except ConfigError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    for part in external:
        if not isinstance(ckpt["config"][part].get("weights"), str):
            raise CheckpointError(f"{path}: backbone '{part}' is external but its config names no 'weights'")
    return ckpt


def model_from_checkpoint(path: Path, task: str | None = None, sam_image_encoder: bool = True):
    return model_and_meta(path, task, sam_image_encoder)[0]


def model_and_meta(path: Path, task: str | None = None, sam_image_encoder: bool = True):
    """(model, the checkpoint's meta dict) — the meta says e.g. what data the model knows.

    ``task``: the command the caller runs ('segment' / 'ovss', see ``registry.Method.commands``);
    a model another command runs is refused before anything is built."""
    ckpt = read_sspsam_checkpoint(path, sam_image_encoder=sam_image_encoder)
    method = registry.for_config(ckpt["config"])
    if task is not None and task not in method.commands:
        raise CheckpointError(
            f"{path} holds a '{method.name}' model, "
            + ("not an OVSS model: it does referring segmentation (phrases); use `sspsam segment` / Segmenter"
               if method.task == registry.REFERRING else
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
    if external:  # external backbones may load non-strictly: they keep their real initialisation
        model = build_model(ckpt["config"])
        for part in external:
            getattr(model, part).load_checkpoint(files[part])
        sd = {**{k: v for k, v in model.state_dict().items() if k.split(".")[0] in external}, **sd}
        load_into(model, sd, what=f"model checkpoint {path}")
    else:  # every key comes from the file: build without memory or random draws, then load
        model = _load_on_meta(ckpt["config"], sd, f"model checkpoint {path}")
    meta = ckpt.get("meta")
    return model, dict(meta) if isinstance(meta, dict) else {}


def _load_on_meta(cfg: dict, sd: Mapping[str, torch.Tensor], what: str):
    """Build with every parameter on the meta device — no memory and no random draws (drawing ~250M
    random numbers took 2.4 of the 3.5 s an ``ssp-sam-vitb`` build costs, only for a strict load
    to overwrite them) — then give the parameters storage and load every one from ``sd``.

    Buffers are built for real: the non-persistent ones (CLIP's causal mask, the pixel mean/std)
    are computed in ``__init__`` and are not in a checkpoint; the persistent ones are loaded."""
    from torch.nn.modules.module import register_module_parameter_registration_hook

    def on_meta(module, name, param):
        if param is not None and param.device.type != "meta":
            return nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        return None

    handle = register_module_parameter_registration_hook(on_meta)
    try:
        model = build_model(cfg)
    finally:
        handle.remove()
    done: dict[int, nn.Parameter] = {}  # tied parameters stay tied
    for module in model.modules():
        for key, param in list(module._parameters.items()):
            if param is not None and param.device.type == "meta":
                if id(param) not in done:
                    done[id(param)] = nn.Parameter(torch.empty_like(param, device="cpu"), requires_grad=param.requires_grad)
                module._parameters[key] = done[id(param)]
    load_into(model, sd, what=what)
    return model


# earlier names, kept for callers outside sspsam
_model_and_meta = model_and_meta
_model_from_checkpoint = model_from_checkpoint


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
        problems.append(f"missing {len(missing)} keys: {few(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} keys: {few(unexpected)}")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatches: {few(shapes, 3)}")
    if problems:
        raise CheckpointError(f"official SSP-SAM checkpoint ({cfg['name']}) does not fit: " + "; ".join(problems))


def load_official(path: str | os.PathLike, sam_image_encoder: bool = True, device: str = "cpu"):
    """Build the paper variant an official SSP-SAM checkpoint file belongs to and load it."""
    return model_from_checkpoint(Path(path), sam_image_encoder=sam_image_encoder).to(device)


def load_zeroshot(name_or_cfg: str | Path | dict):
    """A zeroshot config (name, path or dict) with CLIP and SAM weights from the weights cache.

    Missing files are downloaded first (unless SSPSAM_OFFLINE=1); offline or unreachable, it fails
    before anything is built, with the ``sspsam weights fetch/import`` commands to run. A config without ``weights`` entries (the tiny
    test config) keeps its random initialisation.
    """
    from sspsam.config import load_config
    from sspsam.io.weights import ensure_all

    cfg = name_or_cfg if isinstance(name_or_cfg, dict) else load_config(name_or_cfg)
    if not registry.for_config(cfg).training_free:
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
