"""Semantic-spatial fusion (SSP-SAM §III): refined language gates refined vision."""

from __future__ import annotations

import torch
from torch import nn


class SemanticSpatialFusion(nn.Module):
    """tanh(visual) ⊙ tanh(phrase) per patch, projected to SAM's prompt width.

    The element-wise product acts as a soft semantic mask over the spatial tokens: a patch keeps
    only the channels the phrase also activates. The tanh keeps both factors in [-1, 1] so
    neither side can dominate by scale.
    """

    def __init__(self, d_model: int = 512, prompt_dim: int = 256):
        super().__init__()
        self.proj = nn.Linear(d_model, prompt_dim)

    def forward(self, visual: torch.Tensor, phrase: torch.Tensor) -> torch.Tensor:
        """visual [T,N,d], phrase [T,d] → multimodal tokens [T,N,prompt_dim]."""
        return self.proj(torch.tanh(visual) * torch.tanh(phrase).unsqueeze(1))
