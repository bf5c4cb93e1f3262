"""Semantic-Spatial Prompt encoder: the four SSP-SAM modules wired as in the paper's Fig. 2."""

from __future__ import annotations

import torch
from torch import nn

from sspsam.backbones.clip import TextFeatures
from sspsam.models.ssp_sam.fusion import SemanticSpatialFusion
from sspsam.models.ssp_sam.linguistic_adapter import LinguisticAttentionAdapter
from sspsam.models.ssp_sam.prompt_generator import PromptGenerator
from sspsam.models.ssp_sam.visual_adapter import VisualAttentionAdapter


class SemanticSpatialPromptEncoder(nn.Module):
    """CLIP patch + word features → K prompt tokens for SAM's mask decoder (plus the box token)."""

    def __init__(
        self,
        clip_dim: int,
        num_patches: int,
        d_model: int = 512,
        prompt_dim: int = 256,
        num_prompts: int = 128,
        vaa_heads: int = 8,
        vaa_mlp_layers: int = 3,
        sigma_init: float = 0.5,
        scale_init: float = 1.0,
        pg_layers: int = 6,
        pg_heads: int = 8,
        pg_ffn: int = 2048,
        dropout: float = 0.0,
        official: bool = False,
        word_dim: int | None = None,
        vaa_dropout: float = 0.0,
    ):
        super().__init__()
        self.official = official
        self.linguistic_adapter = LinguisticAttentionAdapter(word_dim or clip_dim, d_model, official=official)
        self.visual_adapter = VisualAttentionAdapter(
            clip_dim, d_model, vaa_heads, vaa_mlp_layers, sigma_init, scale_init, official=official, attn_dropout=vaa_dropout
        )
        self.fusion = SemanticSpatialFusion(d_model, prompt_dim)
        self.prompt_generator = PromptGenerator(
            num_patches, prompt_dim, num_prompts, pg_layers, pg_heads, pg_ffn, dropout, official=official
        )

    def forward(self, patches: torch.Tensor, text: TextFeatures, cls: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """patches [T,N,E] (already gathered per phrase), text features for T phrases.

        The official layout reads CLIP's unprojected word tokens, masks token id 0 (as the
        official ``text == 0``) and needs CLIP's token 0 (``cls``) for the token-axis norm.
        """
        if self.official:
            if text.raw_words is None or text.tokens is None:
                raise ValueError("the official SSP head needs CLIP's unprojected word tokens and the token ids")
            pad = text.tokens == 0
            phrase, words, word_weights = self.linguistic_adapter(text.raw_words, pad)
        else:
            pad = text.pad_mask
            phrase, words, word_weights = self.linguistic_adapter(text.words, pad)
        visual, maps = self.visual_adapter(patches, text.sentence, words, pad, cls=cls)
        out = self.prompt_generator(self.fusion(visual, phrase))
        return {**out, **maps, "word_weights": word_weights, "phrase": phrase}
