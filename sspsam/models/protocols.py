"""The contracts between models and predictors: what ``Segmenter`` calls on a referring model and
``OVSS`` on an OVSS model. SSP-SAM, the ONNX graphs and the training-free models implement them;
a fourth method implements one of them and runs under the matching predictor unchanged.

Also the one helper both the predictors and the official evaluation need on mask logits
(:func:`mask_logits_512`), so no predictor imports a method's package.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F


@runtime_checkable
class ReferringModel(Protocol):
    """Image + phrases → masks (``Segmenter``). ``config``: the model's config dict."""

    config: dict

    @property
    def image_size(self) -> int:
        """The side of the square letterboxed input."""

    def clip_input(self, rgbs: list, device: Any = "cpu") -> torch.Tensor | None:
        """Raw HWC uint8 images → the extra input ``encode_image`` reads as ``clip_images`` (or None)."""

    def encode_image(self, images: torch.Tensor, valid_hw: torch.Tensor | None = None,
                     clip_images: torch.Tensor | None = None) -> Any:
        """[B,3,S,S] letterboxed float 0..255 → image features: a dataclass of [B, …] tensors."""

    def tokenize(self, phrases: list[str]) -> torch.Tensor:
        ...

    def encode_text(self, tokens: torch.Tensor) -> Any:
        ...

    def decode(self, image: Any, text: Any, image_index: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Phrase t against image ``image_index[t]`` → {"mask_logits": [T,1,h,w] (the S×S square at
        low resolution), "iou": [T], optional "no_target_logit": [T], "box": [T,4]}."""


@runtime_checkable
class OVSSModel(Protocol):
    """Image + class names → per-class logits (``OVSS``): the image side once, classes many times."""

    config: dict

    @property
    def image_size(self) -> int:
        ...

    def class_embeddings(self, classes: list[str]) -> torch.Tensor:
        """[K, E] embeddings of the class names."""

    def encode_image(self, images: torch.Tensor, valid_hw: torch.Tensor | None = None) -> Any:
        """[B,3,S,S] letterboxed float 0..255 → image features (cached per image)."""

    def decode_classes(self, features: Any, class_emb: torch.Tensor) -> dict[str, torch.Tensor]:
        """Image features × class embeddings [K,E] → {"logits": [B,K,h,w], ...}."""


class WholeForward:
    """An OVSS model that only has ``forward(images, class_emb[, valid_hw])`` seen through
    :class:`OVSSModel`: ``encode_image`` keeps the input, ``decode_classes`` runs ``forward`` —
    exactly the calls the predictor made before it had one run path.

    TODO(models owner): ESC-Net and SAM-MI can implement ``encode_image`` / ``decode_classes``
    themselves (split at the class-independent image towers); this adapter then goes away."""

    def __init__(self, model) -> None:
        import inspect

        self.model = model
        self._takes_valid = "valid_hw" in inspect.signature(model.forward).parameters

    @property
    def config(self) -> dict:
        return self.model.config

    @property
    def image_size(self) -> int:
        return self.model.image_size

    def class_embeddings(self, classes: list[str]) -> torch.Tensor:
        if callable(getattr(type(self.model), "class_embeddings", None)):
            return self.model.class_embeddings(classes)
        from sspsam.models.cost import class_embeddings

        return class_embeddings(self.model.clip, classes)

    def encode_image(self, images: torch.Tensor, valid_hw: torch.Tensor | None = None):
        return images, valid_hw

    def decode_classes(self, features, class_emb: torch.Tensor) -> dict[str, torch.Tensor]:
        x, valid = features
        return self.model(x, class_emb, valid_hw=valid) if self._takes_valid else self.model(x, class_emb)


def as_ovss_model(model) -> OVSSModel:
    """``model`` itself where it implements :class:`OVSSModel`, else a :class:`WholeForward` view."""
    kind = type(model)
    if all(callable(getattr(kind, m, None)) for m in ("encode_image", "decode_classes", "class_embeddings")):
        return model
    return WholeForward(model)


def mask_logits_512(low_res: torch.Tensor, sam_size: int, out_size: int = 512) -> torch.Tensor:
    """Low-res mask logits [T,1,h,w] of the S×S square → bilinear to S, then to ``out_size``² — the
    official SSP-SAM ``pred_masks`` frame, where the GRES "fewer than 50 pixels" rule applies."""
    x = F.interpolate(low_res.float(), size=(sam_size, sam_size), mode="bilinear", align_corners=False)
    return F.interpolate(x, size=(out_size, out_size), mode="bilinear", align_corners=False)
