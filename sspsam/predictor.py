"""Segmenter: the public API. An image (or a list of them) and one or many phrases in; per phrase
a union mask, its instances, their boxes and scores in the image's size out.

The image towers (SAM's encoder, CLIP's image tower) are the expensive part, so an image is
encoded once and every phrase is decoded against the cached features — as SAM's own predictor
does with ``set_image``; a list of images goes through the towers in batches.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import load_into, read_sspsam_checkpoint
from .config import build_model, list_configs, load_config
from .errors import CheckpointError, ModelOutputError, TextError
from .imageio import ImageLike, is_tensor, load_image
from .masks import boxes_xyxy, encode_rle, min_instance_area, split_instances, xyxy_to_coco
from .precision import apply_dtype, autocast, check_dtype, compile_hot_modules, resolve_dtype
from .transforms import Letterbox, image_key, model_input, unletterbox_logits

MAX_PHRASE_CHARS = 1000
MAX_PHRASES = 256
RES_MODELS = ("ssp-sam",)
DEFAULT_MODEL = "shapes-demo"
BUNDLED = {"shapes-demo": "assets/shapes-demo.pt"}


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
    """The separate objects of one phrase's mask (see :func:`sspsam.masks.split_instances`).

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

    def __post_init__(self):
        if self.instances is None:
            self.instances = [instances_of(m, float(s)) for m, s in zip(_np(self.masks), _np(self.scores))]

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
        from .masks import require_supervision

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
        from .masks import mask_polygons

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


@dataclass
class _Encoded:
    key: str
    features: object
    box: Letterbox


def model_domain(name: str | None, meta: dict | None) -> str | None:
    """The data a model knows, from its checkpoint meta; the bundled demos are generated shapes."""
    from .domain import DOMAIN

    domain = (meta or {}).get("domain")
    if domain is None and name in ("shapes-demo", "ovss-shapes-demo"):
        return DOMAIN
    return domain if isinstance(domain, str) else None


def domain_warnings(name: str, domain: str | None, rgb: np.ndarray, command: str) -> list[str]:
    from .domain import DOMAIN, out_of_domain_warning

    if domain != DOMAIN:
        return []
    warning = out_of_domain_warning(name, rgb, command)
    return [warning] if warning else []


class Segmenter:
    """Referring segmentation: an image and phrases in, per phrase a mask, instances and boxes out.

    Compared with ``segment_anything.SamPredictor``: ``set_image`` is the same idea (the image
    towers run once per image, every later phrase reuses them) but prompts are phrases rather than
    points or boxes; compared with lang-sam's ``LangSAM.predict``: one model (no detector in front),
    masks for every phrase at once, and a list of images in one call. See the README, "Python API".

    ``device``: 'auto' (CUDA, then MPS, then CPU), a name or a torch.device; ``dtype``:
    torch.float32 (default), torch.bfloat16 or torch.float16 (see :mod:`sspsam.precision`);
    ``compile``: wrap the image towers with torch.compile, falling back to eager with a warning.
    """

    #: the modules torch.compile wraps: the image towers, where the time goes
    HOT_MODULES = ("clip", "sam.image_encoder")

    def __init__(self, model, device: str | torch.device = "auto", name: str | None = None, meta: dict | None = None,
                 dtype: torch.dtype | str | None = None, compile: bool = False):
        from .device import resolve_device

        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype)
        check_dtype(self.device, self.dtype)
        self.model = apply_dtype(model.to(self.device), self.dtype).eval() if dtype is not None else model.to(self.device).eval()
        self.name = name or model.config.get("name", "ssp-sam")
        self.meta = dict(meta or {})  # the checkpoint's "meta" entry (training data, domain, …)
        self.domain = model_domain(self.name, self.meta)
        inf = model.config.get("inference", {})
        self.mask_threshold = float(inf.get("mask_threshold", 0.0))
        self.no_target_min_pixels = int(inf.get("no_target_min_pixels", 50))
        self.no_target_prob = float(inf.get("no_target_prob", 0.5))
        self.min_instance_area: int | None = None  # pixels; None = masks.MIN_INSTANCE_FRACTION of the image
        self._cache: _Encoded | None = None
        self.compiled: list[str] = []
        if compile:
            self._compile()

    # ---- construction ---------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, name_or_path: str | Path = DEFAULT_MODEL, device: str | torch.device = "auto",
                        dtype: torch.dtype | str | None = None, compile: bool = False) -> "Segmenter":
        """A bundled model name, a registered variant whose weights are in the cache, or a checkpoint path.

        ``dtype`` (torch.bfloat16 / torch.float16) and ``compile`` as in :class:`Segmenter`."""
        name = str(name_or_path)
        opts = {"dtype": dtype, "compile": compile}
        if name in BUNDLED:
            path = Path(str(resources.files("sspsam") / BUNDLED[name]))
            return _build(cls, path, device, name, RES_MODELS, **opts)
        if name in list_configs() and load_config(name).get("model") == "zeroshot":  # training-free: CLIP + SAM from the cache
            from .zeroshot.res import ZeroShotSegmenter

            return ZeroShotSegmenter.from_pretrained(name, device)
        path = Path(name)
        if path.suffix or path.exists():
            return _build(cls, path, device, path.stem, RES_MODELS, **opts)
        if name in list_configs():
            return _build(cls, variant_checkpoint(name), device, name, RES_MODELS, **opts)
        from .ovss.predictor import BUNDLED as OVSS_BUNDLED

        if name in OVSS_BUNDLED:
            raise CheckpointError(f"'{name}' is an open-vocabulary (OVSS) model, not a referring one: use it with "
                                  f"`sspsam ovss`; referring models: {', '.join(BUNDLED)}, zeroshot, or a checkpoint path")
        raise CheckpointError(
            f"unknown model '{name}': use a checkpoint path, a bundled model ({', '.join(BUNDLED)}) "
            f"or a variant ({', '.join(c for c in list_configs() if c != 'ssp-sam-tiny')})"
        )

    def to(self, device: str | torch.device) -> "Segmenter":
        """Move the model to ``device`` ('auto', 'cpu', 'cuda:1', …); returns self."""
        from .device import resolve_device

        self.device = resolve_device(device)
        check_dtype(self.device, self.dtype)
        self.model.to(self.device)
        self._cache = None
        return self

    def _compile(self) -> None:
        self.compiled = compile_hot_modules(self.model, list(self.HOT_MODULES))
        if not self.compiled:
            return
        try:  # compile is lazy: a graph it cannot handle fails here, on a warm-up, not in a user's call
            self.segment(np.full((64, 64, 3), 128, np.uint8), "warm up")
        except Exception as exc:  # noqa: BLE001
            from .precision import uncompile

            uncompile(self.model, self.compiled)
            self.compiled = []
            warnings.warn(f"torch.compile did not work for this model ({type(exc).__name__}: {str(exc).splitlines()[0][:160]}); "
                          "running eagerly", stacklevel=3)
        self._cache = None

    def _run_dtype(self) -> torch.dtype:
        """The dtype to autocast to: the one asked for, or what the weights hold (``model.half()``)."""
        if self.dtype != torch.float32:
            return self.dtype
        from .precision import model_dtype

        return model_dtype(self.model)

    # ---- inference ------------------------------------------------------------------------
    @torch.inference_mode()
    def set_image(self, image: ImageLike, items: int = 1, allow_urls: bool = False) -> np.ndarray:
        """Encode an image once; later ``segment`` calls on the same pixels reuse it. Returns the
        image as loaded: uint8 RGB [H, W, 3]."""
        rgb = load_image(image, items, allow_urls=allow_urls)
        key = image_key(rgb)
        if self._cache is None or self._cache.key != key:
            self._cache = self._encode([rgb], [key])[0]
        return rgb

    def _encode(self, rgbs: list[np.ndarray], keys: list[str]) -> list[_Encoded]:
        """The image towers on a batch of images at once; one :class:`_Encoded` per image."""
        inputs = [model_input(rgb, self.model.image_size, self.device) for rgb in rgbs]
        x = torch.cat([i[0] for i in inputs])
        valid = torch.cat([i[1] for i in inputs])
        clip_x = self.model.clip_input(rgbs, self.device) if hasattr(self.model, "clip_input") else None
        with autocast(self.device, self._run_dtype()):
            feats = self.model.encode_image(x, valid, clip_images=clip_x)
        return [_Encoded(k, _slice_features(feats, b), i[2]) for b, (k, i) in enumerate(zip(keys, inputs))]

    @torch.inference_mode()
    def segment(self, image: ImageLike | Sequence[ImageLike], text_or_texts: str | list[str] | list[list[str]],
                batch_size: int = 16, image_batch_size: int = 8, return_tensors: str = "np",
                allow_urls: bool = False) -> Segmentation | list[Segmentation]:
        """Segment what each phrase refers to.

        ``image``: a path, bytes, PIL image, numpy HWC array, torch tensor (CHW or HWC, uint8 or
        float in [0, 1]), an http(s) URL when ``allow_urls`` — or a list of those (or a [B, C, H, W]
        tensor), which returns a list of :class:`Segmentation`, one per image, with the image
        towers run ``image_batch_size`` images at a time. ``text_or_texts``: a phrase, a list of
        phrases (shared by every image), or with a list of images one list of phrases per image.
        ``batch_size``: phrases decoded at once. ``return_tensors``: "np" (numpy) or "pt" (torch
        tensors on the model's device).
        """
        if return_tensors not in ("np", "pt"):
            raise ValueError(f"return_tensors must be 'np' or 'pt', got {return_tensors!r}")
        if _is_batch(image):
            return self._segment_batch(list(image), text_or_texts, batch_size, image_batch_size, return_tensors, allow_urls)
        phrases = clean_phrases(text_or_texts)
        rgb = self.set_image(image, len(phrases), allow_urls=allow_urls)
        return self._decode_phrases(self._cache, rgb, phrases, batch_size, return_tensors)

    def _segment_batch(self, images: list, texts, batch_size: int, image_batch_size: int, return_tensors: str,
                       allow_urls: bool) -> list[Segmentation]:
        if not images:
            return []
        per_image = isinstance(texts, (list, tuple)) and bool(texts) and all(isinstance(t, (list, tuple)) for t in texts)
        if per_image and len(texts) != len(images):
            raise TextError(f"{len(images)} images but {len(texts)} phrase lists: give one list per image, or one shared list")
        phrase_lists = [clean_phrases(t) for t in texts] if per_image else [clean_phrases(texts)] * len(images)
        rgbs = [load_image(im, len(p), allow_urls=allow_urls) for im, p in zip(images, phrase_lists)]
        out = []
        for i in range(0, len(rgbs), max(1, image_batch_size)):
            chunk = rgbs[i : i + image_batch_size]
            for rgb, enc, phrases in zip(chunk, self._encode(chunk, [image_key(r) for r in chunk]), phrase_lists[i:]):
                out.append(self._decode_phrases(enc, rgb, phrases, batch_size, return_tensors))
        return out

    def _decode_phrases(self, enc: _Encoded, rgb: np.ndarray, phrases: list[str], batch_size: int,
                        return_tensors: str) -> Segmentation:
        masks, scores, no_target, nt_probs, instances = [], [], [], [], []
        with autocast(self.device, self._run_dtype()):
            for i in range(0, len(phrases), batch_size):
                chunk = phrases[i : i + batch_size]
                tokens = self.model.tokenize(chunk).to(self.device)
                text = self.model.encode_text(tokens)
                out = self.model.decode(enc.features, text, torch.zeros(len(chunk), dtype=torch.long, device=self.device))
                m, s, n, p, inst = self._postprocess(out, enc.box)
                masks.append(m), scores.append(s), no_target.append(n), nt_probs.append(p)
                instances += inst
        has_head = nt_probs[0] is not None
        res = Segmentation(
            phrases=phrases,
            masks=torch.cat(masks),
            scores=torch.cat(scores),
            no_target=torch.cat(no_target),
            no_target_prob=torch.cat(nt_probs) if has_head else None,
            warnings=domain_warnings(self.name, self.domain, rgb, "segment"),
            instances=instances,
        )
        return _as_tensors(res, self.device) if return_tensors == "pt" else _as_numpy(res)

    def _postprocess(self, out: dict, box: Letterbox):
        """Low-res logits → (union masks, scores, no-target, no-target prob, instances), torch on the device."""
        low = out["mask_logits"][:, 0].float()
        check_finite(self.name, low, out["iou"], out.get("no_target_logit"))
        # The official GRES rule: fewer than N positive pixels at 512x512 means "no target".
        from .ssp.model import official_mask_logits

        sq = official_mask_logits(low[:, None], self.model.image_size)[:, 0]
        sh, sw = (round(v * 512 / box.size) for v in box.scaled_hw)
        area512 = (sq[:, :sh, :sw] > self.mask_threshold).sum((1, 2))
        # The score is the mask's own confidence (its mean foreground probability), not SAM's IoU head:
        # SSP-SAM's recipe never trains that head (the official code ignores it), so its output says
        # nothing about these masks (a from-scratch model answers 0.00 for a right mask).
        fg = low > self.mask_threshold
        p = low.sigmoid()
        conf = torch.where(fg.any(dim=(1, 2)), (p * fg).sum((1, 2)) / fg.sum((1, 2)).clamp(min=1), p.amax(dim=(1, 2)))
        if "no_target_logit" in out:
            prob = out["no_target_logit"].float().sigmoid()
            no_target = prob > self.no_target_prob
            score = conf * (1 - prob)
            keep = 1 - prob
        else:
            prob = None
            no_target = area512 < self.no_target_min_pixels
            score = conf
            keep = torch.ones_like(conf)
        # one phrase at a time: full-size float logits for a whole chunk would be chunk × pixels × 4 bytes
        full, instances = [], []
        h, w = box.orig_hw
        min_area = min_instance_area(h, w) if self.min_instance_area is None else int(self.min_instance_area)
        for i in range(len(low)):
            logit = unletterbox_logits(low[i : i + 1], box)[0]
            m = logit > self.mask_threshold
            # A mask that vanishes at the original size (tiny image, thin sliver) is no answer: never "found" and empty.
            if bool(no_target[i]) or not bool(m.any()):
                m = torch.zeros_like(m)
                no_target[i] = True
                instances.append(Instances(np.zeros((0, h, w), bool), np.zeros((0, 4), np.float32), np.zeros(0, np.float32)))
            else:
                instances.append(instances_of(m.cpu().numpy(), float(score[i]), min_area, logit.sigmoid().cpu().numpy(), float(keep[i])))
            full.append(m)
        return torch.stack(full), score.float(), no_target, prob, instances


def _is_batch(image) -> bool:
    """A list/tuple of images, or a 4-D tensor/array [B, …] (one image is 2-D or 3-D)."""
    if isinstance(image, (list, tuple)):
        return True
    return (is_tensor(image) or isinstance(image, np.ndarray)) and image.ndim == 4


def _slice_features(feats, b: int):
    """Image ``b`` of a batched features object (a dataclass of [B, …] tensors)."""
    from dataclasses import fields, replace

    return replace(feats, **{f.name: getattr(feats, f.name)[b : b + 1] for f in fields(feats)
                             if isinstance(getattr(feats, f.name), torch.Tensor)})


def _as_numpy(res: Segmentation) -> Segmentation:
    conv = lambda x: None if x is None else _np(x)  # noqa: E731
    res.masks, res.scores, res.no_target, res.no_target_prob = (conv(res.masks), conv(res.scores).astype(np.float32),
                                                                 conv(res.no_target), conv(res.no_target_prob))
    return res


def _as_tensors(res: Segmentation, device: torch.device) -> Segmentation:
    conv = lambda x: None if x is None else (x if is_tensor(x) else torch.as_tensor(np.asarray(x))).to(device)  # noqa: E731
    res.masks, res.scores, res.no_target, res.no_target_prob = (conv(res.masks), conv(res.scores), conv(res.no_target),
                                                                 conv(res.no_target_prob))
    res.instances = [Instances(conv(i.masks), conv(i.boxes), conv(i.scores)) for i in res.instances]
    return res


def check_finite(name: str, *tensors) -> None:
    """NaN or inf out of a model means broken weights; say so rather than write "score": NaN."""
    for t in tensors:
        if t is not None and not bool(torch.isfinite(t).all()):
            raise ModelOutputError(f"model '{name}' produced non-finite outputs (NaN or inf); its weights are damaged")


def _model_from_checkpoint(path: Path, task: tuple[str, ...] | None = None, sam_image_encoder: bool = True):
    return _model_and_meta(path, task, sam_image_encoder)[0]


def variant_checkpoint(name: str) -> Path:
    """The trained checkpoint published for a variant name (downloaded on first use), or an error
    saying to pass a checkpoint path: an architecture name alone has no trained weights."""
    from . import weights

    if name not in weights.REGISTRY:
        raise CheckpointError(
            f"'{name}' is an architecture, and no trained weights are published for it: pass the path of a "
            f"checkpoint (`sspsam train {name} …` writes one), or use a bundled model or 'zeroshot' (see `sspsam models`)"
        )
    return weights.ensure(name)


def _build(cls, path: Path, device, name: str, task: tuple[str, ...] | None = None, **opts):
    model, meta = _model_and_meta(path, task)
    return cls(model, device, name, meta, **opts)


def _model_and_meta(path: Path, task: tuple[str, ...] | None = None, sam_image_encoder: bool = True):
    """(model, the checkpoint's meta dict) — the meta says e.g. what data the model knows.

    ``task``: the model types the caller can run; another type is refused before anything is built."""
    ckpt = read_sspsam_checkpoint(path, sam_image_encoder=sam_image_encoder)
    kind = ckpt["config"].get("model", "ssp-sam")
    if task is not None and kind not in task:
        raise CheckpointError(
            f"{path} holds a '{kind}' model, "
            + ("not an OVSS model: it does referring segmentation (phrases); use `sspsam segment` / Segmenter"
               if kind in RES_MODELS else
               "not a referring model: it does open-vocabulary semantic segmentation (class names); use `sspsam ovss` / OVSS")
        )
    sd = ckpt["state_dict"]
    external = ckpt.get("external_backbones", [])
    files = {}
    if external:  # frozen backbones are not copied into every checkpoint: load them from the weights cache
        from .weights import ensure

        # found (or downloaded on first use, unless offline) before a large model is built
        files = {part: ensure(ckpt["config"][part].get("weights")) for part in external}
    model = build_model(ckpt["config"])
    if external:
        for part in external:
            getattr(model, part).load_checkpoint(files[part])
        sd = {**{k: v for k, v in model.state_dict().items() if k.split(".")[0] in external}, **sd}
    load_into(model, sd, what=f"model checkpoint {path}")
    meta = ckpt.get("meta")
    return model, dict(meta) if isinstance(meta, dict) else {}
