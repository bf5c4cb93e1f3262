"""What the three readers share: records, mask decoding, image reading, the letterbox sample,
training augmentation and batching.

A sample (``dataset[i]``) is a dict:

===============  ============================================================================
``image``        FloatTensor 3×S×S, 0..255, the letterboxed image (SAM's geometry: longest side
                 = S, zero padding bottom/right; see :mod:`sspsam.io.transforms`)
``mask``         BoolTensor S×S, the target (union of all targets; empty for no-target),
                 letterboxed with nearest neighbour so it stays aligned with ``image``
``text``         str, the sentence / phrase (left↔right swapped when a flip was applied)
``no_target``    bool, True when the expression refers to nothing (gRefCOCO)
``box``          FloatTensor 4, normalised (cx, cy, w, h) of the union of the targets in the
                 S×S frame; zeros for no-target
``image_id``     int, the dataset's image id
``sent_id``      int (RefCOCO, gRefCOCO) or str (PhraseCut's task_id)
``ref_id``       int or str, the referent the sentence belongs to
``orig_size``    LongTensor 2, (H, W) of the original image (``Letterbox.fit(orig_size, S)``
                 maps predictions back when ``train=False``)
``index``        int, position in the dataset
``tokens``       LongTensor 77, only with a ``tokenizer``
``orig_mask``    BoolTensor H×W, only with ``return_orig_mask=True``
===============  ============================================================================
"""

from __future__ import annotations

import math
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from pycocotools import mask as mask_utils
from torch.utils.data import Dataset

from sspsam.errors import ImageLoadError
from sspsam.io.transforms import letterbox_image, letterbox_mask, to_tensor
from sspsam.data import DatasetLayoutError

Tokenizer = Callable[[list[str]], torch.Tensor]


@dataclass
class Record:
    """One (referent, sentence) pair, with what is needed to build its sample lazily."""

    image_path: Path
    height: int
    width: int
    text: str
    no_target: bool
    image_id: int
    sent_id: Any
    ref_id: Any
    split: str
    # kind "coco": list of COCO 'segmentation' values (polygon lists or RLE dicts), one per target
    # kind "phrasecut": list of polygons ([[x, y], ...]), all targets' polygons flattened
    segments: list = field(default_factory=list)
    kind: str = "coco"
    extra: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# masks



def sentence_records(ref: dict, img: dict, image_dir: Path, segs: list, *, no_target: bool, ann_ids: list,
                     text_field: str, where: str = "refs file") -> list["Record"]:
    """One Record per sentence of a refer/gRefCOCO ref (both formats share the ref/sentence layout)."""
    from sspsam.data.validate import sentence_text

    if not isinstance(ref["sentences"], list):
        raise DatasetLayoutError(f"{where}: ref {ref.get('ref_id')!r} 'sentences' is {type(ref['sentences']).__name__}; "
                                 "expected a list of {sent_id, sent}")
    return [
        Record(
            image_path=image_dir / img["file_name"],
            height=int(img["height"]),
            width=int(img["width"]),
            text=sentence_text(sent, text_field, f"{where}: ref {ref.get('ref_id')!r}"),
            no_target=no_target,
            image_id=int(ref["image_id"]),
            sent_id=sent.get("sent_id"),
            ref_id=ref["ref_id"],
            split=ref["split"],
            segments=segs,
            kind="coco",
            extra={"ann_ids": list(ann_ids), "category_id": ref.get("category_id")},
        )
        for sent in ref["sentences"]
    ]

def decode_coco_segmentation(seg: Any, height: int, width: int) -> np.ndarray:
    """A COCO 'segmentation' (polygon list, compressed or uncompressed RLE) → bool HxW.

    Polygons are rasterised with pycocotools' ``frPyObjects`` + ``decode`` as refer.py's
    ``getMask`` does; several polygons of one object are united. Polygons with fewer than three
    points are dropped (pycocotools would read a 4-number list as a box).
    """
    if isinstance(seg, list):
        polys = [list(map(float, p)) for p in seg if len(p) >= 6 and len(p) % 2 == 0]
        if not polys:
            return np.zeros((height, width), dtype=bool)
        rles = mask_utils.frPyObjects(polys, height, width)
        return mask_utils.decode(rles).any(axis=2)
    if isinstance(seg, dict):
        if isinstance(seg.get("counts"), list):  # uncompressed RLE
            rle = mask_utils.frPyObjects(seg, *seg["size"])
        else:
            counts = seg["counts"].encode("ascii") if isinstance(seg["counts"], str) else seg["counts"]
            rle = {"size": list(seg["size"]), "counts": counts}
        m = mask_utils.decode(rle).astype(bool)
        if m.shape != (height, width):
            raise DatasetLayoutError(f"RLE mask is {m.shape[1]}x{m.shape[0]} but its image is {width}x{height}")
        return m
    raise DatasetLayoutError(f"unsupported COCO segmentation of type {type(seg).__name__}")


def phrasecut_polygons_to_mask(polygons: Sequence, height: int, width: int) -> np.ndarray:
    """PhraseCut's own ground-truth rasterisation (``utils/data_transfer.polygons_to_mask``):
    vertices truncated to int, PIL polygon with fill and outline, union."""
    from sspsam.data.shapes import rasterize_phrasecut

    return rasterize_phrasecut(list(polygons), height, width)


def record_mask(rec: Record) -> np.ndarray:
    if rec.no_target:
        return np.zeros((rec.height, rec.width), dtype=bool)
    if rec.kind == "coco":
        out = np.zeros((rec.height, rec.width), dtype=bool)
        for seg in rec.segments:
            out |= decode_coco_segmentation(seg, rec.height, rec.width)
        return out
    if rec.kind == "phrasecut":
        return phrasecut_polygons_to_mask(rec.segments, rec.height, rec.width)
    raise ValueError(f"unknown record kind {rec.kind!r}")


# ----------------------------------------------------------------------------------------------
# images


def read_image(path: Path, expect_hw: tuple[int, int] | None = None) -> np.ndarray:
    """HxWx3 uint8 RGB in the frame the annotations use.

    COCO/VG annotations are in the stored pixel frame; the EXIF orientation is applied only when
    that is what makes the image match the annotated (height, width).
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetLayoutError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            if expect_hw is not None and (im.height, im.width) != tuple(expect_hw):
                turned = ImageOps.exif_transpose(im)
                if (turned.height, turned.width) != tuple(expect_hw):
                    raise DatasetLayoutError(
                        f"{path} is {im.width}x{im.height} but the annotation file says "
                        f"{expect_hw[1]}x{expect_hw[0]} (wrong image folder?)"
                    )
                im = turned
            return np.ascontiguousarray(np.asarray(im.convert("RGB")))
    except UnidentifiedImageError:
        raise ImageLoadError(f"{path} is not an image file PIL can read") from None
    except Image.DecompressionBombError as exc:
        raise ImageLoadError(f"{path} declares too many pixels to decode ({str(exc)[:120]})") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, ZeroDivisionError, struct.error) as exc:
        raise ImageLoadError(f"{path} is corrupt or truncated ({type(exc).__name__}: {str(exc)[:200]})") from None


def find_dir(candidates: Sequence[Path], what: str, hint: str) -> Path:
    for c in candidates:
        if c.is_dir():
            return c
    tried = "\n  ".join(str(c) for c in candidates)
    raise DatasetLayoutError(f"no {what} folder found; tried:\n  {tried}\n{hint}")


def require_file(path: Path, expected: str) -> Path:
    if not path.is_file():
        extra = ""
        if path.parent.is_dir():
            names = sorted(p.name for p in path.parent.iterdir())[:12]
            extra = f" (that folder holds: {', '.join(names) or 'nothing'})"
        elif not path.parent.exists():
            extra = f" (folder {path.parent} does not exist)"
        raise DatasetLayoutError(f"missing {path.name}: expected {path}{extra} — {expected}")
    return path


# ----------------------------------------------------------------------------------------------
# text


_LR = re.compile(r"\b(left|right)(most|hand|side|ward|wards)?\b", re.IGNORECASE)


def swap_left_right(text: str) -> str:
    """Swap 'left'↔'right' (and -most/-hand/-side forms), keeping the capitalisation."""

    def repl(m: re.Match) -> str:
        word, suffix = m.group(1), m.group(2) or ""
        new = "right" if word.lower() == "left" else "left"
        if word.isupper():
            new = new.upper()
        elif word[0].isupper():
            new = new.capitalize()
        return new + suffix

    return _LR.sub(repl, text)


# ----------------------------------------------------------------------------------------------
# the dataset


class ReferringDataset(Dataset):
    """Shared ``__getitem__``: subclasses fill ``self.records`` (a list of :class:`Record`)."""

    records: list[Record]

    def __init__(
        self,
        image_size: int = 1024,
        tokenizer: Tokenizer | None = None,
        *,
        train: bool = False,
        return_orig_mask: bool = False,
        scale_range: tuple[float, float] = (0.7, 1.0),
        colour_jitter: float = 0.2,
        flip: bool = False,
    ) -> None:
        if int(image_size) <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        lo, hi = scale_range
        if not 0 < lo <= hi:
            raise ValueError(f"scale_range must be 0 < lo <= hi, got {scale_range}")
        self.image_size = int(image_size)
        self.tokenizer = tokenizer
        self.train = bool(train)
        self.return_orig_mask = bool(return_orig_mask)
        self.scale_range = (float(lo), float(hi))
        self.colour_jitter = float(colour_jitter)
        self.flip = bool(flip)
        self.records = []

    # -- plain access ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.records)

    def info(self, i: int) -> dict:
        """Metadata of sample ``i`` without reading the image."""
        r = self.records[i]
        return {
            "text": r.text,
            "no_target": r.no_target,
            "image_id": r.image_id,
            "sent_id": r.sent_id,
            "ref_id": r.ref_id,
            "split": r.split,
            "image_path": str(r.image_path),
            "height": r.height,
            "width": r.width,
            **r.extra,
        }

    def raw(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(original image HxWx3 uint8, original-size bool mask) for evaluation at full size."""
        r = self.records[i]
        return read_image(r.image_path, (r.height, r.width)), record_mask(r)

    def mask(self, i: int) -> np.ndarray:
        """The original-size ground-truth mask of sample ``i`` (no image read)."""
        return record_mask(self.records[i])

    # -- samples --------------------------------------------------------------------------------

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} samples")
        r = self.records[i]
        image, mask = self.raw(i)
        text = r.text
        orig_mask = mask
        S = self.image_size
        H, W = mask.shape

        if self.train and self.flip and torch.rand(()) < 0.5:
            image = np.ascontiguousarray(image[:, ::-1])
            mask = np.ascontiguousarray(mask[:, ::-1])
            text = swap_left_right(text)

        extent = _extent(mask)
        if self.train:
            img_sq, mask_sq, (sx, sy, ox, oy), content_hw = self._jitter_geometry(image, mask, extent)
            img_t = to_tensor(img_sq)
            if self.colour_jitter > 0:
                img_t = self._jitter_colour(img_t, content_hw)
        else:
            img_sq, lb = letterbox_image(image, S)
            mask_sq = letterbox_mask(mask, lb)
            sh, sw = lb.scaled_hw
            sx, sy, ox, oy = sw / W, sh / H, 0.0, 0.0
            img_t = to_tensor(img_sq)
            content_hw = (sh, sw)

        box = torch.zeros(4)
        if extent is not None and not r.no_target:
            x0, y0, x1, y1 = extent
            x0, x1 = np.clip([x0 * sx - ox, x1 * sx - ox], 0, S)
            y0, y1 = np.clip([y0 * sy - oy, y1 * sy - oy], 0, S)
            if x1 > x0 and y1 > y0:
                box = torch.tensor([(x0 + x1) / 2 / S, (y0 + y1) / 2 / S, (x1 - x0) / S, (y1 - y0) / S], dtype=torch.float32)

        sample = {
            "image": img_t,
            "mask": torch.from_numpy(np.ascontiguousarray(mask_sq)),
            "text": text,
            "no_target": bool(r.no_target),
            "box": box,
            "image_id": r.image_id,
            "sent_id": r.sent_id,
            "ref_id": r.ref_id,
            "orig_size": torch.tensor([H, W], dtype=torch.long),
            # the image content inside the square: SAM zeroes the padding beyond it
            "valid_hw": torch.tensor([int(v) for v in content_hw], dtype=torch.long),
            "index": i,
        }
        if self.tokenizer is not None:
            toks = self.tokenizer([text])
            sample["tokens"] = torch.as_tensor(toks)[0].long()
        if self.return_orig_mask:
            sample["orig_mask"] = torch.from_numpy(np.ascontiguousarray(orig_mask))
        return sample

    # -- augmentation ---------------------------------------------------------------------------

    def _jitter_geometry(self, image: np.ndarray, mask: np.ndarray, extent):
        """Scale jitter: the longest side becomes s·S, s ~ U(scale_range). s ≤ 1: placed top-left
        and zero padded (SAM's convention); s > 1: an S×S crop that keeps the target box when it
        fits. Returns the square image, square mask, (sx, sy, ox, oy) with x' = x·sx − ox, and
        the (h, w) of the image content at the top-left of the square."""
        S = self.image_size
        H, W = mask.shape
        lo, hi = self.scale_range
        s = lo + (hi - lo) * float(torch.rand(()))
        scale = s * S / max(H, W)
        sh, sw = max(1, int(H * scale + 0.5)), max(1, int(W * scale + 0.5))
        img = np.asarray(Image.fromarray(image).resize((sw, sh), Image.BILINEAR))
        msk = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((sw, sh), Image.NEAREST)) > 127
        sx, sy = sw / W, sh / H
        ox = oy = 0
        if sw > S or sh > S:
            ox = _crop_offset(sw, S, None if extent is None else (extent[0] * sx, extent[2] * sx))
            oy = _crop_offset(sh, S, None if extent is None else (extent[1] * sy, extent[3] * sy))
            img = img[oy : oy + S, ox : ox + S]
            msk = msk[oy : oy + S, ox : ox + S]
        out_img = np.zeros((S, S, 3), dtype=np.uint8)
        out_msk = np.zeros((S, S), dtype=bool)
        out_img[: img.shape[0], : img.shape[1]] = img
        out_msk[: msk.shape[0], : msk.shape[1]] = msk
        return out_img, out_msk, (sx, sy, float(ox), float(oy)), (img.shape[0], img.shape[1])

    def _jitter_colour(self, img: torch.Tensor, content_hw: tuple[int, int]) -> torch.Tensor:
        """Brightness, contrast and saturation jitter (no hue: colour words must stay true)."""
        a = self.colour_jitter

        def factor() -> float:
            return 1.0 + a * (2 * float(torch.rand(())) - 1)

        content = torch.zeros(img.shape[1:], dtype=torch.bool)  # leave the zero padding black
        content[: content_hw[0], : content_hw[1]] = True
        x = img * factor()
        mean = x[:, content].mean()
        x = (x - mean) * factor() + mean
        grey = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2])[None]
        x = (x - grey) * factor() + grey
        x = x.clamp(0, 255)
        return torch.where(content[None], x, img)


def _extent(mask: np.ndarray):
    """Pixel-edge extents (x0, y0, x1, y1) of a bool mask, or None when empty."""
    cols = np.flatnonzero(mask.any(axis=0))
    if cols.size == 0:
        return None
    rows = np.flatnonzero(mask.any(axis=1))
    return float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)


def _crop_offset(length: int, window: int, span) -> int:
    if length <= window:
        return 0
    lo, hi = 0, length - window
    if span is not None:
        a, b = span
        keep_lo, keep_hi = int(math.ceil(b)) - window, int(math.floor(a))
        if keep_lo <= keep_hi:
            lo, hi = max(lo, keep_lo), min(hi, keep_hi)
        else:  # target wider than the window: centre it
            c = int((a + b) / 2 - window / 2)
            return int(min(max(c, 0), length - window))
        if lo > hi:
            lo = hi = min(max(lo, 0), length - window)
    return int(lo + int(torch.randint(0, hi - lo + 1, ())))


# ----------------------------------------------------------------------------------------------
# batching


def collate(batch: list[dict]) -> dict:
    """Stack same-shaped tensors; bools/ints become tensors; anything else (text, str ids,
    variable-size ``orig_mask``) stays a list."""
    if not batch:
        return {}
    out: dict = {}
    for key in batch[0]:
        vals = [b[key] for b in batch]
        v0 = vals[0]
        if torch.is_tensor(v0) and all(torch.is_tensor(v) and v.shape == v0.shape for v in vals):
            out[key] = torch.stack(vals)
        elif all(isinstance(v, bool) for v in vals):
            out[key] = torch.tensor(vals, dtype=torch.bool)
        elif all(isinstance(v, int) and not isinstance(v, bool) for v in vals):
            out[key] = torch.tensor(vals, dtype=torch.long)
        else:
            out[key] = vals
    return out
