"""Training-free open-vocabulary segmentation: pretrained CLIP + SAM, no learned heads.

SAM-MI's recipe with every learned part replaced by a rule:

1. cost map: training-free dense CLIP features (SCLIP's correlative attention by default, see
   ``ovss.cost``) × prompt-ensembled class embeddings, cosine, upsampled to SAM's mask resolution;
2. TSPP without heads: per class, local maxima of its probability map (softmax over classes of
   cosine × 40) where the class dominates, above ``point_threshold``, at least ``nms_distance`` apart,
   top ``points_per_class`` — a few points per class instead of SAM's 32×32 grid;
3. SAM masks for all points at once (prompt encoder + mask decoder on the cached image embedding);
4. the overlap merge (``mask_merge.py``, after SAM-MI's Shallow Mask Aggregation) merges partial
   and duplicate masks of one object;
5. mask injection without DMI's layers: per-pixel logits = (1 − w)·cost logits + w·(mask-pooled
   cost logits, averaged over the masks covering the pixel). Masks are soft guidance: a pixel's
   label can still disagree with its mask, so wrong masks cost little (SAM-MI's point against
   hard mask–label coupling).

``prompt: grid`` runs step 3 on SAM's automatic 32×32 point grid instead (each mask labelled by its
pooled cost), for the sparse-vs-dense speed comparison.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sspsam.backbones.clip import CLIPBackbone
from sspsam.backbones.sam import SAMBackbone
from sspsam.errors import ConfigError
import sspsam.models.cost as cost_ops
from sspsam.models.zeroshot.mask_merge import MergedMasks, OverlapMaskMerge

#: the training-free config a bare ``from_pretrained()`` loads (CLIP and SAM from the weights cache)
DEFAULT_CONFIG = "zeroshot"

DEFAULTS = {
    "dense_mode": "sclip",  # surgery | sclip | csa-no-ffn | maskclip
    "clip_size": None,  # CLIP input side for the dense path (None: CLIP's own)
    "templates": "imagenet80",  # default | imagenet80 | plain | a list of '{}' templates
    "logit_scale": cost_ops.SCLIP_LOGIT_SCALE,
    "prompt": "tspp",  # tspp | grid
    "points_per_class": 4,
    "point_threshold": 0.5,  # class probability at a point (0.5: the class dominates there)
    "nms_distance": 0.08,  # minimum distance between a class's points, as a fraction of the image side
    "grid_points": 32,  # per side, prompt: grid (SAM's automatic generator default)
    "point_batch": 64,  # prompts per SAM decoder call
    "multimask": True,  # keep the best of SAM's 3 masks by predicted IoU (ambiguous single points)
    "pred_iou_thresh": 0.0,  # drop masks SAM itself rates lower (grid mode: SAM AMG uses 0.88)
    "smagg_iou": 0.6,
    "smagg_contain": 0.8,
    "mask_weight": 0.5,  # w above; 0 gives the plain CLIP cost map
}


@dataclass
class ZeroShotFeatures:
    """Everything the class-dependent part needs: computed once per image."""

    sam: torch.Tensor  # [B, C, g, g] SAM image embedding
    clip_dense: torch.Tensor  # [B, E, gc, gc] unit-norm dense CLIP features
    valid_hw: torch.Tensor  # [B, 2] letterboxed content size in the S×S frame


@dataclass
class Points:
    coords: torch.Tensor  # [P, 2] (x, y) in the mask-resolution frame (pixel centres at +0.5)
    classes: torch.Tensor  # [P] class index (-1 for grid points)
    scores: torch.Tensor  # [P] class probability at the point


def tspp_points(
    prob: torch.Tensor,
    points_per_class: int,
    threshold: float,
    distance: float,
    valid_hw: tuple[int, int] | None = None,
) -> Points:
    """Sparse text-guided points from a [K,h,w] class-probability map (training-free TSPP rule).

    A point for class k sits where k's probability is a local maximum, at least ``threshold``
    and the largest of all classes; at most ``points_per_class`` per class, greedily kept at least
    ``distance`` pixels apart (highest probability first).
    """
    k, h, w = prob.shape
    vh, vw = valid_hw if valid_hw is not None else (h, w)
    r = max(1, int(distance))
    pooled = F.max_pool2d(prob[None], kernel_size=2 * r + 1, stride=1, padding=r)[0]
    ok = (prob >= pooled) & (prob >= threshold) & (prob >= prob.max(0, keepdim=True).values)
    ok[:, vh:] = False
    ok[:, :, vw:] = False
    coords, classes, scores = [], [], []
    cls_idx, ys, xs = ok.nonzero(as_tuple=True)
    vals = prob[cls_idx, ys, xs]
    for c in cls_idx.unique().tolist():
        sel = (cls_idx == c).nonzero().flatten()
        sel = sel[vals[sel].argsort(descending=True)][: 16 * points_per_class]  # plateaus: bounded candidates
        taken: list[int] = []
        for i in sel.tolist():
            y, x = ys[i].item(), xs[i].item()
            if all((y - ys[j].item()) ** 2 + (x - xs[j].item()) ** 2 >= distance**2 for j in taken):
                taken.append(i)
                if len(taken) == points_per_class:
                    break
        t = torch.tensor(taken, dtype=torch.long, device=prob.device)
        coords.append(torch.stack([xs[t], ys[t]], 1).float() + 0.5)
        classes.append(cls_idx[t])
        scores.append(vals[t])
    if not coords:
        return Points(prob.new_zeros((0, 2)), torch.zeros(0, dtype=torch.long, device=prob.device), prob.new_zeros(0))
    return Points(torch.cat(coords), torch.cat(classes), torch.cat(scores))


def grid_points(n: int, valid_hw: tuple[int, int], device=None) -> Points:
    """SAM's automatic n×n grid over the image content (not the letterbox padding)."""
    vh, vw = valid_hw
    c = (torch.arange(n, dtype=torch.float32, device=device) + 0.5) / n
    ys, xs = torch.meshgrid(c * vh, c * vw, indexing="ij")
    coords = torch.stack([xs.flatten(), ys.flatten()], 1)
    return Points(coords, torch.full((n * n,), -1, dtype=torch.long, device=device), torch.ones(n * n, device=device))


def inject_masks(cost_logits: torch.Tensor, masks: torch.Tensor, weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft mask guidance: blend each pixel's logits [K,h,w] with the mean logits of its masks [M,h,w].

    Returns (logits [K,h,w], pooled logits per mask [M,K]). Uncovered pixels keep their logits.
    """
    if masks.shape[0] == 0 or weight == 0:
        return cost_logits, cost_logits.new_zeros((masks.shape[0], cost_logits.shape[0]))
    m = masks.float().flatten(1)  # [M, hw]
    flat = cost_logits.flatten(1)  # [K, hw]
    pooled = (m @ flat.T) / m.sum(1, keepdim=True).clamp(min=1)  # [M, K]
    cover = m.sum(0)  # [hw]
    guided = (pooled.T @ m) / cover.clamp(min=1)  # [K, hw]
    out = torch.where(cover > 0, (1 - weight) * flat + weight * guided, flat)
    return out.view_as(cost_logits), pooled


class ZeroShot(nn.Module):
    """CLIP + SAM, pretrained and frozen; ``forward(images, class_emb)`` as ESC-Net and SAM-MI."""

    def __init__(self, clip: CLIPBackbone, sam: SAMBackbone, cfg: dict | None = None, config: dict | None = None):
        super().__init__()
        unknown = set(cfg or {}) - set(DEFAULTS)
        if unknown:
            raise ConfigError(f"unknown keys in zeroshot config: {sorted(unknown)}; known: {sorted(DEFAULTS)}")
        self.cfg = {**DEFAULTS, **(cfg or {})}
        if self.cfg["dense_mode"] not in cost_ops.DENSE_MODES:
            raise ConfigError(f"zeroshot.dense_mode must be one of {cost_ops.DENSE_MODES}")
        if self.cfg["prompt"] not in ("tspp", "grid"):
            raise ConfigError(f"zeroshot.prompt must be 'tspp' or 'grid', got {self.cfg['prompt']!r}")
        self.templates = cost_ops.resolve_templates(self.cfg["templates"])
        self.clip = clip
        self.sam = sam
        self.config = config or {}
        self.merge = OverlapMaskMerge(self.cfg["smagg_iou"], self.cfg["smagg_contain"])

    @property
    def image_size(self) -> int:
        return self.sam.img_size

    @property
    def mask_size(self) -> int:
        """Side of SAM's low-resolution masks, and of the output logits."""
        return self.sam.grid * 4

    # ---- class- and image-side encoders (each cached by the predictors) --------------------
    @torch.no_grad()
    def class_embeddings(self, classes: list[str]) -> torch.Tensor:
        return cost_ops.class_embeddings(self.clip, classes, self.templates)

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor, valid_hw: torch.Tensor | None = None) -> ZeroShotFeatures:
        b, s = images.shape[0], self.image_size
        if valid_hw is None:
            valid_hw = torch.tensor([[s, s]] * b, device=images.device)
        dense = cost_ops.dense_features(self.clip, images, self.cfg["dense_mode"], self.cfg["clip_size"])
        return ZeroShotFeatures(self.sam.encode_image(images, valid_hw), dense, valid_hw)

    # ---- SAM on points ---------------------------------------------------------------------
    @torch.no_grad()
    def sam_decode(self, embedding: torch.Tensor, coords: torch.Tensor, multimask: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """One image's SAM embedding [1,C,g,g] and P single-point prompts [P,2] (x, y in the mask
        frame) → mask logits [P,M,o,o] and predicted IoU [P,M] (M = 3 with ``multimask``, else 1)."""
        o, m = self.mask_size, 3 if multimask else 1
        if coords.shape[0] == 0:
            return embedding.new_zeros((0, m, o, o)), embedding.new_zeros((0, m))
        pe = self.sam.prompt_encoder
        coords = coords * (self.image_size / o) - 0.5  # SAM's encoder adds the 0.5 back
        logits, ious = [], []
        for i in range(0, coords.shape[0], self.cfg["point_batch"]):
            c = coords[i : i + self.cfg["point_batch"], None, :]
            labels = torch.ones(c.shape[:2], dtype=torch.long, device=c.device)
            sparse, dense = pe(points=(c, labels), boxes=None, masks=None)
            low, iou = self.sam.mask_decoder(
                image_embeddings=embedding,
                image_pe=pe.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=multimask,
            )
            logits.append(low)
            ious.append(iou)
        return torch.cat(logits), torch.cat(ious)

    @torch.no_grad()
    def sam_masks(self, embedding: torch.Tensor, points: Points) -> tuple[torch.Tensor, torch.Tensor]:
        """P points → the best mask of each by SAM's own IoU estimate: logits [P,o,o], IoU [P]."""
        low, iou = self.sam_decode(embedding, points.coords, self.cfg["multimask"])
        best = iou.argmax(1) if iou.shape[0] else iou.new_zeros(0, dtype=torch.long)
        ar = torch.arange(low.shape[0], device=low.device)
        return low[ar, best], iou[ar, best]

    # ---- the class-dependent pass -----------------------------------------------------------
    @torch.no_grad()
    def decode_classes(self, features: ZeroShotFeatures, class_emb: torch.Tensor) -> dict:
        """Cached image features × class embeddings [K,E] → {"logits": [B,K,o,o], ...}."""
        cfg, o, s = self.cfg, self.mask_size, self.image_size
        scale = float(cfg["logit_scale"])
        cost = cost_ops.upsample_cost(cost_ops.correlation(features.clip_dense, class_emb.to(features.clip_dense)), o)
        out_logits, all_points, all_masks, counts = [], [], [], []
        for b in range(cost.shape[0]):
            vh, vw = (int(-(-int(v) * o // s)) for v in features.valid_hw[b])  # content size at mask resolution
            logits0 = cost[b] * scale
            if cfg["prompt"] == "tspp":
                pts = tspp_points(logits0.softmax(0), cfg["points_per_class"], cfg["point_threshold"],
                                  cfg["nms_distance"] * max(vh, vw), (vh, vw))
            else:
                pts = grid_points(cfg["grid_points"], (vh, vw), device=cost.device)
            low, iou = self.sam_masks(features.sam[b : b + 1], pts)
            masks = low > 0
            masks[:, vh:] = False
            masks[:, :, vw:] = False
            keep = iou >= cfg["pred_iou_thresh"]
            masks, iou, groups = masks[keep], iou[keep], pts.classes[keep]
            if cfg["prompt"] == "grid" and masks.shape[0]:  # unprompted masks take their pooled class
                _, pooled = inject_masks(logits0, masks, 1.0)
                groups = pooled.argmax(1)
            agg = self.merge(masks, iou, groups)
            logits, _ = inject_masks(logits0, agg.masks, float(cfg["mask_weight"]))
            out_logits.append(logits)
            all_points.append(pts)
            all_masks.append(agg)
            counts.append(pts.coords.shape[0])
        return {
            "logits": torch.stack(out_logits),
            "cost": cost,
            "points": all_points,
            "masks": all_masks,
            "num_prompts": torch.tensor(counts),
        }

    def forward(self, images: torch.Tensor, class_emb: torch.Tensor, valid_hw: torch.Tensor | None = None) -> dict:
        """[B,3,S,S] letterboxed 0..255 and class embeddings [K,E] → {"logits": [B,K,S/4,S/4], ...}
        (the OVSS method set of :mod:`sspsam.models.common.ovss`)."""
        return self.decode_classes(self.encode_image(images, valid_hw), class_emb)


__all__ = ["ZeroShot", "ZeroShotFeatures", "Points", "tspp_points", "grid_points", "inject_masks", "MergedMasks"]
