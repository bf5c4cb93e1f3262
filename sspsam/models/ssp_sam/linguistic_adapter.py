"""Linguistic Attention Adapter (SSP-SAM §III): which words of the phrase discriminate the referent."""

from __future__ import annotations

import torch
from torch import nn

import sspsam.backbones.runtime as runtime


class LinguisticAttentionAdapter(nn.Module):
    """Word features → bidirectional GRU → phrase attention → one weighted phrase vector.

    In "the larger zebra" the weight on "larger" should dominate: the phrase vector is what tells
    the visual side which of several similar instances is meant.

    As the official code (``clip_proj``, ``text_proj``, ``phrase_attn``): the words are CLIP's
    *unprojected* ``ln_final`` outputs of all context positions, the GRU runs over every position
    (padding included, no packing), and the word weights are a softmax over all positions, zeroed
    where the token id is 0 and renormalised. (The bundled ``shapes-demo`` runs an earlier layout:
    :class:`sspsam.models.ssp_sam.legacy_head.LegacyLinguisticAttentionAdapter`.)
    """

    #: read by the ONNX exporter: only the legacy layout packs its GRU (which torch.export cannot trace)
    official = True

    def __init__(self, clip_dim: int, d_model: int = 512):
        super().__init__()
        self.word_proj = nn.Linear(clip_dim, d_model)
        self.gru = nn.GRU(d_model, d_model, batch_first=True, bidirectional=True)
        self.phrase_attention = nn.Linear(2 * d_model, 1)

    def forward(self, words: torch.Tensor, pad_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """words [T,L,E], pad_mask [T,L] → (phrase [T,d], projected words [T,L,d], weights [T,L])."""
        w = self.word_proj(words)
        h = runtime.gru_batch_first(self.gru, w)
        weights = self.phrase_attention(h).squeeze(-1).softmax(dim=-1) * (~pad_mask).to(w.dtype)
        weights = weights / weights.sum(1, keepdim=True)
        return torch.bmm(weights.unsqueeze(1), w).squeeze(1), w, weights
