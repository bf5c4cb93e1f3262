"""The inputs as the official SSP-SAM test pipeline prepares them: CLIP's image and the phrase.

The official code does not show CLIP the SAM letterbox: its ``RandomResize`` scales the long
side to CLIP's input size (Python ``round``, PIL bilinear on uint8), ``ToTensor`` and
``NormalizeAndPad`` normalise with CLIP's mean/std and paste the image *centred* into a zero
canvas (``top = round((S - h) / 2 - 0.1)``). A model trained that way sees padding on both
sides, so feeding it the top-left letterbox shifts every patch. The phrase is lower-cased,
stripped and given a trailing period before tokenisation (``datasets/dataset.py``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from sspsam.backbones.clip import OPENAI_MEAN, OPENAI_STD


def format_phrase(phrase: str) -> str:
    """``'The man on the left'`` → ``'the man on the left.'`` (the official dataset's text)."""
    return phrase.lower().strip() + "."


def centered_geometry(hw: tuple[int, int], size: int) -> tuple[int, int, int, int]:
    """(new_h, new_w, top, left) of an image of ``hw`` in the official ``size``² CLIP canvas."""
    h, w = hw
    ratio = size / max(h, w)
    nh, nw = round(h * ratio), round(w * ratio)
    return nh, nw, round((size - nh) / 2 - 0.1), round((size - nw) / 2 - 0.1)


def _normalise(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(OPENAI_MEAN, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    std = torch.tensor(OPENAI_STD, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return (x - mean) / std


def clip_input(rgb: np.ndarray, size: int) -> torch.Tensor:
    """HWC uint8 RGB → the official CLIP input [3, size, size] (normalised, centred, zero padded)."""
    nh, nw, top, left = centered_geometry(rgb.shape[:2], size)
    resized = np.array(Image.fromarray(rgb).resize((nw, nh), Image.BILINEAR))
    x = _normalise(torch.from_numpy(resized).permute(2, 0, 1).float().div(255))
    out = torch.zeros(3, size, size)
    out[:, top : top + nh, left : left + nw] = x
    return out


def clip_input_from_letterbox(images: torch.Tensor, valid_hw: torch.Tensor | None, size: int) -> torch.Tensor:
    """The same geometry from SAM's letterboxed batch [B,3,S,S] (0..255) when the raw image is gone.

    Used by training and batch paths that only carry the letterbox; it resamples twice
    (original → SAM → CLIP, torch's antialiased bilinear), so it is close to but not bitwise
    :func:`clip_input`. The predictor passes the raw image instead.
    """
    b, _, s, _ = images.shape
    hw = valid_hw.tolist() if valid_hw is not None else [[s, s]] * b
    out = images.new_zeros(b, 3, size, size)
    for i, (h, w) in enumerate(hw):
        h, w = int(h), int(w)
        nh, nw, top, left = centered_geometry((h, w), size)
        x = F.interpolate(images[i : i + 1, :, :h, :w], size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
        out[i, :, top : top + nh, left : left + nw] = _normalise(x[0].clamp(0, 255) / 255)
    return out


def letterbox_box_to_clip(box: torch.Tensor, valid_hw: torch.Tensor | None, sam_size: int, clip_size: int) -> torch.Tensor:
    """Box targets (cx, cy, w, h), normalised to SAM's ``sam_size``² letterbox → the same boxes
    normalised to the centred CLIP canvas of :func:`centered_geometry`.

    The official box head predicts in the padded CLIP image (its targets are the GT box moved by
    the same resize-and-centre as the image), while sspsam's datasets give boxes in SAM's
    top-left letterbox; without this the auxiliary box loss of the official head would pull its
    box towards the wrong place. All-zero rows (no target) stay zero.
    """
    b = box.shape[0]
    hw = valid_hw.tolist() if valid_hw is not None else [[sam_size, sam_size]] * b
    geo = [centered_geometry((int(h), int(w)), clip_size) for h, w in hw]
    t = lambda rows: torch.tensor(rows, dtype=box.dtype, device=box.device)  # noqa: E731
    sx = t([sam_size / w * nw / clip_size for (h, w), (nh, nw, top, left) in zip(hw, geo)])
    sy = t([sam_size / h * nh / clip_size for (h, w), (nh, nw, top, left) in zip(hw, geo)])
    ox = t([left / clip_size for nh, nw, top, left in geo])
    oy = t([top / clip_size for nh, nw, top, left in geo])
    out = torch.stack([box[:, 0] * sx + ox, box[:, 1] * sy + oy, box[:, 2] * sx, box[:, 3] * sy], dim=1)
    return torch.where((box == 0).all(dim=1, keepdim=True), box, out)
