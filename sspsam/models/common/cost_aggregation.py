"""CAT-Seg's cost-aggregation building blocks, run by ESC-Net and by SAM-MI (both build on CAT-Seg).

* :func:`clip_features` — one CLIP pass giving the unit-norm dense features (CLIP-Surgery path,
  as :func:`sspsam.models.cost.dense_features`) and intermediate ViT tokens for decoder guidance.
* :class:`SwinBlock` — spatial aggregation per class as CAT-Seg (and ESC-Net's VLF) do it: a
  window-attention block followed by a shifted-window one (:class:`SwinTransformerBlock`, the
  attention mask of :func:`shifted_window_mask`), optionally with appearance guidance on q and k.
* :class:`SpatialBlock` — the lighter stand-in used by the tiny configs: windowed self-attention
  without shifted windows (a depthwise 3×3 conv in the MLP links neighbouring windows).
* :class:`ClassLinearAttention` — aggregation across classes with linear attention, the text
  embeddings as guidance on queries and keys (CAT-Seg's class aggregation, ESC-Net's VLF).
* :class:`GuidedUpsampleDecoder` — CAT-Seg's upsampling decoder: each 2× step concatenates a
  projected CLIP guidance map and runs a double 3×3 conv; :class:`UpsampleDecoder` is the lighter
  variant of the tiny configs.

Cost volumes are laid out ``[B, K, D, h, w]`` (K classes); per-class operations run on
``[B·K, D, h, w]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sspsam.backbones.clip import CLIPBackbone
from sspsam.errors import ConfigError
from sspsam.models.cost import clip_preprocess, dense_features


def clip_features(
    clip: CLIPBackbone, images: torch.Tensor, layers: list[int], mode: str = "surgery", size: int | None = None
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Dense features [B,E,g,g] and the patch tokens [B,width,g,g] after each block in ``layers``.

    ``mode="surgery"``: unit-norm CLIP-Surgery features at CLIP's own input size; only blocks before
    the dual path run as modules, so only they can be tapped. ``mode="clip"``: CAT-Seg's dense
    features — every block as pretrained, ``ln_post`` and the projection on all patch tokens (not
    normalised: the correlation normalises) — at ``size`` px with interpolated positions, so CAT-Seg's
    384 px for ViT-B/16 gives its 24×24 grid; any block can be tapped.
    """
    blocks = clip.model.visual.transformer.resblocks
    if mode == "surgery":
        if size not in (None, clip.image_size):
            raise ConfigError(f"escnet dense 'surgery' runs at CLIP's own input size {clip.image_size}, not {size}")
        first_dual = len(blocks) - clip.surgery_layers
        if any(not 0 <= i < max(first_dual, 1) for i in layers):
            raise ConfigError(f"guidance_layers {layers} must lie in [0, {first_dual}): later blocks use the surgery path")
    elif mode == "clip":
        if any(not 0 <= i < len(blocks) for i in layers):
            raise ConfigError(f"guidance_layers {layers} must lie in [0, {len(blocks)})")
    else:
        raise ConfigError(f"unknown escnet dense mode '{mode}'; choose 'surgery' or 'clip'")
    taps: dict[int, torch.Tensor] = {}
    handles = [blocks[i].register_forward_hook(lambda m, a, out, i=i: taps.__setitem__(i, out)) for i in set(layers)]
    try:
        dense = dense_features(clip, images) if mode == "surgery" else _plain_dense(clip, images, size)
    finally:
        for h in handles:
            h.remove()
    g = dense.shape[-1]
    guides = [taps[i][:, 1:].transpose(1, 2).reshape(dense.shape[0], -1, g, g) for i in layers]
    return dense, guides


def _plain_dense(clip: CLIPBackbone, images: torch.Tensor, size: int | None) -> torch.Tensor:
    vis = clip.model.visual
    x = vis.conv1(clip_preprocess(clip, images, size))
    b, c, gh, gw = x.shape
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([vis.class_embedding.expand(b, 1, c).to(x.dtype), x], dim=1)
    x = vis.ln_pre(x + clip._positional(gh, gw).to(x.dtype))
    for blk in vis.transformer.resblocks:
        x = blk(x)
    patches = vis.ln_post(x[:, 1:]) @ vis.proj
    return patches.float().transpose(1, 2).reshape(b, -1, gh, gw)


def shifted_window_mask(h: int, w: int, window: int, shift: int) -> torch.Tensor:
    """Swin's attention mask for shifted windows: [nW, ws², ws²], 0 within a region, -100 across.

    After the cyclic shift by ``shift``, a window at the bottom/right edge holds pixels that were
    not neighbours in the image. Rows (and columns) fall into three bands — [0, h-ws), [h-ws, h-shift),
    [h-shift, h) — and two pixels of a window may attend to each other only if they share both bands.
    Windows are numbered row-major, pixels within a window row-major.
    """
    ys, xs = torch.arange(h), torch.arange(w)
    band_y = (ys >= h - window).long() + (ys >= h - shift).long() if shift else torch.zeros(h, dtype=torch.long)
    band_x = (xs >= w - window).long() + (xs >= w - shift).long() if shift else torch.zeros(w, dtype=torch.long)
    label = (band_y[:, None] * 3 + band_x[None, :]).float()
    win = label.view(h // window, window, w // window, window).permute(0, 2, 1, 3).reshape(-1, window * window)
    diff = win[:, None, :] - win[:, :, None]
    return torch.zeros_like(diff).masked_fill(diff != 0, -100.0)


class SwinTransformerBlock(nn.Module):
    """One Swin block (W-MSA when ``shift`` is 0, SW-MSA otherwise) on a [N,D,h,w] map.

    As CAT-Seg's variant: no relative position bias, and optional appearance guidance concatenated
    to the input of the q and k projections (v sees the cost features only). A map that does not
    tile into windows is zero-padded after the norm, as the official Swin code does.
    """

    def __init__(self, dim: int, heads: int, window: int, shift: int = 0, guidance_dim: int = 0, mlp_ratio: float = 4.0):
        super().__init__()
        if not 0 <= shift < window:
            raise ConfigError(f"Swin shift {shift} must lie in [0, window={window})")
        self.heads, self.window, self.shift = heads, window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.q = nn.Linear(dim + guidance_dim, dim)
        self.k = nn.Linear(dim + guidance_dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, int(dim * mlp_ratio)), nn.GELU(), nn.Linear(int(dim * mlp_ratio), dim))

    def forward(self, x: torch.Tensor, guidance: torch.Tensor | None = None) -> torch.Tensor:
        """x [N,D,h,w], guidance [N,G,h,w] or None → [N,D,h,w]."""
        n, d, h, w = x.shape
        ws, shift = self.window, self.shift
        if min(h, w) <= ws:  # the whole map is one window: nothing to shift (as Swin)
            ws, shift = min(h, w), 0
        t = x.permute(0, 2, 3, 1)
        y = self.norm1(t)
        if guidance is not None:
            y = torch.cat([y, guidance.permute(0, 2, 3, 1)], -1)
        ph, pw = (-h) % ws, (-w) % ws
        y = F.pad(y, (0, 0, 0, pw, 0, ph))
        hh, ww = h + ph, w + pw
        if shift:
            y = torch.roll(y, (-shift, -shift), (1, 2))
        c = y.shape[-1]
        win = y.view(n, hh // ws, ws, ww // ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, c)
        split = lambda z: z.view(z.shape[0], ws * ws, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(win)), split(self.k(win)), split(self.v(win[..., :d]))
        mask = None
        if shift:
            nw = (hh // ws) * (ww // ws)
            mask = shifted_window_mask(hh, ww, ws, shift).to(q.dtype).to(q.device)
            mask = mask[None, :, None].expand(n, nw, 1, ws * ws, ws * ws).reshape(n * nw, 1, ws * ws, ws * ws)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(-1, ws * ws, d)
        out = self.proj(out).view(n, hh // ws, ww // ws, ws, ws, d).permute(0, 1, 3, 2, 4, 5).reshape(n, hh, ww, d)
        if shift:
            out = torch.roll(out, (shift, shift), (1, 2))
        t = t + out[:, :h, :w]
        t = t + self.mlp(self.norm2(t))
        return t.permute(0, 3, 1, 2)


class SwinBlock(nn.Module):
    """The Swin block of CAT-Seg's spatial aggregation and ESC-Net's VLF module: window attention,
    then shifted-window attention (shift = window // 2), so information crosses window borders."""

    def __init__(self, dim: int, heads: int, window: int, guidance_dim: int = 0):
        super().__init__()
        self.block_1 = SwinTransformerBlock(dim, heads, window, 0, guidance_dim)
        self.block_2 = SwinTransformerBlock(dim, heads, window, window // 2, guidance_dim)
        self.guidance_norm = nn.LayerNorm(guidance_dim) if guidance_dim else None

    def forward(self, x: torch.Tensor, guidance: torch.Tensor | None = None) -> torch.Tensor:
        """x [N,D,h,w]; guidance [N,G,h,w] (already repeated per class) or None."""
        if guidance is not None and self.guidance_norm is not None:
            guidance = self.guidance_norm(guidance.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.block_2(self.block_1(x, guidance), guidance)


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
    over classes (no class positions), so any vocabulary works at test time.

    ``pool`` > 0 selects CAT-Seg's class-aggregation layer: the map is average-pooled by ``pool``
    (1: no pooling), attention and a 4× ReLU MLP run on the pooled map, which is upsampled
    (bilinear, corners aligned) and added to the input — CAT-Seg adds the whole updated pooled map,
    not only the update — and the attention has no output projection, as CAT-Seg's. ``pool=0``
    keeps the lighter pre-norm block of the tiny configs.
    """

    def __init__(self, dim: int, text_dim: int, heads: int = 4, mlp_ratio: float = 2.0, pool: int = 0):
        super().__init__()
        self.heads, self.pool = heads, pool
        if pool:
            mlp_ratio = 4.0
        self.norm1 = nn.LayerNorm(dim)
        self.qk = nn.Linear(dim + text_dim, 2 * dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Identity() if pool else nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        act = nn.ReLU() if pool else nn.GELU()
        self.mlp = nn.Sequential(nn.Linear(dim, int(dim * mlp_ratio)), act, nn.Linear(int(dim * mlp_ratio), dim))

    def forward(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """x [B,K,D,h,w], text [K,T] (or [B,K,T]) → [B,K,D,h,w]."""
        b, k, d, h0, w0 = x.shape
        src = x
        if self.pool > 1:
            src = F.avg_pool2d(x.flatten(0, 1), self.pool).view(b, k, d, h0 // self.pool, w0 // self.pool)
        h, w = src.shape[-2:]
        t = src.permute(0, 3, 4, 1, 2).reshape(b * h * w, k, d)
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
        t = t.view(b, h, w, k, d).permute(0, 3, 4, 1, 2)
        if not self.pool:
            return t
        if (h, w) != (h0, w0):
            t = F.interpolate(t.flatten(0, 1), size=(h0, w0), mode="bilinear", align_corners=True).view(b, k, d, h0, w0)
        return x + t


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


class GuidedUpsampleDecoder(nn.Module):
    """CAT-Seg's upsampling decoder. Each guidance map (a CLIP layer already brought to its scale by
    :class:`GuidanceProjection`) is projected by a 3×3 conv + ReLU; each step is a 2× transposed
    conv to ``in - guidance`` channels, the concatenated guidance, and a double 3×3 conv (GroupNorm
    with 16 channels a group, ReLU); a 3×3 conv gives one logit per class and pixel."""

    def __init__(self, dim: int, guidance_dims: list[int], proj_dims: list[int], dims: list[int]):
        super().__init__()
        if not len(guidance_dims) == len(proj_dims) == len(dims):
            raise ConfigError("escnet guidance_dims, guidance_proj_dims and decoder_dims need the same length")
        self.proj = nn.ModuleList(nn.Sequential(nn.Conv2d(g, p, 3, padding=1), nn.ReLU()) for g, p in zip(guidance_dims, proj_dims))
        self.ups, self.convs = nn.ModuleList(), nn.ModuleList()
        c = dim
        for p, o in zip(proj_dims, dims):
            if c <= p:
                raise ConfigError(f"escnet decoder: {c} channels cannot make room for {p} guidance channels")
            self.ups.append(nn.ConvTranspose2d(c, c - p, 2, stride=2))
            gn = lambda ch: nn.GroupNorm(max(ch // 16, 1), ch)  # noqa: E731
            self.convs.append(nn.Sequential(
                nn.Conv2d(c, o, 3, padding=1, bias=False), gn(o), nn.ReLU(),
                nn.Conv2d(o, o, 3, padding=1, bias=False), gn(o), nn.ReLU(),
            ))
            c = o
        self.head = nn.Conv2d(c, 1, 3, padding=1)

    def forward(self, x: torch.Tensor, guidance: list[torch.Tensor]) -> torch.Tensor:
        """x [B,K,D,h,w], guidance[i] [B,G_i,h·2^(i+1),w·2^(i+1)] → logits [B,K,h·2^n,w·2^n]."""
        b, k = x.shape[:2]
        y = x.flatten(0, 1)
        for proj, up, conv, g in zip(self.proj, self.ups, self.convs, guidance):
            y = up(y)
            g = proj(g if g.shape[-2:] == y.shape[-2:] else F.interpolate(g, size=y.shape[-2:], mode="bilinear", align_corners=False))
            y = conv(torch.cat([y, g.repeat_interleave(k, dim=0)], 1))
        out = self.head(y)
        return out.view(b, k, *out.shape[-2:])
