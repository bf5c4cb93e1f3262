"""What the predictors return: per-phrase masks, instances, boxes and scores, and their JSON,
COCO and supervision forms. Plain data with no model code, so every predictor (and ``serve``)
shares them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from sspsam.errors import TextError
from sspsam.io.images import is_tensor
from sspsam.io.masks import boxes_xyxy, encode_rle, min_instance_area, split_instances, xyxy_to_coco

MAX_PHRASE_CHARS = 1000


MAX_PHRASES = 256


def clean_phrases(text_or_texts: str | list[str]) -> list[str]:
    if isinstance(text_or_texts, str):
        texts = [text_or_texts]
    elif isinstance(text_or_texts, (list, tuple)):
        texts = list(text_or_texts)
    else:
        raise TextError(f"phrases must be text or a list of texts, got {type(text_or_texts).__name__}")
    if not texts:
        raise TextError("no phrase given")
    if len(texts) > MAX_PHRASES:
        raise TextError(f"{len(texts)} phrases given; at most {MAX_PHRASES} at once")
    out = []
    for t in texts:
        if not isinstance(t, str):
            raise TextError(f"a phrase must be text, got {type(t).__name__}")
        clean = " ".join("".join(ch if ch.isprintable() else " " for ch in t).split())
        if not clean:
            raise TextError("empty phrase: say what to segment, e.g. \"the dog on the left\"")
        if len(clean) > MAX_PHRASE_CHARS:
            raise TextError(f"phrase is {len(clean)} characters long; at most {MAX_PHRASE_CHARS} are accepted")
        out.append(clean)
    return out


@dataclass
class Instances:
    """The separate objects of one phrase's mask (see :func:`sspsam.io.masks.split_instances`).

    ``masks``: bool [K, H, W] in the original image size, largest first; ``boxes``: float32
    [K, 4] (x0, y0, x1, y1) in original pixels, x1/y1 one past the last pixel; ``scores``: float32
    [K] in [0, 1], each the instance's mean foreground probability × (1 − no-target probability).
    numpy arrays, or torch tensors on the model's device with ``return_tensors="pt"``.
    """

    masks: Any
    boxes: Any
    scores: Any

    def __len__(self) -> int:
        return len(self.masks)

    def __repr__(self) -> str:
        boxes = [[int(round(float(v))) for v in b] for b in _np(self.boxes)]
        return f"Instances({len(self)} object{'s' * (len(self) != 1)}, boxes xyxy {boxes})"


def _np(x):
    """numpy view of an output that may be a torch tensor (``return_tensors="pt"``)."""
    return x.detach().cpu().numpy() if is_tensor(x) else np.asarray(x)


def instances_of(mask, score: float, min_area: int | None = None, prob=None, scale: float = 1.0) -> Instances:
    """Split one union mask into :class:`Instances` (numpy). ``prob``: per-pixel foreground
    probability [H, W] for per-instance scores (else every instance gets ``score``); ``scale``:
    the factor applied to them (1 − no-target probability)."""
    mask = _np(mask).astype(bool)
    h, w = mask.shape
    parts = split_instances(mask, min_instance_area(h, w) if min_area is None else min_area)
    if prob is None:
        scores = np.full(len(parts), score, np.float32)
    else:
        prob = _np(prob)
        scores = np.array([float(prob[m].mean()) * scale for m in parts], np.float32)
    return Instances(parts, boxes_xyxy(parts), scores)


@dataclass
class Segmentation:
    """Results for N phrases on one image.

    ``masks``: bool [N, H, W], the union mask per phrase in the original image size (all False
    where ``no_target``); ``scores``: float32 [N] in [0, 1] (the mask's mean foreground
    probability, × (1 − no-target probability) with that head); ``no_target``: bool [N], "nothing
    in the image matches this phrase"; ``instances``: one :class:`Instances` per phrase (computed
    from ``masks`` when not given). numpy arrays by default; torch tensors on the model's device
    when ``segment(..., return_tensors="pt")`` made it.
    """

    phrases: list[str]
    masks: Any  # [N, H, W] bool, original image size; all False where no_target
    scores: Any  # [N] float in [0, 1]
    no_target: Any  # [N] bool: "nothing in the image matches this phrase"
    no_target_prob: Any = None
    extras: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # e.g. a demo model on an image unlike its training data
    instances: list[Instances] | None = None
    #: per phrase, its own warnings (words the model does not know); also in ``warnings``
    phrase_warnings: list[list[str]] | None = None
    #: float32 [N, H, W] mask logits at the original size (``segment(..., return_logits=True)``), else None
    logits: Any = None

    def __post_init__(self):
        if self.instances is None:
            self.instances = [instances_of(m, float(s)) for m, s in zip(_np(self.masks), _np(self.scores))]
        if self.phrase_warnings is None:
            self.phrase_warnings = [[] for _ in self.phrases]
        self.warnings = list(dict.fromkeys([*self.warnings, *(w for ws in self.phrase_warnings for w in ws)]))

    @property
    def image_warnings(self) -> list[str]:
        """The warnings about the image and the model (not about one phrase)."""
        own = {w for ws in self.phrase_warnings for w in ws}
        return [w for w in self.warnings if w not in own]

    def subset(self, idx: list[int]) -> "Segmentation":
        """The results of some phrases only, with the image's warnings and those phrases' own."""
        pick = lambda x: None if x is None else x[idx]  # noqa: E731
        return Segmentation([self.phrases[i] for i in idx], pick(self.masks), pick(self.scores), pick(self.no_target),
                            pick(self.no_target_prob), dict(self.extras), self.image_warnings,
                            [self.instances[i] for i in idx], [list(self.phrase_warnings[i]) for i in idx], pick(self.logits))

    def __repr__(self) -> str:
        h, w = _np(self.masks).shape[1:] if len(self) else (0, 0)
        rows = []
        for p, n, s, inst in zip(self.phrases, _np(self.no_target), _np(self.scores), self.instances):
            rows.append(f"  {p!r}: " + ("no match" if n else f"score {float(s):.2f}, {len(inst)} object{'s' * (len(inst) != 1)}"))
        warn = f", {len(self.warnings)} warning{'s' * (len(self.warnings) != 1)} (see .warnings)" if self.warnings else ""
        return f"Segmentation({len(self)} phrase{'s' * (len(self) != 1)} on a {w}x{h} image{warn}" + (":\n" + "\n".join(rows) if rows else "") + ")"

    def plot(self, image=None):
        """The overlay the CLI writes (masks filled and outlined, one box per object, a legend, a
        banner for warnings) as a PIL image. ``image``: the image segmented (path, array, PIL…);
        without it the masks are drawn on grey."""
        from sspsam.io.images import load_image
        from sspsam.io.masks import segmentation_overlay

        masks = _np(self.masks)
        rgb = load_image(image) if image is not None else np.full((*masks.shape[1:], 3), 200, np.uint8)
        return segmentation_overlay(rgb, self.phrases, masks, _np(self.scores), _np(self.no_target),
                                    warnings=self.warnings, instances=self.instances)

    def __len__(self) -> int:
        return len(self.phrases)

    @property
    def boxes(self) -> list:
        """Per phrase, its instances' boxes [K, 4] xyxy (original pixels)."""
        return [inst.boxes for inst in self.instances]

    def union_boxes(self) -> np.ndarray:
        """float32 [N, 4]: each phrase's box around its whole mask (0s where nothing was found)."""
        return boxes_xyxy(_np(self.masks))

    def to_json(self) -> dict:
        """JSON-safe dict: per phrase its RLE (COCO, compressed string counts), score, no-target
        flag, area, ``bbox`` (COCO [x, y, w, h] of the whole mask, null when empty) and
        ``instances`` (each with ``bbox``, ``bbox_xyxy``, ``score``, ``area``, ``rle``)."""
        masks, scores, no_target = _np(self.masks), _np(self.scores), _np(self.no_target)
        ntp = None if self.no_target_prob is None else _np(self.no_target_prob)
        h, w = masks.shape[1:]
        union = boxes_xyxy(masks)
        return {
            "image_size": [int(h), int(w)],
            "results": [
                {
                    "phrase": p,
                    "score": float(s),
                    "no_target": bool(n),
                    **({"no_target_prob": float(ntp[i])} if ntp is not None else {}),
                    "area": int(m.sum()),
                    "rle": encode_rle(m),
                    "bbox": xyxy_to_coco(union[i]) if m.any() else None,
                    "instances": _instances_json(self.instances[i]),
                    "warnings": list(self.phrase_warnings[i]),
                }
                for i, (p, m, s, n) in enumerate(zip(self.phrases, masks, scores, no_target))
            ],
            "warnings": list(self.warnings),
        }

    def to_coco(self, image_id: int = 0, category_ids: dict[str, int] | None = None) -> list[dict]:
        """COCO results entries (``{"image_id", "category_id", "segmentation", "bbox", "score"}``),
        one per instance; ``category_id`` is the phrase's index (or ``category_ids[phrase]``)."""
        out = []
        for i, (phrase, inst) in enumerate(zip(self.phrases, self.instances)):
            cat = category_ids[phrase] if category_ids is not None else i
            for r in _instances_json(inst):
                out.append({"image_id": image_id, "category_id": cat, "phrase": phrase, "segmentation": r["rle"],
                            "bbox": r["bbox"], "score": r["score"], "area": r["area"]})
        return out

    def to_supervision(self):
        """A ``supervision.Detections`` with one detection per instance: ``mask`` bool [K, H, W],
        ``xyxy`` float32 [K, 4] (x1/y1 one past the last pixel, as here), ``confidence`` [K],
        ``class_id`` = phrase index, ``data["class_name"]`` = the phrase. Needs ``sspsam[interop]``."""
        from sspsam.io.masks import require_supervision

        sv = require_supervision()
        h, w = _np(self.masks).shape[1:]
        masks, boxes, conf, cls = [], [], [], []
        for i, inst in enumerate(self.instances):
            masks.append(_np(inst.masks).reshape(-1, h, w))
            boxes.append(_np(inst.boxes).reshape(-1, 4))
            conf.append(_np(inst.scores).reshape(-1))
            cls += [i] * len(inst)
        return sv.Detections(xyxy=np.concatenate(boxes).astype(np.float32), mask=np.concatenate(masks).astype(bool),
                             confidence=np.concatenate(conf).astype(np.float32), class_id=np.array(cls, dtype=int),
                             data={"class_name": np.array([self.phrases[c] for c in cls], dtype=str)})

    def polygons(self) -> list[list[list[list[float]]]]:
        """Per phrase, per instance, its outline(s) as COCO polygons. Needs ``sspsam[interop]``."""
        from sspsam.io.masks import mask_polygons

        return [[mask_polygons(m) for m in _np(inst.masks)] for inst in self.instances]


def _instances_json(inst: Instances) -> list[dict]:
    masks, boxes, scores = _np(inst.masks), _np(inst.boxes), _np(inst.scores)
    return [{"bbox": xyxy_to_coco(b), "bbox_xyxy": [float(v) for v in b], "score": float(sc), "area": int(m.sum()),
             "rle": encode_rle(m)} for m, b, sc in zip(masks, boxes, scores)]


def coco_results(results: Sequence[Segmentation], image_ids: Sequence[int] | None = None,
                 category_ids: dict[str, int] | None = None) -> list[dict]:
    """COCO-style results JSON (a list of detections) for a batch of :class:`Segmentation`."""
    ids = range(len(results)) if image_ids is None else image_ids
    return [r for res, i in zip(results, ids) for r in res.to_coco(int(i), category_ids)]


def as_numpy(res: Segmentation) -> Segmentation:
    conv = lambda x: None if x is None else _np(x)  # noqa: E731
    res.masks, res.scores, res.no_target, res.no_target_prob = (conv(res.masks), conv(res.scores).astype(np.float32),
                                                                 conv(res.no_target), conv(res.no_target_prob))
    res.logits = conv(res.logits)
    return res


def as_tensors(res: Segmentation, device: torch.device) -> Segmentation:
    conv = lambda x: None if x is None else (x if is_tensor(x) else torch.as_tensor(np.asarray(x))).to(device)  # noqa: E731
    res.masks, res.scores, res.no_target, res.no_target_prob = (conv(res.masks), conv(res.scores), conv(res.no_target),
                                                                 conv(res.no_target_prob))
    res.instances = [Instances(conv(i.masks), conv(i.boxes), conv(i.scores)) for i in res.instances]
    res.logits = conv(res.logits)
    return res


@dataclass
class SemanticSegmentation:
    """One label per pixel for one image.

    ``classes``: the cleaned class names; ``labels``: int32 [H, W] index into ``classes`` at the
    original image size; ``scores``: float32 [H, W] in [0, 1], each pixel's winning-class softmax
    probability (None where the protocol has none); ``shares``: class → fraction of the image's
    pixels. numpy by default; ``labels``/``scores`` are torch tensors on the model's device when
    ``segment(..., return_tensors="pt")`` made it.
    """

    classes: list[str]
    labels: np.ndarray  # [H, W] int32 index into classes, original image size
    scores: np.ndarray | None  # [H, W] float32 max class probability, or None
    shares: dict[str, float]  # class -> fraction of image pixels
    warnings: list[str] = field(default_factory=list)  # e.g. a demo model on an image unlike its training data

    def class_masks(self) -> tuple[list[int], np.ndarray]:
        """(indices into ``classes`` of the classes present, bool [K, H, W] their masks)."""
        labels = np.asarray(self.labels.cpu() if hasattr(self.labels, "cpu") else self.labels)
        present = [i for i in range(len(self.classes)) if (labels == i).any()]
        return present, np.stack([labels == i for i in present]) if present else np.zeros((0, *labels.shape), bool)

    def to_supervision(self):
        """A ``supervision.Detections`` with one detection per class present: ``mask`` bool
        [K, H, W], ``xyxy`` float32 [K, 4] (x1/y1 one past the last pixel), ``confidence`` = the
        class's mean max-probability over its pixels (1.0 without scores), ``class_id`` = index
        into ``classes``, ``data["class_name"]``. Needs ``sspsam[interop]``."""
        from sspsam.io.masks import boxes_xyxy, require_supervision

        sv = require_supervision()
        present, masks = self.class_masks()
        scores = None if self.scores is None else np.asarray(self.scores.cpu() if hasattr(self.scores, "cpu") else self.scores)
        conf = np.array([1.0 if scores is None else float(scores[m].mean()) for m in masks], np.float32)
        return sv.Detections(xyxy=boxes_xyxy(masks), mask=masks, confidence=conf, class_id=np.array(present, dtype=int),
                             data={"class_name": np.array([self.classes[i] for i in present], dtype=str)})

    def polygons(self) -> dict[str, list[list[float]]]:
        """Per class present, its outlines as COCO polygons (pixel units). Needs ``sspsam[interop]``."""
        from sspsam.io.masks import mask_polygons

        present, masks = self.class_masks()
        return {self.classes[i]: mask_polygons(m) for i, m in zip(present, masks)}

    def to_json(self) -> dict:
        """JSON-safe summary: image size [H, W], the classes and each one's share of the pixels
        (the label map itself goes out as a PNG: see the service's ``label_png``)."""
        h, w = self.labels.shape
        return {"image_size": [int(h), int(w)], "classes": list(self.classes), "shares": dict(self.shares),
                "warnings": list(self.warnings)}


