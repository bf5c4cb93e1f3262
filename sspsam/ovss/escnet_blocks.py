"""Cost-aggregation building blocks shared by ESC-Net and SAM-MI (both follow CAT-Seg here).

* :func:`clip_features` — one CLIP pass giving the unit-norm dense features (CLIP-Surgery path,
  as :func:`sspsam.ovss.cost.dense_features`) and intermediate ViT tokens for decoder guidance.
* :class:`SpatialBlock` — spatial aggregation per class. The papers use a Swin block; this is a
  windowed self-attention block (no shifted windows: a depthwise 3×3 conv in the MLP links
  neighbouring windows), much lighter on a CPU.
* :class:`ClassLinearAttention` — aggregation across classes with linear attention, the text
  embeddings as guidance on queries and keys (CAT-Seg's class aggregation, ESC-Net's VLF).
* :class:`UpsampleDecoder` — the U-Net-style decoder: 2× transposed-conv steps, each joined with
  a higher-resolution guidance map, then one logit per class and pixel.

Cost volumes are laid out ``[B, K, D, h, w]`` (K classes); per-class operations run on
``[B·K, D, h, w]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones.clip import CLIPBackbone
from ..errors import ConfigError
from .cost import dense_features


def clip_features(clip: CLIPBackbone, images: torch.Tensor, layers: list[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Dense unit-norm features [B,E,g,g] and the patch tokens [B,width,g,g] after each block in ``layers``.

    Only blocks before CLIP-Surgery's dual path run as modules, so only they can be tapped.
    """
    blocks = clip.model.visual.transformer.resblocks
    first_dual = len(blocks) - clip.surgery_layers
    if any(not 0 <= i < max(first_dual, 1) for i in layers):
        raise ConfigError(f"guidance_layers {layers} must lie in [0, {first_dual}): later blocks use the surgery path")
    taps: dict[int, torch.Tensor] = {}
    handles = [blocks[i].register_forward_hook(lambda m, a, out, i=i: taps.__setitem__(i, out)) for i in set(layers)]
    try:
        dense = dense_features(clip, images)
    finally:
        for h in handles:
            h.remove()
    g = dense.shape[-1]
    guides = [taps[i][:, 1:].transpose(1, 2).reshape(dense.shape[0], -1, g, g) for i in layers]
    return dense, guides


class SpatialBlock(nn.Module):
    """Windowed multi-head self-attention + conv MLP over one class's cost map (stands in for Swin)."""

    def __init__(self, dim: int, heads: int = 4, window: int = 4, mlp_ratio: float = 2.0):
        super().__init__()
        self.window = window
        self.norm1 = nn.GroupNorm(1, dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.GroupNorm(1, dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Conv2d(dim, hidden, 1), nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden), nn.GELU(), nn.Conv2d(hidden, dim, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, d, h, w = x.shape
        ws = self.window
        ph, pw = (-h) % ws, (-w) % ws
        y = F.pad(self.norm1(x), (0, pw, 0, ph))
        hh, ww = h + ph, w + pw
        y = y.view(n, d, hh // ws, ws, ww // ws, ws).permute(0, 2, 4, 3, 5, 1).reshape(-1, ws * ws, d)
        y = self.attn(y, y, y, need_weights=False)[0]
        y = y.view(n, hh // ws, ww // ws, ws, ws, d).permute(0, 5, 1, 3, 2, 4).reshape(n, d, hh, ww)[..., :h, :w]
        x = x + y
        return x + self.mlp(self.norm2(x))


class ClassLinearAttention(nn.Module):
    """Linear attention across the K classes of each pixel, text-guided; permutation-equivariant
    over classes (no class positions), so any vocabulary works at test time."""

    def __init__(self, dim: int, text_dim: int, heads: int = 4, mlp_ratio: float = 2.0):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qk = nn.Linear(dim + text_dim, 2 * dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, int(dim * mlp_ratio)), nn.GELU(), nn.Linear(int(dim * mlp_ratio), dim))

    def forward(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """x [B,K,D,h,w], text [K,T] (or [B,K,T]) → [B,K,D,h,w]."""
        b, k, d, h, w = x.shape
        t = x.permute(0, 3, 4, 1, 2).reshape(b * h * w, k, d)
        guide = text.expand(b, -1, -1) if text.dim() == 2 else text
        guide = guide[:, None].expand(b, h * w, k, guide.shape[-1]).reshape(b * h * w, k, -1)
        y = self.norm1(t)
        q, kk = self.qk(torch.cat([y, guide], -1)).chunk(2, -1)
        v = self.v(y)
        split = lambda z: z.view(z.shape[0], k, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        q, kk, v = F.elu(split(q)) + 1, F.elu(split(kk)) + 1, split(v)
        kv = kk.transpose(-2, -1) @ v  # [N, H, dh, dh]
        z = 1.0 / (q @ kk.sum(-2, keepdim=True).transpose(-2, -1) + 1e-6)
        y = ((q @ kv) * z).transpose(1, 2).reshape(-1, k, d)
        t = t + self.out(y)
        t = t + self.mlp(self.norm2(t))
        return t.view(b, h, w, k, d).permute(0, 3, 4, 1, 2)


class UpsampleDecoder(nn.Module):
    """U-Net-style decoder: per class, ×2 transposed conv, concatenate the guidance map of that
    scale (shared by all classes), conv; repeated per guidance map; then a 3×3 conv to one logit."""

    def __init__(self, dim: int, guidance_dims: list[int], dims: list[int]):
        super().__init__()
        self.ups = nn.ModuleList()
        self.fuse = nn.ModuleList()
        c = dim
        for g, o in zip(guidance_dims, dims):
            self.ups.append(nn.ConvTranspose2d(c, o, 2, stride=2))
            self.fuse.append(nn.Sequential(nn.Conv2d(o + g, o, 3, padding=1), nn.GroupNorm(1, o), nn.GELU()))
            c = o
        self.head = nn.Conv2d(c, 1, 3, padding=1)

    def forward(self, x: torch.Tensor, guidance: list[torch.Tensor]) -> torch.Tensor:
        """x [B,K,D,h,w], guidance[i] [B,G_i,h·2^(i+1),w·2^(i+1)] → logits [B,K,h·2^n,w·2^n]."""
        b, k = x.shape[:2]
        y = x.flatten(0, 1)
        for up, fuse, g in zip(self.ups, self.fuse, guidance):
            y = up(y)
            g = g if g.shape[-2:] == y.shape[-2:] else F.interpolate(g, size=y.shape[-2:], mode="bilinear", align_corners=False)
            g = g.repeat_interleave(k, dim=0)
            y = fuse(torch.cat([y, g], 1))
        out = self.head(y)
        return out.view(b, k, *out.shape[-2:])


class GuidanceProjection(nn.Module):
    """CAT-Seg's guidance: a ViT token map brought to 2^(i+1)× its grid by one transposed conv."""

    def __init__(self, in_dims: list[int], out_dims: list[int]):
        super().__init__()
        self.proj = nn.ModuleList(
            nn.ConvTranspose2d(c, o, 2 ** (i + 1), stride=2 ** (i + 1)) for i, (c, o) in enumerate(zip(in_dims, out_dims))
        )

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        return [p(f) for p, f in zip(self.proj, feats)]
