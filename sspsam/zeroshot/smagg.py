"""Shallow Mask Aggregation without learned parts (after SAM-MI's SMAgg).

SAM over-segments: points on one object often return its parts (a shirt, a face) and near-copies
of the same mask. Before masks guide the cost map, partial masks of one object are merged into
one, so that mask pooling averages over the whole object rather than over a part. "Shallow": one
pass of pairwise overlap tests and a union-find (shared with SAM-MI's learned SMAgg), no
features, no training.

Two masks of the same group (the class that prompted them) are merged when either

* their IoU ≥ ``iou_thr`` (near-duplicates from nearby points or multimask outputs), or
* the smaller lies mostly inside the larger, intersection / smaller area ≥ ``contain_thr`` (a part
  and its whole).

Disjoint masks stay apart, even with the same class: they are separate instances.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ovss.sam_mi import connected_groups


@dataclass
class Aggregated:
    masks: torch.Tensor  # [M, h, w] bool, merged
    scores: torch.Tensor  # [M] the best member's score
    groups: torch.Tensor  # [M] group (class) id
    members: list[list[int]]  # input indices merged into each output mask


class ShallowMaskAggregation:
    """Merge same-group masks that duplicate or contain each other; keep disjoint ones apart."""

    def __init__(self, iou_thr: float = 0.6, contain_thr: float = 0.8, min_area: int = 1):
        self.iou_thr = float(iou_thr)
        self.contain_thr = float(contain_thr)
        self.min_area = int(min_area)

    def __call__(self, masks: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor | None = None) -> Aggregated:
        masks = masks.bool()
        n = masks.shape[0]
        groups = torch.zeros(n, dtype=torch.long, device=masks.device) if groups is None else groups.long()
        keep = masks.flatten(1).sum(1) >= self.min_area
        idx = keep.nonzero().flatten().tolist()
        if not idx:
            h, w = masks.shape[-2:]
            return Aggregated(masks.new_zeros((0, h, w)), scores.new_zeros(0), groups.new_zeros(0), [])
        flat = masks[idx].flatten(1).float()
        area = flat.sum(1)
        inter = flat @ flat.T
        union = area[:, None] + area[None, :] - inter
        iou = inter / union.clamp(min=1)
        contain = inter / torch.minimum(area[:, None], area[None, :]).clamp(min=1)
        same = groups[idx][:, None] == groups[idx][None, :]
        link = same & ((iou >= self.iou_thr) | (contain >= self.contain_thr))

        clusters: dict[int, list[int]] = {}
        for a, g in enumerate(connected_groups(link).tolist()):
            clusters.setdefault(g, []).append(a)
        out_m, out_s, out_g, members = [], [], [], []
        for local in clusters.values():
            src = [idx[a] for a in local]
            out_m.append(masks[src].any(0))
            out_s.append(scores[src].max())
            out_g.append(groups[src[0]])
            members.append(src)
        return Aggregated(torch.stack(out_m), torch.stack(out_s), torch.stack(out_g), members)
