"""supervision, polygons and COCO results (issue 11 part 6): what goes out comes back unchanged."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from sspsam.data.shapes import make_scene
from sspsam.errors import SSPSamError
from sspsam.predict.results import Segmentation, coco_results



@pytest.fixture(scope="module")
def sv():
    return pytest.importorskip("supervision")  # the optional extra sspsam[interop]; installed with [dev]


def _scene_result():
    """A Segmentation of known masks: phrase 0 = two objects, phrase 1 = one, phrase 2 = nothing."""
    scene = make_scene(np.random.default_rng(4), width=160, height=120, n_objects=(4, 4), radius=(0.12, 0.18))
    m = scene.masks()
    masks = np.stack([m[0] | m[1], m[2], np.zeros_like(m[0])])
    return scene, Segmentation(["two", "one", "none"], masks, np.array([0.9, 0.7, 0.0], np.float32),
                               np.array([False, False, True]))


def test_to_supervision_round_trip(sv):
    scene, res = _scene_result()
    det = res.to_supervision()
    assert isinstance(det, sv.Detections) and len(det) == 3
    want_masks = np.concatenate([i.masks for i in res.instances])
    assert np.array_equal(det.mask, want_masks)
    assert np.array_equal(det.xyxy, np.concatenate([i.boxes for i in res.instances]))
    assert list(det.data["class_name"]) == ["two", "two", "one"] and list(det.class_id) == [0, 0, 1]
    np.testing.assert_array_equal(det.confidence, np.concatenate([i.scores for i in res.instances]))
    # back: the detections of a phrase rebuild its union mask exactly; boxes are the generator's
    for i, phrase in enumerate(res.phrases):
        mine = det[det.data["class_name"] == phrase]
        union = mine.mask.any(0) if len(mine) else np.zeros_like(res.masks[i])
        assert np.array_equal(union, res.masks[i])
    boxes = sorted(map(tuple, det.xyxy[:2]))
    want = sorted(tuple(scene.objects[k].extent) for k in (0, 1))
    assert np.abs(np.array(boxes) - np.array(want)).max() <= 2
    # supervision's own box-from-mask agrees (it is inclusive: x1 = last pixel)
    np.testing.assert_array_equal(sv.mask_to_xyxy(det.mask) + [0, 0, 1, 1], det.xyxy)


def test_nothing_found_is_an_empty_detections(sv):
    _, res = _scene_result()
    empty = Segmentation(["none"], res.masks[2:], res.scores[2:], res.no_target[2:])
    det = empty.to_supervision()
    assert len(det) == 0 and det.mask.shape == (0, *res.masks.shape[1:]) and det.xyxy.shape == (0, 4)


def test_semantic_segmentation_to_supervision(sv):
    from sspsam.predict.ovss import SemanticSegmentation

    labels = np.zeros((40, 50), np.int32)
    labels[5:15, 10:30] = 2
    scores = np.full((40, 50), 0.5, np.float32)
    scores[5:15, 10:30] = 0.8
    res = SemanticSegmentation(["sky", "road", "car"], labels, scores, {})
    det = res.to_supervision()
    assert list(det.class_id) == [0, 2] and list(det.data["class_name"]) == ["sky", "car"]
    assert np.array_equal(det.mask[1], labels == 2) and np.array_equal(det.mask[0], labels == 0)
    assert det.xyxy[1].tolist() == [10, 5, 30, 15] and det.xyxy[0].tolist() == [0, 0, 50, 40]
    np.testing.assert_allclose(det.confidence, [0.5, 0.8], rtol=1e-6)
    assert set(res.polygons()) == {"sky", "car"}


def test_polygons_trace_each_instance(sv):
    _, res = _scene_result()
    polys = res.polygons()
    assert [len(p) for p in polys] == [2, 1, 0]
    h, w = res.masks.shape[1:]
    for inst, per in zip(res.instances, polys):
        for m, outline in zip(inst.masks, per):
            (poly,) = outline  # one part each
            drawn = mask_utils.decode(mask_utils.frPyObjects([poly], h, w)).any(2)
            iou = (drawn & m).sum() / (drawn | m).sum()
            assert iou > 0.8, iou  # an outline through boundary pixel centres loses half a pixel all round


def test_coco_results_for_a_batch_load_in_pycocotools():
    _, res = _scene_result()
    out = coco_results([res, res], image_ids=[3, 9], category_ids={"two": 10, "one": 11, "none": 12})
    assert [(r["image_id"], r["category_id"]) for r in out] == [(3, 10), (3, 10), (3, 11), (9, 10), (9, 10), (9, 11)]
    for r, m in zip(out, np.concatenate([i.masks for i in res.instances] * 2)):
        rle = {"size": r["segmentation"]["size"], "counts": r["segmentation"]["counts"].encode()}
        assert np.array_equal(mask_utils.decode(rle).astype(bool), m)
        assert list(mask_utils.toBbox(rle)) == r["bbox"] and r["area"] == int(m.sum())


def test_without_supervision_one_line_error(monkeypatch):
    _, res = _scene_result()
    monkeypatch.setitem(sys.modules, "supervision", None)
    with pytest.raises(SSPSamError, match=r"pip install sspsam\[interop\]"):
        res.to_supervision()
