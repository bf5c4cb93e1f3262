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

import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

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

#: LAVT ``eval_seg_iou_list`` and PhraseCut ``mask_threshs``.
RES_THRESHOLDS: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9)
#: ReLA ``pr_thres``.
GRES_THRESHOLDS: tuple[float, ...] = (0.7, 0.8, 0.9)

_NAN = float("nan")


# --------------------------------------------------------------------------- helpers


def _to_numpy(x: Any) -> np.ndarray:
    """numpy array from a numpy array, a (possibly CUDA) torch tensor or a nested list."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor without importing torch
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _binary(x: Any, name: str) -> np.ndarray:
    """A mask as a bool array. Nonzero is foreground (as ``np.logical_and`` treats it in the
    references); float input is refused, since a probability map must be thresholded first."""
    a = _to_numpy(x)
    if a.dtype == np.bool_:
        return a
    if np.issubdtype(a.dtype, np.integer):
        return a != 0
    raise TypeError(f"{name} must be a bool or integer mask (threshold probabilities first), got dtype {a.dtype}")


def _same_shape(a: np.ndarray, b: np.ndarray, what: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{what}: prediction shape {a.shape} != ground-truth shape {b.shape}")


def _inter_union(pred: np.ndarray, gt: np.ndarray, ignore: Any = None) -> tuple[int, int]:
    if ignore is not None:
        keep = ~_binary(ignore, "ignore")
        _same_shape(keep, gt, "ignore mask")
        pred = pred & keep
        gt = gt & keep
    return int(np.count_nonzero(pred & gt)), int(np.count_nonzero(pred | gt))


def _div(a: float, b: float) -> float:
    return float(a) / float(b) if b else _NAN


def _thr_name(t: float) -> str:
    return f"Pr@{t:.1f}" if round(t, 1) == t else f"Pr@{t:g}"


def _check_merge(a: "_Meter", b: "_Meter") -> None:
    if type(a) is not type(b):
        raise TypeError(f"cannot merge {type(b).__name__} into {type(a).__name__}")
    if a._config() != b._config():
        raise ValueError(f"cannot merge meters with different settings: {a._config()} vs {b._config()}")


class _Meter:
    """Shared plumbing: state is a dict of sums (ints, floats, int64 arrays)."""

    _state: dict[str, Any]

    def _config(self) -> tuple:  # pragma: no cover - overridden
        return ()

    def _empty_state(self) -> dict[str, Any]:  # pragma: no cover - overridden
        raise NotImplementedError

    def reset(self) -> None:
        self._state = self._empty_state()

    def state_dict(self) -> dict[str, Any]:
        """Copies of the accumulated sums; every value may be all-reduced with SUM."""
        return {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in self._state.items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        empty = self._empty_state()
        if set(state) != set(empty):
            raise KeyError(f"state keys {sorted(state)} != expected {sorted(empty)}")
        new: dict[str, Any] = {}
        for k, ref in empty.items():
            v = state[k]
            if isinstance(ref, np.ndarray):
                arr = _to_numpy(v)
                if arr.shape != ref.shape:
                    raise ValueError(f"state[{k!r}] has shape {arr.shape}, expected {ref.shape}")
                new[k] = np.rint(arr).astype(np.int64) if arr.dtype.kind == "f" else arr.astype(np.int64)
            else:
                v = _to_numpy(v).item() if not isinstance(v, (int, float)) else v
                new[k] = int(round(v)) if isinstance(ref, int) else float(v)
        self._state = new

    def merge(self, other: "_Meter") -> "_Meter":
        """Add ``other``'s sums into this meter (in place); returns self."""
        _check_merge(self, other)
        for k, v in other._state.items():
            self._state[k] = self._state[k] + v
        return self

    def __len__(self) -> int:
        return int(self._state["n"])


# --------------------------------------------------------------------------- RES


class RESMeter(_Meter):
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
        p, g = _binary(pred, "pred"), _binary(gt, "gt")
        _same_shape(p, g, "RESMeter.update")
        inter, union = _inter_union(p, g, ignore)
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
        out: dict[str, Any] = {"mIoU": _div(s["sum_iou"], n), "oIoU": _div(s["cum_I"], s["cum_U"])}
        for t, c in zip(self.thresholds, s["pr_count"]):
            out[_thr_name(t)] = _div(int(c), n)
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
    m = _binary(mask, "mask")
    return bool(np.count_nonzero(m) < int(min_pixels))


class GRESMeter(_Meter):
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
        p, g = _binary(pred_mask, "pred_mask"), _binary(gt_mask, "gt_mask")
        _same_shape(p, g, "GRESMeter.update")
        pred_nt = bool(pred_no_target)
        if pred_nt and self.zero_mask_on_no_target:
            p = np.zeros_like(p)
        inter, union = _inter_union(p, g)
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
            "gIoU": _div(s["sum_iou"], s["n"]),
            "cIoU": _div(s["cum_I"], s["cum_U"]),
            "N-acc": _div(s["TP"], s["TP"] + s["FN"]),
            "T-acc": _div(s["TN"], s["TN"] + s["FP"]),
        }
        for t, c in zip(self.thresholds, s["pr_count"]):
            out[_thr_name(t)] = _div(int(c), s["n_target"])
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


class PhraseCutMeter(_Meter):
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
        p, g = _binary(pred, "pred"), _binary(gt, "gt")
        _same_shape(p, g, "PhraseCutMeter.update")
        inter, union = _inter_union(p, g)
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
        out: dict[str, Any] = {"mIoU": _div(s["sum_iou"], s["n"]), "oIoU": _div(s["cum_I"], s["cum_U"])}
        for t, c in zip(self.thresholds, s["pr_count"]):
            out[_thr_name(t)] = _div(int(c), s["n"])
        out["n"] = s["n"]
        return out


# --------------------------------------------------------------------------- semantic segmentation


class SemSegMeter(_Meter):
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
        p, g = _to_numpy(pred), _to_numpy(gt)
        for a, name in ((p, "pred"), (g, "gt")):
            if not (np.issubdtype(a.dtype, np.integer) or a.dtype == np.bool_):
                raise TypeError(f"{name} must be an integer label map, got dtype {a.dtype}")
        _same_shape(p, g, "SemSegMeter.update")
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
        miou = float(iou[iou_valid].mean()) if iou_valid.any() else _NAN
        macc = float(acc[acc_valid].mean()) if acc_valid.any() else _NAN
        fw_valid = acc_valid & iou_valid
        fwiou = float((iou[fw_valid] * pos_gt[fw_valid]).sum() / total_gt) if total_gt else _NAN
        return {
            "mIoU": miou,
            "fwIoU": fwiou,
            "mACC": macc,
            "pACC": _div(tp.sum(), total_gt),
            "per_class_iou": [float(v) for v in iou],
            "per_class_acc": [float(v) for v in acc],
            "n": self._state["n"],
        }


# --------------------------------------------------------------------------- reporting


def format_table(results: Mapping[str, Any], keys: Iterable[str], header: bool = False, label: str | None = None) -> str:
    """A markdown table row of ``results[k]`` for ``k`` in ``keys``, papers' style.

    Fractions become percentages to two decimals (0.72731 → ``72.73``); ints (counts such as
    ``n``) print as they are; nan prints ``n/a``. ``label`` adds a first cell (e.g. the split).
    ``header=True`` prepends the header and separator lines.
    """
    keys = list(keys)
    cells = []
    for k in keys:
        v = results[k]
        if isinstance(v, (bool, np.bool_)):
            cells.append(str(bool(v)))
        elif isinstance(v, (int, np.integer)):
            cells.append(str(int(v)))
        else:
            f = float(v)
            cells.append("n/a" if math.isnan(f) else f"{100.0 * f:.2f}")
    names = keys
    if label is not None:
        cells.insert(0, label)
        names = [""] + keys
    row = "| " + " | ".join(cells) + " |"
    if not header:
        return row
    head = "| " + " | ".join(names) + " |"
    sep = "|" + "|".join("---" for _ in names) + "|"
    return "\n".join([head, sep, row])
