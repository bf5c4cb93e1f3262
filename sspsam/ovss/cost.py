"""CLIP cost maps: dense image–text cosine similarity, the common input of ESC-Net, SAM-MI and
the training-free path.

Class names become text embeddings through prompt ensembling (CLIP's recipe: embed each class in
several templates, L2-normalise, average, normalise again); ``IMAGENET_TEMPLATES`` are CLIP's 80
ImageNet templates, which the training-free protocol (SCLIP, ProxyCLIP) averages. Dense image
features come from ``CLIPBackbone.encode_image``'s patch tokens (CLIP-Surgery's v-v path in the last
blocks) or, selected by ``mode``, from the two other training-free fixes of CLIP's last block:

* ``"sclip"``: SCLIP's correlative self-attention, softmax(q·qᵀ) + softmax(k·kᵀ), in the last block;
  its residual is kept and its FFN dropped [recall of SCLIP's code];
* ``"maskclip"``: MaskCLIP's value path: the last block's value embedding through its output
  projection, no attention mixing, no residual, no FFN.

All three need no training: they only rewire the pretrained weights.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..backbones.clip import CLIPBackbone
from ..errors import ConfigError

# A short, commonly used subset of CLIP's 80 ImageNet templates.
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a bad photo of a {}.",
    "a photo of the large {}.",
    "a photo of the small {}.",
    "a close-up photo of a {}.",
    "a bright photo of a {}.",
    "a cropped photo of a {}.",
    "itap of a {}.",
)

# CLIP's 80 ImageNet prompt templates (Radford et al., notebook "Prompt_Engineering_for_ImageNet"),
# averaged by the training-free OVSS protocol.
IMAGENET_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.", "a photo of the hard to see {}.",
    "a low resolution photo of the {}.", "a rendering of a {}.", "graffiti of a {}.", "a bad photo of the {}.",
    "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.", "a photo of a hard to see {}.",
    "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.",
    "a drawing of a {}.", "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.", "a painting of the {}.", "a painting of a {}.",
    "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.", "a cropped photo of a {}.",
    "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.", "a blurry photo of the {}.",
    "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.", "a {} in a video game.",
    "a photo of one {}.", "a doodle of a {}.", "a close-up photo of the {}.", "a photo of a {}.",
    "the origami {}.", "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.",
    "a origami {}.", "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.", "a photo of a nice {}.",
    "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.",
    "a sketch of the {}.", "a embroidered {}.", "a pixelated photo of a {}.", "itap of the {}.",
    "a jpeg corrupted photo of the {}.", "a good photo of a {}.", "a plushie {}.", "a photo of the nice {}.",
    "a photo of the small {}.", "a photo of the weird {}.", "the cartoon {}.", "art of the {}.",
    "a drawing of the {}.", "a photo of the large {}.", "a black and white photo of a {}.", "the plushie {}.",
    "a dark photo of a {}.", "itap of a {}.", "graffiti of the {}.", "a toy {}.",
    "itap of my {}.", "a photo of a cool {}.", "a photo of a small {}.", "a tattoo of the {}.",
)
assert len(IMAGENET_TEMPLATES) == 80

TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "default": DEFAULT_TEMPLATES,
    "imagenet80": IMAGENET_TEMPLATES,
    "plain": ("{}",),
}
DENSE_MODES = ("surgery", "sclip", "maskclip")
SCLIP_LOGIT_SCALE = 40.0  # SCLIP's softmax temperature over classes (cosine × 40)
_TEXT_CHUNK = 512  # texts per text-tower call: 150 classes × 80 templates would not fit at once


def resolve_templates(templates: str | Sequence[str]) -> tuple[str, ...]:
    """A template-set name ('default', 'imagenet80', 'plain') or an explicit list of '{}' strings."""
    if isinstance(templates, str):
        if templates not in TEMPLATE_SETS:
            raise ConfigError(f"unknown template set '{templates}'; choose one of {', '.join(TEMPLATE_SETS)}")
        return TEMPLATE_SETS[templates]
    out = tuple(templates)
    if not out or not all("{}" in t for t in out):
        raise ConfigError("templates must be a non-empty list of strings with a '{}' placeholder")
    return out


def class_embeddings(
    clip: CLIPBackbone, classes: Sequence[str], templates: str | Sequence[str] = DEFAULT_TEMPLATES
) -> torch.Tensor:
    """[K, E] unit-norm prompt-ensembled text embeddings, one per class name."""
    templates = resolve_templates(templates)
    device = next(clip.parameters()).device
    texts = [t.format(c) for c in classes for t in templates]
    parts = []
    for i in range(0, len(texts), _TEXT_CHUNK):
        sent = clip.encode_text(clip.tokenize(texts[i : i + _TEXT_CHUNK]).to(device)).sentence
        parts.append(F.normalize(sent.float(), dim=-1))
    sent = torch.cat(parts).view(len(classes), len(templates), -1).mean(1)
    return F.normalize(sent, dim=-1)


def _preprocess(clip: CLIPBackbone, images: torch.Tensor, size: int | None) -> torch.Tensor:
    """CLIP normalisation at ``size`` (default: CLIP's own input size); positions are interpolated."""
    size = size or clip.image_size
    if images.shape[-2:] != (size, size):
        images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return (images - clip.mean) / clip.std


def _last_block_dense(clip: CLIPBackbone, images: torch.Tensor, mode: str, size: int | None = None) -> torch.Tensor:
    """Patch tokens [B, g*g, E] with the last vision block replaced by SCLIP's or MaskCLIP's variant."""
    vis = clip.model.visual
    x = vis.conv1(_preprocess(clip, images, size))
    b, c, gh, gw = x.shape
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([vis.class_embedding.expand(b, 1, c).to(x.dtype), x], dim=1)
    x = vis.ln_pre(x + clip._positional(gh, gw).to(x.dtype))
    blocks = vis.transformer.resblocks
    for blk in blocks[:-1]:
        x = blk(x)
    last = blocks[-1]
    attn = last.attn
    h = attn.num_heads
    n = x.shape[1]
    qkv = F.linear(last.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).reshape(b, n, 3, h, c // h).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    if mode == "sclip":
        # Correlative self-attention: (softmax(q qᵀ) + softmax(k kᵀ)) v, so each patch attends to
        # patches that look like itself instead of to the few global "sink" tokens.
        out = F.scaled_dot_product_attention(q, q, v) + F.scaled_dot_product_attention(k, k, v)
        x = x + last.ls_1(attn.out_proj(out.transpose(1, 2).reshape(b, n, c)))
    else:  # maskclip: the value embedding alone keeps each patch's own semantics
        x = attn.out_proj(v.transpose(1, 2).reshape(b, n, c))
    return vis.ln_post(x[:, 1:]) @ vis.proj


def dense_features(
    clip: CLIPBackbone, images: torch.Tensor, mode: str = "surgery", size: int | None = None
) -> torch.Tensor:
    """[B,3,S,S] 0..255 → unit-norm dense CLIP features [B, E, g, g].

    ``mode``: 'surgery' (the backbone's CLIP-Surgery v-v path, what SSP-SAM uses), 'sclip' or
    'maskclip' (see the module docstring). ``size``: CLIP input side for 'sclip'/'maskclip' (e.g.
    448 for a 28×28 grid from ViT-B/16; positional embeddings are interpolated), since a 14×14
    grid is coarse for segmentation.
    """
    if mode == "surgery":
        if size not in (None, clip.image_size):
            raise ConfigError(f"dense mode 'surgery' runs at CLIP's own input size {clip.image_size}, not {size}")
        patches, _ = clip.encode_image(images)
    elif mode in DENSE_MODES:
        patches = _last_block_dense(clip, images, mode, size)
    else:
        raise ConfigError(f"unknown dense mode '{mode}'; choose one of {', '.join(DENSE_MODES)}")
    b, n, e = patches.shape
    g = int(round(n**0.5))
    return F.normalize(patches.float(), dim=-1).transpose(1, 2).reshape(b, e, g, g)


def correlation(dense: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Cosine image–text correlation: dense [B,E,h,w] (or [B,N,E]) × text [K,E] or [B,K,E] → [B,K,h,w] (or [B,K,N])."""
    text = F.normalize(text, dim=-1)
    if dense.dim() == 4:
        dense = F.normalize(dense, dim=1)
        eq = "behw,ke->bkhw" if text.dim() == 2 else "behw,bke->bkhw"
    else:
        dense = F.normalize(dense, dim=-1)
        eq = "bne,ke->bkn" if text.dim() == 2 else "bne,bke->bkn"
    return torch.einsum(eq, dense, text)


def upsample_cost(cost: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling of a [B,K,h,w] cost map: the patch grid is far coarser than masks."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(cost.shape[-2:]) == size:
        return cost
    return F.interpolate(cost, size=size, mode="bilinear", align_corners=False)


def cost_map(
    clip: CLIPBackbone,
    images: torch.Tensor,
    text: torch.Tensor,
    mode: str = "sclip",
    size: int | tuple[int, int] | None = None,
    clip_size: int | None = None,
) -> torch.Tensor:
    """Cosine cost map [B,K,H,W] of images × class embeddings, upsampled to ``size`` if given."""
    cost = correlation(dense_features(clip, images, mode, clip_size), text)
    return cost if size is None else upsample_cost(cost, size)


def class_probabilities(cost: torch.Tensor, logit_scale: float = SCLIP_LOGIT_SCALE) -> torch.Tensor:
    """Softmax over classes (dim 1) of cosine × ``logit_scale`` (SCLIP: 40)."""
    return (cost * logit_scale).softmax(dim=1)
