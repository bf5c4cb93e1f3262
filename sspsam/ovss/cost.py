"""CLIP cost maps: dense image–text cosine similarity, the common input of ESC-Net, SAM-MI and
the training-free path.

Class names become text embeddings through prompt ensembling (CLIP's recipe: embed each class in
several templates, L2-normalise, average, normalise again). Dense image features come from
``CLIPBackbone.encode_image``'s patch tokens (CLIP-Surgery's v-v path in the last blocks, which
keeps each patch's own semantics without training).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..backbones.clip import CLIPBackbone

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


def class_embeddings(
    clip: CLIPBackbone, classes: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES
) -> torch.Tensor:
    """[K, E] unit-norm prompt-ensembled text embeddings, one per class name."""
    device = next(clip.parameters()).device
    texts = [t.format(c) for c in classes for t in templates]
    sent = clip.encode_text(clip.tokenize(texts).to(device)).sentence
    sent = F.normalize(sent.float(), dim=-1).view(len(classes), len(templates), -1).mean(1)
    return F.normalize(sent, dim=-1)


def dense_features(clip: CLIPBackbone, images: torch.Tensor) -> torch.Tensor:
    """[B,3,S,S] 0..255 → unit-norm dense CLIP features [B, E, g, g]."""
    patches, _ = clip.encode_image(images)
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
