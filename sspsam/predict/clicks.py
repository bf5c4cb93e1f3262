"""Clicks and boxes that refine a phrase's mask (``Segmenter.segment(..., points=, boxes=)``).

SSP-SAM turns a phrase into sparse prompt tokens for SAM's mask decoder; a click is one more
sparse token, embedded by SAM's own prompt encoder, so the two travel together exactly as SAM
takes several prompts at once. A model trained with clicks (SAM's decoder is) uses them
directly. A model whose decoder never saw a click (the bundled demo trained every tower from
scratch on phrases alone) cannot read those tokens, so the clicks are also applied to the
answer: the mask keeps the parts a positive click touches and drops those a negative click
touches, inside the box. Where a positive click falls outside every part, the phrase's mask was
wrong there: the click's object is then taken from the model's own masks for the phrases of its
vocabulary (what it can segment), the one under the click that is smallest — an object, not a
group of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from sspsam.errors import TextError


@dataclass
class Click:
    """The clicks for one phrase, in original image pixels."""

    points: np.ndarray  # float32 [K, 2] x, y
    labels: np.ndarray  # int [K]: 1 on the object, 0 not on it
    box: np.ndarray | None  # float32 [4] x0, y0, x1, y1

    @property
    def positive(self) -> np.ndarray:
        return self.points[self.labels == 1]

    @property
    def negative(self) -> np.ndarray:
        return self.points[self.labels == 0]


def _per_phrase(value, n: int, width: int, what: str) -> list:
    """One array per phrase: a single [K, width] (or [width]) array is shared by every phrase."""
    if value is None:
        return [None] * n
    if isinstance(value, (list, tuple)) and len(value) == n and n > 1 and all(
            v is None or np.asarray(v, dtype=float).ndim == (2 if width == 2 else 1) for v in value):
        items = list(value)
    else:
        items = [value] * n
    out = []
    for v in items:
        if v is None:
            out.append(None)
            continue
        try:
            a = np.asarray(v.detach().cpu() if isinstance(v, torch.Tensor) else v, dtype=np.float32)
        except (TypeError, ValueError):
            raise TextError(f"{what} must be numbers, got {type(v).__name__}") from None
        a = a.reshape(-1, width) if a.size % width == 0 and a.size else None
        if a is None or not np.isfinite(a).all():
            raise TextError(f"{what} must be finite numbers in groups of {width} ({'x, y' if width == 2 else 'x0, y0, x1, y1'})")
        out.append(a)
    return out


def parse_clicks(points, point_labels, boxes, n: int, hw: tuple[int, int]) -> list[Click | None]:
    """Per phrase its :class:`Click` (or None), checked against the image size."""
    h, w = hw
    pts = _per_phrase(points, n, 2, "points")
    boxes_ = _per_phrase(boxes, n, 4, "boxes")
    if boxes is not None and len(boxes_) == n and all(b is not None for b in boxes_) and boxes_[0].shape[0] == n and n > 1:
        boxes_ = [b[i : i + 1] for i, b in enumerate(boxes_)]  # [N, 4]: one box per phrase
    labs = [None] * n if point_labels is None else _per_phrase(point_labels, n, 1, "point_labels")
    out: list[Click | None] = []
    for p, lab, b in zip(pts, labs, boxes_):
        if p is None and b is None:
            out.append(None)
            continue
        p = np.zeros((0, 2), np.float32) if p is None else p
        lab = np.ones(len(p), int) if lab is None else lab.reshape(-1).astype(int)
        if len(lab) != len(p):
            raise TextError(f"{len(p)} points but {len(lab)} point_labels: give one label (1 on the object, 0 not) per point")
        if not np.isin(lab, (0, 1)).all():
            raise TextError("point_labels must be 1 (on the object) or 0 (not on it)")
        if len(p) and ((p[:, 0] < 0) | (p[:, 0] >= w) | (p[:, 1] < 0) | (p[:, 1] >= h)).any():
            raise TextError(f"a point lies outside the {w}x{h} image (points are x, y in pixels)")
        if b is not None:
            if len(b) != 1:
                raise TextError(f"one box per phrase: got {len(b)} boxes for {n} phrase{'s' * (n != 1)}")
            b = b[0]
            if not (0 <= b[0] < b[2] <= w and 0 <= b[1] < b[3] <= h):
                raise TextError(f"box {b.tolist()} is not x0 < x1, y0 < y1 inside the {w}x{h} image")
        out.append(Click(p, lab, b))
    return out


def click_tokens(sam, click: Click, box, device) -> torch.Tensor:
    """SAM's prompt-encoder tokens [1, K, C] for one phrase's clicks, in the letterbox frame."""
    scale = box.scaled_hw[0] / box.orig_hw[0], box.scaled_hw[1] / box.orig_hw[1]
    pts = None
    if len(click.points):
        xy = torch.as_tensor(click.points, device=device) * torch.tensor([scale[1], scale[0]], device=device) + 0.5
        pts = (xy[None].float(), torch.as_tensor(click.labels, device=device)[None])
    b = None
    if click.box is not None:
        b = torch.as_tensor(click.box, device=device).reshape(2, 2) * torch.tensor([scale[1], scale[0]], device=device)
        b = b.reshape(1, 4).float()
    sparse, _ = sam.prompt_encoder(points=pts, boxes=b, masks=None)
    return sparse


def decode_with_clicks(model, enc, text, clicks: list[Click | None], image_index: torch.Tensor) -> dict:
    """``model.decode`` with each phrase's click tokens beside its phrase tokens (one phrase at a
    time: phrases may have different numbers of clicks)."""
    from dataclasses import fields, replace

    if not hasattr(model, "sam") or not hasattr(model.sam, "prompt_encoder"):
        raise TextError("points= and boxes= need a PyTorch SSP-SAM model (an ONNX export's decoder takes phrases only)")
    outs = []
    for t, click in enumerate(clicks):
        one = replace(text, **{f.name: getattr(text, f.name)[t : t + 1] for f in fields(text)
                               if isinstance(getattr(text, f.name), torch.Tensor)})
        extra = None if click is None else click_tokens(model.sam, click, enc.box, image_index.device)
        outs.append(model.decode(enc.features, one, image_index[t : t + 1], extra_sparse=extra))
    return {k: torch.cat([o[k] for o in outs]) for k in outs[0] if isinstance(outs[0][k], torch.Tensor)}


def _components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    from scipy import ndimage

    return ndimage.label(mask, structure=np.ones((3, 3), int))


def _hit(labels: np.ndarray, pts: np.ndarray) -> set[int]:
    h, w = labels.shape
    return {int(labels[min(h - 1, int(y)), min(w - 1, int(x))]) for x, y in pts} - {0}


def keep_clicked(mask: torch.Tensor, click: Click, candidates=None) -> torch.Tensor:
    """The parts of ``mask`` the clicks choose: touched by a positive click (all parts when none
    is given), not touched by a negative one, inside the box. ``candidates`` [M, H, W] (or a function
    returning them, called only when needed): masks to take a positive click's object from where
    ``mask`` misses it."""
    m = mask.detach().cpu().numpy().astype(bool)
    labels, _ = _components(m)
    keep = np.zeros_like(m)
    pos = click.positive
    if len(pos):
        for k in _hit(labels, pos):
            keep |= labels == k
        missed = [p for p in pos if not _hit(labels, p[None])]
        if missed and candidates is not None:
            cands = candidates() if callable(candidates) else candidates
            for p in missed:
                keep |= _object_under(p, cands, click.negative)
    else:
        keep = m.copy()
    for k in _hit(labels, click.negative):
        keep &= labels != k
    if click.box is not None:
        x0, y0, x1, y1 = (int(round(float(v))) for v in click.box)
        inside = np.zeros_like(keep)
        inside[y0:y1, x0:x1] = True
        keep &= inside
    return torch.as_tensor(keep, device=mask.device)


def _object_under(point: np.ndarray, candidates: np.ndarray, negative: np.ndarray) -> np.ndarray:
    """The smallest candidate part under ``point`` that no negative click touches (else nothing)."""
    best = None
    for c in candidates:
        labels, _ = _components(c)
        hit = _hit(labels, point[None])
        if not hit:
            continue
        part = labels == hit.pop()
        if len(negative) and _hit(part.astype(int), negative):
            continue
        if best is None or part.sum() < best.sum():
            best = part
    return np.zeros(candidates.shape[1:], bool) if best is None else best
