"""The method set every open-vocabulary (OVSS) model exposes, so a predictor calls it without probing.

Every OVSS model (ESC-Net, SAM-MI, the training-free ``ZeroShot``) has:

* ``image_size`` — the side S of the letterboxed square it reads;
* ``clip`` — its CLIP backbone (SCLIP's protocol runs on it);
* ``class_embeddings(classes: list[str]) -> Tensor [K, E]`` — the class names through its templates;
* ``encode_image(images [B,3,S,S] 0..255, valid_hw [B,2] | None = None) -> features`` — the image
  side, computed once per image where the model can split it off; a model that cannot returns
  :class:`ImageInput` and does all the work in ``decode_classes``;
* ``decode_classes(features, class_emb [K,E]) -> {"logits": [B,K,h,w], ...}``;
* ``forward(images, class_emb, valid_hw=None)`` — the two above in one call (training).

``decode_classes(encode_image(x, v), e)`` gives what ``forward(x, e, v)`` gives, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ImageInput:
    """``encode_image``'s answer for a model whose image side depends on the classes (or that
    fine-tunes CLIP end to end): the input itself, kept until ``decode_classes`` runs the model."""

    images: torch.Tensor  # [B,3,S,S] letterboxed, 0..255
    valid_hw: torch.Tensor | None = None  # [B,2] the content size in the square
