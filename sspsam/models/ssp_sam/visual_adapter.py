"""Visual Attention Adapter (SSP-SAM §III): where in the image the phrase points."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def mlp_stack(dims: list[int]) -> nn.Sequential:
    """Linear layers through ``dims`` with a ReLU between two (none after the last)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def min_max(sim: torch.Tensor) -> torch.Tensor:
    """Per row [T,N] → [0, 1] (a constant row becomes 0)."""
    lo, hi = sim.amin(1, keepdim=True), sim.amax(1, keepdim=True)
    return (sim - lo) / (hi - lo).clamp(min=1e-6)


def gaussian_score(cos: torch.Tensor, sigma: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """scale · exp(−(1 − cos)² / 2σ²): 1 − cos measured in units of the learnable width σ."""
    return scale * torch.exp(-((1 - cos) ** 2) / (2 * sigma**2))


class VisualAttentionAdapter(nn.Module):
    """Sentence-level and word-level attention over CLIP patch features.

    Sentence level: similarity of the sentence embedding with each patch, min-max normalised per
    image, re-weights the patches (a coarse "where"). Word level: patches query the words;
    agreement between a patch and what it attended to, mapped through a Gaussian of (1 − cos)
    with learnable width σ and scale, sharpens the map so that only patches that match the
    words strongly survive.

    As the official code: the CLIP image tokens (CLS included) are divided by their norm over the
    *token* axis, not per token, and those normalised patches are both scored against the unit
    sentence and re-weighted; the cosine of the Gaussian score is taken between two extra
    projections (``image_proj`` of the patch queries, ``text_proj`` of what they attended to); the
    word attention has the official dropout; σ and the scale are [1]. (The bundled ``shapes-demo``
    runs an earlier layout: :class:`sspsam.models.ssp_sam.legacy_head.LegacyVisualAttentionAdapter`.)
    """

    def __init__(
        self,
        clip_dim: int,
        d_model: int = 512,
        num_heads: int = 8,
        mlp_layers: int = 3,
        sigma_init: float = 0.5,
        scale_init: float = 1.0,
        attn_dropout: float = 0.0,
    ):
        super().__init__()
        self.mlp = mlp_stack([clip_dim] + [d_model] * mlp_layers)
        self.word_attention = nn.MultiheadAttention(d_model, num_heads, dropout=attn_dropout, batch_first=True)
        self.norm = nn.LayerNorm(d_model)
        self.sigma = nn.Parameter(torch.full((1,), float(sigma_init)))
        self.scale = nn.Parameter(torch.full((1,), float(scale_init)))
        self.image_proj = nn.Linear(d_model, d_model)
        self.text_proj = nn.Linear(d_model, d_model)

    def gaussian_score(self, cos: torch.Tensor) -> torch.Tensor:
        return gaussian_score(cos, self.sigma, self.scale)

    def forward(
        self,
        patches: torch.Tensor,
        sentence: torch.Tensor,
        words: torch.Tensor,
        pad_mask: torch.Tensor,
        cls: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """patches [T,N,E], sentence [T,E], words [T,L,d] (projected), pad_mask [T,L] → [T,N,d].

        ``cls`` [T,E] is CLIP's token 0, part of the token-axis norm.
        """
        if cls is None:
            raise ValueError("the official Visual Attention Adapter needs CLIP's token 0 (cls)")
        norm = torch.cat([cls.unsqueeze(1), patches], dim=1).norm(dim=1, keepdim=True)
        patches = patches / norm
        unit = sentence / sentence.norm(dim=-1, keepdim=True)
        a_sent = min_max(torch.bmm(patches, unit.unsqueeze(-1)).squeeze(-1))
        v = self.mlp(patches * a_sent.unsqueeze(-1))
        attended, _ = self.word_attention(v, words, words, key_padding_mask=pad_mask, need_weights=False)
        cos = (F.normalize(self.image_proj(v), dim=-1) * F.normalize(self.text_proj(attended), dim=-1)).sum(-1)
        a_word = self.gaussian_score(cos)
        return self.norm(v) * a_word.unsqueeze(-1), {"sentence_map": a_sent, "word_map": a_word}
