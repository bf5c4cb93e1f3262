"""Training-free referring segmentation: CLIP proposes where, SAM draws masks, CLIP picks one.

Per phrase: the phrase's dense CLIP similarity map gives a few peak points; SAM returns three
candidate masks per point (multimask: whole, part, sub-part); each candidate's image crop (its box
with a margin, background blanked to CLIP's mean colour so only the masked pixels speak) is embedded
by CLIP's image tower and compared with the phrase. The best candidate wins — or, when even the best
cosine is under the calibrated ``no_target_threshold``, the phrase is declared absent (the
predictor, :mod:`sspsam.predict.zeroshot_res`, decides that). Scoring whole masked crops with
CLIP's *global* embedding is what CLIP was trained for, so it judges "is this the thing" better
than the dense map that proposed the points.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import sspsam.models.cost as cost_ops
from sspsam.models.zeroshot.pipeline import ZeroShot, ZeroShotFeatures, tspp_points

#: the ``res`` section of a zeroshot config, as read when the config leaves a key out
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


class ZeroShotRES(nn.Module):
    """The referring model of the training-free path, on a :class:`ZeroShot` (its CLIP and SAM).

    ``encode_image`` once per image (SAM embedding + dense CLIP), ``phrase_embeddings`` per phrase
    list, then :meth:`best_candidate` per phrase. Settings come from the config's ``res`` section
    (:data:`RES_DEFAULTS`); the no-target threshold and score temperature are the predictor's.
    """

    def __init__(self, zeroshot: ZeroShot):
        super().__init__()
        self.zeroshot = zeroshot
        self.res = {**RES_DEFAULTS, **zeroshot.config.get("res", {})}
        self.templates = cost_ops.resolve_templates(self.res["templates"])
        self.n_points = int(self.res["points"])
        self.nms_distance = float(self.res["nms_distance"])
        self.crop_margin = float(self.res["crop_margin"])

    @property
    def config(self) -> dict:
        return self.zeroshot.config

    @property
    def random_init(self) -> list[str] | None:
        """The backbones built without weights (read by the predictors' warnings)."""
        return getattr(self.zeroshot, "random_init", None)

    @property
    def clip(self):
        return self.zeroshot.clip

    @property
    def sam(self):
        return self.zeroshot.sam

    @property
    def image_size(self) -> int:
        return self.zeroshot.image_size

    @property
    def mask_size(self) -> int:
        return self.zeroshot.mask_size

    def encode_image(self, images: torch.Tensor, valid_hw: torch.Tensor | None = None) -> ZeroShotFeatures:
        """[B,3,S,S] letterboxed 0..255 → SAM embedding + dense CLIP features."""
        return self.zeroshot.encode_image(images, valid_hw)

    def phrase_embeddings(self, phrases: list[str]) -> torch.Tensor:
        """[T,E] unit-norm CLIP text embeddings of the phrases in the ``res`` templates."""
        return cost_ops.class_embeddings(self.zeroshot.clip, phrases, self.templates)

    def clip_scores(self, crops: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Cosine between CLIP's global embedding of each crop [N,3,c,c] (0..255) and the phrase [E]."""
        _, glob = self.zeroshot.clip.encode_image(crops)
        return F.normalize(glob.float(), dim=-1) @ F.normalize(text.float(), dim=0)

    def candidates(self, features: ZeroShotFeatures, text: torch.Tensor, scaled_hw: tuple[int, int],
                   mask_threshold: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Image 0 of ``features`` and one phrase [E] → SAM's candidates: low-res logits [n,o,o] and
        masks [n,S,S] in the letterbox (inside the ``scaled_hw`` content, none empty)."""
        m = self.zeroshot
        o, s = m.mask_size, m.image_size
        vh, vw = (-(-int(v) * o // s) for v in features.valid_hw[0])
        sim = cost_ops.upsample_cost(cost_ops.correlation(features.clip_dense[:1], text[None]), o)[0, 0]
        valid = sim[:vh, :vw]
        norm = (sim - valid.min()) / (valid.max() - valid.min()).clamp(min=1e-6)
        pts = tspp_points(norm[None], self.n_points, 0.0, self.nms_distance * max(vh, vw), (vh, vw))
        low, iou = m.sam_decode(features.sam[:1], pts.coords, multimask=True)
        low = low.flatten(0, 1)
        full = F.interpolate(low[:, None], size=(s, s), mode="bilinear", align_corners=False)[:, 0] > mask_threshold
        sh, sw = scaled_hw
        full[:, sh:] = False
        full[:, :, sw:] = False
        keep = full.flatten(1).any(1)
        return low[keep], full[keep]

    def best_candidate(self, features: ZeroShotFeatures, square: torch.Tensor, scaled_hw: tuple[int, int],
                       text: torch.Tensor, mask_threshold: float = 0.0, scorer=None) -> tuple[torch.Tensor | None, float]:
        """The best-scoring candidate's low-res logits [o,o] and its CLIP cosine (None, -1 if none).

        ``square`` [3,S,S] is the letterboxed image (0..255) the crops are cut from; ``scorer``
        replaces :meth:`clip_scores` (crops, text) → cosines."""
        low, full = self.candidates(features, text, scaled_hw, mask_threshold)
        if low.shape[0] == 0:
            return None, -1.0
        clip = self.zeroshot.clip
        crops = masked_crops(square, full, clip.image_size, self.crop_margin, clip.mean.flatten())
        cos = (scorer or self.clip_scores)(crops, text)
        best = int(cos.argmax())
        return low[best], float(cos[best])


__all__ = ["ZeroShotRES", "RES_DEFAULTS", "calibrate_threshold", "masked_crops"]
