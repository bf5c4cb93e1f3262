"""Mask helpers more than one method uses.

* :func:`connected_groups` — the transitive closure of a pairwise "these two masks belong
  together" link: SAM-MI's Shallow Mask Aggregation and the training-free path's overlap merge
  each decide the links their own way, then group the same way.
* :func:`mask_pool` — the mean of a feature map inside each (soft) mask.
* :func:`official_mask_logits` — SAM's low-resolution logits in the frame the official SSP-SAM
  code evaluates (512²), for every referring model (SSP-SAM, its ONNX export).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: the side of the square the official SSP-SAM code evaluates masks in (and applies GRES's
#: "fewer than 50 pixels means no target" rule to)
OFFICIAL_MASK_SIZE = 512


def connected_groups(link: torch.Tensor, ok: torch.Tensor | None = None) -> torch.Tensor:
    """Transitive closure of a pairwise link [N,N] (read above the diagonal) → a group id per item
    [N], groups numbered in the order of their first item; −1 where ``ok`` [N] is False.

    ``scipy.sparse.csgraph.connected_components`` on the linked pairs (C, no per-item Python loop).
    """
    import numpy as np
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = link.shape[0]
    ok = torch.ones(n, dtype=torch.bool, device=link.device) if ok is None else ok
    group = torch.full((n,), -1, dtype=torch.long, device=link.device)
    if n == 0:
        return group
    i, j = (link & ok[:, None] & ok[None]).triu(1).nonzero(as_tuple=True)
    graph = coo_matrix((np.ones(i.numel(), dtype=np.int8), (i.cpu().numpy(), j.cpu().numpy())), shape=(n, n))
    labels = connected_components(graph, directed=False)[1]
    okn = ok.cpu().numpy()
    # renumber in the order of each group's first ok item
    _, first, inv = np.unique(labels[okn], return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    group[ok] = torch.from_numpy(rank[inv.reshape(-1)]).to(link.device)
    return group


def mask_pool(masks: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
    """Average features inside soft masks: masks [..., N, h, w], feats [..., D, h, w] → [..., N, D]."""
    num = torch.einsum("...nhw,...dhw->...nd", masks, feats)
    return num / masks.sum((-2, -1))[..., None].clamp(min=1e-6)


def official_mask_logits(low_res: torch.Tensor, sam_size: int, out_size: int = OFFICIAL_MASK_SIZE) -> torch.Tensor:
    """SAM low-res logits [T,1,h,w] → the official ``pred_masks`` frame: bilinear to SAM's input
    square, then to ``out_size``² (the official code evaluates and applies its GRES
    "fewer than 50 pixels" rule there)."""
    x = F.interpolate(low_res.float(), size=(sam_size, sam_size), mode="bilinear", align_corners=False)
    return F.interpolate(x, size=(out_size, out_size), mode="bilinear", align_corners=False)
