"""Mask outputs: COCO RLE (pycocotools, the format every benchmark and tool reads), polygons and
the OVSS label PNG.

The connected parts and boxes of a mask are in :mod:`sspsam.io.instances`, class colours in
:mod:`sspsam.io.colours`, overlays in :mod:`sspsam.io.overlay`; this module re-exports them, so
``sspsam.io.masks`` stays the one import path for mask outputs."""

from __future__ import annotations

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from sspsam.io.colours import class_colours, palette  # noqa: F401 (re-exported)
from sspsam.io.instances import (  # noqa: F401 (re-exported)
    MIN_INSTANCE_FRACTION, bbox, boxes_xyxy, min_instance_area, split_instances, xyxy_to_coco)
from sspsam.io.overlay import (  # noqa: F401 (re-exported)
    MAX_OVERLAY_SIDE, MIN_OVERLAY_SIDE, NO_MATCH, check_overlay_size, contour, font, label_overlay, overlay, overlay_scale,
    segmentation_overlay,
    unicode_font_path, warning_banner, with_banner)


def encode_rle(mask: np.ndarray) -> dict:
    """Bool HxW → COCO RLE with a JSON-safe string 'counts'."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def decode_rle(rle: dict) -> np.ndarray:
    counts = rle["counts"].encode("ascii") if isinstance(rle["counts"], str) else rle["counts"]
    return mask_utils.decode({"size": rle["size"], "counts": counts}).astype(bool)


def mask_polygons(mask: np.ndarray) -> list[list[float]]:
    """A bool [H, W] mask's outlines as COCO polygons (flat [x0, y0, x1, y1, …] lists, pixel
    units), one per part; supervision's tracer (OpenCV when installed). Needs ``sspsam[interop]``."""
    sv = require_supervision()
    return [[float(v) for v in poly.reshape(-1)] for poly in sv.mask_to_polygons(np.asarray(mask, bool)) if len(poly) >= 3]


def require_supervision():
    """``import supervision``, or one line naming the extra to install."""
    import warnings

    try:
        with warnings.catch_warnings():  # without OpenCV it says so on import; its NumPy path is all sspsam uses
            warnings.filterwarnings("ignore", message=".*OpenCV.*", category=UserWarning)
            import supervision
    except ImportError:
        from sspsam.errors import MissingExtraError

        raise MissingExtraError("this needs the optional package 'supervision': pip install sspsam[interop]") from None
    return supervision


_UNLABELLED = (0, 0, 0)  # palette entry 255 of the label PNG: pixels no class claimed


def label_png(labels: np.ndarray, classes: list[str]) -> Image.Image:
    """The per-pixel class index as a PNG any viewer shows in colour: a palette ("P") image whose
    index is the class index and whose palette is the overlay's class colours (255 = unlabelled,
    black). Readers that take the raw values (``np.asarray(Image.open(p))``) still get the indices.
    Over 255 classes (256 with every pixel labelled) an 8-bit palette cannot hold them: 16-bit
    greyscale, 65535 = unlabelled."""
    labels, n_classes = np.asarray(labels), len(classes)
    if n_classes <= 255 or (n_classes == 256 and (labels >= 0).all()):
        img = Image.fromarray(np.where(labels < 0, 255, labels).astype(np.uint8), mode="P")
        colours = class_colours(classes) + [(0, 0, 0)] * (256 - n_classes)
        if n_classes < 256:
            colours[255] = _UNLABELLED
        img.putpalette([v for c in colours for v in c])
        return img
    return Image.fromarray(np.where(labels < 0, 65535, labels).astype(np.uint16))
