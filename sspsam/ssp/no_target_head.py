"""No-target head for GRES: an explicit "nothing in the image matches" logit.

Not in the paper — the official code learns empty masks and calls a prediction with fewer
than 50 positive pixels (at 512²) "no target". The head reads the box token, which already
summarises the whole phrase-image pair; it is off in the paper-faithful configs.
"""

from __future__ import annotations

import torch
from torch import nn


class NoTargetHead(nn.Module):
    def __init__(self, dim: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, 1))

    def forward(self, box_token: torch.Tensor) -> torch.Tensor:
        """[T,dim] → no-target logit [T]."""
        return self.mlp(box_token).squeeze(-1)
