"""Train ESC-Net / SAM-MI on a semantic-segmentation dataset (generic layout, :class:`SemSegDataset`).

Loss: per-pixel binary cross-entropy over classes (CAT-Seg's, which ESC-Net and SAM-MI keep),
logits upsampled to the label; pixels labelled ``ignore_index`` are left out. Models may return
``aux_logits`` (a list of per-class maps at their own resolution: ESC-Net's per-block scores that
drive the pseudo prompts, SAM-MI's text-guided point scores); they get the same loss against the
label resized with nearest neighbour, weighted by ``train.aux_weight``.

``train.loss: catseg`` is CAT-Seg's loss exactly: BCE averaged over every pixel and class, pixels
labelled ``ignore_index`` included with an all-zero target (CAT-Seg only leaves them out of the
one-hot); the default ``masked`` leaves them out of the mean.

Two learning rates, as ESC-Net trains CLIP and the SAM block 100× slower than the rest:
``train.backbone_lr`` for ``clip.*`` and ``sam.*``, ``lr`` for the new modules; a model with a
``param_groups(lr, backbone_lr, weight_decay)`` method (ESC-Net) defines its own groups.

The loop is the shared one (:func:`sspsam.engine.trainer.fit`; this module is the :class:`OVSSTask`
it runs): DDP under torchrun, bf16 autocast, gradient accumulation, TensorBoard, ``log.jsonl``,
bit-exact resume from ``last.pt`` (the training state, as for SSP-SAM) and an atomic ``model.pt``
(:func:`sspsam.io.checkpoint.save_checkpoint` with the classes), from which
``sspsam.models.build._model_from_checkpoint`` rebuilds the model alone. ``sspsam train
escnet-tiny --data SEMSEG_ROOT`` runs the same thing from the command line.

``cached_features`` (SAM-MI only): SAM's image embeddings from a folder written by
:func:`build_ovss_feature_cache` (``sspsam cache-features sam-mi-…``), for configs that freeze SAM's
image encoder (``sam-mi-vitb`` freezes all of SAM). The random horizontal flip stays: the cache holds
each image twice, plain and mirrored, and a step reads the view it drew. ESC-Net has nothing to
cache: it never runs SAM's image encoder (its SAM block works on CLIP features, and CLIP trains).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import sspsam.engine.feature_cache as fc
from sspsam.engine.trainer import TrainTask, fit
from sspsam.io.checkpoint import save_checkpoint
from sspsam.models.build import build_model
from sspsam.config import load_config
from sspsam.data.semseg import SemSegDataset
from sspsam.errors import ConfigError
from sspsam.models.cost import class_embeddings


def bce_loss(logits: torch.Tensor, label: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """logits [B,K,h,w] (any size), label [B,H,W] → mean BCE over classes and valid pixels."""
    k = logits.shape[1]
    if logits.shape[-2:] != label.shape[-2:]:
        logits = F.interpolate(logits, size=label.shape[-2:], mode="bilinear", align_corners=False)
    valid = label != ignore_index
    target = F.one_hot(torch.where(valid, label, 0), k).permute(0, 3, 1, 2).to(logits.dtype)
    loss = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(1)
    return (loss * valid).sum() / valid.sum().clamp(min=1)


def catseg_bce_loss(logits: torch.Tensor, label: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """CAT-Seg's per-pixel BCE: logits upsampled (bilinear) to the label, one-hot targets where the
    label is valid and all zeros where it is ignored, mean over B·H·W·K."""
    k = logits.shape[1]
    if logits.shape[-2:] != label.shape[-2:]:
        logits = F.interpolate(logits, size=label.shape[-2:], mode="bilinear", align_corners=False)
    valid = label != ignore_index
    target = F.one_hot(torch.where(valid, label, 0), k).permute(0, 3, 1, 2).to(logits.dtype) * valid[:, None]
    return F.binary_cross_entropy_with_logits(logits, target)


LOSSES = {"masked": bce_loss, "catseg": catseg_bce_loss}


def aux_loss(aux: list[torch.Tensor], label: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """The same BCE for low-resolution maps, against the label resized (nearest) to each map."""
    total = label.new_zeros((), dtype=torch.float32)
    for a in aux:
        small = F.interpolate(label[:, None].float(), size=a.shape[-2:], mode="nearest")[:, 0].long()
        total = total + bce_loss(a, small, ignore_index)
    return total / max(len(aux), 1)


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
    """ESC-Net / SAM-MI on a generic semseg folder for :func:`sspsam.engine.trainer.fit`: the
    per-pixel BCE (plus ``aux_weight`` x the auxiliary maps' BCE), ``lr`` / ``backbone_lr`` groups,
    ``train.schedule``, ``train.grad_clip``; ``model.pt`` carries the training classes."""

    def __init__(self, cfg: dict, data_root, *, lr: float | None = None, warmup: int = 20, cached_features=None) -> None:
        self.cfg, self.data_root, self.warmup, self.cached_features = cfg, data_root, int(warmup), cached_features
        tcfg = cfg.get("train") or {}
        self.lr = float(lr if lr is not None else tcfg.get("lr", 1e-4))
        self.backbone_lr = float(tcfg.get("backbone_lr", self.lr / 100))
        self.weight_decay = float(tcfg.get("weight_decay", 1e-4))
        self.aux_weight = float(tcfg.get("aux_weight", 0.4))
        if tcfg.get("loss", "masked") not in LOSSES:
            raise ConfigError(f"unknown train.loss '{tcfg.get('loss')}'; choose one of {', '.join(LOSSES)}")
        self.criterion = LOSSES[tcfg.get("loss", "masked")]
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

    def dataset(self, core):
        data = getattr(self, "_reader", None) or SemSegDataset(self.data_root, "train", core.image_size)
        data.image_size = int(core.image_size)  # the file list does not depend on it; samples are cut at the model's size
        self.classes, self.ignore = data.classes, data.ignore_index
        if self.cached_features is None:
            return OVSSSamples(data)
        _check_cacheable(self.cfg, core)
        cache = fc.FeatureCache(self.cached_features)
        index = fc.image_index(data, self.data_root)
        want = _cache_identity(self.cfg, core, index, self.data_root)
        cache.check(**{k: want[k] for k in ("model", "sam_config_hash", "encoder_hash", "dataset", "views")})
        return OVSSSamples(data, cache, index.sample_rows)

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


def train_ovss(
    cfg: dict | str | Path,
    data_root: str | Path,
    out_dir: str | Path,
    steps: int = 300,
    batch_size: int = 4,
    lr: float | None = None,
    seed: int = 0,
    *,
    resume: bool = False,
    save_every: int = 0,
    log_every: int = 50,
    time_limit: float | None = None,
    warmup: int = 20,
    log=print,
    cached_features: str | Path | None = None,
    device: str = "cpu",
    precision: str = "fp32",
    grad_accum: int = 1,
    total_steps: int | None = None,
    tensorboard: bool = True,
    progress: bool = False,
    overwrite: bool = False,
) -> dict:
    """Train with the shared loop (:func:`sspsam.engine.trainer.fit`: DDP under torchrun, AMP,
    accumulation, TensorBoard, bit-exact resume) and write ``out_dir/model.pt``, plus
    ``out_dir/last.pt`` every ``save_every`` steps and at the end (0: never); ``resume=True``
    continues from ``last.pt`` when there is one (else starts afresh). ``log`` gets a line every
    ``log_every`` steps (0: none). Returns a summary with the model."""
    cfg = load_config(cfg) if not isinstance(cfg, dict) else cfg
    if steps < 1 or batch_size < 1:
        raise ConfigError(f"steps and batch_size must be positive, got {steps} and {batch_size}")
    if save_every < 0:
        raise ConfigError(f"save_every must be >= 0, got {save_every}")
    task = OVSSTask(cfg, data_root, lr=lr, warmup=warmup, cached_features=cached_features)
    out_dir = Path(out_dir)
    resume = resume and (out_dir / "last.pt").is_file()
    t0 = time.perf_counter()

    def on_step(rec: dict) -> None:
        if log_every and rec["step"] % log_every == 0:
            log(f"step {rec['step']} loss {rec['total']:.4f} {time.perf_counter() - t0:.0f}s")

    res = fit(task, out_dir, steps=steps, batch_size=batch_size, seed=seed, total_steps=int(total_steps or steps),
              resume=resume, ckpt_every=save_every, device=device, precision=precision, grad_accum=grad_accum,
              tensorboard=tensorboard, progress=progress, time_limit=time_limit, echo=log, on_step=on_step,
              overwrite=overwrite)
    curve = [r["total"] for r in res["losses"]]
    return {"checkpoint": str(res["model"]), "steps": res["step"], "loss": curve[-1] if curve else float("nan"),
            "seconds": res["seconds"], "classes": task.classes, "model": res["module"], "losses": curve}


def build_ovss_training_model(cfg: dict, seed: int):
    """The model as :func:`train_ovss` builds it (seeded init, frozen parts): the cache must be
    built from the same SAM image-encoder weights."""
    torch.manual_seed(seed)
    model = build_model(cfg)
    model.freeze((cfg.get("train") or {}).get("freeze", []))
    return model


VIEWS = ["plain", "hflip"]


def _check_cacheable(cfg: dict, model) -> None:
    kind = cfg.get("model")
    if kind != "sam-mi":
        raise ConfigError(f"--cached-features: {kind} never runs SAM's image encoder (ESC-Net's SAM block "
                          "works on CLIP features, which train), so there is nothing to cache")
    if any(p.requires_grad for p in model.sam.image_encoder.parameters()):
        raise ConfigError(f"--cached-features needs SAM's image encoder frozen, but config '{cfg.get('name')}' trains it "
                          "(add sam or sam.image_encoder to train.freeze)")


def _cache_identity(cfg: dict, model, index, data_root) -> dict:
    ds_id = {"name": "semseg", "split": "train", "image_size": int(model.image_size), "images": len(index.keys)}
    ds_id["fingerprint"] = index.fingerprint(ds_id)
    return {"model": cfg.get("model"), "config": cfg.get("name", "?"), "sam_config_hash": fc.sam_config_hash(cfg),
            "encoder_hash": fc.encoder_hash(model.sam.image_encoder), "dataset": ds_id, "views": VIEWS}


def build_ovss_feature_cache(
    cfg: dict | str | Path,
    data_root: str | Path,
    out_dir: str | Path,
    *,
    seed: int = 0,
    batch_size: int = 8,
    shard_size: int = 64,
    dtype: str = "float16",
    device: str = "cpu",
    progress=None,
) -> dict:
    """SAM image embeddings of every training image, plain and mirrored (rows ``2 i`` and ``2 i + 1``),
    for ``train_ovss(..., cached_features=out_dir)`` with the same config, data and seed."""
    cfg = load_config(cfg) if not isinstance(cfg, dict) else cfg
    model = build_ovss_training_model(cfg, seed)
    _check_cacheable(cfg, model)
    data = SemSegDataset(data_root, "train", model.image_size)
    index = fc.image_index(data, data_root)
    identity = _cache_identity(cfg, model, index, data_root)
    dev = torch.device(device)
    sam = model.sam.to(dev).eval()

    def encode(rows: list[int]):
        images = torch.stack([data[index.first_sample[r // 2]]["image"] for r in rows])
        mirrored = torch.tensor([r % 2 == 1 for r in rows])
        images[mirrored] = images[mirrored].flip(-1)  # as OVSSSamples flips a sample before the model
        with torch.no_grad():  # SAM-MI's forward passes no valid_hw in training
            return sam.encode_image(images.to(dev)).float().cpu().numpy()

    shape = encode([0]).shape[1:]
    identity.update(dtype=dtype, shape=list(shape), shard_size=int(shard_size), rows=2 * len(index.keys))
    return fc.write_cache(out_dir, identity, encode, batch_size=batch_size, progress=progress)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sspsam.engine.train_ovss", description="Train ESC-Net / SAM-MI on a generic semseg folder.")
    p.add_argument("config")
    p.add_argument("data_root")
    p.add_argument("out_dir")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--cached-features", help="SAM-MI: a folder from `sspsam cache-features` (same config, data, seed)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--total-steps", type=int, help="length of the LR schedule (default --steps); keep it across resumes")
    a = p.parse_args(argv)
    from sspsam.errors import SSPSamError

    try:
        res = train_ovss(a.config, a.data_root, a.out_dir, a.steps, a.batch_size, a.lr, a.seed, resume=a.resume,
                         save_every=a.save_every, cached_features=a.cached_features, device=a.device,
                         precision=a.precision, grad_accum=a.grad_accum, total_steps=a.total_steps)
    except SSPSamError as exc:
        from sspsam.errors import one_line

        p.exit(2, f"error: {one_line(exc)}\n")
    print(json.dumps({k: v for k, v in res.items() if k not in ("model", "losses")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
