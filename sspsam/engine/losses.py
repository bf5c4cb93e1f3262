"""SSP-SAM's training objective (official recipe): 4·dice + 4·focal on masks, 5·L1 + 2·GIoU on the
auxiliary box, and (our GRES switch) a BCE on the no-target logit.

``loss.reduction: official`` (the paper configs) reduces as the official code does
(``models/ssp_sam_224.py``: ``VGCriterion.loss_boxes``, ``SegCriterion``; ``losses/dice_sun.py``,
``losses/binary_focal.py``): the box L1 is summed over the four coordinates and divided by the
number of boxes — sspsam's older ``mean`` reduction (still the code default, so existing runs and
checkpoints keep their loss scale) averages over coordinates too, which is 4x smaller; GIoU is the
mean over boxes in both. ``loss.mask_size`` (official: 512) is the resolution the mask losses are
computed at: the official decoder output is upsampled 256 → 1024 → 512 bilinearly and compared
with the ground truth resized to 1024 and then to 512 by nearest neighbour.

OVSS (ESC-Net, SAM-MI): per-pixel binary cross-entropy over classes (CAT-Seg's, which both keep),
logits upsampled to the label; pixels labelled ``ignore_index`` are left out (``masked``, the
default) or, as CAT-Seg exactly, kept with an all-zero target (``catseg``). Auxiliary maps (ESC-Net's
per-block scores, SAM-MI's point scores) get the same loss against the label resized with nearest
neighbour."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample soft dice with +1 smoothing (so an empty target with an empty prediction costs 0); mean over samples."""
    p = logits.sigmoid().flatten(1)
    t = target.float().flatten(1)
    return (1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)).mean()


def sigmoid_focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Focal loss (Lin et al.) averaged over pixels and samples."""
    t = target.float()
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, t, reduction="none")
    p_t = p * t + (1 - p) * (1 - t)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * t + (1 - alpha) * (1 - t)) * loss
    return loss.flatten(1).mean(1).mean()


def box_cxcywh_to_xyxy(b: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = b.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)


def generalized_box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Element-wise GIoU of paired xyxy boxes [N,4]."""
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    lt, rb = torch.max(a[:, :2], b[:, :2]), torch.min(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = area_a + area_b - inter
    iou = inter / union.clamp(min=1e-7)
    hull = (torch.max(a[:, 2:], b[:, 2:]) - torch.min(a[:, :2], b[:, :2])).clamp(min=0).prod(-1)
    return iou - (hull - union) / hull.clamp(min=1e-7)


def box_losses(pred: torch.Tensor, target: torch.Tensor, weights: dict) -> dict[str, torch.Tensor]:
    """Weighted L1 and GIoU of paired cxcywh boxes [N,4] (the official ``VGCriterion``, and alone the
    whole stage-1 objective). ``official``: L1 summed over coordinates / N; ``mean``: / (4N)."""
    target = target.to(pred.dtype)
    l1 = F.l1_loss(pred, target, reduction="none")
    l1 = l1.sum() / max(1, pred.shape[0]) if weights.get("reduction", "mean") == "official" else l1.mean()
    giou = generalized_box_iou(box_cxcywh_to_xyxy(pred), box_cxcywh_to_xyxy(target))
    out = {"box_l1": weights.get("box_l1", 5.0) * l1, "box_giou": weights.get("box_giou", 2.0) * (1 - giou).mean()}
    out["total"] = out["box_l1"] + out["box_giou"]
    return out


def ssp_loss(out: dict, mask: torch.Tensor, box: torch.Tensor, no_target: torch.Tensor, weights: dict) -> dict[str, torch.Tensor]:
    """out: model outputs; mask [T,S,S] bool (letterboxed GT); box [T,4] cxcywh in [0,1]; no_target [T] bool."""
    if weights.get("reduction", "mean") not in ("mean", "official"):
        raise ValueError(f"loss.reduction must be 'mean' or 'official', got {weights['reduction']!r}")
    logits = out["mask_logits"][:, 0]
    logits = F.interpolate(logits[:, None], size=mask.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    if weights.get("mask_size") and int(weights["mask_size"]) != mask.shape[-1]:
        size = (int(weights["mask_size"]),) * 2
        logits = F.interpolate(logits[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
        mask = F.interpolate(mask[:, None].float(), size=size, mode="nearest")[:, 0] > 0.5
    losses = {
        "dice": weights.get("dice", 4.0) * dice_loss(logits, mask),
        "focal": weights.get("focal", 4.0)
        * sigmoid_focal_loss(logits, mask, weights.get("focal_alpha", 0.25), weights.get("focal_gamma", 2.0)),
    }
    has = ~no_target
    if has.any() and "box" in out:
        b = box_losses(out["box"][has], box[has], weights)
        losses["box_l1"], losses["box_giou"] = b["box_l1"], b["box_giou"]
    if "no_target_logit" in out:
        losses["no_target"] = weights.get("no_target", 1.0) * F.binary_cross_entropy_with_logits(
            out["no_target_logit"], no_target.float()
        )
    losses["total"] = sum(losses.values())
    return losses


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


SEMSEG_LOSSES = {"masked": bce_loss, "catseg": catseg_bce_loss}


def aux_loss(aux: list[torch.Tensor], label: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """The same BCE for low-resolution maps, against the label resized (nearest) to each map."""
    total = label.new_zeros((), dtype=torch.float32)
    for a in aux:
        small = F.interpolate(label[:, None].float(), size=a.shape[-2:], mode="nearest")[:, 0].long()
        total = total + bce_loss(a, small, ignore_index)
    return total / max(len(aux), 1)
