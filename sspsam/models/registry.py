"""What a method is, in one place: one :class:`Method` entry per method (its config ``model`` type,
task, config section, classes, training recipe defaults, which command runs it).

Everything that needs a per-method fact (config validation, ``build_model``, the predictors,
`sspsam models`, train / cache-features / evaluate / export, the training tasks) reads it from
here; no other module names a model type. The classes are "module:Name" paths imported on first
use, so this module (and ``sspsam --help``) loads no torch.

Adding a method from outside sspsam: a module that calls :func:`register` with its entry, named
in ``SSPSAM_METHODS=package.module[,…]`` or under the ``sspsam.methods`` entry-point group; it is
imported the first time the registry is used.
"""

from __future__ import annotations

import difflib
import importlib
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from sspsam.errors import ConfigError

REFERRING = "referring"
OVSS = "ovss"
TASKS = (REFERRING, OVSS)
#: `sspsam evaluate --protocol` of the official SSP-SAM test.py (named after the method)
OFFICIAL_PROTOCOL = "ssp-sam"
#: the model type of a config without a ``model`` key (every config before ESC-Net had none)
DEFAULT_MODEL = "ssp-sam"


@dataclass(frozen=True)
class Method:
    """One method. ``name``: the config ``model`` type; ``task``: 'referring' (image + phrase →
    mask, run by ``Segmenter`` / `sspsam segment`) or 'ovss' (image + class names → label map,
    ``OVSS`` / `sspsam ovss`); ``section``: its config section and ``schema`` the "module:Dataclass"
    that types it; ``extra_sections``: more (section, schema) pairs it reads; ``model``: the
    "module:Class" built as ``Class(clip, sam, section_dict, config=cfg)`` (``None`` for a backbone
    it does not take); ``training_task``: "module:Class" of its training task (``None``: not
    trained); ``seed`` / ``lr`` / ``decoder_lr``: the defaults of `sspsam train` (``lr=None``:
    the config's ``train.lr``); ``caches_features``: `sspsam cache-features` can precompute its
    frozen SAM embeddings; ``training_free``: pretrained backbones only, loaded by config name;
    ``commands``: the commands (and predictors) that run it; ``exportable``: ONNX export."""

    name: str
    task: str
    model: str
    section: str | None = None
    schema: str | None = None
    extra_sections: tuple[tuple[str, str], ...] = ()
    training_task: str | None = None
    seed: int = 0
    lr: float | None = None
    decoder_lr: float | None = None
    caches_features: bool = False
    training_free: bool = False
    commands: tuple[str, ...] = ()
    backbones: tuple[str, ...] = ("clip", "sam")
    exportable: bool = False
    description: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"method '{self.name}': task must be one of {TASKS}, got {self.task!r}")
        if not self.commands:
            object.__setattr__(self, "commands", ("segment",) if self.task == REFERRING else ("ovss",))

    @property
    def trains(self) -> bool:
        return self.training_task is not None

    @property
    def sections(self) -> dict[str, str]:
        """config section → "module:Dataclass" schema, for every section this method reads."""
        own = {self.section: self.schema} if self.section else {}
        return {**own, **dict(self.extra_sections)}

    def model_class(self):
        return load(self.model)

    def task_class(self):
        if self.training_task is None:
            raise ConfigError(f"'{self.name}' models are not trained (training-free)")
        return load(self.training_task)


_SECTIONS = "sspsam.models.sections"
_BUILTIN = (
    Method("ssp-sam", REFERRING, "sspsam.models.ssp_sam.model:SSPSAM", "ssp", f"{_SECTIONS}:SSPSection",
           training_task="sspsam.engine.tasks.referring:ReferringTask", seed=3407, lr=1e-4, decoder_lr=1e-5,
           caches_features=True, exportable=True, description="SSP-SAM (referring segmentation)"),
    Method("escnet", OVSS, "sspsam.models.escnet.escnet:ESCNet", "escnet", f"{_SECTIONS}:ESCNetSection",
           training_task="sspsam.engine.tasks.ovss:OVSSTask", seed=0,
           description="ESC-Net (open-vocabulary semantic segmentation)"),
    Method("sam-mi", OVSS, "sspsam.models.sam_mi.sam_mi:SAMMI", "sam_mi", f"{_SECTIONS}:SAMMISection",
           training_task="sspsam.engine.tasks.ovss:OVSSTask", seed=0, caches_features=True,
           description="SAM-MI (open-vocabulary semantic segmentation)"),
    Method("zeroshot", OVSS, "sspsam.models.zeroshot.pipeline:ZeroShot", "zeroshot", f"{_SECTIONS}:ZeroShotSection",
           extra_sections=(("res", f"{_SECTIONS}:ZeroShotRESSection"),), training_free=True,
           commands=("segment", "ovss"), description="training-free CLIP + SAM (OVSS and referring)"),
)

_METHODS: dict[str, Method] = {m.name: m for m in _BUILTIN}
_plugins_loaded = False
ENV = "SSPSAM_METHODS"
ENTRY_POINTS = "sspsam.methods"


def register(method: Method, replace: bool = False) -> Method:
    """Add a method (a plugin's module calls this on import). The same entry twice is a no-op."""
    if not isinstance(method, Method):
        raise TypeError(f"register() takes a Method, got {type(method).__name__}")
    old = _METHODS.get(method.name)
    if old is not None and old != method and not replace:
        raise ConfigError(f"method '{method.name}' is registered already")
    _METHODS[method.name] = method
    return method


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for name in [n.strip() for n in os.environ.get(ENV, "").split(",") if n.strip()]:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ConfigError(f"{ENV} names '{name}', which cannot be imported ({exc})") from None
    try:
        from importlib.metadata import entry_points

        for ep in entry_points(group=ENTRY_POINTS):
            ep.load()
    except Exception:  # a broken third-party entry point must not take the built-in methods down
        import logging

        logging.getLogger(__name__).warning("an '%s' entry point failed to load", ENTRY_POINTS, exc_info=True)


def methods(task: str | None = None) -> list[Method]:
    """Every registered method (of ``task``: 'referring' / 'ovss' / None for all)."""
    _load_plugins()
    return [m for m in _METHODS.values() if task is None or m.task == task]


def names(task: str | None = None) -> tuple[str, ...]:
    return tuple(m.name for m in methods(task))


def running_under(command: str) -> tuple[str, ...]:
    """The model types a command ('segment' / 'ovss') runs."""
    return tuple(m.name for m in methods() if command in m.commands)


def commands_by_type() -> dict[str, str]:
    """model type → the command that runs its checkpoints (what a model card tells users to run)."""
    return {m.name: m.commands[0] for m in methods()}


def get(name: object, where: str = "") -> Method:
    """The entry of model type ``name``; an unknown one is a ConfigError with a "did you mean"."""
    _load_plugins()
    if isinstance(name, str) and name in _METHODS:
        return _METHODS[name]
    close = difflib.get_close_matches(str(name), list(_METHODS), n=1, cutoff=0.6) if isinstance(name, str) else []
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise ConfigError(f"unknown model type {name!r}{where} (known: {', '.join(_METHODS)}){hint}")


def model_type(cfg: Mapping) -> str:
    """A config's ``model`` key (default :data:`DEFAULT_MODEL`)."""
    return cfg.get("model", DEFAULT_MODEL) if isinstance(cfg, Mapping) else DEFAULT_MODEL


def for_config(cfg: Mapping) -> Method:
    """The entry of a config dict (its ``model`` key)."""
    name = cfg.get("name", "?") if isinstance(cfg, Mapping) else "?"
    return get(model_type(cfg), f" in config '{name}'")


def load(path: str):
    """Import "package.module:Name"."""
    module, _, attr = path.partition(":")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def validate(cfg):
    """A config dict checked against its method's schema (see :func:`sspsam.config.typed_config`);
    returns the typed :class:`sspsam.config.ModelConfig`."""
    from sspsam.config import check_structure, typed_config

    check_structure(cfg)
    method = for_config(cfg)
    return typed_config(cfg, method.name, {sec: load(schema) for sec, schema in method.sections.items()},
                        required=method.backbones)
