"""Visual Attention Adapter (SSP-SAM §III): where in the image the phrase points."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _mlp(dims: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class VisualAttentionAdapter(nn.Module):
    """Sentence-level and word-level attention over CLIP patch features.

    Sentence level: cosine similarity of the sentence embedding with each patch, min-max
    normalised per image, re-weights the patches (a coarse "where"). Word level: patches query
    the words; agreement between a patch and what it attended to, mapped through a Gaussian of
    (1 − cos) with learnable width σ and scale, sharpens the map so that only patches that
    match the words strongly survive.
    """

    def __init__(
        self,
        clip_dim: int,
        d_model: int = 512,
        num_heads: int = 8,
        mlp_layers: int = 3,
        sigma_init: float = 0.5,
        scale_init: float = 1.0,
    ):
        super().__init__()
        self.mlp = _mlp([clip_dim] + [d_model] * mlp_layers)
        self.word_attention = nn.MultiheadAttention(d_model, num_heads, batch_first=True)
        self.norm = nn.LayerNorm(d_model)
        self.sigma = nn.Parameter(torch.tensor(float(sigma_init)))
        self.scale = nn.Parameter(torch.tensor(float(scale_init)))

    @staticmethod
    def sentence_map(patches: torch.Tensor, sentence: torch.Tensor) -> torch.Tensor:
        """Min-max normalised cosine similarity [T,N] in [0,1]."""
        sim = torch.einsum("tnc,tc->tn", F.normalize(patches, dim=-1), F.normalize(sentence, dim=-1))
        lo, hi = sim.amin(1, keepdim=True), sim.amax(1, keepdim=True)
        return (sim - lo) / (hi - lo).clamp(min=1e-6)

    def gaussian_score(self, cos: torch.Tensor) -> torch.Tensor:
        return self.scale * torch.exp(-((1 - cos) ** 2) / (2 * self.sigma**2))

    def forward(
        self, patches: torch.Tensor, sentence: torch.Tensor, words: torch.Tensor, pad_mask: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """patches [T,N,E], sentence [T,E], words [T,L,d] (projected), pad_mask [T,L] → [T,N,d]."""
        a_sent = self.sentence_map(patches, sentence)
        v = self.mlp(patches * a_sent.unsqueeze(-1))
        attended, _ = self.word_attention(v, words, words, key_padding_mask=pad_mask, need_weights=False)
        a_word = self.gaussian_score(F.cosine_similarity(v, attended, dim=-1))
        return self.norm(v) * a_word.unsqueeze(-1), {"sentence_map": a_sent, "word_map": a_word}
