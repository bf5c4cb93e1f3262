"""OVSS: the public open-vocabulary semantic segmentation API. An image and class names in; a
label map in the image's original size out.

One predictor serves every OVSS method through one contract,
:class:`sspsam.models.protocols.OVSSModel`: ``encode_image(images, valid_hw)`` once per image,
``decode_classes(features, class_emb) -> {"logits": [B,K,h,w], ...}`` per class list (a model with
only ``forward`` is seen through :class:`~sspsam.models.protocols.WholeForward`, whose image side
is the input itself). Class embeddings are cached per list.

Large images are segmented with sliding windows as the trained-OVSS protocol does (CAT-Seg:
windows of the model input, overlap 1/3, window logits averaged, then averaged with a global
view of the whole image); it switches on by itself when the long side exceeds
``inference.slide_above`` × the model input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from sspsam.config import load_config
from sspsam.errors import CheckpointError, TextError
from sspsam.io.images import ImageLike, load_image
from sspsam.io.transforms import Letterbox, image_key, letterbox_image, to_tensor
from sspsam.models import registry
from sspsam.models.protocols import as_ovss_model
from sspsam.predict.results import SemanticSegmentation
from sspsam.predict.work_limit import MAX_GFLOP_ENV, OVERLAP, WorkLimit, default_max_gflop, window_starts  # noqa: F401 (re-exported)
from sspsam.predict.base import OVSS_BUNDLED, REFERRING_BUNDLED, Predictor, check_finite, domain_warnings, is_batch, per_image

MAX_CLASSES = 1000
MAX_CLASS_CHARS = 200
DEFAULT_MODEL = "ovss-shapes-demo"
BUNDLED = OVSS_BUNDLED
PROTOCOLS = ("sspsam", "sclip")
_CHUNK_PIXELS = 64_000_000  # class×pixel floats upsampled at once to the original size (256 MB)
def clean_classes(classes: str | list[str]) -> list[str]:
    """'sky, road,car' or a list → stripped names; blank items are skipped, a class given twice
    (case-insensitive) is refused."""
    if isinstance(classes, str):
        items = classes.replace("\n", ",").split(",")
    elif isinstance(classes, (list, tuple)):
        items = list(classes)
    else:
        raise TextError(f"classes must be a comma-separated string or a list of names, got {type(classes).__name__}")
    out, seen = [], {}
    for c in items:
        if not isinstance(c, str):
            raise TextError(f"a class name must be text, got {type(c).__name__}")
        clean = " ".join("".join(ch if ch.isprintable() else " " for ch in c).split())
        if not clean:
            continue
        if clean.lower() in seen:  # two labels for one class: which would its pixels get?
            raise TextError(f"class '{clean}' is given twice" + (f" (as '{seen[clean.lower()]}')" if seen[clean.lower()] != clean else "")
                            + "; give each class once")
        if len(clean) > MAX_CLASS_CHARS:
            raise TextError(f"class name '{clean[:40]}…' is {len(clean)} characters long; at most {MAX_CLASS_CHARS} are accepted")
        seen[clean.lower()] = clean
        out.append(clean)
    if not out:
        raise TextError('no class names given: list what to label, e.g. "sky, road, car, person"')
    if len(out) > MAX_CLASSES:
        raise TextError(f"{len(out)} classes given; at most {MAX_CLASSES} are accepted")
    return out


@dataclass
class _View:
    """One model input cut from the image: the global letterbox or a sliding window."""

    features: object  # the model's encode_image output
    y0: int  # window position in the working image (0 for the global view)
    x0: int
    hw: tuple[int, int]  # content size inside the S×S input
    is_global: bool


@dataclass
class _ImageEntry:
    key: str
    orig_hw: tuple[int, int]
    work_hw: tuple[int, int]  # image size at which windows are cut (= global letterbox content without sliding)
    views: list[_View]


class OVSS(WorkLimit, Predictor):
    """Open-vocabulary semantic segmentation: an image (or a list) and class names in, one label
    per pixel out (:class:`SemanticSegmentation`). ESC-Net, SAM-MI or the training-free path.

    Where a Hugging Face segmentation pipeline or a CAT-Seg demo fixes the label set at training
    time, here the classes are free text given per call; ``set_image`` caches the image side as
    SAM's predictor does, so a new class list re-runs only the class-dependent part (split models).
    ``device``: 'auto' (CUDA, then MPS, then CPU), a name or a torch.device.
    """

    BUNDLED = OVSS_BUNDLED
    COMMAND = "ovss"
    TASK = "an OVSS"
    HOT_MODULES = ("clip.encode_image", "sam.image_encoder")

    def __init__(self, model, device: str | torch.device = "auto", name: str | None = None, meta: dict | None = None,
                 protocol: str = "sspsam", sclip_options: dict | None = None,
                 dtype: torch.dtype | str | None = "auto", compile: bool = False, max_gflop: float | None | str = "auto"):
        """``protocol``: 'sspsam' (the model's own inference: letterbox, windows when large) or
        'sclip' (SCLIP's training-free protocol on the model's CLIP, see :mod:`sspsam.models.zeroshot.sclip`;
        ``sclip_options`` go to :class:`~sspsam.models.zeroshot.sclip.SCLIPProtocol`, e.g. prob_thd, area_thd).
        ``dtype``: 'auto' (default), torch.float32, torch.bfloat16 or torch.float16, as for :class:`Segmenter`
        (norms stay fp32, the model runs under autocast; logits and labels come out fp32);
        ``compile``: wrap the image towers with torch.compile, falling back to eager with a warning.
        ``max_gflop``: the most model work one image's ``segment`` may ask for (see :meth:`cost`);
        'auto' = ``SSPSAM_MAX_OVSS_GFLOP`` or the device's default, None = unbounded."""
        if protocol not in PROTOCOLS:
            raise ValueError(f"unknown OVSS inference protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
        if protocol == "sclip" and not hasattr(model, "clip"):
            raise CheckpointError("the SCLIP protocol needs a model with a CLIP backbone (zeroshot, escnet, sam-mi)")
        self.protocol, self.sclip_options = protocol, dict(sclip_options or {})
        self._sclip = None
        kind = getattr(model, "config", {}).get("model")
        if kind not in self.model_types():
            raise CheckpointError(
                f"model '{name or getattr(model, 'config', {}).get('name')}' is a '{kind}' model, not an OVSS model "
                f"({', '.join(self.model_types())}); referring models go through `sspsam segment` / Segmenter"
            )
        self._place(model, device, dtype)
        self._identify(model, name, meta, kind)
        inf = model.config.get("inference", {})
        self.slide_above = float(inf.get("slide_above", 1.5))
        self.slide_max_scale = float(inf.get("slide_max_scale", 1.67))
        self._image: _ImageEntry | None = None
        self._classes: tuple[tuple[str, ...], torch.Tensor] | None = None
        self._logits: tuple[str, tuple[str, ...], torch.Tensor] | None = None
        self.surface = "python"  # who reads the errors and warnings: "python", "cli", "http"
        self.max_gflop = default_max_gflop(self.device) if max_gflop == "auto" else max_gflop
        self._unit_gflop: tuple[float, float, float] | None = None
        if compile:
            self._compile()

    # ---- construction ---------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, name_or_path: str | Path = DEFAULT_MODEL, device: str | torch.device = "auto",
                        dtype: torch.dtype | str | None = "auto", compile: bool = False) -> "OVSS":
        """A bundled model, 'zeroshot' (CLIP + SAM from the weights cache), a published OVSS variant
        (downloaded on first use) or an sspsam checkpoint path (see :meth:`Predictor.resolve`).
        ``dtype`` and ``compile`` as in :class:`OVSS`."""
        kind, path, name = cls.resolve(name_or_path)
        if kind == "training-free":
            from sspsam.models.build import load_zeroshot

            return cls(load_zeroshot(name), device, name, dtype=dtype, compile=compile)
        return cls._from_checkpoint(path, device, name, dtype=dtype, compile=compile)

    def _warm_up(self) -> None:
        self.segment(np.full((64, 64, 3), 128, np.uint8), ["background", "thing"])

    @classmethod
    def _other_command(cls) -> str:
        return "use `sspsam segment` for it"

    @classmethod
    def _unknown(cls, name: str, configs: list[str]) -> str:
        ovss = [c for c in configs if not c.endswith("-tiny") and registry.for_config(load_config(c)).name in cls.model_types()]
        if name in REFERRING_BUNDLED:
            return (f"'{name}' is a referring-segmentation model, not an OVSS model: use it with "
                    f"`sspsam segment`; OVSS models: {', '.join([*cls.BUNDLED, *ovss])}")
        return (f"unknown OVSS model '{name}': use a checkpoint path, a bundled model ({', '.join(cls.BUNDLED)}) "
                f"or a variant ({', '.join(ovss) or 'none installed'})")

    def clear_cache(self) -> None:
        """Forget the cached image, class and logit features."""
        self._image = self._classes = self._logits = self._sclip = None

    # ---- caches ---------------------------------------------------------------------------
    @torch.inference_mode()
    def class_embeddings(self, classes: list[str]) -> torch.Tensor:
        """float [K, E] text embeddings of ``classes`` on the model's device, cached for the last
        list (a service asks the same classes of many images)."""
        key = tuple(classes)
        if self._classes is None or self._classes[0] != key:
            self._classes = (key, self._embed(list(classes)).to(self.device))
        return self._classes[1]

    @torch.inference_mode()
    def set_image(self, image: ImageLike, slide: bool | None = None, items: int = 1, allow_urls: bool = False) -> np.ndarray:
        """Encode an image's views once; later ``segment`` calls on the same pixels reuse them.
        Returns the image as loaded: uint8 RGB [H, W, 3]."""
        rgb = load_image(image, items, allow_urls=allow_urls)
        key, orig_hw, work_hw, pieces = self._cut(rgb, slide)
        if self._image is not None and self._image.key == key:
            return rgb
        self._image = _ImageEntry(key, orig_hw, work_hw, [self._view(*p) for p in pieces])
        self._logits = None
        return rgb

    def _cut(self, rgb: np.ndarray, slide: bool | None):
        """(cache key, original size, working size, views to run: (square, hw, y0, x0, is_global))."""
        s = self.model.image_size
        h, w = rgb.shape[:2]
        do_slide = (max(h, w) > self.slide_above * s) if slide is None else bool(slide)
        key = image_key(rgb) + f"|slide={do_slide}"
        square, box = letterbox_image(rgb, s)
        pieces = [(square, box.scaled_hw, 0, 0, True)]
        work_hw = box.scaled_hw
        if do_slide:
            work_long = min(max(h, w, s), int(round(self.slide_max_scale * s)))
            work_hw = Letterbox.fit((h, w), work_long).scaled_hw
            work = rgb if work_hw == (h, w) else np.asarray(Image.fromarray(rgb).resize(work_hw[::-1], Image.BILINEAR))
            for y0 in window_starts(work_hw[0], s):
                for x0 in window_starts(work_hw[1], s):
                    crop = work[y0 : y0 + s, x0 : x0 + s]
                    pad = np.zeros((s, s, 3), np.uint8)
                    pad[: crop.shape[0], : crop.shape[1]] = crop
                    pieces.append((pad, crop.shape[:2], y0, x0, False))
        return key, (h, w), work_hw, pieces

    @property
    def net(self):
        """The model as :class:`~sspsam.models.protocols.OVSSModel` (the one run path)."""
        if getattr(self, "_net", None) is None or getattr(self._net, "model", self._net) is not self.model:
            self._net = as_ovss_model(self.model)
        return self._net

    def _encode(self, pieces: list) -> object:
        """Views (square, hw, …) → the model's image features for all of them at once."""
        x = torch.cat([to_tensor(sq)[None] for sq, *_ in pieces]).to(self.device)
        valid = torch.tensor([list(hw) for _, hw, *_ in pieces], device=self.device)
        with self._autocast():
            return self.net.encode_image(x, valid)

    def _decode(self, features, emb: torch.Tensor) -> torch.Tensor:
        """Image features × class embeddings → float logits [B, K, o, o], checked finite."""
        with self._autocast():
            out = self.net.decode_classes(features, emb)
        logits = out["logits"].float()
        check_finite(self.name, logits)
        return logits

    def _embed(self, classes: list[str]) -> torch.Tensor:
        with self._autocast():
            return self.net.class_embeddings(list(classes))

    def _view(self, square: np.ndarray, hw: tuple[int, int], y0: int, x0: int, is_global: bool) -> _View:
        return _View(self._encode([(square, hw)]), y0, x0, (int(hw[0]), int(hw[1])), is_global)

    def _run(self, view: _View, emb: torch.Tensor) -> torch.Tensor:
        return self._decode(view.features, emb)[0]

    # ---- inference ------------------------------------------------------------------------
    @property
    def default_classes(self) -> list[str] | None:
        """The classes a model trained on a fixed list was trained on (its checkpoint's), used
        when ``segment`` is given none; None for an open-vocabulary model."""
        for key in ("classes", "example_classes"):
            names = self.meta.get(key)
            if isinstance(names, (list, tuple)) and names and all(isinstance(c, str) for c in names):
                return list(names)
        return None

    def _classes_or_default(self, classes):
        if classes is not None:
            return classes
        if self.default_classes is None:
            raise TextError(f"model '{self.name}' has no class list of its own: name the classes to label, e.g. "
                            + ('--classes "sky, road, car"' if self.surface == "cli" else 'segment(image, ["sky", "road", "car"])'))
        return self.default_classes

    @torch.inference_mode()
    def segment(self, image: ImageLike | Sequence[ImageLike], classes: str | list[str] | list[list[str]] | None = None,
                slide: bool | None = None, image_batch_size: int = 8, return_tensors: str = "np",
                allow_urls: bool = False) -> SemanticSegmentation | list[SemanticSegmentation]:
        """Label every pixel with one of ``classes``.

        ``image``: a path, bytes, PIL image, numpy HWC array, torch tensor (CHW or HWC, uint8 or
        float in [0, 1]), an http(s) URL when ``allow_urls`` — or a list of those (or a [B, C, H, W]
        tensor): then a list of results, one per image, with the model run on ``image_batch_size``
        views (letterboxed images and sliding windows) at a time. ``classes``: names as a list or
        one comma-separated string, shared by every image, or with a list of images one list per
        image. ``slide``: sliding windows; None = automatic by image size. ``return_tensors``:
        "np" (numpy) or "pt" (``labels``/``scores`` as torch tensors on the model's device).
        """
        if return_tensors not in ("np", "pt"):
            raise ValueError(f"return_tensors must be 'np' or 'pt', got {return_tensors!r}")
        classes = self._classes_or_default(classes)
        if is_batch(image):
            return self.segment_batch(list(image), classes, slide, image_batch_size, return_tensors, allow_urls)
        if self.protocol == "sclip":
            return _as_output(self._segment_sclip(image, classes, allow_urls), return_tensors, self.device)
        names = clean_classes(classes)
        rgb = load_image(image, len(names), allow_urls=allow_urls)
        self.check_cost(rgb.shape[:2], len(names), slide)
        rgb = self.set_image(rgb, slide, items=len(names))
        canvas, q = self._canvas(names)
        labels, scores = self._finalise(canvas, q)
        return _as_output(self._result(names, labels, scores, rgb), return_tensors, self.device)

    def _result(self, names: list[str], labels: np.ndarray, scores: np.ndarray | None, rgb: np.ndarray) -> SemanticSegmentation:
        h, w = labels.shape
        counts = np.bincount(labels.ravel(), minlength=len(names))
        shares = {c: float(n) / (h * w) for c, n in zip(names, counts)}
        return SemanticSegmentation(list(names), labels, scores, shares, self.warnings_for(rgb, names))

    def warnings_for(self, rgb: np.ndarray, names: list[str]) -> list[str]:
        """Random weights, an image unlike the model's training data, classes outside its vocabulary."""
        from sspsam.predict.base import model_warnings
        from sspsam.predict.vocabulary import check_classes

        return (model_warnings(self.name, self.model) + domain_warnings(self.name, self.domain, rgb, "ovss")
                + check_classes(self.name, self.vocabulary, names))

    @torch.inference_mode()
    def segment_batch(self, images: Sequence[ImageLike], classes: str | list[str] | list[list[str]] | None = None,
                      slide: bool | None = None, image_batch_size: int = 8, return_tensors: str = "np",
                      allow_urls: bool = False) -> list[SemanticSegmentation]:
        """A list of images: one :class:`SemanticSegmentation` each; ``classes`` shared by every
        image or one list per image; the model runs ``image_batch_size`` views at a time.
        ``segment`` with a list comes here."""
        if return_tensors not in ("np", "pt"):
            raise ValueError(f"return_tensors must be 'np' or 'pt', got {return_tensors!r}")
        out = self._segment_batch(list(images), self._classes_or_default(classes), slide, image_batch_size, allow_urls)
        return [_as_output(r, return_tensors, self.device) for r in out]

    def _segment_batch(self, images: list, classes, slide: bool | None, image_batch_size: int,
                       allow_urls: bool) -> list[SemanticSegmentation]:
        if not images:
            return []
        lists = per_image(images, classes, "class")
        if self.protocol == "sclip":
            return [self._segment_sclip(im, c, allow_urls) for im, c in zip(images, lists)]
        shared = all(c is lists[0] for c in lists)
        names = [clean_classes(lists[0])] * len(images) if shared else [clean_classes(c) for c in lists]
        rgbs = [load_image(im, len(n), allow_urls=allow_urls) for im, n in zip(images, names)]
        for rgb, n in zip(rgbs, names):
            self.check_cost(rgb.shape[:2], len(n), slide)
        cuts = [self._cut(rgb, slide) for rgb in rgbs]
        groups: dict[tuple[str, ...], list[int]] = {}
        for i, n in enumerate(names):
            groups.setdefault(tuple(n), []).append(i)
        out: list[SemanticSegmentation | None] = [None] * len(images)
        step = max(1, image_batch_size)
        for key, idx in groups.items():
            emb = self.class_embeddings(list(key))
            for c0 in range(0, len(idx), step):
                chunk = idx[c0 : c0 + step]
                pieces = [p for i in chunk for p in cuts[i][3]]
                logits = [lo for v0 in range(0, len(pieces), step) for lo in self._run_pieces(pieces[v0 : v0 + step], emb)]
                at = 0
                for i in chunk:
                    key_i, orig_hw, work_hw, mine = cuts[i]
                    ent = _ImageEntry(key_i, orig_hw, work_hw, [_View(None, y0, x0, (int(hw[0]), int(hw[1])), g)
                                                                for _, hw, y0, x0, g in mine])
                    canvas, q = _merge_views(ent, logits[at : at + len(mine)], self.model.image_size)
                    at += len(mine)
                    labels, scores = self._finalise(canvas, q, ent)
                    out[i] = self._result(list(key), labels, scores, rgbs[i])
        return out

    def _run_pieces(self, pieces: list, emb: torch.Tensor) -> list[torch.Tensor]:
        """Several views through the model at once (the image towers batched): logits [K, o, o] each."""
        return list(self._decode(self._encode(pieces), emb))

    def _segment_sclip(self, image: ImageLike, classes: str | list[str], allow_urls: bool = False) -> SemanticSegmentation:
        """SCLIP's protocol. ``classes``: a list with one class per entry (synonyms split on ", "),
        SCLIP's class-file text (one class per line), or comma-separated single names."""
        from sspsam.models.zeroshot.sclip import SCLIPProtocol

        if isinstance(classes, str) and "\n" not in classes.strip():
            classes = clean_classes(classes)
        key = tuple(classes.splitlines()) if isinstance(classes, str) else tuple(classes)
        rgb = load_image(image, allow_urls=allow_urls)
        with self._autocast():
            if self._sclip is None or self._sclip[0] != key:
                self._sclip = (key, SCLIPProtocol(self.model.clip, list(key), **self.sclip_options))
            proto = self._sclip[1]
            labels, scores = proto(rgb)
        h, w = labels.shape
        counts = np.bincount(labels.ravel(), minlength=proto.num_classes)
        shares = {c: float(n) / (h * w) for c, n in zip(proto.class_names, counts)}
        return SemanticSegmentation(list(proto.class_names), labels, scores, shares,
                                    self.warnings_for(rgb, list(proto.class_names)))

    def _canvas(self, names: list[str]) -> tuple[torch.Tensor, float]:
        """Logits [K, ch, cw] over the working image at the model's output resolution, and the
        number of working-image pixels per canvas pixel."""
        ent = self._image
        if self._logits is not None and self._logits[0] == ent.key and self._logits[1] == tuple(names):
            return self._logits[2]
        emb = self.class_embeddings(names)
        out = _merge_views(ent, [self._run(v, emb) for v in ent.views], self.model.image_size)
        self._logits = (ent.key, tuple(names), out)
        return out

    def _finalise(self, canvas: torch.Tensor, q: float, ent: _ImageEntry | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Upsample to the original size class-chunk by chunk: arg-max label and max softmax prob.

        The running maximum, label and log-sum-exp are updated in place and a one-class chunk skips
        the reductions over its single class: on a 90 MP image each full-size buffer is 360 MB, and
        the fresh tensors ``torch.where`` and the int64 arg-max made per chunk took the peak past
        4 GB. The arithmetic is the same, so the labels and scores are too."""
        ent = self._image if ent is None else ent
        h, w = ent.orig_hw
        wh, ww = ent.work_hw
        up_hw = (round(canvas.shape[1] * q), round(canvas.shape[2] * q))
        k = canvas.shape[0]
        chunk = max(1, _CHUNK_PIXELS // max(1, h * w + up_hw[0] * up_hw[1]))
        best = torch.full((h, w), -torch.inf, device=canvas.device)
        label = torch.zeros((h, w), dtype=torch.int32, device=canvas.device)
        lse = torch.full((h, w), -torch.inf, device=canvas.device)
        for i in range(0, k, chunk):
            c = canvas[i : i + chunk][None]
            up = F.interpolate(c, size=up_hw, mode="bilinear", align_corners=False)[..., :wh, :ww]
            if (wh, ww) != (h, w):
                up = F.interpolate(up, size=(h, w), mode="bilinear", align_corners=False)
            up = up[0]
            if up.shape[0] == 1:
                m, a, sum_exp = up[0], None, up[0]  # max and log-sum-exp over one class: the class itself
            else:
                m, a = up.max(0)
                sum_exp = torch.logsumexp(up, 0)
            better = m > best
            if a is None:
                label.masked_fill_(better, i)
            else:
                torch.where(better, a.to(torch.int32) + i, label, out=label)
            del a
            torch.where(better, m, best, out=best)
            del better, m
            torch.logaddexp(lse, sum_exp, out=lse)
            del up, sum_exp
        score = best.sub_(lse).exp_()
        del lse
        return label.cpu().numpy(), score.float().cpu().numpy()


def _as_output(res: SemanticSegmentation, return_tensors: str, device: torch.device) -> SemanticSegmentation:
    """``return_tensors="pt"``: labels and scores as torch tensors on the model's device."""
    if return_tensors == "pt":
        res.labels = torch.as_tensor(np.asarray(res.labels)).to(device)
        res.scores = None if res.scores is None else torch.as_tensor(np.asarray(res.scores)).to(device)
    return res


def _merge_views(ent: _ImageEntry, logits: list[torch.Tensor], s: int) -> tuple[torch.Tensor, float]:
    """The global view's logits and the windows' (averaged where they overlap), averaged, on one
    canvas over the working image; and the working-image pixels per canvas pixel."""
    glob = logits[0]  # [K, o, o]
    q = s / glob.shape[-1]  # input pixels per output pixel
    ch, cw = (math.ceil(v / q) for v in ent.work_hw)
    gh, gw = (math.ceil(v / q) for v in ent.views[0].hw)
    g = glob[:, :gh, :gw]
    g = g if (gh, gw) == (ch, cw) else F.interpolate(g[None], size=(ch, cw), mode="bilinear", align_corners=False)[0]
    windows = list(zip(ent.views[1:], logits[1:]))
    if windows:
        acc = torch.zeros((glob.shape[0], ch, cw), device=glob.device)
        cnt = torch.zeros((1, ch, cw), device=glob.device)
        for v, lo in windows:
            cy, cx = int(round(v.y0 / q)), int(round(v.x0 / q))
            vh, vw = min(math.ceil(v.hw[0] / q), ch - cy), min(math.ceil(v.hw[1] / q), cw - cx)
            acc[:, cy : cy + vh, cx : cx + vw] += lo[:, :vh, :vw]
            cnt[:, cy : cy + vh, cx : cx + vw] += 1
        g = (acc / cnt.clamp(min=1) + g) / 2
    return g, q
