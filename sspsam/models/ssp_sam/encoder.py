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
    """CLIP patch + word features → K prompt tokens for SAM's mask decoder (plus the box token).

    The official SSP head (config ``ssp.head: official``). The class attributes name the module
    classes it is built from and what the model around it defaults to; the bundled demo's earlier
    head (:class:`sspsam.models.ssp_sam.legacy_head.LegacySemanticSpatialPromptEncoder`) swaps them.
    """

    linguistic_adapter_class: type[nn.Module] = LinguisticAttentionAdapter
    visual_adapter_class: type[nn.Module] = VisualAttentionAdapter
    prompt_generator_class: type[nn.Module] = PromptGenerator
    #: what SSPSAM takes when the config leaves ``ssp.clip_input`` / ``ssp.phrase_format`` out
    default_clip_input = "centered"
    default_phrase_format = "official"

    @classmethod
    def config_defaults(cls, clip_text_width: int) -> tuple[dict, dict]:
        """(defaults a config may override, settings it may not) for this head's constructor: the
        official word attention has dropout 0.1 and reads CLIP's unprojected ``ln_final`` tokens."""
        return {"vaa_dropout": 0.1}, {"word_dim": clip_text_width}

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
        word_dim: int | None = None,
        vaa_dropout: float = 0.0,
    ):
        super().__init__()
        self.linguistic_adapter = self.linguistic_adapter_class(word_dim or clip_dim, d_model)
        self.visual_adapter = self.visual_adapter_class(
            clip_dim, d_model, vaa_heads, vaa_mlp_layers, sigma_init, scale_init, attn_dropout=vaa_dropout
        )
        self.fusion = SemanticSpatialFusion(d_model, prompt_dim)
        self.prompt_generator = self.prompt_generator_class(
            num_patches, prompt_dim, num_prompts, pg_layers, pg_heads, pg_ffn, dropout
        )

    def words(self, text: TextFeatures) -> tuple[torch.Tensor, torch.Tensor]:
        """(word features [T,L,E], padding [T,L]) as this head reads them: CLIP's unprojected word
        tokens, padding where the token id is 0 (the official ``text == 0``)."""
        if text.raw_words is None or text.tokens is None:
            raise ValueError("the official SSP head needs CLIP's unprojected word tokens and the token ids")
        return text.raw_words, text.tokens == 0

    def forward(self, patches: torch.Tensor, text: TextFeatures, cls: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """patches [T,N,E] (already gathered per phrase), text features for T phrases; ``cls``
        [T,E] is CLIP's token 0 (the official head's token-axis norm reads it)."""
        words, pad = self.words(text)
        phrase, words, word_weights = self.linguistic_adapter(words, pad)
        visual, maps = self.visual_adapter(patches, text.sentence, words, pad, cls=cls)
        out = self.prompt_generator(self.fusion(visual, phrase))
        return {**out, **maps, "word_weights": word_weights, "phrase": phrase}
