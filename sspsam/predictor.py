"""Segmenter: the public API. An image and one or many phrases in; masks in the image's size out.

The image towers (SAM's encoder, CLIP's image tower) are the expensive part, so an image is
encoded once and every phrase is decoded against the cached features — as SAM's own predictor
does with ``set_image``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import load_into, read_sspsam_checkpoint
from .config import build_model, list_configs, load_config
from .errors import CheckpointError, ModelOutputError, TextError
from .imageio import ImageLike, load_image
from .masks import encode_rle
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
class Segmentation:
    """Results for N phrases on one image."""

    phrases: list[str]
    masks: np.ndarray  # [N, H, W] bool, original image size; all False where no_target
    scores: np.ndarray  # [N] float in [0, 1]
    no_target: np.ndarray  # [N] bool: "nothing in the image matches this phrase"
    no_target_prob: np.ndarray | None = None
    extras: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # e.g. a demo model on an image unlike its training data

    def __len__(self) -> int:
        return len(self.phrases)

    def to_json(self) -> dict:
        h, w = self.masks.shape[1:]
        return {
            "image_size": [int(h), int(w)],
            "results": [
                {
                    "phrase": p,
                    "score": float(s),
                    "no_target": bool(n),
                    **({"no_target_prob": float(self.no_target_prob[i])} if self.no_target_prob is not None else {}),
                    "area": int(m.sum()),
                    "rle": encode_rle(m),
                }
                for i, (p, m, s, n) in enumerate(zip(self.phrases, self.masks, self.scores, self.no_target))
            ],
            "warnings": list(self.warnings),
        }


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
    def __init__(self, model, device: str | torch.device = "cpu", name: str | None = None, meta: dict | None = None):
        from .device import resolve_device

        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.name = name or model.config.get("name", "ssp-sam")
        self.meta = dict(meta or {})  # the checkpoint's "meta" entry (training data, domain, …)
        self.domain = model_domain(self.name, self.meta)
        inf = model.config.get("inference", {})
        self.mask_threshold = float(inf.get("mask_threshold", 0.0))
        self.no_target_min_pixels = int(inf.get("no_target_min_pixels", 50))
        self.no_target_prob = float(inf.get("no_target_prob", 0.5))
        self._cache: _Encoded | None = None

    # ---- construction ---------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, name_or_path: str | Path = DEFAULT_MODEL, device: str = "cpu") -> "Segmenter":
        """A bundled model name, a registered variant whose weights are in the cache, or a checkpoint path."""
        name = str(name_or_path)
        if name in BUNDLED:
            path = Path(str(resources.files("sspsam") / BUNDLED[name]))
            return _build(cls, path, device, name, RES_MODELS)
        if name in list_configs() and load_config(name).get("model") == "zeroshot":  # training-free: CLIP + SAM from the cache
            from .zeroshot.res import ZeroShotSegmenter

            return ZeroShotSegmenter.from_pretrained(name, device)
        path = Path(name)
        if path.suffix or path.exists():
            return _build(cls, path, device, path.stem, RES_MODELS)
        if name in list_configs():
            return _build(cls, variant_checkpoint(name), device, name, RES_MODELS)
        from .ovss.predictor import BUNDLED as OVSS_BUNDLED

        if name in OVSS_BUNDLED:
            raise CheckpointError(f"'{name}' is an open-vocabulary (OVSS) model, not a referring one: use it with "
                                  f"`sspsam ovss`; referring models: {', '.join(BUNDLED)}, zeroshot, or a checkpoint path")
        raise CheckpointError(
            f"unknown model '{name}': use a checkpoint path, a bundled model ({', '.join(BUNDLED)}) "
            f"or a variant ({', '.join(c for c in list_configs() if c != 'ssp-sam-tiny')})"
        )

    # ---- inference ------------------------------------------------------------------------
    @torch.inference_mode()
    def set_image(self, image: ImageLike, items: int = 1) -> np.ndarray:
        """Encode an image once; later ``segment`` calls on the same pixels reuse it."""
        rgb = load_image(image, items)
        key = image_key(rgb)
        if self._cache is None or self._cache.key != key:
            x, valid, box = model_input(rgb, self.model.image_size, self.device)
            clip_x = self.model.clip_input([rgb], self.device) if hasattr(self.model, "clip_input") else None
            self._cache = _Encoded(key, self.model.encode_image(x, valid, clip_images=clip_x), box)
        return rgb

    @torch.inference_mode()
    def segment(self, image: ImageLike, text_or_texts: str | list[str], batch_size: int = 16) -> Segmentation:
        phrases = clean_phrases(text_or_texts)
        rgb = self.set_image(image, len(phrases))
        enc = self._cache
        masks, scores, no_target, nt_probs = [], [], [], []
        for i in range(0, len(phrases), batch_size):
            chunk = phrases[i : i + batch_size]
            tokens = self.model.tokenize(chunk).to(self.device)
            text = self.model.encode_text(tokens)
            out = self.model.decode(enc.features, text, torch.zeros(len(chunk), dtype=torch.long, device=self.device))
            m, s, n, p = self._postprocess(out, enc.box)
            masks.append(m), scores.append(s), no_target.append(n), nt_probs.append(p)
        has_head = nt_probs[0] is not None
        return Segmentation(
            phrases=phrases,
            masks=np.concatenate(masks),
            scores=np.concatenate(scores),
            no_target=np.concatenate(no_target),
            no_target_prob=np.concatenate(nt_probs) if has_head else None,
            warnings=domain_warnings(self.name, self.domain, rgb, "segment"),
        )

    def _postprocess(self, out: dict, box: Letterbox):
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
            prob = prob.cpu().numpy()
        else:
            prob = None
            no_target = area512 < self.no_target_min_pixels
            score = conf
        # one phrase at a time: full-size float logits for a whole chunk would be chunk × pixels × 4 bytes
        full = torch.stack([unletterbox_logits(low[i : i + 1], box)[0] > self.mask_threshold for i in range(len(low))])
        # A mask that vanishes at the original size (tiny image, thin sliver) is no answer: never "found" and empty.
        no_target = no_target | ~full.flatten(1).any(1)
        full[no_target] = False
        return full.cpu().numpy(), score.cpu().numpy(), no_target.cpu().numpy(), prob


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


def _build(cls, path: Path, device, name: str, task: tuple[str, ...] | None = None):
    model, meta = _model_and_meta(path, task)
    return cls(model, device, name, meta)


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
