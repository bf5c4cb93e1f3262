"""Open-vocabulary semantic segmentation (image + class names → label map) for
:func:`sspsam.engine.loop.fit`, on a generic semseg folder (:class:`SemSegDataset`).

Loss: the per-pixel BCE over classes (:func:`sspsam.engine.losses.bce_loss`, or ``train.loss:
catseg``), plus ``train.aux_weight`` x the same loss on a model's ``aux_logits``. Two learning
rates, as ESC-Net trains CLIP and the SAM block 100x slower than the rest: ``train.backbone_lr``
for ``clip.*`` and ``sam.*``, ``lr`` for the new modules; a model with a
``param_groups(lr, backbone_lr, weight_decay)`` method defines its own groups. ``model.pt``
carries the training classes, from which ``sspsam.models.build`` rebuilds the model alone.

Feature cache: SAM's image embeddings for models whose forward runs SAM's image encoder with it
frozen. The random horizontal flip stays: the cache holds each image twice, plain and mirrored,
and a step reads the view it drew.
"""

from __future__ import annotations

import contextlib
import math

import torch

import sspsam.engine.feature_cache as fc
from sspsam.data.semseg import SemSegDataset
from sspsam.engine.loop import TrainTask
from sspsam.engine.losses import SEMSEG_LOSSES, aux_loss
from sspsam.engine.tasks import runs_sam_image_encoder
from sspsam.errors import ConfigError
from sspsam.io.checkpoint import save_checkpoint
from sspsam.models.build import build_model
from sspsam.models.cost import class_embeddings

VIEWS = ["plain", "hflip"]


def param_groups(model, lr: float, backbone_lr: float, weight_decay: float) -> list[dict]:
    """CLIP and SAM (ESC-Net's SAM block, SAM-MI's prompt path) at ``backbone_lr``, the rest at ``lr``
    (or the model's own ``param_groups``)."""
    if hasattr(model, "param_groups"):
        return model.param_groups(lr, backbone_lr, weight_decay)
    back, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (back if name.startswith(("clip.", "sam.")) else rest).append(p)
    return [{"params": rest, "lr": lr, "weight_decay": weight_decay}, {"params": back, "lr": backbone_lr, "weight_decay": weight_decay}]


def lr_scale(schedule: str, step: int, steps: int, warmup: int) -> float:
    """Learning-rate factor at ``step`` of ``steps``. ``cosine``: CAT-Seg's detectron2 WarmupCosineLR
    with no warm-up, 0.5·(1 + cos(π·step/steps)); ``default``: linear warm-up over ``warmup`` steps
    times a cosine from 1 to a 0.1 floor."""
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * step / steps))
    return min(1.0, (step + 1) / warmup) * (0.55 + 0.45 * math.cos(math.pi * step / steps))


def build_ovss_training_model(cfg: dict, seed: int):
    """The model as training builds it (seeded init, frozen parts): the cache must be built from
    the same SAM image-encoder weights."""
    torch.manual_seed(seed)
    model = build_model(cfg)
    model.freeze((cfg.get("train") or {}).get("freeze", []))
    return model


class OVSSSamples(torch.utils.data.Dataset):
    """The semseg reader with the random horizontal flip drawn per sample from the global torch RNG
    (which the loop seeds per rank and saves in ``last.pt``), plus, from a feature cache, SAM's
    embedding of the view drawn (row = image x 2 + view: 0 plain, 1 mirrored)."""

    def __init__(self, data, cache=None, cache_rows=None) -> None:
        self.data, self.cache, self.cache_rows = data, cache, cache_rows

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict:
        s = self.data[i]
        flip = bool(torch.rand(()) < 0.5)
        out = {"image": s["image"].flip(-1) if flip else s["image"], "label": s["label"].flip(-1) if flip else s["label"]}
        if self.cache is not None:
            out["sam_embed"] = torch.from_numpy(self.cache[int(self.cache_rows[i]) * 2 + int(flip)])
        return out


class ClassForward(torch.nn.Module):
    """The classes' text embeddings and the model in one forward, so DDP sees every trainable
    parameter (ESC-Net trains CLIP's text attention) inside the module it wraps."""

    def __init__(self, core, classes: list[str], text_trains: bool) -> None:
        super().__init__()
        self.core, self.classes, self.text_trains = core, classes, text_trains

    def forward(self, images: torch.Tensor) -> dict:
        core = self.core
        with torch.set_grad_enabled(self.text_trains and torch.is_grad_enabled()):
            emb = core.class_embeddings(self.classes) if hasattr(core, "class_embeddings") else class_embeddings(core.clip, self.classes)
        return core(images, emb)


class OVSSTask(TrainTask):
    """An OVSS model on a semseg folder: ``lr`` (default ``train.lr``) / ``train.backbone_lr``
    groups, ``train.schedule`` with ``warmup`` steps, ``train.grad_clip``; ``cached_features``: a
    folder :func:`sspsam.engine.feature_cache.build_cache` wrote for this task."""

    def __init__(self, cfg: dict, data_root, *, lr: float | None = None, warmup: int = 20, cached_features=None) -> None:
        self.cfg, self.data_root, self.warmup, self.cached_features = cfg, data_root, int(warmup), cached_features
        tcfg = cfg.get("train") or {}
        self.lr = float(lr if lr is not None else tcfg.get("lr", 1e-4))
        self.backbone_lr = float(tcfg.get("backbone_lr", self.lr / 100))
        self.weight_decay = float(tcfg.get("weight_decay", 1e-4))
        self.aux_weight = float(tcfg.get("aux_weight", 0.4))
        if tcfg.get("loss", "masked") not in SEMSEG_LOSSES:
            raise ConfigError(f"unknown train.loss '{tcfg.get('loss')}'; choose one of {', '.join(SEMSEG_LOSSES)}")
        self.criterion = SEMSEG_LOSSES[tcfg.get("loss", "masked")]
        self.schedule = tcfg.get("schedule", "default")
        if self.schedule not in ("default", "cosine"):
            raise ConfigError(f"unknown train.schedule '{self.schedule}'; choose default or cosine")
        if self.schedule == "default" and self.warmup < 1:
            raise ConfigError(f"warmup must be >= 1 step, got {self.warmup}")
        self.clip_grad = float(tcfg.get("grad_clip", 1.0))
        self.frozen = list(tcfg.get("freeze") or [])
        self.classes: list[str] = []
        self.ignore = 255

    def build(self, seed):
        model = build_ovss_training_model(self.cfg, seed)
        self.text_trains = any(p.requires_grad for p in model.clip.model.transformer.parameters())
        return model

    def open_data(self):
        self._reader = SemSegDataset(self.data_root, "train", None)
        return self._reader

    def _reader_for(self, core):
        data = getattr(self, "_reader", None) or SemSegDataset(self.data_root, "train", core.image_size)
        data.image_size = int(core.image_size)  # the file list does not depend on it; samples are cut at the model's size
        return data

    def dataset(self, core):
        data = self._reader_for(core)
        self.classes, self.ignore = data.classes, data.ignore_index
        if self.cached_features is None:
            return OVSSSamples(data)
        self.check_cacheable(core)
        cache = fc.FeatureCache(self.cached_features)
        index = fc.image_index(data, self.data_root)
        want = self.cache_identity(core, index)
        cache.check(**{k: want[k] for k in ("model", "sam_config_hash", "encoder_hash", "dataset", "views")})
        return OVSSSamples(data, cache, index.sample_rows)

    # ---- feature cache ------------------------------------------------------------------------

    def check_cacheable(self, core) -> None:
        if not runs_sam_image_encoder(self.cfg):
            raise ConfigError(f"--cached-features: a {self.cfg.get('model')} model never runs SAM's image encoder (its "
                              "SAM parts work on CLIP features), so there is nothing to cache")
        if any(p.requires_grad for p in core.sam.image_encoder.parameters()):
            raise ConfigError(f"--cached-features needs SAM's image encoder frozen, but config '{self.cfg.get('name')}' trains it "
                              "(add sam or sam.image_encoder to train.freeze)")

    def cache_identity(self, core, index) -> dict:
        ds_id = {"name": "semseg", "split": "train", "image_size": int(core.image_size), "images": len(index.keys)}
        ds_id["fingerprint"] = index.fingerprint(ds_id)
        return {"model": self.cfg.get("model"), "config": self.cfg.get("name", "?"), "sam_config_hash": fc.sam_config_hash(self.cfg),
                "encoder_hash": fc.encoder_hash(core.sam.image_encoder), "dataset": ds_id, "views": VIEWS}

    def cache_rows(self, core) -> fc.CacheRows:
        """Rows ``2 i`` and ``2 i + 1``: image i plain and mirrored, as :class:`OVSSSamples` flips it."""
        self.check_cacheable(core)
        data = self._reader_for(core)
        index = fc.image_index(data, self.data_root)

        def images(rows: list[int]):
            batch = torch.stack([data[index.first_sample[r // 2]]["image"] for r in rows])
            mirrored = torch.tensor([r % 2 == 1 for r in rows])
            batch[mirrored] = batch[mirrored].flip(-1)
            return batch, None  # the OVSS forward passes no valid_hw in training

        return fc.CacheRows(self.cache_identity(core, index), 2 * len(index.keys), images)

    # ---- optimisation -------------------------------------------------------------------------

    def collate(self, samples):
        return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}

    def param_groups(self, core):
        return param_groups(core, self.lr, self.backbone_lr, self.weight_decay)

    def scheduler(self, optimizer, total_steps, steps_per_epoch):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_scale(self.schedule, s, total_steps, self.warmup))

    def forward_module(self, core):
        return ClassForward(core, self.classes, self.text_trains)

    def loss(self, module, core, batch, autocast):
        feed = fc.sam_embeddings(core.sam, batch["sam_embed"]) if "sam_embed" in batch else contextlib.nullcontext()
        with autocast(), feed:
            out = module(batch["image"])
        logits = out["logits"].float()
        bce = self.criterion(logits, batch["label"], self.ignore)
        losses = {"total": bce, "bce": bce}
        if out.get("aux_logits") and self.aux_weight:
            aux = aux_loss([a.float() for a in out["aux_logits"]], batch["label"], self.ignore)
            losses.update(total=bce + self.aux_weight * aux, aux=aux)
        return losses

    def log_fields(self, optimizer, step):
        groups = optimizer.param_groups
        if all("name" in g for g in groups):
            return {"lr": groups[0]["lr"], **{f"lr_{g['name']}": g["lr"] for g in groups}}
        return {"lr": groups[0]["lr"], "backbone_lr": groups[-1]["lr"]}

    def save_model(self, path, core, step):
        core.eval()
        sd = {k: v.detach().cpu() for k, v in core.state_dict().items()}
        save_checkpoint(path, self.cfg, sd, classes=self.classes, step=step)
