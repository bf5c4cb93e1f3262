"""The official SSP-SAM training recipe (``train.recipe: official``), read from the config.

Why a module of its own: the official code (WayneTomas/SSP-SAM) trains by *epochs* with two
stages and a schedule that the step-based default loop of :mod:`sspsam.engine.trainer` does not have.
Everything here is what ``train.py`` / ``engine.py`` / ``configs/SSP_SAM_CLIP_*`` of the official
repository do; each choice is cited in ``sspsam/configs/ssp-sam-vitb.yaml``. The trainer asks this
module three things: the learning rate of each parameter group in a given epoch, whether SAM's
mask decoder is frozen in that epoch, and what a stage trains on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from sspsam.errors import ConfigError

OFFICIAL = "official"

# the official stage settings (configs/SSP_SAM_CLIP_B_pretrain.py and SSP_SAM_CLIP_B_FT_unc.py);
# a config's ``train.stages`` entries override them key by key
DEFAULT_STAGES = {
    1: {"dataset": "refcoco-merged", "epochs": 20, "warmup_epochs": 0, "freeze_decoder_epochs": 20, "box_only": True},
    2: {"dataset": None, "epochs": 80, "warmup_epochs": 5, "freeze_decoder_epochs": 20, "box_only": False},
}


def is_official(cfg: dict) -> bool:
    return str((cfg.get("train") or {}).get("recipe", "")).lower() == OFFICIAL


def official_lr(epoch: int, base_lr: float, epochs: int, warmup_epochs: int, min_lr: float, warmup_lr: float) -> float:
    """Learning rate during ``epoch`` (0-based) of one parameter group.

    This is timm's ``CosineLRScheduler(t_initial=epochs, lr_min=min_lr, warmup_t=warmup_epochs,
    warmup_lr_init=warmup_lr)`` with its defaults (``warmup_prefix=False``, one cycle), stepped
    once per epoch as the official ``train.py`` does (``lr_scheduler.step(epoch + 1)``). Two
    consequences worth knowing: the warm-up is linear from ``warmup_lr`` and never quite reaches
    ``base_lr`` (epoch ``warmup_epochs`` is already on the cosine, which is *not* shifted by the
    warm-up), and ``min_lr`` is an absolute floor shared by every group — so SAM's decoder group
    (base 1e-5) decays to the same 1e-6 as the rest (base 1e-4).
    """
    if epoch < warmup_epochs:
        return warmup_lr + epoch * (base_lr - warmup_lr) / warmup_epochs
    if epoch >= epochs:  # past the single cycle: the floor
        return min_lr
    return min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * epoch / epochs))


@dataclass(frozen=True)
class Stage:
    """One stage of the official recipe, resolved from the config."""

    number: int
    dataset: str | None
    epochs: int
    warmup_epochs: int
    freeze_decoder_epochs: int
    box_only: bool
    min_lr: float
    warmup_lr: float

    def lr(self, epoch: int, base_lr: float) -> float:
        return official_lr(epoch, base_lr, self.epochs, self.warmup_epochs, self.min_lr, self.warmup_lr)

    def decoder_frozen(self, epoch: int) -> bool:
        """The official ParamFreezer: ``sam.mask_decoder`` gets no gradient while epoch < freeze_epochs."""
        return self.box_only or epoch < self.freeze_decoder_epochs


def stage(cfg: dict, number: int) -> Stage:
    """The resolved settings of stage 1 (box-only pretraining) or 2 (full training)."""
    if number not in DEFAULT_STAGES:
        raise ConfigError(f"the official recipe has stages 1 and 2, not {number!r}")
    tcfg = dict(cfg.get("train") or {})
    given = (tcfg.get("stages") or {})
    over = given.get(number, given.get(str(number), {})) or {}
    unknown = set(over) - set(DEFAULT_STAGES[number])
    if unknown:
        raise ConfigError(f"train.stages.{number}: unknown keys {', '.join(sorted(unknown))}")
    s = {**DEFAULT_STAGES[number], **over}
    sched = dict(tcfg.get("schedule") or {})
    out = Stage(
        number=number,
        dataset=s["dataset"],
        epochs=int(s["epochs"]),
        warmup_epochs=int(s["warmup_epochs"]),
        freeze_decoder_epochs=int(s["freeze_decoder_epochs"]),
        box_only=bool(s["box_only"]),
        min_lr=float(sched.get("min_lr", 1e-6)),
        warmup_lr=float(sched.get("warmup_lr", 1e-6)),
    )
    if out.epochs < 1 or out.warmup_epochs < 0 or out.freeze_decoder_epochs < 0:
        raise ConfigError(f"train.stages.{number}: epochs must be >= 1 and warmup/freeze epochs >= 0")
    return out


def official_schedule(st: Stage, base_lrs: list[float], steps_per_epoch: int) -> list:
    """LambdaLR factors, one per parameter group, for the official per-epoch schedule: optimizer
    step s runs in epoch s // steps_per_epoch at that epoch's lr (:meth:`Stage.lr`)."""

    def make(base: float):
        return lambda s: st.lr(s // steps_per_epoch, base) / base if base else 0.0

    return [make(b) for b in base_lrs]
