"""SSP-SAM: CLIP + Semantic-Spatial Prompt encoder + SAM's mask decoder."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..backbones.clip import CLIPBackbone, TextFeatures
from ..backbones.sam import SAMBackbone
from ..errors import ConfigError
from .encoder import SemanticSpatialPromptEncoder
from .no_target_head import NoTargetHead


@dataclass
class ImageFeatures:
    """What one forward of the two image towers yields; computed once per image, reused per phrase."""

    sam: torch.Tensor  # [B, C, h, w]
    clip_patches: torch.Tensor  # [B, N, E]


class SSPSAM(nn.Module):
    """Referring segmentation: phrases become 128 learned sparse prompts for SAM's decoder.

    Image and text are encoded separately (``encode_image`` / ``encode_text``) so the predictor
    and the service can encode an image once and decode many phrases against it.
    """

    def __init__(self, clip: CLIPBackbone, sam: SAMBackbone, ssp: dict, config: dict | None = None):
        super().__init__()
        self.clip = clip
        self.sam = sam
        ssp = dict(ssp)
        no_target = ssp.pop("no_target_head", False)
        ssp.setdefault("prompt_dim", sam.prompt_encoder.embed_dim)
        self.ssp_encoder = SemanticSpatialPromptEncoder(clip.embed_dim, clip.grid_size**2, **ssp)
        if no_target not in (False, True, "mask"):
            raise ConfigError(f"ssp.no_target_head must be false, true or 'mask', got {no_target!r}")
        self.no_target_head = NoTargetHead(ssp["prompt_dim"], use_mask=no_target == "mask") if no_target else None
        self.config = config or {}

    @property
    def image_size(self) -> int:
        return self.sam.img_size

    def encode_image(self, images: torch.Tensor, valid_hw: torch.Tensor | None = None) -> ImageFeatures:
        """[B,3,S,S] letterboxed, float 0..255."""
        patches, _ = self.clip.encode_image(images)
        return ImageFeatures(sam=self.sam.encode_image(images, valid_hw), clip_patches=patches)

    def encode_text(self, tokens: torch.Tensor) -> TextFeatures:
        return self.clip.encode_text(tokens)

    def decode(
        self, image: ImageFeatures, text: TextFeatures, image_index: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Decode T phrases; phrase t refers to image ``image_index[t]`` (default: t)."""
        t = text.sentence.shape[0]
        if image_index is None:
            image_index = torch.arange(t, device=text.sentence.device)
        out = self.ssp_encoder(image.clip_patches[image_index], text)
        chunks = []
        for b in image_index.unique(sorted=True).tolist():  # SAM's decoder takes one image and many prompt sets
            sel = (image_index == b).nonzero(as_tuple=True)[0]
            lo, iou = self.sam.decode(image.sam[b : b + 1], out["prompts"][sel])
            chunks.append((sel, lo, iou))
        h, w = chunks[0][1].shape[-2:]
        logits = out["prompts"].new_empty(t, 1, h, w)
        ious = out["prompts"].new_empty(t, 1)
        for sel, lo, iou in chunks:
            logits[sel], ious[sel] = lo.to(logits.dtype), iou.to(ious.dtype)
        result = {"mask_logits": logits, "iou": ious[:, 0], "box": out["box"],
                  "sentence_map": out["sentence_map"], "word_weights": out["word_weights"]}
        if self.no_target_head is not None:
            result["no_target_logit"] = self.no_target_head(out["box_token"], logits)
        return result

    def forward(self, images: torch.Tensor, tokens: torch.Tensor, valid_hw: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Training path: one phrase per image."""
        return self.decode(self.encode_image(images, valid_hw), self.encode_text(tokens))

    def freeze(self, parts: list[str]) -> None:
        """Freeze named sub-modules, e.g. ['clip', 'sam.image_encoder'] (the paper's default)."""
        for name in parts:
            module = self.get_submodule(name)
            module.requires_grad_(False)
            module.eval()
