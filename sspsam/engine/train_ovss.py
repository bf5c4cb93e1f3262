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
written atomically with :func:`sspsam.io.checkpoint.save_checkpoint`, so
``sspsam.models.build._model_from_checkpoint`` rebuilds the model from the file alone.

``cached_features`` (SAM-MI only): SAM's image embeddings from a folder written by
:func:`build_ovss_feature_cache` (``sspsam cache-features sam-mi-…``), for configs that freeze SAM's
image encoder (``sam-mi-vitb`` freezes all of SAM). The random horizontal flip stays: the cache holds
each image twice, plain and mirrored, and a step reads the view it drew. ESC-Net has nothing to
cache: it never runs SAM's image encoder (its SAM block works on CLIP features, and CLIP trains).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import sspsam.engine.feature_cache as fc
from sspsam.models.build import read_sspsam_checkpoint
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
    model = build_ovss_training_model(cfg, seed)
    data = SemSegDataset(data_root, "train", model.image_size)
    classes, ignore = data.classes, data.ignore_index
    cache = cache_rows = None
    if cached_features is not None:
        _check_cacheable(cfg, model)
        cache = fc.FeatureCache(cached_features)
        index = fc.image_index(data, data_root)
        want = _cache_identity(cfg, model, index, data_root)
        cache.check(**{k: want[k] for k in ("model", "sam_config_hash", "encoder_hash", "dataset", "views")})
        cache_rows = index.sample_rows
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
    curve: list[float] = []

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
        if cache is None:
            out = model(images, class_emb)
        else:  # row = image x 2 + view (0 plain, 1 mirrored): the view this step drew
            emb = torch.stack([torch.from_numpy(cache[int(cache_rows[i]) * 2 + int(f)]) for i, f in zip(idx, flip)])
            with fc.sam_embeddings(model.sam, emb):
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
        curve.append(loss_v)
        if log_every and step % log_every == 0:
            log(f"step {step} loss {loss_v:.4f} {time.perf_counter() - t0:.0f}s")
        if save_every and step % save_every == 0:
            save(last, True)
    model.eval()
    path = out_dir / "model.pt"
    save(path, False)
    return {"checkpoint": str(path), "steps": step, "loss": loss_v, "seconds": time.perf_counter() - t0,
            "classes": classes, "model": model, "losses": curve}


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
        images[mirrored] = images[mirrored].flip(-1)  # as train_ovss flips the batch before the model
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
    a = p.parse_args(argv)
    from sspsam.errors import SSPSamError

    try:
        res = train_ovss(a.config, a.data_root, a.out_dir, a.steps, a.batch_size, a.lr, a.seed, resume=a.resume,
                         save_every=a.save_every, cached_features=a.cached_features)
    except SSPSamError as exc:
        from sspsam.errors import one_line

        p.exit(2, f"error: {one_line(exc)}\n")
    print(json.dumps({k: v for k, v in res.items() if k not in ("model", "losses")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
