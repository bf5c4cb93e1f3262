"""Metrics against hand-computed answers (small arrays, numbers worked out in the comments).

Rules under test come from the reference code named in ``sspsam/engine/metrics.py``: LAVT-RIS test.py
(RES), LISA's validate (gIoU/cIoU with empty union = 1), ReLA refer_evaluation.py (GRES),
PhraseCutDataset utils/evaluator.py (PhraseCut), detectron2 SemSegEvaluator and mmseg IoUMetric.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sspsam.engine.metrics import (
    GRESMeter,
    PhraseCutMeter,
    RESMeter,
    SemSegMeter,
    format_table,
    no_target_from_mask,
)


def m(rows):
    return np.array(rows, dtype=bool)


def mask_with(n_on: int, shape=(4, 8), start: int = 0) -> np.ndarray:
    """Bool mask with pixels [start, start+n_on) set in row-major order."""
    a = np.zeros(shape[0] * shape[1], dtype=bool)
    a[start : start + n_on] = True
    return a.reshape(shape)


# --------------------------------------------------------------------------- RES samples
# A: I=1, U=2  -> IoU 0.5 (exactly on the Pr@0.5 boundary)
# B: empty prediction, empty GT -> U=0: IoU 0 (LAVT) or 1 (LISA)
# C: GT 4 px, prediction = GT + 1 px -> I=4, U=5 -> 0.8 (exactly on Pr@0.8)
# D: GT 10 px, prediction 9 of them -> I=9, U=10 -> 0.9 (exactly on Pr@0.9)
RES_SAMPLES = [
    (m([[1, 1, 0, 0], [0, 0, 0, 0]]), m([[1, 0, 0, 0], [0, 0, 0, 0]])),
    (m([[0, 0, 0, 0], [0, 0, 0, 0]]), m([[0, 0, 0, 0], [0, 0, 0, 0]])),
    (mask_with(5), mask_with(4)),
    (mask_with(9), mask_with(10)),
]


def feed(meter, samples):
    for s in samples:
        meter.update(*s)
    return meter


def test_res_lavt_convention_hand_numbers():
    r = feed(RESMeter(), RES_SAMPLES).compute()
    # per-sample IoU 0.5, 0, 0.8, 0.9
    assert r["mIoU"] == pytest.approx((0.5 + 0.0 + 0.8 + 0.9) / 4)  # 0.55
    assert r["oIoU"] == pytest.approx((1 + 0 + 4 + 9) / (2 + 0 + 5 + 10))  # 14/17
    assert r["Pr@0.5"] == 3 / 4  # A (exactly 0.5 counts: >=), C, D
    assert r["Pr@0.6"] == 2 / 4
    assert r["Pr@0.7"] == 2 / 4
    assert r["Pr@0.8"] == 2 / 4  # C at exactly 0.8 counts
    assert r["Pr@0.9"] == 1 / 4  # D at exactly 0.9 counts
    assert r["n"] == 4
    assert "gIoU" not in r


def test_res_giou_ciou_differ_and_match_hand_numbers():
    r = feed(RESMeter(empty_union_as_one=True), RES_SAMPLES).compute()
    # LISA: B (empty union) scores 1
    assert r["gIoU"] == pytest.approx((0.5 + 1.0 + 0.8 + 0.9) / 4)  # 0.8
    assert r["cIoU"] == pytest.approx(14 / 17)  # B adds nothing to I or U
    assert r["gIoU"] == r["mIoU"] and r["cIoU"] == r["oIoU"]
    assert abs(r["gIoU"] - r["cIoU"]) > 0.02
    assert r["Pr@0.5"] == 1.0
    assert r["Pr@0.9"] == 2 / 4


def test_res_pr_just_below_threshold_does_not_count():
    meter = RESMeter()
    iou = meter.update_counts(49, 100)  # 0.49 < 0.5
    assert iou == 0.49
    assert meter.compute()["Pr@0.5"] == 0.0
    meter.update_counts(7, 10)  # 0.7 exactly, as a float division gives the literal 0.7
    assert meter.compute()["Pr@0.7"] == 1 / 2


def test_res_ignore_pixels_leave_i_and_u():
    pred = m([[1, 1, 1, 0]])
    gt = m([[1, 0, 0, 0]])
    ignore = m([[0, 0, 1, 0]])
    meter = RESMeter()
    # without ignore I=1, U=3; the ignored pixel leaves U: I=1, U=2
    assert meter.update(pred, gt, ignore=ignore) == 0.5
    assert meter.state_dict()["cum_U"] == 2


def test_res_accepts_torch_and_int_masks_rejects_float():
    meter = RESMeter()
    assert meter.update(torch.tensor([[1, 1]], dtype=torch.uint8), torch.tensor([[True, False]])) == 0.5
    with pytest.raises(TypeError):
        meter.update(np.array([[0.7, 0.2]]), m([[1, 0]]))
    with pytest.raises(ValueError):
        meter.update(m([[1, 0]]), m([[1, 0, 0]]))


def test_res_empty_meter_is_nan():
    r = RESMeter().compute()
    assert math.isnan(r["mIoU"]) and math.isnan(r["oIoU"]) and r["n"] == 0


# --------------------------------------------------------------------------- GRES
Z = np.zeros((4, 8), dtype=bool)
GT4 = mask_with(4)  # pixels 0..3
PRED_OVERLAP = mask_with(2, start=3)  # pixels 3,4: one inside GT4
GT5 = mask_with(5)

# 1 no-target GT, predicted no-target (empty mask)   -> IoU 1, TP, nothing added
# 2 no-target GT, predicted a 3-px mask               -> IoU 0, FN, U += 3
# 3 target GT (4 px), predicted NT, raw mask 2 px
#   overlapping 1                                    -> IoU 0, FP, I forced 0, U = |P∪G| = 5
# 4 target GT 4 px, exact prediction                 -> IoU 1, TN, I 4, U 4
# 5 target GT 5 px, prediction 4 of them             -> IoU 0.8, TN, I 4, U 5
GRES_SAMPLES = [
    (Z, Z, True),
    (mask_with(3), Z, False),
    (PRED_OVERLAP, GT4, True),
    (GT4, GT4, False),
    (GT4, GT5, False),
]


def test_gres_relas_rules_hand_numbers():
    meter = GRESMeter()
    ious = [meter.update(*s) for s in GRES_SAMPLES]
    assert ious == [1.0, 0.0, 0.0, 1.0, 0.8]
    r = meter.compute()
    assert r["gIoU"] == pytest.approx((1 + 0 + 0 + 1 + 0.8) / 5)  # 0.56, over all samples
    assert r["cIoU"] == pytest.approx((0 + 0 + 0 + 4 + 4) / (0 + 3 + 5 + 4 + 5))  # 8/17
    assert r["N-acc"] == 1 / 2  # TP / (TP + FN)
    assert r["T-acc"] == 2 / 3  # TN / (TN + FP)
    # Pr over the 3 target samples only: IoUs 0, 1, 0.8
    assert r["Pr@0.7"] == 2 / 3
    assert r["Pr@0.8"] == 2 / 3  # 0.8 exactly counts
    assert r["Pr@0.9"] == 1 / 3
    assert (r["TP"], r["FN"], r["FP"], r["TN"]) == (1, 1, 1, 2)
    assert (r["n"], r["n_target"], r["n_no_target"]) == (5, 3, 2)


def test_gres_no_target_correct_adds_nothing_even_with_stray_mask():
    meter = GRESMeter()
    assert meter.update(mask_with(7), Z, pred_no_target=True) == 1.0
    s = meter.state_dict()
    assert (s["cum_I"], s["cum_U"], s["TP"]) == (0, 0, 1)
    assert meter.compute()["N-acc"] == 1.0
    assert math.isnan(meter.compute()["cIoU"])  # nothing in the union yet


def test_gres_empty_gt_with_mask_grows_union_by_predicted_area():
    meter = GRESMeter()
    assert meter.update(mask_with(6), Z, pred_no_target=False) == 0.0
    s = meter.state_dict()
    assert (s["cum_I"], s["cum_U"], s["FN"]) == (0, 6, 1)
    # empty mask not flagged no-target on an empty GT: still a miss (FN), union += 0
    meter.update(Z, Z, pred_no_target=False)
    r = meter.compute()
    assert r["FN"] == 2 and r["N-acc"] == 0.0 and r["gIoU"] == 0.0


def test_gres_target_predicted_no_target_mask_handling():
    # ReLA does not zero the mask: U = |P ∪ G| = 5, I forced to 0
    relA = GRESMeter()
    assert relA.update(PRED_OVERLAP, GT4, pred_no_target=True) == 0.0
    assert (relA.state_dict()["cum_I"], relA.state_dict()["cum_U"], relA.state_dict()["FP"]) == (0, 5, 1)
    assert relA.compute()["T-acc"] == 0.0
    assert relA.compute()["Pr@0.7"] == 0.0
    # zeroing the mask on NT: U = |G| = 4
    zeroed = GRESMeter(zero_mask_on_no_target=True)
    zeroed.update(PRED_OVERLAP, GT4, pred_no_target=True)
    assert (zeroed.state_dict()["cum_I"], zeroed.state_dict()["cum_U"]) == (0, 4)
    # whole batch under the zeroing option: cIoU 8/16
    zb = feed(GRESMeter(zero_mask_on_no_target=True), GRES_SAMPLES).compute()
    assert zb["cIoU"] == 0.5 and zb["gIoU"] == pytest.approx(0.56)


def test_gres_acc_without_no_target_samples_is_nan():
    meter = GRESMeter()
    meter.update(GT4, GT4, False)
    r = meter.compute()
    assert math.isnan(r["N-acc"]) and r["T-acc"] == 1.0


def test_no_target_from_mask_50_pixel_rule():
    assert no_target_from_mask(np.zeros((512, 512), dtype=bool))
    assert no_target_from_mask(mask_with(49, shape=(512, 512)))
    assert not no_target_from_mask(mask_with(50, shape=(512, 512)))
    assert no_target_from_mask(mask_with(10, shape=(512, 512)), min_pixels=11)
    # SSP-SAM on an empty GT: a 30-px prediction counts as "no target" -> IoU 1, nothing added
    pred = mask_with(30, shape=(512, 512))
    meter = GRESMeter()
    assert meter.update(pred, np.zeros((512, 512), bool), no_target_from_mask(pred)) == 1.0
    pred = mask_with(60, shape=(512, 512))
    assert meter.update(pred, np.zeros((512, 512), bool), no_target_from_mask(pred)) == 0.0
    assert meter.state_dict()["cum_U"] == 60


# --------------------------------------------------------------------------- PhraseCut


def test_phrasecut_mean_cum_and_strict_thresholds():
    meter = PhraseCutMeter()
    assert meter.update(m([[1, 1, 0, 0]]), m([[1, 0, 0, 0]])) == 0.5  # I=1, U=2
    assert meter.update(m([[0, 1, 1, 0]]), m([[1, 0, 0, 0]])) == 0.0  # I=0, U=3
    assert meter.update(m([[1, 1, 1, 1]]), m([[1, 1, 1, 0]])) == 0.75  # I=3, U=4
    r = meter.compute()
    assert r["mIoU"] == pytest.approx((0.5 + 0 + 0.75) / 3)
    assert r["oIoU"] == pytest.approx((1 + 0 + 3) / (2 + 3 + 4))  # 4/9
    # PhraseCut counts iou > X (strict): the task at exactly 0.5 is not in Pr@0.5
    assert r["Pr@0.5"] == 1 / 3
    assert r["Pr@0.7"] == 1 / 3
    assert r["Pr@0.8"] == 0.0
    # RESMeter (LAVT, >=) on the same three tasks counts it
    res = RESMeter()
    for i, u in [(1, 2), (0, 3), (3, 4)]:
        res.update_counts(i, u)
    assert res.compute()["Pr@0.5"] == 2 / 3


def test_phrasecut_empty_gt_and_pred_scores_zero():
    meter = PhraseCutMeter()
    assert meter.update(m([[0, 0]]), m([[0, 0]])) == 0.0  # i == 0 -> iou 0


# --------------------------------------------------------------------------- semantic segmentation
# 4 classes, 255 ignored. Class 2 only predicted, class 3 nowhere.
SEM_GT = np.array([[0, 0, 1, 1], [0, 255, 1, 1]], dtype=np.uint8)
SEM_PRED = np.array([[0, 2, 1, 1], [0, 1, 1, 0]], dtype=np.int64)
# pixel pairs (pred, gt): (0,0) (2,0) (1,1) (1,1) / (0,0) (1,ign) (1,1) (0,1)
# class 0: tp 2, gt 3, pred 3 -> U 4 -> IoU 1/2, acc 2/3
# class 1: tp 3, gt 4, pred 3 (the ignored pixel's prediction is dropped) -> U 4 -> IoU 3/4, acc 3/4
# class 2: tp 0, gt 0, pred 1 -> detectron2: not valid (nan); mmseg: U 1 -> IoU 0
# class 3: nothing -> nan in both


def test_semseg_detectron2_hand_numbers():
    meter = SemSegMeter(4, ignore_index=255)
    meter.update(SEM_PRED, SEM_GT)
    r = meter.compute()
    assert r["per_class_iou"][:2] == [0.5, 0.75]
    assert math.isnan(r["per_class_iou"][2])  # predicted only: excluded (no GT pixels)
    assert math.isnan(r["per_class_iou"][3])  # absent from both: excluded
    assert r["mIoU"] == pytest.approx((0.5 + 0.75) / 2)  # 0.625
    assert r["mACC"] == pytest.approx((2 / 3 + 3 / 4) / 2)  # 17/24
    assert r["pACC"] == pytest.approx(5 / 7)
    assert r["fwIoU"] == pytest.approx(0.5 * 3 / 7 + 0.75 * 4 / 7)  # 9/14
    assert r["n"] == 1
    # the ignored pixel landed in the last column only
    assert meter.conf_matrix[1, 4] == 1 and meter.conf_matrix[:, 4].sum() == 1


def test_semseg_mmseg_protocol_includes_predicted_only_class():
    meter = SemSegMeter(4, protocol="mmseg")
    meter.update(SEM_PRED, SEM_GT)
    r = meter.compute()
    assert r["per_class_iou"][2] == 0.0
    assert math.isnan(r["per_class_iou"][3])
    assert r["mIoU"] == pytest.approx((0.5 + 0.75 + 0.0) / 3)  # 5/12
    assert r["mACC"] == pytest.approx(17 / 24)
    assert r["pACC"] == pytest.approx(5 / 7)


def test_semseg_rejects_out_of_range_labels():
    meter = SemSegMeter(4)
    with pytest.raises(ValueError):
        meter.update(np.array([[4]]), np.array([[0]]))
    with pytest.raises(ValueError):
        meter.update(np.array([[0]]), np.array([[7]]))
    with pytest.raises(TypeError):
        meter.update(np.array([[0.0]]), np.array([[0]]))
    assert meter.compute()["n"] == 0 and math.isnan(meter.compute()["mIoU"])


# --------------------------------------------------------------------------- merge / state


def _gres_two_halves():
    a, b = GRESMeter(), GRESMeter()
    for i, s in enumerate(GRES_SAMPLES):
        (a if i % 2 else b).update(*s)
    return a, b


def _same(r1, r2):
    assert r1.keys() == r2.keys()
    for k in r1:
        v1, v2 = r1[k], r2[k]
        if isinstance(v1, list):
            np.testing.assert_allclose(v1, v2)
        elif isinstance(v1, float) and math.isnan(v1):
            assert math.isnan(v2)
        else:
            assert v1 == pytest.approx(v2), k


@pytest.mark.parametrize(
    "make,samples",
    [
        (lambda: RESMeter(), RES_SAMPLES),
        (lambda: RESMeter(empty_union_as_one=True), RES_SAMPLES),
        (lambda: GRESMeter(), GRES_SAMPLES),
        (lambda: PhraseCutMeter(), RES_SAMPLES),
        (lambda: SemSegMeter(4), [(SEM_PRED, SEM_GT), (SEM_GT.astype(np.int64) % 255, SEM_GT)]),
    ],
)
def test_merge_and_state_sum_equal_single_meter(make, samples):
    single = feed(make(), samples)
    a, b = make(), make()
    for i, s in enumerate(samples):
        (a if i % 2 else b).update(*s)
    # merge
    merged = make().merge(a).merge(b)
    _same(merged.compute(), single.compute())
    # simulated all-reduce(SUM) of state_dicts, loaded into a fresh meter
    sa, sb = a.state_dict(), b.state_dict()
    summed = {k: sa[k] + sb[k] for k in sa}
    fresh = make()
    fresh.load_state_dict(summed)
    _same(fresh.compute(), single.compute())
    # round trip through torch tensors (what dist.all_reduce hands back)
    fresh2 = make()
    fresh2.load_state_dict({k: torch.as_tensor(v) for k, v in single.state_dict().items()})
    _same(fresh2.compute(), single.compute())
    # reset
    single.reset()
    assert single.compute()["n"] == 0


def test_merge_refuses_mismatched_meters():
    with pytest.raises(ValueError):
        RESMeter().merge(RESMeter(empty_union_as_one=True))
    with pytest.raises(TypeError):
        RESMeter().merge(PhraseCutMeter())
    with pytest.raises(ValueError):
        SemSegMeter(4).merge(SemSegMeter(5))
    with pytest.raises(KeyError):
        RESMeter().load_state_dict({"n": 1})


def test_state_dict_is_a_copy():
    a, _ = _gres_two_halves()
    st = a.state_dict()
    st["pr_count"][:] = 99
    assert a.state_dict()["pr_count"].max() < 99


# --------------------------------------------------------------------------- format_table


def test_format_table_percentages():
    res = {"mIoU": 0.72731, "oIoU": 14 / 17, "n": 4, "N-acc": float("nan")}
    assert format_table(res, ["mIoU", "oIoU", "n", "N-acc"]) == "| 72.73 | 82.35 | 4 | n/a |"
    table = format_table(res, ["mIoU", "oIoU"], header=True, label="val")
    assert table.splitlines() == ["|  | mIoU | oIoU |", "|---|---|---|", "| val | 72.73 | 82.35 |"]
    with pytest.raises(KeyError):
        format_table(res, ["cIoU"])
