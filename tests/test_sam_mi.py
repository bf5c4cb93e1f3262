"""Mask grouping (``connected_groups`` on scipy's csgraph), SAM-MI's SMAgg and the training-free overlap merge
against hand-worked answers."""

from __future__ import annotations

import torch

from sspsam.models.common.masks import connected_groups
from sspsam.models.sam_mi.smagg import shallow_mask_aggregation
from sspsam.models.zeroshot.mask_merge import OverlapMaskMerge


def _link(n: int, pairs: list[tuple[int, int]]) -> torch.Tensor:
    link = torch.zeros(n, n, dtype=torch.bool)
    for i, j in pairs:
        link[i, j] = True
    return link


def test_connected_groups_known_answer():
    # chains 0-3-5 and 1-4; 6 alone; 2 not ok: groups numbered by their first item
    link = _link(7, [(0, 3), (3, 5), (1, 4), (2, 6)])
    ok = torch.tensor([True, True, False, True, True, True, True])
    assert connected_groups(link, ok).tolist() == [0, 1, -1, 0, 1, 0, 2]
    # a not-ok item does not bridge its neighbours
    assert connected_groups(_link(3, [(0, 1), (1, 2)]), torch.tensor([True, False, True])).tolist() == [0, -1, 1]
    # only the part above the diagonal is read (the link is symmetric by contract)
    assert connected_groups(_link(3, [(2, 0)])).tolist() == [0, 1, 2]
    assert connected_groups(_link(4, [(2, 3), (0, 3)])).tolist() == [0, 1, 0, 0]


def _rect(y0: int, y1: int, x0: int, x1: int, size: int = 12) -> torch.Tensor:
    m = torch.zeros(size, size, dtype=torch.bool)
    m[y0:y1, x0:x1] = True
    return m


def test_shallow_aggregation_known_groups():
    whole = _rect(0, 6, 0, 6)
    masks = torch.stack([
        _rect(7, 12, 7, 12),  # 0: alone
        whole,  # 1: the whole
        whole.clone(),  # 2: its duplicate
        _rect(0, 2, 0, 2),  # 3: a part inside the whole
        _rect(7, 12, 0, 3),  # 4: disjoint, same class
        _rect(0, 6, 0, 6),  # 5: a copy of the whole, another class: never merged across classes
    ])
    scores = torch.tensor([0.1, 0.5, 0.9, 0.2, 0.3, 0.4])
    out = OverlapMaskMerge()(masks, scores, torch.tensor([0, 0, 0, 0, 0, 1]))
    assert out.members == [[0], [1, 2, 3], [4], [5]]
    assert out.groups.tolist() == [0, 0, 0, 1]
    assert torch.allclose(out.scores, torch.tensor([0.1, 0.9, 0.3, 0.4]))
    assert torch.equal(out.masks[1], whole)


def test_learned_smagg_merges_touching_halves_with_agreeing_features():
    left, right, far = _rect(0, 6, 0, 3), _rect(0, 6, 3, 6), _rect(9, 12, 9, 12)
    feats = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0]])
    merged, group = shallow_mask_aggregation(torch.stack([left, right, far]).float(), feats)
    assert group.tolist() == [0, 0, 1]
    assert torch.equal(merged[0] > 0.5, left | right) and torch.equal(merged[1] > 0.5, far)
    # without features, touching is not enough: the halves stay apart
    _, group = shallow_mask_aggregation(torch.stack([left, right, far]).float())
    assert group.tolist() == [0, 1, 2]
