"""The separate objects of a union mask and their boxes: connected parts, pixel-edge boxes and
COCO's [x, y, width, height]."""

from __future__ import annotations

import numpy as np

MIN_INSTANCE_FRACTION = 0.0005  # a part smaller than 1/2000 of the image is a speck, not an object



def min_instance_area(height: int, width: int, fraction: float = MIN_INSTANCE_FRACTION) -> int:
    """The smallest part (pixels) counted as an instance: ``fraction`` of the image, at least 1 px."""
    return max(1, int(round(fraction * height * width)))



def split_instances(mask: np.ndarray, min_area: int = 1) -> np.ndarray:
    """The separate objects of a union mask: its 8-connected parts of at least ``min_area`` pixels.

    ``mask``: bool [H, W]. Returns bool [K, H, W], largest part first (ties: top-left first). A
    non-empty mask whose parts are all below ``min_area`` still yields its largest part, so a
    phrase that was found always has an instance. Connected components of the union is the
    instance definition because SSP-SAM decodes one mask per phrase (GRES phrases such as "the two
    red shapes" included): it has no per-object output, so objects that touch merge into one.
    """
    from scipy import ndimage

    mask = np.asarray(mask, bool)
    lab, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    if n == 0:
        return np.zeros((0, *mask.shape), bool)
    areas = np.bincount(lab.ravel(), minlength=n + 1)[1:]
    keep = [i for i in np.argsort(-areas, kind="stable") if areas[i] >= min_area] or [int(np.argmax(areas))]
    return np.stack([lab == i + 1 for i in keep])



def bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1), inclusive, of the mask's pixels; None for an empty mask."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if not len(rows):
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1])



def boxes_xyxy(masks: np.ndarray) -> np.ndarray:
    """Bool [K, H, W] → float32 [K, 4] boxes (x0, y0, x1, y1) in pixel-edge coordinates: x1/y1 are
    one past the last pixel, so x1 − x0 is the width in pixels (COCO's bbox w and pycocotools'
    ``toBbox``). An empty mask gets (0, 0, 0, 0)."""
    out = np.zeros((len(masks), 4), np.float32)
    for k, m in enumerate(masks):
        b = bbox(m)
        if b is not None:
            out[k] = (b[0], b[1], b[2] + 1, b[3] + 1)
    return out



def xyxy_to_coco(box) -> list[float]:
    """(x0, y0, x1, y1) → COCO's [x, y, width, height]."""
    x0, y0, x1, y1 = (float(v) for v in box)
    return [x0, y0, x1 - x0, y1 - y0]
