"""Geometry shared by the predictor and the datasets: SAM's letterbox and its inverse.

SAM resizes the longest side to its input size and pads bottom/right with zeros. CLIP's view
is taken from the same letterboxed square (resized inside the model), so every pixel of the
CLIP patch grid and the SAM embedding grid covers the same part of the image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


@dataclass(frozen=True)
class Letterbox:
    """Where an image of ``orig_hw`` sits inside the ``size``×``size`` square."""

    size: int
    orig_hw: tuple[int, int]
    scaled_hw: tuple[int, int]

    @classmethod
    def fit(cls, orig_hw: tuple[int, int], size: int) -> "Letterbox":
        h, w = orig_hw
        scale = size / max(h, w)
        return cls(size, (h, w), (max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))))


def letterbox_image(image: np.ndarray, size: int) -> tuple[np.ndarray, Letterbox]:
    """HWC uint8 RGB → size×size×3 uint8, longest side = size, zero padded bottom/right."""
    box = Letterbox.fit(image.shape[:2], size)
    sh, sw = box.scaled_hw
    resized = np.asarray(Image.fromarray(image).resize((sw, sh), Image.BILINEAR))
    out = np.zeros((size, size, 3), dtype=np.uint8)
    out[:sh, :sw] = resized
    return out, box


def letterbox_mask(mask: np.ndarray, box: Letterbox) -> np.ndarray:
    """Bool HW mask → bool size×size, nearest neighbour so labels never blur."""
    sh, sw = box.scaled_hw
    resized = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((sw, sh), Image.NEAREST)) > 127
    out = np.zeros((box.size, box.size), dtype=bool)
    out[:sh, :sw] = resized
    return out


def unletterbox_logits(logits: torch.Tensor, box: Letterbox) -> torch.Tensor:
    """[N, h, w] low-res logits → [N, H, W] logits in the original image frame."""
    x = F.interpolate(logits[:, None].float(), size=(box.size, box.size), mode="bilinear", align_corners=False)
    sh, sw = box.scaled_hw
    x = x[..., :sh, :sw]
    return F.interpolate(x, size=box.orig_hw, mode="bilinear", align_corners=False)[:, 0]


def image_key(rgb: np.ndarray) -> str:
    """A key for the pixels of an image: predictors cache encodings under it."""
    import hashlib

    return hashlib.blake2b(rgb.tobytes(), digest_size=16).hexdigest() + str(rgb.shape)


def model_input(rgb: np.ndarray, size: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, Letterbox]:
    """An RGB image → the letterboxed batch of one [1,3,S,S], its content size [1,2] and the box."""
    square, box = letterbox_image(rgb, size)
    x = to_tensor(square)[None].to(device)
    return x, torch.tensor([box.scaled_hw], device=device), box


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """HWC uint8 → CHW float in 0..255 (the models normalise internally)."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()
