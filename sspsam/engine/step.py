"""Training core shared by the smoke test, the bundled demo model and (later) `sspsam train`."""

from __future__ import annotations

import numpy as np
import torch

from sspsam.engine.losses import ssp_loss
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


def train_step(model, batch: dict, optimizer: torch.optim.Optimizer, loss_weights: dict, clip_grad: float | None = 0.1) -> dict:
    model.train()
    tokens = model.tokenize(batch["text"]).to(batch["image"].device)
    out = model(batch["image"], tokens, batch.get("valid_hw"))
    box = model.box_target(batch["box"], batch.get("valid_hw"))  # the box head's frame
    losses = ssp_loss(out, batch["mask"], box, batch["no_target"], loss_weights)
    optimizer.zero_grad(set_to_none=True)
    losses["total"].backward()
    if clip_grad:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], clip_grad)
    optimizer.step()
    return {k: float(v.detach()) for k, v in losses.items()}


def param_groups(model, lr: float, decoder_lr: float, weight_decay: float = 1e-4) -> list[dict]:
    """The official recipe's two learning rates: SAM's pretrained mask decoder moves 10x slower."""
    dec = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith("sam.mask_decoder.")]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("sam.mask_decoder.")]
    return [{"params": rest, "lr": lr, "weight_decay": weight_decay}, {"params": dec, "lr": decoder_lr, "weight_decay": weight_decay}]
