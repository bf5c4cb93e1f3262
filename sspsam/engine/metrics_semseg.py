"""Semantic-segmentation meter (the OVSS benchmarks), split from :mod:`sspsam.engine.metrics`
(which re-exports it): a dataset-wide confusion matrix as detectron2 or mmseg computes it."""

from __future__ import annotations

from typing import Any

import numpy as np

from sspsam.engine.metrics_base import NAN, Meter, check_merge, safe_div, check_same_shape, as_numpy  # noqa: F401


# --------------------------------------------------------------------------- semantic segmentation


class SemSegMeter(Meter):
    """Open-vocabulary / semantic segmentation over a dataset-wide confusion matrix.

    detectron2 ``SemSegEvaluator`` (``protocol="detectron2"``, default; CAT-Seg and the trained
    OVSS protocol): GT pixels equal to ``ignore_index`` go to an extra bin and are left out;
    ``conf[pred, gt] += 1`` via ``np.bincount``; with the (N+1)² matrix cut to N×N,
    ``tp`` = diagonal, ``pos_gt`` = column sums, ``pos_pred`` = row sums,
    ``IoU = tp / (pos_gt + pos_pred - tp)``. Only classes with ``pos_gt > 0`` are valid: a class
    absent from the GT is left out of mIoU/mACC *even when it was predicted* (its per-class IoU
    is nan), though its wrongly predicted pixels still lower the true class's IoU.
    ``fwIoU = Σ_valid IoU · pos_gt / Σ pos_gt``; ``pACC = Σ tp / Σ pos_gt``;
    ``mACC`` = mean over valid classes of ``tp / pos_gt``.

    mmseg ``IoUMetric`` (``protocol="mmseg"``; the training-free protocol of SCLIP / ProxyCLIP):
    ``IoU = I / U`` per class with ``U = 0`` giving nan, mIoU = ``nanmean`` — so a class
    predicted but absent from the GT *is* in the mean with IoU 0. ``Acc = I / |G|``, mAcc =
    nanmean; aAcc (key ``pACC``) as above. mmseg's ``histc`` silently drops out-of-range
    predictions; here any label outside ``[0, num_classes)`` (other than the ignore index in
    the GT) raises instead. ``reduce_zero_label`` is a dataset step, not the meter's.
    """

    PROTOCOLS = ("detectron2", "mmseg")

    def __init__(self, num_classes: int, ignore_index: int = 255, protocol: str = "detectron2"):
        if int(num_classes) < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if protocol not in self.PROTOCOLS:
            raise ValueError(f"protocol must be one of {self.PROTOCOLS}, got {protocol!r}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.protocol = protocol
        self.reset()

    def _config(self) -> tuple:
        return (self.num_classes, self.ignore_index, self.protocol)

    def _empty_state(self) -> dict[str, Any]:
        k = self.num_classes + 1
        return {"n": 0, "conf_matrix": np.zeros((k, k), dtype=np.int64)}

    @property
    def conf_matrix(self) -> np.ndarray:
        """(N+1)×(N+1) int64, rows = prediction, columns = GT, last column = ignored GT."""
        return self._state["conf_matrix"]

    def update(self, pred: Any, gt: Any) -> None:
        """Add one image: integer label maps of equal shape."""
        p, g = as_numpy(pred), as_numpy(gt)
        for a, name in ((p, "pred"), (g, "gt")):
            if not (np.issubdtype(a.dtype, np.integer) or a.dtype == np.bool_):
                raise TypeError(f"{name} must be an integer label map, got dtype {a.dtype}")
        check_same_shape(p, g, "SemSegMeter.update")
        n = self.num_classes
        p = p.astype(np.int64, copy=False).reshape(-1)
        g = g.astype(np.int64).reshape(-1)
        ign = g == self.ignore_index
        g[ign] = n
        if p.size and (p.min() < 0 or p.max() >= n):
            raise ValueError(f"pred labels must lie in [0, {n}), got range [{p.min()}, {p.max()}]")
        if g.size and (g.min() < 0 or g.max() > n):
            bad = np.unique(g[(g < 0) | (g > n)])[:5]
            raise ValueError(f"gt labels must lie in [0, {n}) or equal ignore_index {self.ignore_index}; got {bad.tolist()}")
        k = n + 1
        self._state["conf_matrix"] += np.bincount(k * p + g, minlength=k * k).reshape(k, k)
        self._state["n"] += 1

    def compute(self) -> dict[str, Any]:
        conf = self._state["conf_matrix"][:-1, :-1].astype(np.float64)
        tp = np.diagonal(conf).copy()
        pos_gt = conf.sum(axis=0)
        pos_pred = conf.sum(axis=1)
        union = pos_gt + pos_pred - tp
        iou = np.full(self.num_classes, np.nan)
        acc = np.full(self.num_classes, np.nan)
        acc_valid = pos_gt > 0
        acc[acc_valid] = tp[acc_valid] / pos_gt[acc_valid]
        if self.protocol == "detectron2":
            iou_valid = acc_valid & (union > 0)
        else:  # mmseg: I / U, nan only where U == 0
            iou_valid = union > 0
        iou[iou_valid] = tp[iou_valid] / union[iou_valid]
        total_gt = pos_gt.sum()
        miou = float(iou[iou_valid].mean()) if iou_valid.any() else NAN
        macc = float(acc[acc_valid].mean()) if acc_valid.any() else NAN
        fw_valid = acc_valid & iou_valid
        fwiou = float((iou[fw_valid] * pos_gt[fw_valid]).sum() / total_gt) if total_gt else NAN
        return {
            "mIoU": miou,
            "fwIoU": fwiou,
            "mACC": macc,
            "pACC": safe_div(tp.sum(), total_gt),
            "per_class_iou": [float(v) for v in iou],
            "per_class_acc": [float(v) for v in acc],
            "n": self._state["n"],
        }
