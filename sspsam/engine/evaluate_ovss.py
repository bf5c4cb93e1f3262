"""Evaluate an OVSS model (ESC-Net, SAM-MI, the training-free path) on a semantic-segmentation dataset.

Predictions come from the public :class:`~sspsam.predict.ovss.OVSS` predictor — the same
letterbox, sliding windows and arg-max a user gets — at the original image size, and are scored
there against the original label with :class:`sspsam.engine.metrics.SemSegMeter` (detectron2's
SemSegEvaluator by default, mmseg's IoUMetric with ``protocol="mmseg"``; ``protocol="sclip"``: SCLIP's
whole inference protocol and mmseg's metric). ``slide=True`` adds
the predictor's sliding windows (1/3 overlap, averaged with the global view) for images much
larger than the model input.
"""

from __future__ import annotations

import time

import torch

from sspsam.engine.metrics import SemSegMeter
from sspsam.predict.ovss import OVSS, clean_classes


@torch.inference_mode()
def evaluate_ovss(model, dataset, protocol: str = "detectron2", slide: bool = False, classes: list[str] | None = None,
                  limit: int | None = None, sclip_options: dict | None = None) -> dict:
    """mIoU, fwIoU, mACC, pACC and the per-class IoU table of ``model`` on ``dataset``
    (a :class:`sspsam.data.semseg.SemSegBase`: uses ``raw(i)``, ``classes``, ``ignore_index``).

    ``protocol="sclip"`` runs SCLIP's inference protocol (``sspsam.models.zeroshot.sclip``) scored with
    mmseg's IoUMetric, as SCLIP reports; ``classes`` may then carry synonyms ("dog, puppy", one
    entry per dataset class, e.g. the lines of SCLIP's ``cls_*.txt``).

    The model runs in the dtype its weights have (``dtype=None``): the predictor's automatic
    bf16 would cast a model under training in place."""
    was_training = model.training
    classes = list(classes or dataset.classes)
    device = next(model.parameters()).device
    if protocol == "sclip":
        if len(classes) != len(dataset.classes):
            raise ValueError(f"{len(classes)} class lines given for a dataset with {len(dataset.classes)} classes")
        predictor = OVSS(model, device, protocol="sclip", sclip_options=sclip_options, dtype=None)
        protocol = "mmseg"
    else:
        if clean_classes(classes) != classes:
            raise ValueError("the dataset's class names must be distinct, non-empty and already clean")
        predictor = OVSS(model, device, dtype=None, max_gflop=None)  # an evaluation asks its dataset's classes, however many
    meter = SemSegMeter(len(classes), ignore_index=dataset.ignore_index, protocol=protocol)
    n = len(dataset) if limit is None else min(limit, len(dataset))
    t0 = time.perf_counter()
    try:
        for i in range(n):
            image, label = dataset.raw(i)
            meter.update(predictor.segment(image, classes, slide=slide).labels, label)
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - t0
    res = meter.compute()
    res["per_class"] = {c.split(", ")[0]: v for c, v in zip(classes, res["per_class_iou"])}
    res["seconds_per_image"] = seconds / max(n, 1)
    return res


def format_iou_table(result: dict) -> str:
    """A markdown table of the per-class IoU (percent), then mIoU and pixel accuracy."""
    rows = ["| class | IoU |", "|---|---|"]
    rows += [f"| {c} | {'n/a' if v != v else f'{100 * v:.2f}'} |" for c, v in result["per_class"].items()]
    rows += [f"| **mIoU** | {100 * result['mIoU']:.2f} |", f"| pixel acc | {100 * result['pACC']:.2f} |"]
    return "\n".join(rows)
