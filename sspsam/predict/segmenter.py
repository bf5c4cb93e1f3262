"""Segmenter: the public API. An image (or a list of them) and one or many phrases in; per phrase
a union mask, its instances, their boxes and scores in the image's size out.

The image towers (SAM's encoder, CLIP's image tower) are the expensive part, so an image is
encoded once and every phrase is decoded against the cached features — as SAM's own predictor
does with ``set_image``; a list of images goes through the towers in batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from sspsam.errors import ConfigError, TextError
from sspsam.io.images import ImageLike, load_image
from sspsam.io.masks import min_instance_area
from sspsam.io.transforms import Letterbox, image_key, model_input, unletterbox_logits
from sspsam.models import registry
from sspsam.models.protocols import mask_logits_512
from sspsam.predict.base import (OVSS_BUNDLED, REFERRING_BUNDLED, Predictor, check_finite, domain_warnings, is_batch,
                                 model_warnings, per_image)
from sspsam.predict.results import Instances, Segmentation, as_numpy, as_tensors, clean_phrases, instances_of

DEFAULT_MODEL = "shapes-demo"
BUNDLED = REFERRING_BUNDLED


@dataclass
class _Encoded:
    key: str
    features: object
    box: Letterbox
    warnings: list[str] | None = None  # the image's domain warnings, worked out once per image
    objects: np.ndarray | None = None  # the model's single-object masks, for clicks (worked out when first needed)


class Segmenter(Predictor):
    """Referring segmentation: an image and phrases in, per phrase a mask, instances and boxes out.

    Compared with ``segment_anything.SamPredictor``: ``set_image`` is the same idea (the image
    towers run once per image, every later phrase reuses them) but prompts are phrases rather than
    points or boxes; compared with lang-sam's ``LangSAM.predict``: one model (no detector in front),
    masks for every phrase at once, and a list of images in one call. See the README, "Python API".

    ``device``: 'auto' (CUDA, then MPS, then CPU), a name or a torch.device; ``dtype``: 'auto'
    (default: bf16 where the GPU or CPU has bf16 units, else fp32; ``$SSPSAM_DTYPE`` overrides it),
    torch.float32, torch.bfloat16 or torch.float16 (see :mod:`sspsam.predict.precision`);
    ``compile``: wrap the image towers with torch.compile, falling back to eager with a warning.
    """

    #: what torch.compile wraps: the image towers, where the time goes (CLIP's wrapper has no
    #: forward, so its image method is compiled; SAM's encoder as a module)
    HOT_MODULES = ("clip.encode_image", "sam.image_encoder")
    BUNDLED = REFERRING_BUNDLED
    COMMAND = "segment"
    RUNTIMES = ("onnx",)
    TASK = "a referring"

    def __init__(self, model, device: str | torch.device = "auto", name: str | None = None, meta: dict | None = None,
                 dtype: torch.dtype | str | None = "auto", compile: bool = False):
        self._place(model, device, dtype)
        self._identify(model, name, meta, registry.model_type(model.config))
        inf = model.config.get("inference", {})
        self.mask_threshold = float(inf.get("mask_threshold", 0.0))
        self.no_target_min_pixels = int(inf.get("no_target_min_pixels", 50))
        self.no_target_prob = float(inf.get("no_target_prob", 0.5))
        self.min_instance_area: int | None = None  # pixels; None = masks.MIN_INSTANCE_FRACTION of the image
        self._cache: _Encoded | None = None
        #: who reads the warnings ("python", "cli", "http"): they name the switch that reader can use
        self.surface = "python"
        if compile:
            self._compile()

    # ---- construction ---------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, name_or_path: str | Path = DEFAULT_MODEL, device: str | torch.device = "auto",
                        dtype: torch.dtype | str | None = "auto", compile: bool = False) -> "Segmenter":
        """A bundled model name, 'zeroshot' (training-free), a published variant (downloaded on first
        use), a checkpoint path or a folder `sspsam export onnx` wrote (see :meth:`Predictor.resolve`).

        ``dtype`` (torch.bfloat16 / torch.float16) and ``compile`` as in :class:`Segmenter`; an
        ONNX folder runs its graphs on ONNX Runtime in fp32 (the fast CPU path), with as many
        intra-op threads as torch has (``--threads``)."""
        kind, path, name = cls.resolve(name_or_path)
        if kind == "training-free":  # CLIP + SAM from the cache
            from sspsam.predict.zeroshot_res import ZeroShotSegmenter

            return ZeroShotSegmenter.from_pretrained(name, device)
        if kind == "onnx":
            from sspsam.predict.onnx_runtime import load_graphs

            if str(dtype).lower().replace("torch.", "") not in ("none", "auto", "fp32", "float32") or compile:
                raise ConfigError("an ONNX export runs in fp32 on ONNX Runtime: dtype and compile apply to PyTorch models")
            graphs = load_graphs(path, device=device)
            return cls(graphs, "cpu", graphs.manifest["model"], graphs.manifest.get("meta"))
        return cls._from_checkpoint(path, device, name, dtype=dtype, compile=compile)

    @classmethod
    def _other_command(cls) -> str:
        return "it does open-vocabulary semantic segmentation (class names); use `sspsam ovss` / OVSS"

    @classmethod
    def _unknown(cls, name: str, configs: list[str]) -> str:
        if name in OVSS_BUNDLED:
            return (f"'{name}' is an open-vocabulary (OVSS) model, not a referring one: use it with "
                    f"`sspsam ovss`; referring models: {', '.join(cls.BUNDLED)}, zeroshot, or a checkpoint path")
        return (f"unknown model '{name}': use a checkpoint path, a bundled model ({', '.join(cls.BUNDLED)}) "
                f"or a variant ({', '.join(c for c in configs if c != 'ssp-sam-tiny')})")

    def clear_cache(self) -> None:
        """Forget the cached image features (the next call encodes its image again)."""
        self._cache = None

    def _warm_up(self) -> None:
        self.segment(np.full((64, 64, 3), 128, np.uint8), "warm up")

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
        clip_x = self.model.clip_input(rgbs, self.device)
        with self._autocast():
            feats = self.model.encode_image(x, valid, clip_images=clip_x)
        return [_Encoded(k, _slice_features(feats, b), i[2]) for b, (k, i) in enumerate(zip(keys, inputs))]

    @torch.inference_mode()
    def segment(self, image: ImageLike | Sequence[ImageLike], text_or_texts: str | list[str] | list[list[str]],
                batch_size: int = 16, image_batch_size: int = 8, return_tensors: str = "np",
                allow_urls: bool = False, *, allow_unknown_words: bool = False, mask_threshold: float | None = None,
                no_target_threshold: float | None = None, return_logits: bool = False,
                points=None, point_labels=None, boxes=None) -> Segmentation | list[Segmentation]:
        """Segment what each phrase refers to.

        ``image``: a path, bytes, PIL image, numpy HWC array, torch tensor (CHW or HWC, uint8 or
        float in [0, 1]), an http(s) URL when ``allow_urls`` — or a list of those (or a [B, C, H, W]
        tensor), which returns a list of :class:`Segmentation`, one per image, with the image
        towers run ``image_batch_size`` images at a time. ``text_or_texts``: a phrase, a list of
        phrases (shared by every image), or with a list of images one list of phrases per image.
        ``batch_size``: phrases decoded at once. ``return_tensors``: "np" (numpy) or "pt" (torch
        tensors on the model's device).

        ``allow_unknown_words``: a model that records its vocabulary (the bundled demo) answers a
        phrase with no word it knows "no match" (with a warning) instead of guessing; True asks it
        anyway. ``mask_threshold`` (a logit; default the model's, 0 = probability 0.5) and
        ``no_target_threshold`` (the no-target probability above which a phrase is "no match")
        override the model's settings for this call only. ``return_logits``: also return
        ``res.logits``, float32 [N, H, W] mask logits at the original size.

        ``points`` ([K, 2] x, y in original pixels, or one list per phrase) with ``point_labels``
        ([K], 1 = on the object, 0 = not; default all 1) and ``boxes`` ([4] or [N, 4] x0, y0, x1,
        y1): clicks that refine each phrase's mask. They go through SAM's prompt encoder and join
        the phrase's prompt tokens in the mask decoder, as a SAM click would; the mask is then
        kept to the parts the positive clicks touch and the box holds, so a model whose decoder
        never saw a click (the demo) still follows them. One image only.
        """
        if return_tensors not in ("np", "pt"):
            raise ValueError(f"return_tensors must be 'np' or 'pt', got {return_tensors!r}")
        opts = dict(allow_unknown_words=allow_unknown_words, mask_threshold=mask_threshold,
                    no_target_threshold=no_target_threshold, return_logits=return_logits)
        if is_batch(image):
            if points is not None or boxes is not None:
                raise TextError("points= and boxes= refine one image's masks: call segment once per image")
            return self.segment_batch(list(image), text_or_texts, batch_size, image_batch_size, return_tensors, allow_urls, **opts)
        phrases = clean_phrases(text_or_texts)
        rgb = self.set_image(image, len(phrases), allow_urls=allow_urls)
        clicks = None
        if points is not None or boxes is not None:
            from sspsam.predict.clicks import parse_clicks

            clicks = parse_clicks(points, point_labels, boxes, len(phrases), rgb.shape[:2])
        return self._decode_phrases(self._cache, rgb, phrases, batch_size, return_tensors, opts, clicks)

    def track(self, frames, phrases: str | list[str], image_batch_size: int = 8, lost_frames: int = 30,
              min_score: float = 0.25):
        """Segment a video and follow each phrase's instances through it: an iterator of one
        :class:`Segmentation` per frame, whose ``extras["track_ids"]`` gives per phrase the track id
        of each instance (see :mod:`sspsam.predict.track`). ``frames``: a video file path (decoded
        with PyAV, checked whole first) or an iterable of images. Lazy, so a long video is never
        held in memory; needs ``sspsam[video]``."""
        from sspsam.predict.track import track

        return track(self, frames, phrases, image_batch_size, lost_frames, min_score)

    @torch.inference_mode()
    def segment_batch(self, images: Sequence[ImageLike], texts: str | list[str] | list[list[str]], batch_size: int = 16,
                      image_batch_size: int = 8, return_tensors: str = "np", allow_urls: bool = False,
                      **opts) -> list[Segmentation]:
        """A list of images: one :class:`Segmentation` each. ``texts``: phrases shared by every
        image, or one list per image; the image towers run ``image_batch_size`` images at a time;
        ``opts`` as :meth:`segment`'s (allow_unknown_words, mask_threshold, …). ``segment`` with
        a list comes here."""
        if return_tensors not in ("np", "pt"):
            raise ValueError(f"return_tensors must be 'np' or 'pt', got {return_tensors!r}")
        images = list(images)
        if not images:
            return []
        texts = per_image(images, texts, "phrase")
        shared = all(t is texts[0] for t in texts)
        phrase_lists = [clean_phrases(texts[0])] * len(images) if shared else [clean_phrases(t) for t in texts]
        rgbs = [load_image(im, len(p), allow_urls=allow_urls) for im, p in zip(images, phrase_lists)]
        out = []
        for i in range(0, len(rgbs), max(1, image_batch_size)):
            chunk = rgbs[i : i + image_batch_size]
            for rgb, enc, phrases in zip(chunk, self._encode(chunk, [image_key(r) for r in chunk]), phrase_lists[i:]):
                out.append(self._decode_phrases(enc, rgb, phrases, batch_size, return_tensors, opts))
        return out

    def image_warnings(self, rgb: np.ndarray) -> list[str]:
        """What every answer on this image must carry: random weights, an image unlike the
        model's training data (worked out once per image: the caches keep it)."""
        return model_warnings(self.name, self.model) + domain_warnings(self.name, self.domain, rgb, "segment")

    def _object_masks(self, enc: _Encoded) -> np.ndarray:
        """bool [M, H, W]: the model's masks for the single-object phrases its checkpoint lists
        (``meta["vocabulary"]["objects"]``), once per image: where a click falls outside a
        phrase's mask, the object under it comes from here (see :mod:`sspsam.predict.clicks`)."""
        if getattr(enc, "objects", None) is None:
            vocab = self.meta.get("vocabulary")
            phrases = [str(p) for p in (vocab.get("objects") or [])] if isinstance(vocab, dict) else []
            h, w = enc.box.orig_hw
            enc.objects = np.zeros((0, h, w), bool)
            if phrases:
                enc.objects = self._decode_phrases(enc, None, phrases, 32, "np", {"allow_unknown_words": True}).masks
        return enc.objects

    def _decode_phrases(self, enc: _Encoded, rgb: np.ndarray, phrases: list[str], batch_size: int,
                        return_tensors: str, opts: dict | None = None, clicks=None) -> Segmentation:
        from sspsam.predict.vocabulary import check_phrases

        opts = opts or {}
        if enc.warnings is None:
            enc.warnings = self.image_warnings(rgb)
        refuse, phrase_warnings = check_phrases(self.name, getattr(self, "vocabulary", None), phrases,
                                                bool(opts.get("allow_unknown_words")), self.surface)
        thr = self.mask_threshold if opts.get("mask_threshold") is None else float(opts["mask_threshold"])
        nt_thr = self.no_target_prob if opts.get("no_target_threshold") is None else float(opts["no_target_threshold"])
        asked = [i for i, r in enumerate(refuse) if not r]
        h, w = enc.box.orig_hw
        n = len(phrases)
        masks = torch.zeros((n, h, w), dtype=torch.bool, device=self.device)
        scores = torch.zeros(n, dtype=torch.float32, device=self.device)
        no_target = torch.ones(n, dtype=torch.bool, device=self.device)
        nt_prob = torch.ones(n, dtype=torch.float32, device=self.device)
        logits = torch.full((n, h, w), float("-inf"), device=self.device) if opts.get("return_logits") else None
        empty = Instances(np.zeros((0, h, w), bool), np.zeros((0, 4), np.float32), np.zeros(0, np.float32))
        instances = [empty] * n
        has_head = getattr(self.model, "no_target_head", None) is not None  # until a decode says
        with self._autocast():
            for i in range(0, len(asked), batch_size):
                idx = asked[i : i + batch_size]
                chunk = [phrases[j] for j in idx]
                tokens = self.model.tokenize(chunk).to(self.device)
                text = self.model.encode_text(tokens)
                image_index = torch.zeros(len(chunk), dtype=torch.long, device=self.device)
                if clicks is not None and self.meta.get("prompt_clicks", True):
                    from sspsam.predict.clicks import decode_with_clicks

                    out = decode_with_clicks(self.model, enc, text, [clicks[j] for j in idx], image_index)
                else:
                    out = self.model.decode(enc.features, text, image_index)
                chunk_clicks = None if clicks is None else [(clicks[j], lambda: self._object_masks(enc)) for j in idx]
                m, s, nt, p, inst, lg = self._postprocess(out, enc.box, thr, nt_thr, logits is not None, chunk_clicks)
                sel = torch.tensor(idx, device=self.device)
                masks[sel], scores[sel], no_target[sel] = m, s, nt
                has_head = p is not None
                if p is not None:
                    nt_prob[sel] = p.float()
                if lg is not None:
                    logits[sel] = lg
                for j, ins in zip(idx, inst):
                    instances[j] = ins
        res = Segmentation(
            phrases=phrases,
            masks=masks,
            scores=scores,
            no_target=no_target,
            no_target_prob=nt_prob if has_head else None,
            warnings=list(enc.warnings),
            instances=instances,
            phrase_warnings=phrase_warnings,
            logits=logits,
        )
        return as_tensors(res, self.device) if return_tensors == "pt" else as_numpy(res)

    def _postprocess(self, out: dict, box: Letterbox, mask_threshold: float | None = None, no_target_prob: float | None = None,
                     keep_logits: bool = False, clicks=None):
        """Low-res logits → (union masks, scores, no-target, no-target prob, instances, full-size
        logits or None), torch on the device."""
        thr = self.mask_threshold if mask_threshold is None else mask_threshold
        nt_thr = self.no_target_prob if no_target_prob is None else no_target_prob
        low = out["mask_logits"][:, 0].float()
        check_finite(self.name, low, out["iou"], out.get("no_target_logit"))
        # The official GRES rule: fewer than N positive pixels at 512x512 means "no target".
        sq = mask_logits_512(low[:, None], self.model.image_size)[:, 0]
        sh, sw = (round(v * 512 / box.size) for v in box.scaled_hw)
        area512 = (sq[:, :sh, :sw] > thr).sum((1, 2))
        # The score is the mask's own confidence (its mean foreground probability), not SAM's IoU head:
        # SSP-SAM's recipe never trains that head (the official code ignores it), so its output says
        # nothing about these masks (a from-scratch model answers 0.00 for a right mask).
        fg = low > thr
        p = low.sigmoid()
        conf = torch.where(fg.any(dim=(1, 2)), (p * fg).sum((1, 2)) / fg.sum((1, 2)).clamp(min=1), p.amax(dim=(1, 2)))
        if "no_target_logit" in out:
            prob = out["no_target_logit"].float().sigmoid()
            no_target = prob > nt_thr
            if clicks is not None:  # a positive click says the object is there: only an empty mask is "no match"
                no_target &= torch.tensor([c is None or not len(c.positive) for c, _ in clicks], device=no_target.device)
            score = conf * (1 - prob)
            keep = 1 - prob
        else:
            prob = None
            no_target = area512 < self.no_target_min_pixels
            score = conf
            keep = torch.ones_like(conf)
        # one phrase at a time: full-size float logits for a whole chunk would be chunk × pixels × 4 bytes
        full, instances, full_logits = [], [], []
        h, w = box.orig_hw
        min_area = min_instance_area(h, w) if self.min_instance_area is None else int(self.min_instance_area)
        for i in range(len(low)):
            logit = unletterbox_logits(low[i : i + 1], box)[0]
            m = logit > thr
            if clicks is not None and clicks[i][0] is not None:
                from sspsam.predict.clicks import keep_clicked

                m = keep_clicked(m, *clicks[i])
            if keep_logits:
                full_logits.append(logit.float())
            # A mask that vanishes at the original size (tiny image, thin sliver) is no answer: never "found" and empty.
            if bool(no_target[i]) or not bool(m.any()):
                m = torch.zeros_like(m)
                no_target[i] = True
                instances.append(Instances(np.zeros((0, h, w), bool), np.zeros((0, 4), np.float32), np.zeros(0, np.float32)))
            else:
                instances.append(instances_of(m.cpu().numpy(), float(score[i]), min_area, logit.sigmoid().cpu().numpy(), float(keep[i])))
            full.append(m)
        return (torch.stack(full), score.float(), no_target, prob, instances,
                torch.stack(full_logits) if keep_logits else None)


def _slice_features(feats, b: int):
    """Image ``b`` of a batched features object (a dataclass of [B, …] tensors)."""
    from dataclasses import fields, replace

    return replace(feats, **{f.name: getattr(feats, f.name)[b : b + 1] for f in fields(feats)
                             if isinstance(getattr(feats, f.name), torch.Tensor)})
