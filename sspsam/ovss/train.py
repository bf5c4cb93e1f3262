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
``param_groups(lr, backbone_lr, weight_decay)`` method (ESC-Net) defines its own groups. Checkpoints are
written atomically with :func:`sspsam.checkpoint.save_checkpoint`, so
``sspsam.predictor._model_from_checkpoint`` rebuilds the model from the file alone.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..checkpoint import read_sspsam_checkpoint, save_checkpoint
from ..config import build_model, load_config
from ..data.semseg import SemSegDataset
from ..errors import ConfigError
from .cost import class_embeddings


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
) -> dict:
    """Train, write ``out_dir/model.pt`` (and ``out_dir/last.pt`` with the optimizer every
    ``save_every`` steps; ``resume=True`` continues from it). Returns a summary with the model."""
    cfg = load_config(cfg) if not isinstance(cfg, dict) else cfg
    tcfg = cfg.get("train", {})
    lr = float(lr if lr is not None else tcfg.get("lr", 1e-4))
    backbone_lr = float(tcfg.get("backbone_lr", lr / 100))
    aux_weight = float(tcfg.get("aux_weight", 0.4))
    if tcfg.get("loss", "masked") not in LOSSES:
        raise ConfigError(f"unknown train.loss '{tcfg.get('loss')}'; choose one of {', '.join(LOSSES)}")
    criterion = LOSSES[tcfg.get("loss", "masked")]
    schedule = tcfg.get("schedule", "default")
    if schedule not in ("default", "cosine"):
        raise ConfigError(f"unknown train.schedule '{schedule}'; choose default or cosine")
    grad_clip = float(tcfg.get("grad_clip", 1.0))
    if steps < 1 or batch_size < 1:
        raise ConfigError(f"steps and batch_size must be positive, got {steps} and {batch_size}")
    torch.manual_seed(seed)
    model = build_model(cfg)
    model.freeze(tcfg.get("freeze", []))
    data = SemSegDataset(data_root, "train", model.image_size)
    classes, ignore = data.classes, data.ignore_index
    opt = torch.optim.AdamW(param_groups(model, lr, backbone_lr, float(tcfg.get("weight_decay", 1e-4))))
    for g in opt.param_groups:
        g["initial_lr"] = g["lr"]
    out_dir = Path(out_dir)
    last = out_dir / "last.pt"
    step = 0
    if resume and last.is_file():
        ck = read_sspsam_checkpoint(last)
        model.load_state_dict(ck["state_dict"])
        opt.load_state_dict(ck["optimizer"])
        step = int(ck["step"])
        log(f"resumed from {last} at step {step}")
    text_trains = any(p.requires_grad for p in model.clip.model.transformer.parameters())
    gen = torch.Generator().manual_seed(seed + step)
    model.train()
    t0, order, pos, loss_v = time.perf_counter(), torch.randperm(len(data), generator=gen), 0, float("nan")

    def save(path: Path, with_optimizer: bool) -> None:
        extra = {"optimizer": opt.state_dict(), "step": step} if with_optimizer else {"step": step}
        save_checkpoint(path, cfg, model.state_dict(), classes=classes, **extra)

    while step < steps:
        if time_limit is not None and time.perf_counter() - t0 > time_limit:
            log(f"time limit reached at step {step}")
            break
        idx = []
        while len(idx) < batch_size:
            if pos == len(order):
                order, pos = torch.randperm(len(data), generator=gen), 0
            idx.append(int(order[pos]))
            pos += 1
        samples = [data[i] for i in idx]
        images = torch.stack([s["image"] for s in samples])
        labels = torch.stack([s["label"] for s in samples])
        flip = torch.rand(len(idx), generator=gen) < 0.5
        images[flip], labels[flip] = images[flip].flip(-1), labels[flip].flip(-1)
        with torch.set_grad_enabled(text_trains):
            class_emb = model.class_embeddings(classes) if hasattr(model, "class_embeddings") else class_embeddings(model.clip, classes)
        scale = lr_scale(schedule, step, steps, warmup)
        for g in opt.param_groups:
            g["lr"] = g["initial_lr"] * scale
        out = model(images, class_emb)
        loss = criterion(out["logits"], labels, ignore)
        if out.get("aux_logits") and aux_weight:
            loss = loss + aux_weight * aux_loss(out["aux_logits"], labels, ignore)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        step += 1
        loss_v = loss.item()
        if log_every and step % log_every == 0:
            log(f"step {step} loss {loss_v:.4f} {time.perf_counter() - t0:.0f}s")
        if save_every and step % save_every == 0:
            save(last, True)
    model.eval()
    path = out_dir / "model.pt"
    save(path, False)
    return {"checkpoint": str(path), "steps": step, "loss": loss_v, "seconds": time.perf_counter() - t0,
            "classes": classes, "model": model}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sspsam.ovss.train", description="Train ESC-Net / SAM-MI on a generic semseg folder.")
    p.add_argument("config")
    p.add_argument("data_root")
    p.add_argument("out_dir")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--save-every", type=int, default=100)
    a = p.parse_args(argv)
    res = train_ovss(a.config, a.data_root, a.out_dir, a.steps, a.batch_size, a.lr, a.seed, resume=a.resume, save_every=a.save_every)
    print(json.dumps({k: v for k, v in res.items() if k != "model"}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
