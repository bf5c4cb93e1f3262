"""The training-free referring predictor: ``Segmenter``'s API on :mod:`sspsam.models.zeroshot.res`
(CLIP proposes points, SAM draws candidate masks, CLIP picks one).

``ZeroShotSegmenter`` is what ``Segmenter.from_pretrained("zeroshot")`` returns: the same
``set_image`` / ``segment`` / ``to`` and the same ``Segmentation`` result, on the shared
:class:`~sspsam.predict.base.Predictor` (device, dtype, torch.compile, name resolution).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sspsam.errors import CheckpointError, ConfigError
from sspsam.io.images import ImageLike, load_image
from sspsam.io.transforms import Letterbox, image_key, model_input, unletterbox_logits
from sspsam.models.zeroshot.pipeline import DEFAULT_CONFIG, ZeroShot, ZeroShotFeatures
from sspsam.models.zeroshot.res import RES_DEFAULTS, ZeroShotRES, calibrate_threshold, masked_crops
from sspsam.predict.base import Predictor, is_batch, model_warnings, per_image
from sspsam.predict.results import Segmentation, clean_phrases

__all__ = ["ZeroShotSegmenter", "RES_DEFAULTS", "calibrate_threshold", "masked_crops"]


@dataclass
class _Encoded:
    key: str
    features: ZeroShotFeatures
    square: torch.Tensor  # [3,S,S] the letterboxed image, 0..255 (crops are cut from it)
    box: Letterbox


class ZeroShotSegmenter(Predictor):
    """``Segmenter``'s API on the training-free pipeline: ``set_image`` once, ``segment`` many phrases."""

    COMMAND = "segment"
    TASK = "a referring"
    HOT_MODULES = ("clip.encode_image", "sam.image_encoder")

    def __init__(self, model: ZeroShot | ZeroShotRES, device: str | torch.device = "auto", name: str | None = None,
                 meta: dict | None = None, dtype: torch.dtype | str | None = None, compile: bool = False):
        """``dtype``: None (default: the weights as they are, fp32), 'auto', torch.bfloat16 or
        torch.float16 as for :class:`~sspsam.Segmenter`; ``compile``: wrap the image towers with
        torch.compile, falling back to eager with a warning."""
        if isinstance(model, ZeroShot):
            model = ZeroShotRES(model)
        if not isinstance(model, ZeroShotRES):
            raise CheckpointError(f"ZeroShotSegmenter needs a zeroshot model, got {type(model).__name__}")
        self._place(model, device, dtype)
        self._identify(model, name, meta, model.config.get("name", "training-free"))
        res = model.res
        self.no_target_threshold = float(res["no_target_threshold"])
        self.score_temperature = float(res["score_temperature"])
        self.mask_threshold = float(model.config.get("inference", {}).get("mask_threshold", 0.0))
        self._cache: _Encoded | None = None
        if compile:
            self._compile()

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path = DEFAULT_CONFIG, device: str | torch.device = "auto",
                        dtype: torch.dtype | str | None = None, compile: bool = False) -> "ZeroShotSegmenter":
        """A zeroshot config name (weights from the cache) or an sspsam checkpoint of a zeroshot model."""
        name = str(name_or_path)
        path = Path(name)
        if path.suffix or path.exists():
            return cls._from_checkpoint(path, device, path.stem, dtype=dtype, compile=compile)
        from sspsam.models.build import load_zeroshot

        return cls(load_zeroshot(name), device, name, dtype=dtype, compile=compile)

    def clear_cache(self) -> None:
        """Forget the cached image features (the next call encodes its image again)."""
        self._cache = None

    def _warm_up(self) -> None:
        self.segment(np.full((64, 64, 3), 128, np.uint8), "warm up")

    @classmethod
    def model_types(cls) -> tuple[str, ...]:
        """The training-free methods: their referring path is this predictor's."""
        from sspsam.models import registry

        return tuple(m.name for m in registry.methods() if m.training_free and cls.COMMAND in m.commands)

    @classmethod
    def _unknown(cls, name: str, configs: list[str]) -> str:
        return f"unknown zeroshot model '{name}': use a zeroshot config name or a checkpoint path"

    # ---- inference ------------------------------------------------------------------------
    @torch.inference_mode()
    def set_image(self, image: ImageLike, items: int = 1, allow_urls: bool = False) -> np.ndarray:
        """Encode an image once (SAM embedding + dense CLIP); later phrases on the same pixels reuse it."""
        rgb = load_image(image, items, allow_urls=allow_urls)
        key = image_key(rgb)
        if self._cache is None or self._cache.key != key:
            x, valid, box = model_input(rgb, self.model.image_size, self.device)
            with self._autocast():
                feats = self.model.encode_image(x, valid)
            self._cache = _Encoded(key, feats, x[0], box)
        return rgb

    @torch.inference_mode()
    def segment(self, image, text_or_texts, batch_size: int = 16, return_tensors: str = "np", allow_urls: bool = False,
                *, mask_threshold: float | None = None, no_target_threshold: float | None = None,
                allow_unknown_words: bool = False, points=None, point_labels=None, boxes=None, return_logits: bool = False):
        """As :meth:`sspsam.Segmenter.segment`; a list of images is run one image at a time here
        (each phrase's candidates come from per-image point prompts, which do not batch).
        ``mask_threshold`` / ``no_target_threshold`` (a CLIP cosine here) override the settings for
        this call. CLIP reads any word, so ``allow_unknown_words`` changes nothing; clicks and logits
        belong to the trained decoder's prompt tokens and are refused here rather than ignored."""
        from sspsam.predict.results import as_numpy, as_tensors

        if return_tensors not in ("np", "pt"):
            raise ValueError(f"return_tensors must be 'np' or 'pt', got {return_tensors!r}")
        if points is not None or point_labels is not None or boxes is not None or return_logits:
            raise ConfigError(f"'{self.name}' is the training-free path: points=/boxes= refine a trained model's mask through "
                              "its prompt tokens and return_logits= returns its decoder's logits; use a trained referring model for them")
        if is_batch(image):
            images = list(image)
            texts = per_image(images, text_or_texts)
            return [self.segment(im, t, batch_size, return_tensors, allow_urls, mask_threshold=mask_threshold,
                                 no_target_threshold=no_target_threshold) for im, t in zip(images, texts)]
        res = self._segment_one(image, text_or_texts, batch_size, allow_urls,
                                self.mask_threshold if mask_threshold is None else float(mask_threshold),
                                self.no_target_threshold if no_target_threshold is None else float(no_target_threshold))
        return as_tensors(res, self.device) if return_tensors == "pt" else as_numpy(res)

    def clip_scores(self, crops: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Cosine between CLIP's global embedding of each crop [N,3,c,c] (0..255) and the phrase [E]."""
        return self.model.clip_scores(crops, text)

    def _segment_one(self, image: ImageLike, text_or_texts: str | list[str], batch_size: int, allow_urls: bool,
                     mask_threshold: float, no_target_threshold: float) -> Segmentation:
        phrases = clean_phrases(text_or_texts)
        self.set_image(image, len(phrases), allow_urls=allow_urls)
        enc = self._cache
        h, w = enc.box.orig_hw
        masks = np.zeros((len(phrases), h, w), dtype=bool)
        scores = np.zeros(len(phrases), dtype=np.float32)
        no_target = np.zeros(len(phrases), dtype=bool)
        best_cos = np.zeros(len(phrases), dtype=np.float32)
        for i in range(0, len(phrases), batch_size):
            chunk = phrases[i : i + batch_size]
            with self._autocast():
                text = self.model.phrase_embeddings(chunk)
            for j, emb in enumerate(text):
                with self._autocast():
                    low, cos = self.model.best_candidate(enc.features, enc.square, enc.box.scaled_hw, emb,
                                                         mask_threshold, scorer=self.clip_scores)
                n = i + j
                best_cos[n] = cos
                scores[n] = 1 / (1 + np.exp(-self.score_temperature * (cos - no_target_threshold)))
                no_target[n] = low is None or cos < no_target_threshold
                if not no_target[n]:
                    masks[n] = (unletterbox_logits(low[None].float(), enc.box)[0] > mask_threshold).cpu().numpy()
                    no_target[n] = not masks[n].any()  # empty at the original size: never "found"
        return Segmentation(phrases, masks, scores, no_target, no_target_prob=1 - scores,
                            extras={"clip_score": best_cos}, warnings=model_warnings(self.name, self.model))
