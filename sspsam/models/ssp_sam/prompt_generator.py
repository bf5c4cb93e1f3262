"""Prompt Generator (SSP-SAM §III): a DETR-style encoder that turns fused tokens into SAM prompts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class EncoderLayer(nn.Module):
    """Post-norm transformer layer with positions added to queries and keys only (as DETR)."""

    def __init__(self, dim: int, heads: int, ffn: int, dropout: float):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(ffn, dim))
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.drop1, self.drop2 = nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        qk = x + pos
        x = self.norm1(x + self.drop1(self.attn(qk, qk, x, need_weights=False)[0]))
        return self.norm2(x + self.drop2(self.ffn(x)))


class BoxHead(nn.Module):
    """MLP(dim, dim, 4, 3 layers) → normalised (cx, cy, w, h): the auxiliary box of the official code."""

    def __init__(self, dim: int):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, 4)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x.sigmoid()


class PromptGenerator(nn.Module):
    """[box token, K learnable prompt tokens, N multimodal tokens] → encoder → K SAM sparse prompts.

    The learnable tokens read the whole fused map through self-attention, so each becomes a
    prompt carrying both what (semantics) and where (position) — unlike a click, which only says where.

    As the official code: a final LayerNorm (``norm``) on every output token before the prompts
    and the box head read them, and the official initialisation: the box token, prompt tokens and
    positions are ``nn.Embedding`` weights (N(0, 1)), and every matrix of the encoder layers is
    Xavier-uniform (DETR's ``_reset_parameters``). (The bundled ``shapes-demo`` runs an earlier
    layout without either: :class:`sspsam.models.ssp_sam.legacy_head.LegacyPromptGenerator`.)
    """

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
        super().__init__()
        self.num_prompts = num_prompts
        self.box_token = nn.Parameter(torch.randn(1, 1, dim))
        self.prompt_tokens = nn.Parameter(torch.randn(1, num_prompts, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + num_prompts + num_tokens, dim))
        self.layers = nn.ModuleList([EncoderLayer(dim, heads, ffn, dropout) for _ in range(layers)])
        self.norm = nn.LayerNorm(dim)
        self.box_head = BoxHead(dim)
        for p in self.layers.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [T,N,dim] → the encoder's output over [box token, prompts, tokens] [T,1+K+N,dim]."""
        t, n, _ = tokens.shape
        if 1 + self.num_prompts + n != self.pos_embed.shape[1]:
            raise ValueError(f"PromptGenerator was built for {self.pos_embed.shape[1] - 1 - self.num_prompts} tokens, got {n}")
        x = torch.cat([self.box_token.expand(t, -1, -1), self.prompt_tokens.expand(t, -1, -1), tokens], dim=1)
        pos = self.pos_embed.expand(t, -1, -1)
        for layer in self.layers:
            x = layer(x, pos)
        return x

    def heads(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The encoder's output → prompts [T,K,dim], box [T,4], box_token [T,dim]."""
        box_token = x[:, 0]
        return {"prompts": x[:, 1 : 1 + self.num_prompts], "box": self.box_head(box_token), "box_token": box_token}

    def forward(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """tokens [T,N,dim] → prompts [T,K,dim], box [T,4], box_token [T,dim]."""
        return self.heads(self.norm(self.encode(tokens)))
