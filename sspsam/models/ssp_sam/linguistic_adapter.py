"""Linguistic Attention Adapter (SSP-SAM §III): which words of the phrase discriminate the referent."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import sspsam.backbones.runtime as runtime


class LinguisticAttentionAdapter(nn.Module):
    """Word features → bidirectional GRU → phrase attention → one weighted phrase vector.

    In "the larger zebra" the weight on "larger" should dominate: the phrase vector is what tells
    the visual side which of several similar instances is meant.

    Two layouts (config ``ssp.head``):

    * ``official`` — as the official code (``clip_proj``, ``text_proj``, ``phrase_attn``): the words
      are CLIP's *unprojected* ``ln_final`` outputs of all context positions, the GRU runs over
      every position (padding included, no packing), and the word weights are a softmax over all
      positions, zeroed where the token id is 0 and renormalised.
    * ``legacy`` — sspsam's earlier head (the bundled ``shapes-demo`` checkpoint): projected words,
      a packed GRU so padding never reaches the backward direction, and a masked softmax.
    """

    def __init__(self, clip_dim: int, d_model: int = 512, official: bool = False):
        super().__init__()
        self.official = official
        self.word_proj = nn.Linear(clip_dim, d_model)
        self.gru = nn.GRU(d_model, d_model, batch_first=True, bidirectional=True)
        self.phrase_attention = nn.Linear(2 * d_model, 1)

    def forward(self, words: torch.Tensor, pad_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """words [T,L,E], pad_mask [T,L] → (phrase [T,d], projected words [T,L,d], weights [T,L])."""
        w = self.word_proj(words)
        if self.official:
            h = runtime.gru_batch_first(self.gru, w)
            weights = self.phrase_attention(h).squeeze(-1).softmax(dim=-1) * (~pad_mask).to(w.dtype)
            weights = weights / weights.sum(1, keepdim=True)
            return torch.bmm(weights.unsqueeze(1), w).squeeze(1), w, weights
        lengths = (~pad_mask).sum(1).clamp(min=1).cpu()
        packed = pack_padded_sequence(w, lengths, batch_first=True, enforce_sorted=False)
        h, _ = pad_packed_sequence(self.gru(packed)[0], batch_first=True, total_length=w.shape[1])
        logits = self.phrase_attention(h).squeeze(-1).masked_fill(pad_mask, float("-inf"))
        weights = logits.softmax(dim=-1)
        phrase = torch.einsum("tl,tld->td", weights, w)
        return phrase, w, weights
