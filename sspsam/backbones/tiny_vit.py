"""MobileSAM's image encoder: TinyViT-5M followed by SAM's neck, in plain torch.

MobileSAM (Zhang et al., 2023) distils SAM's ViT-H image encoder into a TinyViT (Wu et al.,
2022) and keeps SAM's prompt encoder and mask decoder. Its reference code needs timm, which
cannot be imported here, so this module re-implements the encoder. Module and parameter names
follow ``mobile_sam/modeling/tiny_vit_sam.py`` of ChaoningZhang/MobileSAM one for one, so the
``image_encoder.*`` part of the official ``mobile_sam.pt`` loads with ``strict=True``:

* ``patch_embed.seq.{0,2}.{c,bn}``: two stride-2 3x3 Conv+BN (resolution /4);
* ``layers.0``: MBConv blocks; ``layers.1..3``: windowed-attention TinyViT blocks;
  every stage but the last ends in a ``downsample`` (PatchMerging). The last merging keeps
  the resolution (stride 1) so the encoder's stride is 16, like SAM's ViT (1024 -> 64x64);
* ``norm_head`` / ``head``: TinyViT's ImageNet classifier. MobileSAM never calls it but its
  checkpoint carries it (LayerNorm(320), Linear(320, 1000)), so it exists for strict loading;
* ``neck``: SAM's conv1x1 -> LayerNorm2d -> conv3x3 -> LayerNorm2d to 256 channels.

``attention_bias_idxs`` is a non-persistent buffer (as in the reference), so it is not in
the checkpoint; it is rebuilt from the window size. Unlike the reference, which hard-codes a
64x64 output grid, the feature-map size is taken from the input, so small ``img_size``
settings (tests, CPU demos) give ``img_size/16`` outputs with the same code path.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import sspsam.backbones.runtime as runtime
from sspsam.errors import ConfigError

__all__ = ["TinyViT", "LayerNorm2d"]


class Conv2dBN(nn.Sequential):
    """Bias-free conv followed by BatchNorm; children ``c`` and ``bn`` as in the checkpoint."""

    def __init__(
        self,
        in_chans: int,
        out_chans: int,
        kernel_size: int = 1,
        stride: int = 1,
        padding: int = 0,
        groups: int = 1,
        bn_weight_init: float = 1.0,
    ):
        super().__init__()
        self.add_module("c", nn.Conv2d(in_chans, out_chans, kernel_size, stride, padding, groups=groups, bias=False))
        bn = nn.BatchNorm2d(out_chans)
        nn.init.constant_(bn.weight, bn_weight_init)
        nn.init.zeros_(bn.bias)
        self.add_module("bn", bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or not runtime.FAST["fold_bn"]:
            return self.bn(self.c(x))
        # Inference: BatchNorm folded into the conv (one pass over the activations instead of two;
        # the same affine map, so the outputs agree to float rounding).
        c, bn = self.c, self.bn
        scale = bn.weight * (bn.running_var + bn.eps).rsqrt()
        weight = c.weight * scale.view(-1, 1, 1, 1).to(c.weight.dtype)
        bias = bn.bias - bn.running_mean * scale
        return F.conv2d(x, weight, bias.to(weight.dtype), c.stride, c.padding, c.dilation, c.groups)


class DropPath(nn.Module):
    """Stochastic depth: drop a residual branch per sample while training (identity at inference)."""

    def __init__(self, prob: float = 0.0):
        super().__init__()
        self.prob = float(prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.prob == 0.0:
            return x
        keep = 1.0 - self.prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"prob={self.prob}"


def _drop_path(prob: float) -> nn.Module:
    # The reference only creates a DropPath for p > 0; it has no parameters either way.
    return DropPath(prob) if prob > 0.0 else nn.Identity()


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of [B,C,H,W] (SAM's neck norm, eps 1e-6)."""

    def __init__(self, num_channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class PatchEmbed(nn.Module):
    """Two stride-2 Conv+BN with GELU between: [B,C_in,H,W] -> [B,D,H/4,W/4]."""

    def __init__(self, in_chans: int, embed_dim: int):
        super().__init__()
        self.seq = nn.Sequential(
            Conv2dBN(in_chans, embed_dim // 2, 3, 2, 1),
            nn.GELU(),
            Conv2dBN(embed_dim // 2, embed_dim, 3, 2, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


class MBConv(nn.Module):
    """Inverted-residual block (1x1 expand, 3x3 depthwise, 1x1 project) used by stage 0."""

    def __init__(self, dim: int, expand_ratio: float, drop_path: float):
        super().__init__()
        hidden = int(dim * expand_ratio)
        self.conv1 = Conv2dBN(dim, hidden, 1)
        self.act1 = nn.GELU()
        self.conv2 = Conv2dBN(hidden, hidden, 3, 1, 1, groups=hidden)
        self.act2 = nn.GELU()
        # Zero-init of the last BN makes each block start as identity (reference init).
        self.conv3 = Conv2dBN(hidden, dim, 1, bn_weight_init=0.0)
        self.act3 = nn.GELU()
        self.drop_path = _drop_path(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B,C,H,W]
        y = self.act2(self.conv2(self.act1(self.conv1(x))))
        y = self.drop_path(self.conv3(y))
        return self.act3(x + y)


class PatchMerging(nn.Module):
    """1x1 conv -> 3x3 depthwise conv (stride 2, or 1 for the last merge) -> 1x1 conv.

    Takes [B,C,H,W] or channels-last [B,H,W,C]; returns channels-last [B,H',W',C_out], the
    layout the attention stages work in.
    """

    def __init__(self, dim: int, out_dim: int, stride: int):
        super().__init__()
        self.act = nn.GELU()
        self.conv1 = Conv2dBN(dim, out_dim, 1)
        self.conv2 = Conv2dBN(out_dim, out_dim, 3, stride, 1, groups=out_dim)
        self.conv3 = Conv2dBN(out_dim, out_dim, 1)

    def forward(self, x: torch.Tensor, channels_last: bool) -> torch.Tensor:
        if channels_last:
            x = x.permute(0, 3, 1, 2)
        x = self.act(self.conv1(x))
        x = self.act(self.conv2(x))
        return self.conv3(x).permute(0, 2, 3, 1)


class Mlp(nn.Module):
    """Pre-norm MLP (the LayerNorm lives inside, named ``norm`` as in the checkpoint)."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = nn.GELU()
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.act(self.fc1(self.norm(x))))
        return self.drop(self.fc2(x))


def _relative_offset_index(window: int) -> torch.Tensor:
    """[w*w, w*w] index of |dy|*w + |dx| for every query/key pair of a window.

    This equals the LeViT/TinyViT table, which numbers offsets in order of first appearance
    over row-major point pairs: pairs with the first point at (0,0) enumerate every offset
    (dy, dx) in row-major order, so offset (dy, dx) gets number dy*w + dx.
    """
    coords = torch.arange(window)
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    return (ys[:, None] - ys[None, :]).abs() * window + (xs[:, None] - xs[None, :]).abs()


class Attention(nn.Module):
    """Multi-head self-attention over one window with a learned per-head bias per |offset|.

    ``qkv`` packs q, k, v per head ([h0: q k v, h1: q k v, ...]), matching the checkpoint.
    """

    def __init__(self, dim: int, num_heads: int, window: int):
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"tiny_vit: dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, window * window))
        # Derived from the window size, so not saved (the official checkpoint has no such key).
        self.register_buffer("attention_bias_idxs", _relative_offset_index(window), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B,N,C], N = window**2
        b, n, _ = x.shape
        qkv = self.qkv(self.norm(x)).view(b, n, self.num_heads, 3 * self.head_dim).transpose(1, 2)
        q, k, v = qkv.split(self.head_dim, dim=-1)
        # Indexed on every call rather than cached in eval() as the reference does: a cache
        # goes stale when weights are loaded after eval(), and the gather is cheap.
        # 4-D bias: a 3-D mask sends CPU SDPA down its slower unfused math path.
        bias = self.attention_biases[:, self.attention_bias_idxs].to(q.dtype)
        if runtime.FAST["sdpa"]:
            bias = bias[None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # scale = head_dim**-0.5
        return self.proj(out.transpose(1, 2).reshape(b, n, -1))


class TinyViTBlock(nn.Module):
    """Windowed attention -> depthwise ``local_conv`` -> MLP, on channels-last [B,H,W,C]."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int,
        mlp_ratio: float,
        drop: float,
        drop_path: float,
        local_conv_size: int,
    ):
        super().__init__()
        self.window_size = window_size
        self.attn = Attention(dim, num_heads, window_size)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        self.local_conv = Conv2dBN(dim, dim, local_conv_size, 1, local_conv_size // 2, groups=dim)
        self.drop_path = _drop_path(drop_path)

    def _window_attention(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        ws = self.window_size
        pad_b, pad_r = (-h) % ws, (-w) % ws
        # Zero padding enters the attention unmasked (the padded tokens are keys/values too),
        # exactly as in the reference: the pretrained weights were trained that way.
        if pad_b or pad_r:
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        ph, pw = h + pad_b, w + pad_r
        nh, nw = ph // ws, pw // ws
        x = x.view(b, nh, ws, nw, ws, c).transpose(2, 3).reshape(b * nh * nw, ws * ws, c)
        x = self.attn(x)
        x = x.view(b, nh, nw, ws, ws, c).transpose(2, 3).reshape(b, ph, pw, c)
        return x[:, :h, :w] if (pad_b or pad_r) else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self._window_attention(x))
        x = self.local_conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return x + self.drop_path(self.mlp(x))


class _Stage(nn.Module):
    """``blocks`` then an optional ``downsample``; optional activation checkpointing."""

    blocks: nn.ModuleList
    downsample: PatchMerging | None

    def __init__(self, use_checkpoint: bool):
        super().__init__()
        self.use_checkpoint = use_checkpoint

    def _run(self, x: torch.Tensor, channels_last: bool) -> torch.Tensor:
        for blk in self.blocks:
            if self.use_checkpoint and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        if self.downsample is not None:
            x = self.downsample(x, channels_last)
        return x


class ConvLayer(_Stage):
    """Stage 0: MBConv blocks on [B,C,H,W]; its downsample hands channels-last to stage 1."""

    def __init__(self, dim, depth, expand_ratio, drop_path, downsample, use_checkpoint):
        super().__init__(use_checkpoint)
        self.blocks = nn.ModuleList(MBConv(dim, expand_ratio, drop_path[i]) for i in range(depth))
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, channels_last=False)


class BasicLayer(_Stage):
    """Stages 1..3: TinyViT blocks on channels-last [B,H,W,C]."""

    def __init__(self, dim, depth, num_heads, window_size, mlp_ratio, drop, drop_path, local_conv_size,
                 downsample, use_checkpoint):  # fmt: skip
        super().__init__(use_checkpoint)
        self.blocks = nn.ModuleList(
            TinyViTBlock(dim, num_heads, window_size, mlp_ratio, drop, drop_path[i], local_conv_size)
            for i in range(depth)
        )
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, channels_last=True)


class TinyViT(nn.Module):
    """MobileSAM's image encoder: [B,in_chans,S,S] normalised pixels -> [B,out_chans,S/16,S/16].

    Defaults are MobileSAM's ``build_sam_vit_t`` configuration (TinyViT-5M, 1024 px input),
    whose state dict matches the ``image_encoder.*`` keys of ``mobile_sam.pt``. Smaller
    ``img_size`` and widths give test-sized models with the same structure. ``img_size`` is
    informational (SAM-style callers read it); the forward pass follows the input's size.
    """

    def __init__(
        self,
        img_size: int = 1024,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dims: Sequence[int] = (64, 128, 160, 320),
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (2, 4, 5, 10),
        window_sizes: Sequence[int] = (7, 7, 14, 7),
        mlp_ratio: float = 4.0,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        mbconv_expand_ratio: float = 4.0,
        local_conv_size: int = 3,
        out_chans: int = 256,
        use_checkpoint: bool = False,
    ):
        super().__init__()
        embed_dims, depths = [int(d) for d in embed_dims], [int(d) for d in depths]
        num_heads, window_sizes = [int(h) for h in num_heads], [int(w) for w in window_sizes]
        n = len(depths)
        if not (len(embed_dims) == len(num_heads) == len(window_sizes) == n == 4):
            # Four stages give the stride-16 output (4 * 2 * 2 * 1) SAM's decoder is built for.
            raise ConfigError(
                "tiny_vit: embed_dims, depths, num_heads and window_sizes need 4 entries (one per stage), "
                f"got {embed_dims}, {depths}, {num_heads}, {window_sizes}"
            )
        if img_size % 16:
            raise ConfigError(f"tiny_vit: img_size must be a multiple of 16, got {img_size}")
        if any(w < 1 for w in window_sizes):
            raise ConfigError(f"tiny_vit: window sizes must be positive, got {window_sizes}")
        self.img_size = img_size
        self.num_classes = num_classes
        self.embed_dims = embed_dims
        self.depths = depths

        self.patch_embed = PatchEmbed(in_chans, embed_dims[0])  # stride 4

        # Stochastic depth rises linearly over all blocks (0 for inference / MobileSAM).
        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.layers = nn.ModuleList()
        for i in range(n):
            rates = dpr[sum(depths[:i]) : sum(depths[: i + 1])]
            downsample = None
            if i < n - 1:
                # Stride 2 after stages 0..n-3 (4 -> 8 -> 16); the last merge only widens,
                # so the output stride stays 16 as SAM's mask decoder expects.
                stride = 1 if i == n - 2 else 2
                downsample = PatchMerging(embed_dims[i], embed_dims[i + 1], stride)
            if i == 0:
                layer = ConvLayer(embed_dims[0], depths[0], mbconv_expand_ratio, rates, downsample, use_checkpoint)
            else:
                layer = BasicLayer(
                    embed_dims[i], depths[i], num_heads[i], window_sizes[i], mlp_ratio, drop_rate, rates,
                    local_conv_size, downsample, use_checkpoint,
                )  # fmt: skip
            self.layers.append(layer)

        # TinyViT's classifier: unused by SAM, present only because mobile_sam.pt stores it.
        self.norm_head = nn.LayerNorm(embed_dims[-1])
        self.head = nn.Linear(embed_dims[-1], num_classes) if num_classes > 0 else nn.Identity()

        self.apply(self._init_weights)  # before the neck, as in the reference (neck keeps torch defaults)
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dims[-1], out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Channels-last through the conv stem and stage 0: oneDNN's convolutions (the 1x1 ones
        # included) run faster on NHWC than on NCHW on CPU (benchmarks/latency.py measures it).
        if runtime.FAST["channels_last"]:
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.patch_embed(x)  # [B,C0,S/4,S/4]
        for layer in self.layers:  # stage 0 takes [B,C,H,W]; after it everything is [B,H,W,C]
            x = layer(x)
        x = x.permute(0, 3, 1, 2)  # a channels-last view of [B,H,W,C]
        return self.neck(x if runtime.FAST["channels_last"] else x.contiguous())
