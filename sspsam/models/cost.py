"""CLIP cost maps: dense image–text cosine similarity, the common input of ESC-Net, SAM-MI and
the training-free path.

Class names become text embeddings through prompt ensembling (CLIP's recipe: embed each class in
several templates, L2-normalise, average, normalise again); ``IMAGENET_TEMPLATES`` are CLIP's 80
ImageNet templates, which the training-free protocol (SCLIP, ProxyCLIP) averages. Dense image
features come from ``CLIPBackbone.encode_image``'s patch tokens (CLIP-Surgery's v-v path in the last
blocks) or, selected by ``mode``, from the two other training-free fixes of CLIP's last block:

* ``"sclip"``: SCLIP's last block exactly as its code computes it (``encode_image(return_all=True,
  csa=True)``): ``x + CSA(ln_1(x))`` then ``x + mlp(ln_2(x))``, CSA = (softmax(q·qᵀ/√d) +
  softmax(k·kᵀ/√d))·v through the output projection; other grids than CLIP's own take SCLIP's
  bicubic positional interpolation (``scale_factor = (g + 0.1) / 14``). Matches SCLIP's golden
  features to ~1e-6 (tests/test_golden_clip.py);
* ``"csa-no-ffn"``: the same correlative attention with the last block's FFN dropped and plain
  bicubic resizing of the positions: what sspsam called "sclip" before it was checked against
  SCLIP's code (kept under its own name so that results made with it can be reproduced);
* ``"maskclip"``: MaskCLIP's value path: the last block's value embedding through its output
  projection, no attention mixing, no residual, no FFN.

All three need no training: they only rewire the pretrained weights.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from sspsam.backbones.clip import CLIPBackbone
from sspsam.errors import ConfigError

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

# CLIP-Surgery's default prompt ensemble (its encode_text_with_prompt_ensemble): the 80 above
# plus five scene templates.
SURGERY_TEMPLATES: tuple[str, ...] = IMAGENET_TEMPLATES + (
    "there is a {} in the scene.", "there is the {} in the scene.", "this is a {} in the scene.",
    "this is the {} in the scene.", "this is one {} in the scene.",
)

TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "default": DEFAULT_TEMPLATES,
    "imagenet80": IMAGENET_TEMPLATES,
    "surgery85": SURGERY_TEMPLATES,
    "plain": ("{}",),
}
DENSE_MODES = ("surgery", "sclip", "csa-no-ffn", "maskclip")
SCLIP_LOGIT_SCALE = 40.0  # SCLIP's softmax temperature over classes (cosine × 40)
_TEXT_CHUNK = 512  # texts per text-tower call: 150 classes × 80 templates would not fit at once


def resolve_templates(templates: str | Sequence[str]) -> tuple[str, ...]:
    """A template-set name ('default', 'imagenet80', 'surgery85', 'plain') or an explicit list of '{}' strings."""
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
    tokens = clip.tokenize(texts)
    length = tokens.argmax(dim=-1)  # EOT position: texts of one length run together, unpadded
    sent = torch.empty(len(texts), clip.embed_dim, device=device)
    for n in length.unique().tolist():
        sel = (length == n).nonzero().flatten()
        for i in range(0, len(sel), _TEXT_CHUNK):
            idx = sel[i : i + _TEXT_CHUNK]
            sent[idx.to(device)] = F.normalize(clip.encode_sentences(tokens[idx].to(device)).float(), dim=-1)
    sent = sent.view(len(classes), len(templates), -1).mean(1)
    return F.normalize(sent, dim=-1)


def clip_preprocess(clip: CLIPBackbone, images: torch.Tensor, size: int | None) -> torch.Tensor:
    """CLIP normalisation at ``size`` (default: CLIP's own input size); positions are interpolated."""
    size = size or clip.image_size
    if images.shape[-2:] != (size, size):
        images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return (images - clip.mean) / clip.std


_preprocess = clip_preprocess  # the former name, kept for importers until they move


def csa_attention(attn: torch.nn.MultiheadAttention, x: torch.Tensor) -> torch.Tensor:
    """SCLIP's correlative self-attention on [B,N,C]: (softmax(q·qᵀ) + softmax(k·kᵀ))·v, then out_proj.

    Each patch attends to patches that look like itself instead of to the few global "sink"
    tokens, which is what makes CLIP's last layer spatially meaningful without training.
    """
    b, n, c = x.shape
    h = attn.num_heads
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).reshape(b, n, 3, h, c // h).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    out = F.scaled_dot_product_attention(q, q, v) + F.scaled_dot_product_attention(k, k, v)
    return attn.out_proj(out.transpose(1, 2).reshape(b, n, c))


def _before_last_block(clip: CLIPBackbone, x: torch.Tensor, interp: str) -> tuple[torch.Tensor, torch.nn.Module]:
    """Tokens after every vision block but the last, and that last block: the training-free modes
    differ only in how they replace it."""
    blocks = clip.model.visual.transformer.resblocks
    x = clip.embed_patches(x, interp)
    for blk in blocks[:-1]:
        x = blk(x)
    return x, blocks[-1]


def sclip_tokens(clip: CLIPBackbone, x: torch.Tensor, csa: bool = True) -> torch.Tensor:
    """Normalised input [B,3,H,W] (any multiple of the patch size) → ``ln_post(x) @ proj`` of every
    token [B, 1+g*g, E], class token first: SCLIP's ``encode_image(x, return_all=True, csa=csa)``.
    ``csa=False`` runs a standard last block (token 0 is then CLIP's own image embedding)."""
    vis = clip.model.visual
    x, last = _before_last_block(clip, x, "sclip")
    if csa:
        x = x + last.ls_1(csa_attention(last.attn, last.ln_1(x)))
        x = x + last.ls_2(last.mlp(last.ln_2(x)))
    else:
        x = last(x)
    return vis.ln_post(x) @ vis.proj


def _last_block_dense(clip: CLIPBackbone, images: torch.Tensor, mode: str, size: int | None = None) -> torch.Tensor:
    """Patch tokens [B, g*g, E] with the last vision block replaced by SCLIP's or MaskCLIP's variant."""
    x = clip_preprocess(clip, images, size)
    if mode == "sclip":
        return sclip_tokens(clip, x)[:, 1:]
    vis = clip.model.visual
    x, last = _before_last_block(clip, x, "bicubic")
    if mode == "csa-no-ffn":
        x = x + last.ls_1(csa_attention(last.attn, last.ln_1(x)))
    else:  # maskclip: the value embedding alone keeps each patch's own semantics
        attn = last.attn
        c = x.shape[-1]
        v = F.linear(last.ln_1(x), attn.in_proj_weight[2 * c :], attn.in_proj_bias[2 * c :])
        x = attn.out_proj(v)
    return vis.ln_post(x[:, 1:]) @ vis.proj


def dense_features(
    clip: CLIPBackbone, images: torch.Tensor, mode: str = "surgery", size: int | None = None
) -> torch.Tensor:
    """[B,3,S,S] 0..255 → unit-norm dense CLIP features [B, E, g, g].

    ``mode``: 'surgery' (the backbone's CLIP-Surgery v-v path, what SSP-SAM uses), 'sclip',
    'csa-no-ffn' or 'maskclip' (see the module docstring). ``size``: CLIP input side for the last three (e.g.
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
    g = int(round(int(n) ** 0.5))  # int(): under the ONNX tracer a size is a tensor; the grid is fixed per input size
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


def feature_surgery(image_feats: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
    """CLIP-Surgery's feature surgery: unit-norm tokens [B,N,E] (token 0 = the global embedding)
    × unit-norm classes [K,E] → similarities [B,N,K].

    The element-wise products token⊙class are weighted by how much each class stands out in the
    whole image (softmax over classes of 2·cosine of the *global* token, divided by its mean), and
    their mean over the classes — what every class shares, e.g. a response to the image's "sink"
    features — is subtracted before summing, so the map keeps only class-specific evidence.
    """
    prob = (image_feats[:, :1] @ text_feats.T * 2).softmax(-1)  # [B,1,K]
    w = prob / prob.mean(-1, keepdim=True)
    feats = image_feats[:, :, None, :] * text_feats[None, None] * w[..., None]  # [B,N,K,E]
    return (feats - feats.mean(2, keepdim=True)).sum(-1)


def similarity_map(sim: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Patch similarities [B,N,K] (N a square grid) → per-class maps [B,*size,K]: min-max
    normalised over the patches, then bilinearly upsampled (CLIP-Surgery's visualisation)."""
    lo, hi = sim.min(1, keepdim=True).values, sim.max(1, keepdim=True).values
    sim = (sim - lo) / (hi - lo)
    b, n, k = sim.shape
    side = int(round(int(n) ** 0.5))
    grid = sim.reshape(b, side, side, k).permute(0, 3, 1, 2)
    return F.interpolate(grid, size=tuple(size), mode="bilinear", align_corners=False).permute(0, 2, 3, 1)
