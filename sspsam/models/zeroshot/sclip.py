"""SCLIP's training-free segmentation protocol (Wang et al., "SCLIP: Rethinking Self-Attention for
Dense Vision-Language Inference"), as its evaluation code runs it, so that numbers made here can
be compared with the paper's table:

1. class names: one class per line, synonyms separated by ", "; every name becomes a query
   (CLIP's 80 ImageNet templates, each embedding L2-normalised, averaged, normalised again);
2. the image is resized as mmseg's ``Resize(scale=(2048, 336), keep_ratio=True)`` does — mmcv's
   ``imrescale`` size arithmetic and OpenCV's ``INTER_LINEAR`` on uint8, reproduced bit for bit
   by :func:`resize_bilinear` (no OpenCV needed) — and normalised with SCLIP's constants;
3. sliding 224-pixel crops at stride 112 (mmseg's grid: the last crop is flush with the border),
   each crop's CSA patch features (``dense_mode: sclip``) × queries, bilinear to the crop, summed
   and divided by the overlap count, bilinear to the original image size;
4. ``softmax(40 · cosine)`` over the queries, max over each class's synonyms, optional area
   threshold (small non-background classes are dropped) and probability threshold (pixels below
   it become class 0, the background), arg-max.

It matches the golden output of SCLIP's ``CLIPForSegmentation`` (tests/test_golden_clip.py).
Departure: no PAMR refinement (SCLIP's default ``pamr_steps=0`` too).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from sspsam.backbones.clip import CLIPBackbone
from sspsam.errors import TextError
from sspsam.models.cost import IMAGENET_TEMPLATES, SCLIP_LOGIT_SCALE, class_embeddings, sclip_tokens

# SCLIP's SegDataPreProcessor constants (RGB, 0..255 scale). Not bit-identical to CLIP's
# 0.48145466·255 etc.: the input differs by up to ~1e-5 with CLIP's own.
SCLIP_MEAN = (122.771, 116.746, 104.094)
SCLIP_STD = (68.501, 66.632, 70.323)
SCLIP_SCALE = (2048, 336)  # mmseg Resize(scale=(long, short)) of SCLIP's VOC/Context/ADE/COCO-Object configs


def parse_class_names(lines: str | Sequence[str]) -> tuple[list[str], list[int]]:
    """SCLIP's class-name format → (query names, class index of each query).

    One class per line (or list entry); a line's synonyms are separated by ", " and each is a
    query of its own (VOC's background line lists dozens of stuff names)."""
    if isinstance(lines, str):
        lines = lines.splitlines()
    names, idx = [], []
    rows = [str(line).strip("\r\n") for line in lines]
    while rows and not rows[-1].strip():  # a trailing newline is not a class
        rows.pop()
    if not rows:
        raise TextError("no class names given: one class per line, synonyms separated by ', '")
    for i, row in enumerate(rows):
        syn = [s.strip() for s in row.split(", ")]
        if not all(syn):
            raise TextError(f"class line {i + 1} ({row!r}) has an empty name")
        names += syn
        idx += [i] * len(syn)
    return names, idx


def read_class_names(path: str | Path) -> tuple[list[str], list[int]]:
    """A SCLIP ``cls_*.txt`` file → (query names, class index of each query)."""
    path = Path(path)
    if not path.is_file():
        raise TextError(f"class-name file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError) as exc:
        raise TextError(f"class-name file {path} is not readable UTF-8 text ({exc.__class__.__name__})") from None
    return parse_class_names(text)


def rescale_size(h: int, w: int, scale: tuple[int, int] = SCLIP_SCALE) -> tuple[int, int]:
    """mmcv ``imrescale``: the largest size with the aspect ratio kept that fits long ≤ scale[0]
    and short ≤ scale[1] (so usually short = scale[1]); sides rounded half up."""
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(h, w), short_edge / min(h, w))
    return int(h * float(factor) + 0.5), int(w * float(factor) + 0.5)


def _linear_taps(src: int, dst: int, clamp: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """OpenCV's source indices and 11-bit fixed-point weights along one axis (``INTER_LINEAR``).

    The fraction is computed in float32 as OpenCV does; along x a tap left of the first or right
    of the last pixel is pinned there with weight 0, along y only the row index is clamped.
    """
    d = np.arange(dst, dtype=np.float64)
    f = ((d + 0.5) * (1.0 / (dst / src)) - 0.5).astype(np.float32)
    i = np.floor(f).astype(np.int64)
    f = (f - i.astype(np.float32)).astype(np.float32)
    if clamp:
        low, high = i < 0, i >= src - 1
        f[low | high] = 0
        i[low], i[high] = 0, src - 1
    w0 = np.rint((np.float32(1) - f) * np.float32(2048)).astype(np.int64)
    w1 = np.rint(f * np.float32(2048)).astype(np.int64)
    return np.clip(i, 0, src - 1), np.clip(i + 1, 0, src - 1), w0, w1


def resize_bilinear(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """uint8 [H,W,C] → [out_h,out_w,C], bit-identical to ``cv2.resize(..., INTER_LINEAR)`` (4.x, x86).

    SCLIP's numbers are made on OpenCV-resized images and PIL's bilinear differs by one grey
    level at ~20 % of the pixels, which moves the logits well past 1e-3. OpenCV interpolates rows
    with 11-bit weights into integers, then columns with its vectorised rounding
    ``(((r0 >> 4)·b0 >> 16) + ((r1 >> 4)·b1 >> 16) + 2) >> 2``; an exact half-size reduction is
    OpenCV's 2×2 area average instead.
    """
    if img.dtype != np.uint8 or img.ndim != 3:
        raise ValueError(f"resize_bilinear expects a uint8 [H,W,C] image, got {img.dtype} {img.shape}")
    h, w, c = img.shape
    if (h, w) == (out_h, out_w):
        return img.copy()
    if h == 2 * out_h and w == 2 * out_w:
        s = img.astype(np.int32)
        return ((s[0::2, 0::2] + s[0::2, 1::2] + s[1::2, 0::2] + s[1::2, 1::2] + 2) >> 2).astype(np.uint8)
    x0, x1, a0, a1 = _linear_taps(w, out_w, clamp=True)
    y0, y1, b0, b1 = _linear_taps(h, out_h, clamp=False)
    src = img.astype(np.int64)
    rows = src[:, x0] * a0[None, :, None] + src[:, x1] * a1[None, :, None]  # [h, out_w, c], scale 2048
    r0, r1 = rows[y0] >> 4, rows[y1] >> 4
    out = ((r0 * b0[:, None, None]) >> 16) + ((r1 * b1[:, None, None]) >> 16)
    return np.clip((out + 2) >> 2, 0, 255).astype(np.uint8)


def slide_windows(h: int, w: int, crop: int, stride: int) -> list[tuple[int, int, int, int]]:
    """mmseg's sliding grid: (y1, y2, x1, x2) per crop; the last crop of a row/column ends at the border."""
    out = []
    for i in range(max(h - crop + stride - 1, 0) // stride + 1):
        for j in range(max(w - crop + stride - 1, 0) // stride + 1):
            y2, x2 = min(i * stride + crop, h), min(j * stride + crop, w)
            out.append((max(y2 - crop, 0), y2, max(x2 - crop, 0), x2))
    return out


class SCLIPProtocol:
    """SCLIP's ``CLIPForSegmentation`` inference on one CLIP backbone: image in, labels out."""

    def __init__(
        self,
        clip: CLIPBackbone,
        classes: str | Sequence[str],
        logit_scale: float = SCLIP_LOGIT_SCALE,
        prob_thd: float = 0.0,
        area_thd: float | None = None,
        crop: int = 224,
        stride: int = 112,
        scale: tuple[int, int] = SCLIP_SCALE,
        templates: Sequence[str] = IMAGENET_TEMPLATES,
        crop_batch: int = 8,
    ):
        if crop <= 0 or stride <= 0:
            raise ValueError(f"slide crop and stride must be positive, got {crop} and {stride}")
        if not 0.0 <= float(prob_thd) <= 1.0:
            raise ValueError(f"prob_thd must be in [0, 1], got {prob_thd}")
        if area_thd is not None and not 0.0 <= float(area_thd) <= 1.0:
            raise ValueError(f"area_thd must be in [0, 1], got {area_thd}")
        self.clip = clip
        self.names, idx = parse_class_names(classes)
        self.query_idx = torch.tensor(idx, dtype=torch.long)
        self.num_classes = int(self.query_idx.max()) + 1
        self.class_names = [self.names[idx.index(k)] for k in range(self.num_classes)]  # first synonym
        self.logit_scale, self.prob_thd, self.area_thd = float(logit_scale), float(prob_thd), area_thd
        self.crop, self.stride, self.scale, self.crop_batch = int(crop), int(stride), tuple(scale), int(crop_batch)
        self.templates = tuple(templates)
        self._queries: torch.Tensor | None = None

    @property
    def device(self) -> torch.device:
        return next(self.clip.parameters()).device

    @torch.inference_mode()
    def query_features(self) -> torch.Tensor:
        """[Q, E] unit-norm 80-template embeddings, one per query name (computed once)."""
        if self._queries is None:
            self._queries = class_embeddings(self.clip, self.names, self.templates)
        return self._queries

    def preprocess(self, rgb: np.ndarray) -> torch.Tensor:
        """uint8 RGB [H,W,3] → SCLIP's normalised input [1,3,h,w] at the rescaled size."""
        h, w = rescale_size(rgb.shape[0], rgb.shape[1], self.scale)
        x = torch.from_numpy(resize_bilinear(np.ascontiguousarray(rgb), h, w)).permute(2, 0, 1).float()
        mean = torch.tensor(SCLIP_MEAN).view(3, 1, 1)
        std = torch.tensor(SCLIP_STD).view(3, 1, 1)
        return ((x - mean) / std)[None].to(self.device)

    @torch.inference_mode()
    def crop_logits(self, crops: torch.Tensor) -> torch.Tensor:
        """Crops [N,3,h,w] → cosine logits [N,Q,h,w]: CSA patch features × queries, bilinear up."""
        feats = F.normalize(sclip_tokens(self.clip, crops), dim=-1)[:, 1:]
        logits = feats @ self.query_features().to(feats).T  # [N, g*g, Q]
        p = self.clip.patch_size
        gh, gw = crops.shape[-2] // p, crops.shape[-1] // p
        logits = logits.permute(0, 2, 1).reshape(crops.shape[0], -1, gh, gw)
        return F.interpolate(logits, size=crops.shape[-2:], mode="bilinear", align_corners=False)

    @torch.inference_mode()
    def slide_logits(self, x: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
        """Normalised input [1,3,H,W] → overlap-averaged logits [1,Q,*out_hw] (cosines, unscaled)."""
        _, _, h, w = x.shape
        wins = slide_windows(h, w, self.crop, self.stride)
        q = self.query_features().shape[0]
        preds = x.new_zeros((1, q, h, w))
        count = x.new_zeros((1, 1, h, w))
        by_size: dict[tuple[int, int], list] = {}
        for win in wins:  # crops of one size run as one batch
            by_size.setdefault((win[1] - win[0], win[3] - win[2]), []).append(win)
        for group in by_size.values():
            for i in range(0, len(group), self.crop_batch):
                part = group[i : i + self.crop_batch]
                out = self.crop_logits(torch.cat([x[:, :, y1:y2, x1:x2] for y1, y2, x1, x2 in part]))
                for (y1, y2, x1, x2), lo in zip(part, out):
                    preds[0, :, y1:y2, x1:x2] += lo
                    count[0, :, y1:y2, x1:x2] += 1
        return F.interpolate(preds / count, size=tuple(out_hw), mode="bilinear", align_corners=False)

    @torch.inference_mode()
    def postprocess(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [1,Q,h,w] → (class probabilities [K,h,w], labels [h,w] int64)."""
        probs = (logits[0] * self.logit_scale).softmax(0)
        idx = self.query_idx.to(probs.device)
        if self.num_classes != idx.numel():  # max over each class's synonyms
            probs = torch.stack([probs[idx == k].max(0).values for k in range(self.num_classes)])
        if self.area_thd is not None:  # classes (but background) covering too little area are dropped
            area = torch.bincount(probs.argmax(0).flatten(), minlength=self.num_classes)[1:].to(probs.dtype)
            keep = (area > self.area_thd * area.sum()).to(probs.dtype)
            probs = probs.clone()
            probs[1:] *= keep[:, None, None]
        pred = probs.argmax(0)
        pred[probs.max(0).values < self.prob_thd] = 0
        return probs, pred

    @torch.inference_mode()
    def __call__(self, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 RGB [H,W,3] → (labels [H,W] int32, max class probability [H,W] float32)."""
        x = self.preprocess(rgb)
        probs, pred = self.postprocess(self.slide_logits(x, rgb.shape[:2]))
        return pred.to(torch.int32).cpu().numpy(), probs.max(0).values.float().cpu().numpy()
