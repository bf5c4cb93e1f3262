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

# TEMPORARY, until sspsam/models/registry.py says per method whether its features can be cached:
# the one place the engine names method types. The model types whose forward runs SAM's image
# encoder on the training image (so its embeddings can be cached); others (e.g. a SAM block that
# works on CLIP features) have nothing to cache.
_RUNS_SAM_IMAGE_ENCODER = ("ssp-sam", "sam-mi")


def runs_sam_image_encoder(cfg: dict) -> bool:
    return cfg.get("model") in _RUNS_SAM_IMAGE_ENCODER


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
