"""Mask outputs: COCO RLE (pycocotools, the format every benchmark and tool reads) and overlays."""

from __future__ import annotations

import colorsys

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils


def encode_rle(mask: np.ndarray) -> dict:
    """Bool HxW → COCO RLE with a JSON-safe string 'counts'."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def decode_rle(rle: dict) -> np.ndarray:
    counts = rle["counts"].encode("ascii") if isinstance(rle["counts"], str) else rle["counts"]
    return mask_utils.decode({"size": rle["size"], "counts": counts}).astype(bool)


def palette(n: int) -> list[tuple[int, int, int]]:
    """n well-separated colours (golden-ratio hues)."""
    out = []
    for i in range(n):
        r, g, b = colorsys.hsv_to_rgb((0.02 + i * 0.618034) % 1.0, 0.85, 1.0)
        out.append((int(r * 255), int(g * 255), int(b * 255)))
    return out


def overlay(image: np.ndarray, masks: list[np.ndarray], labels: list[str] | None = None, alpha: float = 0.5) -> Image.Image:
    """Tint each mask with its own colour, outline it, and write its label by the mask."""
    out = image.astype(np.float32).copy()
    colours = palette(len(masks))
    for m, c in zip(masks, colours):
        out[m] = out[m] * (1 - alpha) + np.array(c, np.float32) * alpha
    img = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for i, (m, c) in enumerate(zip(masks, colours)):
        if not m.any():
            continue
        edge = m & ~_erode(m)
        ys, xs = np.nonzero(edge)
        pix = img.load()
        for y, x in zip(ys.tolist(), xs.tolist()):
            pix[x, y] = c
        if labels:
            ys, xs = np.nonzero(m)
            x0, y0 = int(xs.min()), int(ys.min())
            text = labels[i]
            box = draw.textbbox((x0, max(0, y0 - 12)), text)
            draw.rectangle(box, fill=(0, 0, 0))
            draw.text((x0, max(0, y0 - 12)), text, fill=c)
    return img


def _erode(m: np.ndarray) -> np.ndarray:
    e = m.copy()
    e[1:] &= m[:-1]
    e[:-1] &= m[1:]
    e[:, 1:] &= m[:, :-1]
    e[:, :-1] &= m[:, 1:]
    return e
