"""The training-free path's mask merge: same-class masks that duplicate or contain each other
become one.

SAM over-segments: points on one object often return its parts (a shirt, a face) and near-copies
of the same mask. Before the masks guide the cost map, partial masks of one object are merged
into one, so that mask pooling averages over the whole object rather than over a part. The rule
has no features and no training: one pass of pairwise overlap tests, then the transitive closure
(:func:`sspsam.models.common.masks.connected_groups`).

Two masks of the same group (the class that prompted them) are merged when either

* their IoU ≥ ``iou_thr`` (near-duplicates from nearby points or multimask outputs), or
* the smaller lies mostly inside the larger, intersection / smaller area ≥ ``contain_thr`` (a part
  and its whole).

Disjoint masks stay apart, even with the same class: they are separate instances.

It follows SAM-MI's Shallow Mask Aggregation in spirit, not in rule: SAM-MI's SMAgg
(:mod:`sspsam.models.sam_mi.smagg`) links masks by mask-pooled feature agreement and touching.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sspsam.models.common.masks import connected_groups


@dataclass
class MergedMasks:
    masks: torch.Tensor  # [M, h, w] bool, merged
    scores: torch.Tensor  # [M] the best member's score
    groups: torch.Tensor  # [M] group (class) id
    members: list[list[int]]  # input indices merged into each output mask


class OverlapMaskMerge:
    """Merge same-group masks that duplicate or contain each other; keep disjoint ones apart."""

    def __init__(self, iou_thr: float = 0.6, contain_thr: float = 0.8, min_area: int = 1):
        self.iou_thr = float(iou_thr)
        self.contain_thr = float(contain_thr)
        self.min_area = int(min_area)

    def __call__(self, masks: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor | None = None) -> MergedMasks:
        masks = masks.bool()
        n = masks.shape[0]
        groups = torch.zeros(n, dtype=torch.long, device=masks.device) if groups is None else groups.long()
        keep = masks.flatten(1).sum(1) >= self.min_area
        idx = keep.nonzero().flatten().tolist()
        if not idx:
            h, w = masks.shape[-2:]
            return MergedMasks(masks.new_zeros((0, h, w)), scores.new_zeros(0), groups.new_zeros(0), [])
        sel = torch.tensor(idx, dtype=torch.long, device=masks.device)
        flat = masks[sel].flatten(1)
        g_in = groups[sel]
        # Pairwise overlaps only within a group (masks of different classes never merge): one
        # [n_c, hw] @ [hw, n_c] product per class instead of [n, hw] @ [hw, n], since grid
        # prompting yields about a thousand masks and the full product would be mostly wasted.
        link = torch.zeros(len(idx), len(idx), dtype=torch.bool, device=masks.device)
        for g in g_in.unique().tolist():
            rows = (g_in == g).nonzero().flatten()
            f = flat[rows].float()
            area = f.sum(1)
            inter = f @ f.T
            iou = inter / (area[:, None] + area[None, :] - inter).clamp(min=1)
            contain = inter / torch.minimum(area[:, None], area[None, :]).clamp(min=1)
            link[rows[:, None], rows[None, :]] = (iou >= self.iou_thr) | (contain >= self.contain_thr)

        cluster = connected_groups(link)  # numbered in the order of each cluster's first mask
        n_out = int(cluster.max()) + 1
        merged = torch.zeros((n_out, flat.shape[1]), dtype=torch.int32, device=masks.device)
        merged.index_add_(0, cluster, flat.int())
        best = scores.new_full((n_out,), float("-inf")).scatter_reduce(0, cluster, scores[sel], "amax")
        order = cluster.argsort(stable=True)
        first = order[torch.cat([order.new_zeros(1), cluster[order].bincount(minlength=n_out).cumsum(0)[:-1]])]
        members = [m.tolist() for m in sel[order].split(cluster.bincount(minlength=n_out).tolist())]
        return MergedMasks((merged > 0).view(n_out, *masks.shape[1:]), best, g_in[first], members)


def merge_overlapping_masks(
    masks: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor | None = None,
    iou_thr: float = 0.6, contain_thr: float = 0.8, min_area: int = 1,
) -> MergedMasks:
    """:class:`OverlapMaskMerge` as one call."""
    return OverlapMaskMerge(iou_thr, contain_thr, min_area)(masks, scores, groups)


# the names this code had while it lived in sam_mi/smagg.py (it never was SAM-MI's SMAgg)
Aggregated = MergedMasks
ShallowMaskAggregation = OverlapMaskMerge
