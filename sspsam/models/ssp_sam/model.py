"""SSP-SAM: CLIP + Semantic-Spatial Prompt encoder + SAM's mask decoder."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sspsam.backbones.clip import CLIPBackbone, TextFeatures
from sspsam.backbones.sam import SAMBackbone
from sspsam.errors import ConfigError
from sspsam.models.common.masks import OFFICIAL_MASK_SIZE, official_mask_logits
from sspsam.models.ssp_sam.encoder import SemanticSpatialPromptEncoder
from sspsam.models.ssp_sam.legacy_head import LegacySemanticSpatialPromptEncoder
from sspsam.models.ssp_sam.no_target_head import NoTargetHead
from sspsam.models.ssp_sam.official_inputs import clip_input, clip_input_from_letterbox, format_phrase, letterbox_box_to_clip


#: ``ssp.head`` → the SSP head's class, chosen once when the model is built
SSP_HEADS: dict[str, type[SemanticSpatialPromptEncoder]] = {
    "official": SemanticSpatialPromptEncoder,
    "legacy": LegacySemanticSpatialPromptEncoder,
}


@dataclass
class ImageFeatures:
    """What one forward of the two image towers yields; computed once per image, reused per phrase."""

    sam: torch.Tensor  # [B, C, h, w]
    clip_patches: torch.Tensor  # [B, N, E]
    clip_global: torch.Tensor | None = None  # [B, E] CLIP's token 0 (read by the official head)


class SSPSAM(nn.Module):
    """Referring segmentation: phrases become 128 learned sparse prompts for SAM's decoder.

    Image and text are encoded separately (``encode_image`` / ``encode_text``) so the predictor
    and the service can encode an image once and decode many phrases against it.

    Config switches of the ``ssp`` section that depart from (or follow) the official code:
    ``head`` (``official`` | ``legacy``, default ``legacy`` so the bundled ``shapes-demo``
    checkpoint keeps its outputs), ``clip_input`` (``centered`` as the official test transforms |
    ``letterbox``: CLIP sees SAM's square; default follows ``head``), ``phrase_format``
    (``official``: lower-case, strip, trailing period | ``plain``; default follows ``head``) and
    ``no_target_head`` (not in the paper).
    """

    def __init__(self, clip: CLIPBackbone, sam: SAMBackbone, ssp: dict, config: dict | None = None):
        super().__init__()
        self.clip = clip
        self.sam = sam
        ssp = dict(ssp)
        no_target = ssp.pop("no_target_head", False)
        head = ssp.pop("head", "legacy")
        if head not in SSP_HEADS:
            raise ConfigError(f"ssp.head must be 'official' or 'legacy', got {head!r}")
        self.head = head
        encoder_class = SSP_HEADS[head]
        self.clip_geometry = ssp.pop("clip_input", encoder_class.default_clip_input)
        if self.clip_geometry not in ("centered", "letterbox"):
            raise ConfigError(f"ssp.clip_input must be 'centered' or 'letterbox', got {self.clip_geometry!r}")
        self.phrase_format = ssp.pop("phrase_format", encoder_class.default_phrase_format)
        if self.phrase_format not in ("official", "plain"):
            raise ConfigError(f"ssp.phrase_format must be 'official' or 'plain', got {self.phrase_format!r}")
        ssp.setdefault("prompt_dim", sam.prompt_encoder.embed_dim)
        defaults, fixed = encoder_class.config_defaults(clip.text_width)
        ssp = {**defaults, **ssp, **fixed}
        self.ssp_encoder = encoder_class(clip.embed_dim, clip.grid_size**2, **ssp)
        if no_target not in (False, True, "mask"):
            raise ConfigError(f"ssp.no_target_head must be false, true or 'mask', got {no_target!r}")
        self.no_target_head = NoTargetHead(ssp["prompt_dim"], use_mask=no_target == "mask") if no_target else None
        self.config = config or {}

    @property
    def image_size(self) -> int:
        return self.sam.img_size

    def encode_image(
        self, images: torch.Tensor, valid_hw: torch.Tensor | None = None, clip_images: torch.Tensor | None = None
    ) -> ImageFeatures:
        """[B,3,S,S] letterboxed, float 0..255; ``clip_images`` the CLIP input made by
        :meth:`clip_input` from the raw images (else derived from the letterbox)."""
        if clip_images is None and self.clip_geometry == "centered":
            clip_images = clip_input_from_letterbox(images, valid_hw, self.clip.image_size)
        patches, glob = self.encode_clip(images if clip_images is None else clip_images, clip_images is not None)
        return ImageFeatures(sam=self.sam.encode_image(images, valid_hw), clip_patches=patches, clip_global=glob)

    def encode_clip(self, images: torch.Tensor, normalized: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """CLIP-Surgery tokens: (patches [B,N,E], token 0 [B,E])."""
        return self.clip.encode_image(images, normalized=normalized)

    def clip_input(self, rgbs: list, device: torch.device | str = "cpu") -> torch.Tensor | None:
        """Raw HWC uint8 images → the batch CLIP reads (``None`` where CLIP reads the letterbox)."""
        if self.clip_geometry != "centered":
            return None
        return torch.stack([clip_input(rgb, self.clip.image_size) for rgb in rgbs]).to(device)

    def box_target(self, box: torch.Tensor, valid_hw: torch.Tensor | None) -> torch.Tensor:
        """Dataset boxes (SAM letterbox frame) → the frame the box head predicts in: the letterbox
        itself, or the centred CLIP canvas for the official geometry."""
        if self.clip_geometry != "centered":
            return box
        return letterbox_box_to_clip(box, valid_hw, self.image_size, self.clip.image_size)

    def tokenize(self, phrases: list[str]) -> torch.Tensor:
        if self.phrase_format == "official":
            phrases = [format_phrase(p) for p in phrases]
        return self.clip.tokenize(phrases)

    def encode_text(self, tokens: torch.Tensor) -> TextFeatures:
        return self.clip.encode_text(tokens)

    def decode(
        self, image: ImageFeatures, text: TextFeatures, image_index: torch.Tensor | None = None,
        extra_sparse: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Decode T phrases; phrase t refers to image ``image_index[t]`` (default: t).

        ``extra_sparse`` [T, K, C]: more sparse prompts for SAM's decoder beside the phrase's own
        (the user's clicks and boxes through SAM's prompt encoder), as SAM takes them."""
        t = text.sentence.shape[0]
        if image_index is None:
            image_index = torch.arange(t, device=text.sentence.device)
        cls = image.clip_global[image_index] if image.clip_global is not None else None
        out = self.ssp_encoder(image.clip_patches[image_index], text, cls=cls)
        if extra_sparse is not None:
            out = {**out, "prompts": torch.cat([out["prompts"], extra_sparse.to(out["prompts"].dtype)], dim=1)}
        first = image_index[:1]
        if bool((image_index == first).all()):  # one image: SAM's own repeat, as the official code runs
            logits, ious = self.sam.decode(image.sam[first], out["prompts"])
        else:  # one decoder call for all images (training: one phrase per image)
            logits, ious = self.sam.decode(image.sam[image_index], out["prompts"])
        logits, ious = logits.to(out["prompts"].dtype), ious.to(out["prompts"].dtype)
        result = {"mask_logits": logits, "iou": ious[:, 0], "box": out["box"],
                  "sentence_map": out["sentence_map"], "word_weights": out["word_weights"],
                  "word_map": out["word_map"], "prompts": out["prompts"], "box_token": out["box_token"],
                  "phrase": out["phrase"]}
        if self.no_target_head is not None:
            result["no_target_logit"] = self.no_target_head(out["box_token"], logits)
        return result

    def forward(self, images: torch.Tensor, tokens: torch.Tensor, valid_hw: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Training path: one phrase per image."""
        return self.decode(self.encode_image(images, valid_hw), self.encode_text(tokens))

    def mask_logits_512(self, low_res: torch.Tensor) -> torch.Tensor:
        """SAM's low-res logits [T,1,h,w] → the official 512² frame (where the official code
        evaluates and applies GRES's "fewer than 50 pixels" no-target rule): [T,1,512,512] fp32."""
        return official_mask_logits(low_res, self.image_size, OFFICIAL_MASK_SIZE)

    @property
    def official(self) -> bool:
        """Whether the SSP head is the official one (``ssp.head: official``)."""
        return self.head == "official"

    def freeze(self, parts: list[str]) -> None:
        """Freeze named sub-modules, e.g. ['clip', 'sam.image_encoder'] (the paper's default)."""
        for name in parts:
            module = self.get_submodule(name)
            module.requires_grad_(False)
            module.eval()


__all__ = ["SSPSAM", "ImageFeatures", "SSP_HEADS", "official_mask_logits"]
