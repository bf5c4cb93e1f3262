"""The legacy SSP head: the layout of sspsam's SSP-SAM before it followed the official code.

Why it exists: the bundled ``shapes-demo`` checkpoint was trained with this head, and its
weights and answers must stay as they are (retraining would change every answer the demo gives).
New models use the official head (:mod:`sspsam.models.ssp_sam.encoder`); this one is chosen
only by ``ssp.head: legacy`` (the default of configs that do not say), once, in
:class:`sspsam.models.ssp_sam.model.SSPSAM`. Its state-dict keys are those of the official head
less ``visual_adapter.image_proj`` / ``text_proj`` and ``prompt_generator.norm``, with a scalar σ
and scale.

Where it departs from the official head:

* Linguistic Attention Adapter — projected CLIP words (``TextFeatures.words``), a packed GRU so
  padding never reaches the backward direction, a masked softmax over the real words.
* Visual Attention Adapter — per-token cosine similarity for the sentence map, the Gaussian score
  on the cosine between the raw patch queries and the attention output (no extra projections),
  scalar σ and scale.
* Prompt Generator — no final LayerNorm; box token zero, prompt tokens and positions N(0, 0.02²),
  default PyTorch initialisation of the encoder layers.
* The model around it defaults to CLIP reading SAM's letterbox and to the phrase as typed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from sspsam.backbones.clip import TextFeatures
from sspsam.models.ssp_sam.encoder import SemanticSpatialPromptEncoder
from sspsam.models.ssp_sam.linguistic_adapter import LinguisticAttentionAdapter
from sspsam.models.ssp_sam.prompt_generator import BoxHead, EncoderLayer, PromptGenerator
from sspsam.models.ssp_sam.visual_adapter import VisualAttentionAdapter, gaussian_score, min_max, mlp_stack


class LegacyLinguisticAttentionAdapter(LinguisticAttentionAdapter):
    """The official adapter's modules; projected words, a packed GRU and a masked softmax."""

    official = False

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


class LegacyVisualAttentionAdapter(nn.Module):
    """Per-token cosine sentence map, Gaussian score on the raw query/attended cosine, scalar σ and scale."""

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
        self.sigma = nn.Parameter(torch.full((), float(sigma_init)))
        self.scale = nn.Parameter(torch.full((), float(scale_init)))

    @staticmethod
    def sentence_map(patches: torch.Tensor, sentence: torch.Tensor) -> torch.Tensor:
        """Min-max normalised cosine similarity [T,N] in [0,1]."""
        sim = torch.einsum("tnc,tc->tn", F.normalize(patches, dim=-1), F.normalize(sentence, dim=-1))
        return min_max(sim)

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
        """patches [T,N,E], sentence [T,E], words [T,L,d] (projected), pad_mask [T,L] → [T,N,d];
        ``cls`` is not read (accepted so both heads are called alike)."""
        a_sent = self.sentence_map(patches, sentence)
        v = self.mlp(patches * a_sent.unsqueeze(-1))
        attended, _ = self.word_attention(v, words, words, key_padding_mask=pad_mask, need_weights=False)
        a_word = self.gaussian_score(F.cosine_similarity(v, attended, dim=-1))
        return self.norm(v) * a_word.unsqueeze(-1), {"sentence_map": a_sent, "word_map": a_word}


class LegacyPromptGenerator(PromptGenerator):
    """The official generator's encoder and heads without the final LayerNorm, initialised small."""

    def __init__(
        self,
        num_tokens: int,
        dim: int = 256,
        num_prompts: int = 128,
        layers: int = 6,
        heads: int = 8,
        ffn: int = 2048,
        dropout: float = 0.0,
    ):
        nn.Module.__init__(self)  # the official __init__ would create (and draw random numbers for) other weights
        self.num_prompts = num_prompts
        self.box_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.prompt_tokens = nn.Parameter(torch.randn(1, num_prompts, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + num_prompts + num_tokens, dim) * 0.02)
        self.layers = nn.ModuleList([EncoderLayer(dim, heads, ffn, dropout) for _ in range(layers)])
        self.box_head = BoxHead(dim)

    def forward(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """tokens [T,N,dim] → prompts [T,K,dim], box [T,4], box_token [T,dim]."""
        return self.heads(self.encode(tokens))


class LegacySemanticSpatialPromptEncoder(SemanticSpatialPromptEncoder):
    """The encoder of ``ssp.head: legacy``: the legacy modules, projected CLIP words and CLIP's padding mask."""

    linguistic_adapter_class = LegacyLinguisticAttentionAdapter
    visual_adapter_class = LegacyVisualAttentionAdapter
    prompt_generator_class = LegacyPromptGenerator
    default_clip_input = "letterbox"
    default_phrase_format = "plain"

    @classmethod
    def config_defaults(cls, clip_text_width: int) -> tuple[dict, dict]:
        return {}, {}

    def words(self, text: TextFeatures) -> tuple[torch.Tensor, torch.Tensor]:
        return text.words, text.pad_mask
