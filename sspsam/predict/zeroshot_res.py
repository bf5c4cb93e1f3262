"""Training-free referring segmentation: CLIP proposes where, SAM draws masks, CLIP picks one.

Per phrase: the phrase's dense CLIP similarity map gives a few peak points; SAM returns three
candidate masks per point (multimask: whole, part, sub-part); each candidate's image crop (its box
with a margin, background blanked to CLIP's mean colour so only the masked pixels speak) is embedded
by CLIP's image tower and compared with the phrase. The best candidate wins — or, when even the best
cosine is under the calibrated ``no_target_threshold``, the phrase is declared absent. Scoring
whole masked crops with CLIP's *global* embedding is what CLIP was trained for, so it judges
"is this the thing" better than the dense map that proposed the points.

``ZeroShotSegmenter`` is a drop-in for ``sspsam.predict.segmenter.Segmenter`` (same methods, same
``Segmentation`` result).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sspsam.errors import CheckpointError, TextError
from sspsam.io.images import ImageLike, load_image
import sspsam.models.cost as cost_ops
from sspsam.predict.results import Segmentation, clean_phrases
from sspsam.io.transforms import Letterbox, image_key, model_input, unletterbox_logits
from sspsam.models.zeroshot.pipeline import ZeroShot, ZeroShotFeatures, tspp_points
from sspsam.models.build import load_zeroshot

RES_DEFAULTS = {
    "templates": ["{}", "a photo of {}."],
    "points": 3,
    "nms_distance": 0.15,
    "crop_margin": 0.1,
    "no_target_threshold": 0.2,
    "score_temperature": 50.0,
}


def calibrate_threshold(best_scores: np.ndarray, has_target: np.ndarray) -> float:
    """The no-target threshold that maximises (N-acc + T-acc) / 2 on a labelled validation split.

    ``best_scores``: each sample's best candidate cosine; ``has_target``: whether its GT is non-empty.
    """
    s = np.asarray(best_scores, dtype=np.float64)
    t = np.asarray(has_target, dtype=bool)
    if t.all() or (~t).all():
        raise ValueError("calibration needs samples both with and without a target")
    u = np.unique(s)
    cands = np.concatenate([[u[0] - 1e-6], (u[:-1] + u[1:]) / 2, [u[-1] + 1e-6]])
    acc = [((s[~t] < c).mean() + (s[t] >= c).mean()) / 2 for c in cands]
    return float(cands[int(np.argmax(acc))])


@dataclass
class _Encoded:
    key: str
    features: ZeroShotFeatures
    square: torch.Tensor  # [3,S,S] the letterboxed image, 0..255 (crops are cut from it)
    box: Letterbox


class ZeroShotSegmenter:
    """``Segmenter``'s API on the training-free pipeline: ``set_image`` once, ``segment`` many phrases."""

    def __init__(self, model: ZeroShot, device: str | torch.device = "auto", name: str | None = None):
        if not isinstance(model, ZeroShot):
            raise CheckpointError(f"ZeroShotSegmenter needs a zeroshot model, got {type(model).__name__}")
        from sspsam.predict.device import resolve_device

        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.name = name or model.config.get("name", "zeroshot")
        self.meta: dict = {}  # nothing learned: no checkpoint meta
        res = {**RES_DEFAULTS, **model.config.get("res", {})}
        self.templates = cost_ops.resolve_templates(res["templates"])
        self.n_points = int(res["points"])
        self.nms_distance = float(res["nms_distance"])
        self.crop_margin = float(res["crop_margin"])
        self.no_target_threshold = float(res["no_target_threshold"])
        self.score_temperature = float(res["score_temperature"])
        self.mask_threshold = float(model.config.get("inference", {}).get("mask_threshold", 0.0))
        self._cache: _Encoded | None = None

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path = "zeroshot", device: str | torch.device = "auto") -> "ZeroShotSegmenter":
        """A zeroshot config name (weights from the cache) or an sspsam checkpoint of a zeroshot model."""
        name = str(name_or_path)
        path = Path(name)
        if path.suffix or path.exists():
            from sspsam.models.build import _model_from_checkpoint

            return cls(_model_from_checkpoint(path), device, path.stem)
        return cls(load_zeroshot(name), device, name)

    # ---- inference ------------------------------------------------------------------------
    @torch.inference_mode()
    def set_image(self, image: ImageLike, items: int = 1) -> np.ndarray:
        """Encode an image once (SAM embedding + dense CLIP); later phrases on the same pixels reuse it."""
        rgb = load_image(image, items)
        key = image_key(rgb)
        if self._cache is None or self._cache.key != key:
            x, valid, box = model_input(rgb, self.model.image_size, self.device)
            self._cache = _Encoded(key, self.model.encode_image(x, valid), x[0], box)
        return rgb

    @torch.inference_mode()
    def segment(self, image, text_or_texts, batch_size: int = 16, **kw):
        """As :meth:`sspsam.Segmenter.segment`; a list of images is run one image at a time here
        (each phrase's candidates come from per-image point prompts, which do not batch)."""
        from sspsam.predict.results import _as_numpy, _as_tensors
        from sspsam.predict.base import _is_batch

        if _is_batch(image):
            images = list(image)
            per_image = isinstance(text_or_texts, (list, tuple)) and bool(text_or_texts) and all(
                isinstance(t, (list, tuple)) for t in text_or_texts)
            if per_image and len(text_or_texts) != len(images):
                raise TextError(f"{len(images)} images but {len(text_or_texts)} phrase lists: give one list per image, or one shared list")
            texts = text_or_texts if per_image else [text_or_texts] * len(images)
            return [self.segment(im, t, batch_size, **kw) for im, t in zip(images, texts)]
        if kw.get("allow_urls"):
            from sspsam.io.images import is_url, _fetch_url

            image = _fetch_url(image) if is_url(image) else image
        res = self._segment_one(image, text_or_texts, batch_size)
        return _as_tensors(res, self.device) if kw.get("return_tensors", "np") == "pt" else _as_numpy(res)

    def to(self, device) -> "ZeroShotSegmenter":
        """Move the model to ``device``; returns self."""
        from sspsam.predict.device import resolve_device

        self.device = resolve_device(device)
        self.model.to(self.device)
        self._cache = None
        return self

    def _segment_one(self, image: ImageLike, text_or_texts: str | list[str], batch_size: int = 16) -> Segmentation:
        phrases = clean_phrases(text_or_texts)
        self.set_image(image, len(phrases))
        enc = self._cache
        h, w = enc.box.orig_hw
        masks = np.zeros((len(phrases), h, w), dtype=bool)
        scores = np.zeros(len(phrases), dtype=np.float32)
        no_target = np.zeros(len(phrases), dtype=bool)
        best_cos = np.zeros(len(phrases), dtype=np.float32)
        for i in range(0, len(phrases), batch_size):
            chunk = phrases[i : i + batch_size]
            text = cost_ops.class_embeddings(self.model.clip, chunk, self.templates)
            for j, emb in enumerate(text):
                low, cos = self._best_candidate(enc, emb)
                n = i + j
                best_cos[n] = cos
                scores[n] = 1 / (1 + np.exp(-self.score_temperature * (cos - self.no_target_threshold)))
                no_target[n] = low is None or cos < self.no_target_threshold
                if not no_target[n]:
                    masks[n] = (unletterbox_logits(low[None], enc.box)[0] > self.mask_threshold).cpu().numpy()
                    no_target[n] = not masks[n].any()  # empty at the original size: never "found"
        from sspsam.predict.base import model_warnings

        return Segmentation(phrases, masks, scores, no_target, no_target_prob=1 - scores,
                            extras={"clip_score": best_cos}, warnings=model_warnings(self.name, self.model))

    def _best_candidate(self, enc: _Encoded, text: torch.Tensor) -> tuple[torch.Tensor | None, float]:
        """The best-scoring candidate's low-res logits [o,o] and its CLIP cosine (None, -1 if none)."""
        m = self.model
        o, s = m.mask_size, m.image_size
        vh, vw = (-(-int(v) * o // s) for v in enc.features.valid_hw[0])
        sim = cost_ops.upsample_cost(cost_ops.correlation(enc.features.clip_dense[:1], text[None]), o)[0, 0]
        valid = sim[:vh, :vw]
        norm = (sim - valid.min()) / (valid.max() - valid.min()).clamp(min=1e-6)
        pts = tspp_points(norm[None], self.n_points, 0.0, self.nms_distance * max(vh, vw), (vh, vw))
        low, iou = m.sam_decode(enc.features.sam[:1], pts.coords, multimask=True)
        low, iou = low.flatten(0, 1), iou.flatten()
        full = F.interpolate(low[:, None], size=(s, s), mode="bilinear", align_corners=False)[:, 0] > self.mask_threshold
        sh, sw = enc.box.scaled_hw
        full[:, sh:] = False
        full[:, :, sw:] = False
        keep = full.flatten(1).any(1)
        if not keep.any():
            return None, -1.0
        low, full = low[keep], full[keep]
        crops = masked_crops(enc.square, full, m.clip.image_size, self.crop_margin, m.clip.mean.flatten())
        cos = self.clip_scores(crops, text)
        best = int(cos.argmax())
        return low[best], float(cos[best])

    def clip_scores(self, crops: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Cosine between CLIP's global embedding of each crop [N,3,c,c] (0..255) and the phrase [E]."""
        _, glob = self.model.clip.encode_image(crops)
        return F.normalize(glob.float(), dim=-1) @ F.normalize(text.float(), dim=0)


def masked_crops(
    image: torch.Tensor, masks: torch.Tensor, size: int, margin: float, fill: torch.Tensor
) -> torch.Tensor:
    """Image [3,S,S] and masks [N,S,S] → [N,3,size,size]: each mask's box (plus ``margin``) cut out,
    pixels outside the mask set to ``fill``, padded to a square and resized for CLIP."""
    out = []
    side = image.shape[-1]
    for m in masks:
        ys, xs = m.nonzero(as_tuple=True)
        y0, y1, x0, x1 = ys.min().item(), ys.max().item() + 1, xs.min().item(), xs.max().item() + 1
        py, px = int((y1 - y0) * margin), int((x1 - x0) * margin)
        y0, y1, x0, x1 = max(0, y0 - py), min(side, y1 + py), max(0, x0 - px), min(side, x1 + px)
        crop = torch.where(m[y0:y1, x0:x1], image[:, y0:y1, x0:x1], fill[:, None, None].to(image))
        h, w = crop.shape[-2:]
        sq = max(h, w)
        canvas = fill[:, None, None].to(image).expand(3, sq, sq).clone()
        canvas[:, (sq - h) // 2 : (sq - h) // 2 + h, (sq - w) // 2 : (sq - w) // 2 + w] = crop
        out.append(F.interpolate(canvas[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0])
    return torch.stack(out)
