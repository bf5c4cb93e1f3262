"""Referring samples made in memory (the shapes demo, the smoke test): one (image, phrase, mask)
in the model's letterboxed frame, as the data readers make them, so the same loop and task train on them."""

from __future__ import annotations

import numpy as np
import torch

from sspsam.engine.tasks.referring import param_groups  # noqa: F401 (the referring task's groups)
from sspsam.io.transforms import letterbox_image, letterbox_mask, to_tensor


def make_sample(image: np.ndarray, mask: np.ndarray, text: str, size: int) -> dict:
    """One (image, phrase, mask) triple in the model's letterboxed frame, with the target box."""
    square, box = letterbox_image(image, size)
    m = letterbox_mask(mask, box)
    if m.any():
        ys, xs = np.nonzero(m)
        x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
        b = [(x0 + x1) / 2 / size, (y0 + y1) / 2 / size, (x1 - x0) / size, (y1 - y0) / size]
    else:
        b = [0.0] * 4
    return {
        "image": to_tensor(square),
        "valid_hw": torch.tensor(box.scaled_hw),
        "mask": torch.from_numpy(m),
        "box": torch.tensor(b, dtype=torch.float32),
        "no_target": torch.tensor(not m.any()),
        "text": text,
    }


def collate(samples: list[dict]) -> dict:
    out = {k: torch.stack([s[k] for s in samples]) for k in samples[0] if k != "text"}
    out["text"] = [s["text"] for s in samples]
    return out
