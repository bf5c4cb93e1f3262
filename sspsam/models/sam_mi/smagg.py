"""SAM-MI's Shallow Mask Aggregation (SMAgg): merge the partial masks SAM returns for one object.

SAM over-segments: points on one object often return its parts (a shirt, a face). Before the
masks guide the cost map, masks whose mask-pooled CLIP features agree and that contain or touch
each other are merged, so that mask pooling averages over the whole object rather than a part.
"Shallow": one pass of pairwise tests, then the transitive closure
(:func:`sspsam.models.common.masks.connected_groups`); no learned parameters of its own.

(The training-free path merges masks by a different rule, IoU and containment within a class,
without features: :mod:`sspsam.models.zeroshot.mask_merge`.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sspsam.models.common.masks import connected_groups


def shallow_mask_aggregation(
    masks: torch.Tensor,
    feats: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
    containment: float = 0.8,
    similarity: float = 0.8,
    touch: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SMAgg: merge partial masks of one object against SAM's over-segmentation.

    masks [N,H,W] (probabilities or bool; foreground is > 0.5), feats [N,D] per-mask features
    (e.g. mask-pooled CLIP features) or None, valid [N]. Masks i, j are merged when their
    features agree (cosine ≥ ``similarity``; always true without ``feats``) and one mostly lies
    inside the other (|i∩j| / min(|i|,|j|) ≥ ``containment``) or — with features only — they
    touch (adjacent within one pixel), as two halves of one object do. Merging is transitive.
    Returns (merged masks [M,H,W], the max of their members, and group ids [N], −1 for invalid
    or empty masks).
    """
    n = masks.shape[0]
    hard = masks.detach().float() > 0.5
    ok = hard.flatten(1).any(1) if valid is None else valid & hard.flatten(1).any(1)
    flat = hard.flatten(1).float()
    area = flat.sum(1)
    inter = flat @ flat.T
    linked = inter / torch.minimum(area[:, None], area[None]).clamp(min=1) >= containment
    if feats is not None:
        f = F.normalize(feats.detach().float(), dim=-1)
        agree = f @ f.T >= similarity
        if touch:
            grown = F.max_pool2d(hard[:, None].float(), 3, 1, 1).flatten(1)
            linked = linked | ((grown @ flat.T) > 0)
        linked = linked & agree
    group = connected_groups(linked, ok)
    n_groups = int(group.max()) + 1 if n else 0
    if n_groups == 0:
        return masks.new_zeros((0, *masks.shape[1:])), group
    member = group >= 0
    src = masks[member].float().flatten(1)
    index = group[member][:, None].expand_as(src)
    merged = src.new_zeros((n_groups, src.shape[1])).scatter_reduce(0, index, src, "amax", include_self=False)
    return merged.view(n_groups, *masks.shape[1:]), group
