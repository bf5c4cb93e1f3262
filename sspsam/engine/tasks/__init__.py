"""Training tasks: what a method family supplies to the one loop (:mod:`sspsam.engine.loop`).

:class:`~sspsam.engine.tasks.referring.ReferringTask` (image + phrase → mask) and
:class:`~sspsam.engine.tasks.ovss.OVSSTask` (image + class names → label map) each own their
model build, data set, loss, parameter groups, schedule, feature-cache rows and identity. A task
is built as ``Task(cfg, data_root, **task_options)`` and run with
``fit(task, out_dir, LoopOptions(...))``; :func:`train` does both from one set of keywords.
"""

from __future__ import annotations

import importlib
from pathlib import Path

def runs_sam_image_encoder(cfg: dict) -> bool:
    """Whether the method's forward runs SAM's image encoder on the training image, so its
    embeddings can be cached (the registry's ``caches_features``)."""
    from sspsam.models import registry

    return registry.for_config(cfg).caches_features


def task_class(cfg: dict, default):
    """The training task the config's method names in the registry (``default`` when it names the
    task family's own class anyway, or none)."""
    from sspsam.models import registry

    method = registry.for_config(cfg)
    return method.task_class() if method.training_task else default


def load_task(path: str):
    """A task class from its lazy path, ``"package.module:Class"`` (as a method's registry entry names it)."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def train(task, cfg: dict, data_root: str | Path, out_dir: str | Path, *, echo=None, on_step=None, **options) -> dict:
    """Build ``task`` (a class or its lazy path) from the task's keywords in ``options`` and run it
    with the loop's (:class:`~sspsam.engine.loop.LoopOptions` fields): one call for any method."""
    from sspsam.engine.loop import LoopOptions, fit

    if isinstance(task, str):
        task = load_task(task)
    loop, task_options = LoopOptions.split(options)
    loop.check()
    return fit(task(cfg, data_root, **task_options), out_dir, loop, echo=echo, on_step=on_step)
