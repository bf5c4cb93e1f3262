"""Train a referring model (SSP-SAM): :func:`train` and :func:`build_feature_cache`, the keyword
front of :class:`sspsam.engine.tasks.referring.ReferringTask` run by :func:`sspsam.engine.loop.fit`.

    from sspsam.config import load_config
    from sspsam.engine.trainer import train
    train(load_config("ssp-sam-tiny"), data_root, Path("runs/x"), steps=1000, batch_size=8,
          lr=1e-4, decoder_lr=1e-5, ckpt_every=100)

The run folder's files, resume and determinism are the loop's (:mod:`sspsam.engine.loop`,
:mod:`sspsam.engine.state`); the names below stay importable from here for existing callers.
"""

from __future__ import annotations

from pathlib import Path

import sspsam.engine.feature_cache as fc
from sspsam.engine.loop import LoopOptions, TrainTask, check_learning_rate, check_precision, fit  # noqa: F401
from sspsam.engine.recipe import official_schedule  # noqa: F401
from sspsam.engine.state import (LAST, LOG, MODEL, RUN_FILES, ResumableSampler, existing_run,  # noqa: F401
                                 read_train_state, seed_everything)
from sspsam.engine.tasks import task_class
from sspsam.engine.tasks.referring import (BoxPretraining, CachedSamples, ReferringTask,  # noqa: F401
                                           build_training_model, cosine_with_warmup, to_batch)
from sspsam.engine.tasks.referring import referring_dataset as _dataset  # noqa: F401
from sspsam.errors import OptionError


def train(cfg: dict, data_root: str | Path, out_dir: str | Path, *, steps: int | None = None, ckpt_every: int = 1000,
          echo=None, on_step=None, **options) -> dict:
    """Train a referring model for ``steps`` optimizer steps (each of ``grad_accum`` micro-batches
    of ``batch_size`` per process). ``options`` are :class:`LoopOptions` fields and
    :class:`ReferringTask` keywords (``dataset``, ``lr``, ``decoder_lr``, ``stage``, ``epochs``,
    ``init``, ``warmup_steps``, ``clip_grad``, ``weight_decay``, ``load_backbones``,
    ``cached_features``). Returns ``{"step", "module", "losses", "last", "model", "log", "seconds"}``.

    With ``train.recipe: official`` the run is by epochs of ``stage`` 1 (box-only pretraining on
    the merged set) or 2 (full; default) and ``steps`` defaults to the whole stage (see
    :mod:`sspsam.engine.recipe`); ``cached_features`` is a folder :func:`build_feature_cache`
    wrote with the same config, data, seed and init (refused unless SAM's image encoder is frozen
    and the images are not augmented)."""
    loop, task_options = LoopOptions.split({"steps": steps, "ckpt_every": ckpt_every, "seed": 3407, **options})
    task = task_class(cfg, ReferringTask)(cfg, data_root, **task_options)  # config-level refusals first (--stage, --epochs, lrs)
    if steps is None and task.st is None:
        raise OptionError("steps is required (the number of optimizer steps to reach)")
    if (steps is not None and steps < 1) or ckpt_every < 1:
        raise OptionError(f"steps and ckpt_every must be >= 1, got {steps} and {ckpt_every}")
    return fit(task, out_dir, loop, echo=echo, on_step=on_step)


def build_feature_cache(cfg: dict, data_root: str | Path, out_dir: str | Path, *, dataset: str | None = None,
                        seed: int = 3407, init: str | Path | None = None, load_backbones: bool = True,
                        batch_size: int = 8, shard_size: int = 64, dtype: str = "float16", device: str = "cpu",
                        progress=None) -> dict:
    """SAM image embeddings of every distinct image of the training split, for
    ``train(..., cached_features=out_dir)`` with the same config, data, dataset, seed and init."""
    task = ReferringTask(cfg, data_root, dataset=dataset, init=init, load_backbones=load_backbones)
    return fc.build_cache(task, out_dir, seed=seed, batch_size=batch_size, shard_size=shard_size, dtype=dtype,
                          device=device, progress=progress)
