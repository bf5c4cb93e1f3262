"""Train an OVSS model (ESC-Net, SAM-MI) on a semseg folder: :func:`train_ovss` and
:func:`build_ovss_feature_cache`, the keyword front of :class:`sspsam.engine.tasks.ovss.OVSSTask`
run by :func:`sspsam.engine.loop.fit` (DDP under torchrun, bf16 autocast, gradient accumulation,
TensorBoard, ``log.jsonl``, bit-exact resume from ``last.pt``, an atomic ``model.pt`` with the
classes). The command line is ``sspsam train <config> --data SEMSEG_ROOT`` (or
``scripts/train_ovss.py``).
"""

from __future__ import annotations

import time
from pathlib import Path

import sspsam.engine.feature_cache as fc
from sspsam.config import load_config
from sspsam.engine.loop import LoopOptions, fit
from sspsam.engine.losses import SEMSEG_LOSSES as LOSSES, aux_loss, bce_loss, catseg_bce_loss  # noqa: F401
from sspsam.engine.tasks import task_class
from sspsam.engine.tasks.ovss import (VIEWS, ClassForward, OVSSSamples, OVSSTask,  # noqa: F401
                                      build_ovss_training_model, lr_scale, param_groups)
from sspsam.errors import ConfigError


def train_ovss(cfg: dict | str | Path, data_root: str | Path, out_dir: str | Path, steps: int = 300, batch_size: int = 4,
               lr: float | None = None, seed: int = 0, *, resume: bool = False, save_every: int = 0, log_every: int = 50,
               warmup: int = 20, log=print, cached_features: str | Path | None = None, **options) -> dict:
    """Train and write ``out_dir/model.pt``, plus ``out_dir/last.pt`` every ``save_every`` steps
    and at the end (0: never); ``resume=True`` continues from ``last.pt`` when there is one (else
    starts afresh). ``log`` gets a line every ``log_every`` steps (0: none). ``options``: the other
    :class:`LoopOptions` fields (``device``, ``precision``, ``grad_accum``, ``total_steps``,
    ``time_limit``, ``tensorboard``, ``progress``, ``overwrite``). Returns a summary with the model."""
    cfg = load_config(cfg) if not isinstance(cfg, dict) else cfg
    if steps < 1 or batch_size < 1:
        raise ConfigError(f"steps and batch_size must be positive, got {steps} and {batch_size}")
    if save_every < 0:
        raise ConfigError(f"save_every must be >= 0, got {save_every}")
    task = task_class(cfg, OVSSTask)(cfg, data_root, lr=lr, warmup=warmup, cached_features=cached_features)
    resume = resume and (Path(out_dir) / "last.pt").is_file()
    loop = LoopOptions(steps=steps, batch_size=batch_size, seed=seed, resume=resume, ckpt_every=save_every, **options)
    t0 = time.perf_counter()

    def on_step(rec: dict) -> None:
        if log_every and rec["step"] % log_every == 0:
            log(f"step {rec['step']} loss {rec['total']:.4f} {time.perf_counter() - t0:.0f}s")

    res = fit(task, out_dir, loop, echo=log, on_step=on_step)
    curve = [r["total"] for r in res["losses"]]
    return {"checkpoint": str(res["model"]), "steps": res["step"], "loss": curve[-1] if curve else float("nan"),
            "seconds": res["seconds"], "classes": task.classes, "model": res["module"], "losses": curve}


def build_ovss_feature_cache(cfg: dict | str | Path, data_root: str | Path, out_dir: str | Path, *, seed: int = 0,
                             batch_size: int = 8, shard_size: int = 64, dtype: str = "float16", device: str = "cpu",
                             progress=None) -> dict:
    """SAM image embeddings of every training image, plain and mirrored (rows ``2 i`` and ``2 i + 1``),
    for ``train_ovss(..., cached_features=out_dir)`` with the same config, data and seed."""
    cfg = load_config(cfg) if not isinstance(cfg, dict) else cfg
    return fc.build_cache(OVSSTask(cfg, data_root), out_dir, seed=seed, batch_size=batch_size, shard_size=shard_size,
                          dtype=dtype, device=device, progress=progress)
