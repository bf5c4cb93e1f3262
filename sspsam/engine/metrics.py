"""Evaluation metrics, computed as the benchmarks' reference code computes them.

Every meter is a streaming accumulator: ``update()`` once per sample adds a few integers and
floats, so a whole split never sits in memory. Every meter has ``reset()``, ``merge(other)``,
``state_dict()`` / ``load_state_dict()`` and ``compute()``.

Distributed evaluation: every value in a meter's ``state_dict()`` is a *sum* over samples (an
int, a float or an int64 array). All-reduce each value with SUM across processes and
``load_state_dict()`` the result into one meter; that equals one meter fed every sample.
The meter's configuration (thresholds, number of classes, conventions) is *not* in the state
and must match; ``merge()`` checks it.

``compute()`` returns plain Python floats as fractions in [0, 1] (counts as ints). Papers print
percentages; :func:`format_table` turns a result dict into a markdown row with percentages to
two decimals. A quantity that is undefined (nothing accumulated, a zero denominator) is
``nan`` rather than an exception or a made-up 0; the docstrings say where a reference differs.

Reference rules (read in the reference sources; see each class for details):

* RES — LAVT-RIS ``test.py`` (yz93/LAVT-RIS): per (image, sentence) I=|P∧G|, U=|P∨G|,
  IoU = 0 if U == 0 else I/U; mIoU = mean IoU; oIoU = ΣI/ΣU; Pr@X counts ``IoU >= X``
  for X in (.5, .6, .7, .8, .9) over all samples.
  LISA / EVF-SAM (``acc_iou[union_i == 0] += 1.0  # no-object target``): same, but a sample
  with U == 0 scores 1 (``RESMeter(empty_union_as_one=True)``); they call mIoU/oIoU gIoU/cIoU.
* GRES — ReLA ``gres_model/evaluation/refer_evaluation.py`` after the fix of N-acc/T-acc.
* PhraseCut — ``utils/evaluator.py`` + ``utils/iou.py`` of ChenyunWu/PhraseCutDataset.
* Semantic segmentation — detectron2 ``SemSegEvaluator`` (default) or mmseg ``IoUMetric``.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from sspsam.engine.metrics_base import (GRES_THRESHOLDS, RES_THRESHOLDS, NAN, Meter, as_binary, check_merge,  # noqa: F401
                                       safe_div, inter_union, check_same_shape, threshold_name, as_numpy, format_table)
from sspsam.engine.metrics_semseg import SemSegMeter  # noqa: F401

__all__ = [
    "RESMeter",
    "GRESMeter",
    "PhraseCutMeter",
    "SemSegMeter",
    "no_target_from_mask",
    "format_table",
    "RES_THRESHOLDS",
    "GRES_THRESHOLDS",
]

# --------------------------------------------------------------------------- RES


class RESMeter(Meter):
    """Referring expression segmentation: mIoU, oIoU, Pr@X, one sample per (image, sentence).

    LAVT-RIS ``test.py`` (``evaluate``): ``I = sum(logical_and(P, G))``, ``U = sum(logical_or(P, G))``;
    ``this_iou = 0.0 if U == 0 else I / U``; ``mean_IoU`` = mean of ``this_iou``;
    ``overall IoU = cum_I / cum_U``; ``precision@X`` counts ``this_iou >= X``.

    ``empty_union_as_one=True`` gives the LISA / EVF-SAM gIoU/cIoU convention: a sample whose
    union is empty (empty GT, empty prediction) scores IoU 1 (and counts for every Pr@X);
    gIoU = mean IoU and cIoU = ΣI/ΣU (the result then also carries ``gIoU`` / ``cIoU`` keys).
    LISA divides by ``U + 1e-5`` (per sample) and ``ΣU + 1e-10``; that epsilon shifts a value by
    less than 1e-5 relative and is not reproduced.

    ``ignore`` (optional, per ``update``): pixels left out of both I and U, as LISA's
    ``intersectionAndUnionGPU(..., ignore_index=255)`` does with GT pixels labelled 255. Masks
    are read as nonzero = foreground, so pass ``ignore=(gt == 255)`` and ``gt == 1`` rather than a
    uint8 GT that still holds 255.
    Compare masks at the resolution the benchmark uses (the original image for RefCOCO).
    """

    def __init__(self, empty_union_as_one: bool = False, thresholds: Sequence[float] = RES_THRESHOLDS):
        self.empty_union_as_one = bool(empty_union_as_one)
        self.thresholds = tuple(float(t) for t in thresholds)
        self.reset()

    def _config(self) -> tuple:
        return (self.empty_union_as_one, self.thresholds)

    def _empty_state(self) -> dict[str, Any]:
        return {
            "n": 0,
            "sum_iou": 0.0,
            "cum_I": 0,
            "cum_U": 0,
            "pr_count": np.zeros(len(self.thresholds), dtype=np.int64),
        }

    def sample_iou(self, intersection: int, union: int) -> float:
        if union == 0:
            return 1.0 if self.empty_union_as_one else 0.0
        return intersection / union

    def update(self, pred: Any, gt: Any, ignore: Any = None) -> float:
        """Add one (image, sentence) sample; returns its IoU."""
        p, g = as_binary(pred, "pred"), as_binary(gt, "gt")
        check_same_shape(p, g, "RESMeter.update")
        inter, union = inter_union(p, g, ignore)
        return self.update_counts(inter, union)

    def update_counts(self, intersection: int, union: int) -> float:
        """Add one sample given its intersection and union pixel counts; returns its IoU."""
        intersection, union = int(intersection), int(union)
        if not 0 <= intersection <= union:
            raise ValueError(f"need 0 <= intersection <= union, got I={intersection}, U={union}")
        iou = self.sample_iou(intersection, union)
        s = self._state
        s["n"] += 1
        s["sum_iou"] += iou
        s["cum_I"] += intersection
        s["cum_U"] += union
        s["pr_count"] += np.array([iou >= t for t in self.thresholds], dtype=np.int64)
        return iou

    def compute(self) -> dict[str, Any]:
        s = self._state
        n = s["n"]
        out: dict[str, Any] = {"mIoU": safe_div(s["sum_iou"], n), "oIoU": safe_div(s["cum_I"], s["cum_U"])}
        for t, c in zip(self.thresholds, s["pr_count"]):
            out[threshold_name(t)] = safe_div(int(c), n)
        if self.empty_union_as_one:
            out["gIoU"], out["cIoU"] = out["mIoU"], out["oIoU"]
        out["n"] = n
        return out


# --------------------------------------------------------------------------- GRES


def no_target_from_mask(mask: Any, min_pixels: int = 50) -> bool:
    """SSP-SAM's official no-target rule: fewer than ``min_pixels`` positive pixels is "no target".

    SSP-SAM ``metric/mask_op.py::mask_iou_reftr`` (the gRefCOCO version): with an empty GT, a
    prediction that is all zero or has ``count_nonzero(pred) < 50`` scores IoU 1 with I = U = 0,
    otherwise IoU 0 with U = |pred|. The masks there are the 512×512 model-space masks, so the
    caller resizes its prediction to 512×512 first; this function only counts.

    Feeding ``GRESMeter.update(mask, gt, no_target_from_mask(mask512))`` reproduces SSP-SAM on
    every no-target sample. On a target sample whose prediction has 1–49 pixels SSP-SAM keeps
    the usual I/U, whereas ReLA's rule (followed by :class:`GRESMeter`) sets I = 0: the two differ
    by at most 49 pixels of intersection at 512² on such samples.
    """
    m = as_binary(mask, "mask")
    return bool(np.count_nonzero(m) < int(min_pixels))


class GRESMeter(Meter):
    """Generalized RES (gRefCOCO): gIoU, cIoU, N-acc, T-acc, Pr@{0.7,0.8,0.9}.

    ReLA ``gres_model/evaluation/refer_evaluation.py`` (the version with
    ``T_acc = TN / (TN + FP)``, ``N_acc = TP / (TP + FN)``; an earlier one used
    ``TP / (TP + FP + 1)`` and ``TP / (TP + FN + 1)`` — wrong, not reproduced). Per sample,
    with ``I, U = computeIoU(pred_mask, gt_mask)`` computed first on the masks as given:

    ========================  ==================  ========================  ============
    GT                        prediction          added to ΣI / ΣU          IoU, count
    ========================  ==================  ========================  ============
    no target (empty mask)    no target           nothing                   1, TP
    no target                 a mask              I 0, U = |P ∪ G| = |P|    0, FN
    target                    no target           I forced to 0, U=|P ∪ G|  0, FP
    target                    a mask              I, U                      I/U, TN
    ========================  ==================  ========================  ============

    gIoU = Σ IoU / all samples; cIoU = ΣI / ΣU; Pr@X = share of *target* samples with
    IoU >= X. The GT is no-target iff ``gt_mask`` is empty (gRefCOCO's ``empty`` flag).

    Predicted no-target and the predicted mask: ReLA does **not** zero the mask. Its
    ``GRES.refer_inference`` returns the sigmoid mask and the NT probability separately, the
    evaluator takes ``ref_seg.argmax`` as the mask, and on a target sample predicted NT only
    forces ``I = 0`` — U stays ``|P ∪ G|`` of the raw mask. So by default (as ReLA) the mask given
    is used as is; ``zero_mask_on_no_target=True`` treats it as empty whenever NT is
    predicted (then U = |G| on an FP sample). A caller that already zeroes its mask on NT gets
    the same numbers either way. A no-target GT predicted NT adds nothing regardless of the mask.
    An empty mask *not* flagged NT on a no-target GT is an FN (IoU 0, U += 0), as in ReLA.

    Deviation: ReLA reports N-acc = T-acc = 0 when a split has no no-target sample; here a
    zero denominator gives nan. Per-source splits (ReLA's ``source``): one meter per source,
    ``merge()`` them for the 'full' row.
    """

    def __init__(self, thresholds: Sequence[float] = GRES_THRESHOLDS, zero_mask_on_no_target: bool = False):
        self.thresholds = tuple(float(t) for t in thresholds)
        self.zero_mask_on_no_target = bool(zero_mask_on_no_target)
        self.reset()

    def _config(self) -> tuple:
        return (self.thresholds, self.zero_mask_on_no_target)

    def _empty_state(self) -> dict[str, Any]:
        return {
            "n": 0,
            "n_target": 0,
            "sum_iou": 0.0,
            "cum_I": 0,
            "cum_U": 0,
            "TP": 0,
            "TN": 0,
            "FP": 0,
            "FN": 0,
            "pr_count": np.zeros(len(self.thresholds), dtype=np.int64),
        }

    def update(self, pred_mask: Any, gt_mask: Any, pred_no_target: bool) -> float:
        """Add one (image, expression) sample; returns its IoU under ReLA's rules."""
        p, g = as_binary(pred_mask, "pred_mask"), as_binary(gt_mask, "gt_mask")
        check_same_shape(p, g, "GRESMeter.update")
        pred_nt = bool(pred_no_target)
        if pred_nt and self.zero_mask_on_no_target:
            p = np.zeros_like(p)
        inter, union = inter_union(p, g)
        gt_nt = not g.any()
        s = self._state
        s["n"] += 1
        if gt_nt:
            if pred_nt:  # true positive: correctly rejected
                s["TP"] += 1
                iou = 1.0
            else:  # false negative: a mask where there is nothing
                s["FN"] += 1
                s["cum_U"] += union
                iou = 0.0
        else:
            if pred_nt:  # false positive: rejected a real target
                s["FP"] += 1
                inter = 0
            else:
                s["TN"] += 1
            iou = 0.0 if union == 0 else inter / union
            s["cum_I"] += inter
            s["cum_U"] += union
            s["n_target"] += 1
            s["pr_count"] += np.array([iou >= t for t in self.thresholds], dtype=np.int64)
        s["sum_iou"] += iou
        return iou

    def compute(self) -> dict[str, Any]:
        s = self._state
        out: dict[str, Any] = {
            "gIoU": safe_div(s["sum_iou"], s["n"]),
            "cIoU": safe_div(s["cum_I"], s["cum_U"]),
            "N-acc": safe_div(s["TP"], s["TP"] + s["FN"]),
            "T-acc": safe_div(s["TN"], s["TN"] + s["FP"]),
        }
        for t, c in zip(self.thresholds, s["pr_count"]):
            out[threshold_name(t)] = safe_div(int(c), s["n_target"])
        out.update(
            n=s["n"],
            n_target=s["n_target"],
            n_no_target=s["n"] - s["n_target"],
            TP=s["TP"],
            TN=s["TN"],
            FP=s["FP"],
            FN=s["FN"],
        )
        return out


# --------------------------------------------------------------------------- PhraseCut


class PhraseCutMeter(Meter):
    """PhraseCut (VGPhraseCut) mask metrics: mean IoU, cumulative IoU, Pr@X.

    ChenyunWu/PhraseCutDataset ``utils/iou.py::iou_polygons_masks`` and
    ``utils/evaluator.py::Evaluator``: per task ``i = |P ∧ G|``, ``u = |P ∨ G|`` (G rasterised
    from the task's polygons, P the union of predicted masks), ``iou = 0 if i == 0 else i / u``;
    ``mean_mask_iou`` = mean over tasks (key ``mIoU``), ``cum_mask_iou = Σi / Σu`` (key
    ``oIoU``, "overall"/cumulative IoU). ``pred_mask_acc[X]`` (keys ``Pr@X``) counts
    ``iou > X`` — **strictly greater**, unlike LAVT/ReLA's ``>=``: a task at IoU exactly 0.5 does
    not count for Pr@0.5. The reference warns about tasks left unevaluated; feed those as empty
    predictions (IoU 0), which is what its "assuming empty prediction" line assumes.
    """

    def __init__(self, thresholds: Sequence[float] = RES_THRESHOLDS):
        self.thresholds = tuple(float(t) for t in thresholds)
        self.reset()

    def _config(self) -> tuple:
        return (self.thresholds,)

    def _empty_state(self) -> dict[str, Any]:
        return {
            "n": 0,
            "sum_iou": 0.0,
            "cum_I": 0,
            "cum_U": 0,
            "pr_count": np.zeros(len(self.thresholds), dtype=np.int64),
        }

    def update(self, pred: Any, gt: Any) -> float:
        """Add one task (image, phrase); returns its IoU."""
        p, g = as_binary(pred, "pred"), as_binary(gt, "gt")
        check_same_shape(p, g, "PhraseCutMeter.update")
        inter, union = inter_union(p, g)
        iou = 0.0 if inter == 0 else inter / union
        s = self._state
        s["n"] += 1
        s["sum_iou"] += iou
        s["cum_I"] += inter
        s["cum_U"] += union
        s["pr_count"] += np.array([iou > t for t in self.thresholds], dtype=np.int64)
        return iou

    def compute(self) -> dict[str, Any]:
        s = self._state
        out: dict[str, Any] = {"mIoU": safe_div(s["sum_iou"], s["n"]), "oIoU": safe_div(s["cum_I"], s["cum_U"])}
        for t, c in zip(self.thresholds, s["pr_count"]):
            out[threshold_name(t)] = safe_div(int(c), s["n"])
        out["n"] = s["n"]
        return out
