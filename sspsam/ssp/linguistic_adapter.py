"""Linguistic Attention Adapter (SSP-SAM §III): which words of the phrase discriminate the referent."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence


class LinguisticAttentionAdapter(nn.Module):
    """Word features → bidirectional GRU → phrase attention → one weighted phrase vector.

    In "the larger zebra" the weight on "larger" should dominate: the phrase vector is what tells
    the visual side which of several similar instances is meant. The GRU runs on packed
    sequences so that padding never leaks into the backward direction.
    """

    def __init__(self, clip_dim: int, d_model: int = 512):
        super().__init__()
        self.word_proj = nn.Linear(clip_dim, d_model)
        self.gru = nn.GRU(d_model, d_model, batch_first=True, bidirectional=True)
        self.phrase_attention = nn.Linear(2 * d_model, 1)

    def forward(self, words: torch.Tensor, pad_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """words [T,L,E], pad_mask [T,L] → (phrase [T,d], projected words [T,L,d], weights [T,L])."""
        w = self.word_proj(words)
        lengths = (~pad_mask).sum(1).clamp(min=1).cpu()
        packed = pack_padded_sequence(w, lengths, batch_first=True, enforce_sorted=False)
        h, _ = pad_packed_sequence(self.gru(packed)[0], batch_first=True, total_length=w.shape[1])
        logits = self.phrase_attention(h).squeeze(-1).masked_fill(pad_mask, float("-inf"))
        weights = logits.softmax(dim=-1)
        phrase = torch.einsum("tl,tld->td", weights, w)
        return phrase, w, weights
