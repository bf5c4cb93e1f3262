"""No-target head for GRES: an explicit "nothing in the image matches" logit.

Not in the paper — the official code learns empty masks and calls a prediction with fewer
than 50 positive pixels (at 512²) "no target". The head reads the box token, which already
summarises the whole phrase-image pair; it is off in the paper-faithful configs.

``use_mask=True`` (config ``no_target_head: mask``) also reads three statistics of the decoded
mask logits — the peak logit, the mean probability and the area above 0.5 — i.e. the evidence the
official "< 50 pixels" rule looks at, learned instead of thresholded. The box token alone only
sees CLIP's coarse patch grid; SAM's decoder has looked at the full-resolution embedding.
"""

from __future__ import annotations

import torch
from torch import nn


class NoTargetHead(nn.Module):
    def __init__(self, dim: int = 256, use_mask: bool = False):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, 1))
        self.mask_stats = None
        if use_mask:
            # initialised as a soft version of the official rule: a low peak logit means "no target"
            self.mask_stats = nn.Linear(3, 1)
            with torch.no_grad():
                self.mask_stats.weight.copy_(torch.tensor([[-0.5, 0.0, 0.0]]))
                self.mask_stats.bias.zero_()

    def forward(self, box_token: torch.Tensor, mask_logits: torch.Tensor | None = None) -> torch.Tensor:
        """box_token [T,dim] (+ mask_logits [T,1,h,w] with use_mask) → no-target logit [T]."""
        logit = self.mlp(box_token).squeeze(-1)
        if self.mask_stats is not None:
            if mask_logits is None:
                raise ValueError("this no-target head also reads the mask logits")
            # detached: the head reads the mask evidence but must not bend the masks to its loss
            flat = mask_logits.detach().flatten(1).float()
            prob = flat.sigmoid()
            stats = torch.stack([flat.amax(1).clamp(-20, 20), prob.mean(1), (prob > 0.5).float().mean(1)], -1)
            logit = logit + self.mask_stats(stats.to(box_token.dtype)).squeeze(-1)
        return logit
