"""ESC-Net / SAM-MI modules on tiny configs, their hand-checkable parts, and the semseg readers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from sspsam.config import build_model, load_config
from sspsam.data import DatasetLayoutError
from sspsam.data.semseg import (
    ADE20K150,
    ADE20K847,
    COCOStuff171,
    PascalContext,
    PascalVOC,
    SemSegDataset,
    generate_semseg,
)
from sspsam.data.shapes import COLOURS
from sspsam.ovss.cost import class_embeddings
from sspsam.ovss.escnet import PseudoPromptGenerator, kmeans
from sspsam.ovss.evaluate import evaluate_ovss, format_iou_table
from sspsam.ovss.sam_mi import shallow_mask_aggregation


@pytest.fixture(scope="module", params=["escnet-tiny", "sam-mi-tiny"])
def tiny(request):
    torch.manual_seed(0)
    return build_model(load_config(request.param))


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("semseg")
    generate_semseg(root, n=3, size=128, seed=5)
    return root


# ---------------------------------------------------------------------------------------- models


def test_model_contract_and_shapes(tiny):
    classes = ["background", "red", "blue"]
    emb = class_embeddings(tiny.clip, classes)
    with torch.no_grad():
        out = tiny(torch.rand(2, 3, 128, 128) * 255, emb)
    assert tiny.image_size == tiny.sam.img_size == 128
    assert tiny.config["model"] in ("escnet", "sam-mi")
    assert out["logits"].shape == (2, 3, 64, 64)  # 16x16 CLIP grid, two 2x decoder stages
    assert torch.isfinite(out["logits"]).all()
    assert all(a.shape[:2] == (2, 3) for a in out["aux_logits"])


def test_model_backward_and_freeze():
    torch.manual_seed(0)
    model = build_model(load_config("escnet-tiny"))
    model.freeze(["clip"])
    emb = class_embeddings(model.clip, ["a", "b"])
    model(torch.rand(1, 3, 128, 128) * 255, emb)["logits"].sum().backward()
    assert all(p.grad is None for p in model.clip.parameters())
    assert model.sam.mask_decoder.transformer.layers[0].self_attn.q_proj.weight.grad is not None  # the SAM block trains
    assert model.decoder.head.weight.grad is not None


def test_kmeans_two_clusters():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(20, 2, generator=g) * 0.5
    b = torch.randn(20, 2, generator=g) * 0.5 + 10
    far = torch.full((5, 2), 100.0)  # invalid points must be ignored
    pts = torch.cat([a, b, far])[torch.randperm(45, generator=g)]
    valid = (pts < 50).all(1)
    cent, assign = kmeans(pts[None], valid[None], k=2)
    cent = cent[0][cent[0, :, 0].argsort()]
    assert torch.allclose(cent[0], a.mean(0), atol=1e-4)
    assert torch.allclose(cent[1], b.mean(0), atol=1e-4)
    assert (assign[0][~valid] == -1).all()
    near_b = pts[:, 0] > 5
    assert len(set(assign[0][valid & near_b].tolist())) == 1 and len(set(assign[0][valid & ~near_b].tolist())) == 1
    again, _ = kmeans(pts[None], valid[None], k=2)  # deterministic
    assert torch.equal(again[0][again[0, :, 0].argsort()], cent)


def test_pseudo_prompts_pick_the_argmax_of_each_region():
    score = torch.zeros(1, 2, 8, 8)
    score[0, 0, 1:3, 0:3] = 1.0  # class 0: two blobs, peaks at (x=1, y=2) and (x=6, y=5)
    score[0, 0, 2, 1] = 2.0
    score[0, 0, 4:7, 5:8] = 1.0
    score[0, 0, 5, 6] = 3.0
    score[0, 1] = 0.5  # class 1 wins where class 0 scores 0
    ppg = PseudoPromptGenerator(num_regions=2, alpha=0.5, temperature=0.1)
    prob, points, labels = ppg.points(score)
    assert prob.shape == (1, 2, 8, 8)
    assert sorted(map(tuple, points[0, 0].tolist())) == [(1.0, 2.0), (6.0, 5.0)]
    assert labels[0, 0].tolist() == [1, 1]
    assert (labels[0, 1] == 1).all()


def test_pseudo_prompts_empty_class_is_not_a_point():
    score = torch.zeros(1, 2, 4, 4)
    score[0, 0] = 5.0  # class 1 never exceeds alpha
    _, _, labels = PseudoPromptGenerator(num_regions=3, alpha=0.5, temperature=0.1).points(score)
    assert labels[0, 1].tolist() == [-1, -1, -1]


def _box(y0, y1, x0, x1, size=24):
    m = torch.zeros(size, size)
    m[y0:y1, x0:x1] = 1.0
    return m


def test_smagg_merges_parts_and_keeps_objects_apart():
    left, right = _box(2, 10, 2, 6), _box(2, 10, 6, 10)  # two halves of one square object
    other = _box(15, 22, 15, 22)  # a second object, far away
    touching = _box(2, 10, 10, 14)  # touches the square but looks different
    masks = torch.stack([left, right, other, touching])
    feats = torch.tensor([[1.0, 0.0, 0.0], [0.95, 0.1, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    merged, group = shallow_mask_aggregation(masks, feats, similarity=0.8)
    assert group[0] == group[1]
    assert len({int(group[0]), int(group[2]), int(group[3])}) == 3
    assert merged.shape == (3, 24, 24)
    assert torch.equal(merged[group[0]], torch.maximum(left, right))


def test_smagg_containment_without_features():
    whole = _box(2, 12, 2, 12)
    part = _box(4, 8, 4, 8)
    apart = _box(14, 20, 14, 20)
    merged, group = shallow_mask_aggregation(torch.stack([whole, part, apart]), valid=torch.tensor([True, True, True]))
    assert group.tolist()[0] == group.tolist()[1] != group.tolist()[2]
    assert torch.equal(merged[group[0]], whole)
    _, group = shallow_mask_aggregation(torch.stack([whole, part]), valid=torch.tensor([True, False]))
    assert group.tolist() == [0, -1]


# ----------------------------------------------------------------------------------- generic data


def test_generated_semseg_round_trip(shapes_root):
    ds = SemSegDataset(shapes_root, "val", image_size=128)
    meta = json.loads((shapes_root / "classes.json").read_text())
    assert ds.classes == meta["classes"] and ds.ignore_index == 255 and len(ds) == 3
    for i in range(len(ds)):
        s = ds[i]
        h, w = s["orig_size"].tolist()
        assert max(h, w) == 128 and min(h, w) < 128  # the letterbox pads
        label, image = s["label"], s["image"]
        assert label.dtype == torch.int64 and label.shape == (128, 128)
        assert (label[h:] == 255).all() and (label[:, w:] == 255).all()
        assert (label[:h, :w] != 255).all()
        assert set(label.unique().tolist()) <= {0, 1, 2, 3, 4, 255}
        for k, name in enumerate(ds.classes[1:], start=1):  # a class's name determines its pixels
            px = image[:, label == k]
            if px.numel():
                assert torch.equal(px.T.unique(dim=0), torch.tensor([COLOURS[name]], dtype=torch.float32))
    raw_image, raw_label = ds.raw(0)
    full = SemSegDataset(shapes_root, "val")[0]
    assert full["image"].shape[1:] == raw_label.shape and torch.equal(full["label"], torch.from_numpy(raw_label))
    assert raw_image.shape[:2] == raw_label.shape


def test_generation_is_deterministic(tmp_path, shapes_root):
    generate_semseg(tmp_path, n=3, size=128, seed=5, splits=("val",))
    for a, b in zip(sorted((tmp_path / "annotations" / "val").iterdir()), sorted((shapes_root / "annotations" / "val").iterdir())):
        assert a.read_bytes() == b.read_bytes()


def test_layout_errors_name_the_missing_path(tmp_path, shapes_root):
    with pytest.raises(DatasetLayoutError, match="classes.json"):
        SemSegDataset(tmp_path, "val")
    (tmp_path / "classes.json").write_text(json.dumps({"classes": ["a"], "ignore_index": 255}))
    with pytest.raises(DatasetLayoutError, match=r"images/val"):
        SemSegDataset(tmp_path, "val")
    (tmp_path / "images" / "val").mkdir(parents=True)
    (tmp_path / "annotations" / "val").mkdir(parents=True)
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "annotations" / "val" / "x1.png")
    with pytest.raises(DatasetLayoutError, match=r"x1\.jpg"):
        SemSegDataset(tmp_path, "val")
    with pytest.raises(DatasetLayoutError, match="ADEChallengeData2016"):
        ADE20K150(tmp_path)
    with pytest.raises(DatasetLayoutError, match=r"val\.txt"):
        (tmp_path / "VOCdevkit" / "VOC2012" / "JPEGImages").mkdir(parents=True)
        (tmp_path / "VOCdevkit" / "VOC2012" / "SegmentationClass").mkdir()
        PascalVOC(tmp_path)


# ----------------------------------------------------------------------------- benchmark readers


def _img(path, h=6, w=8):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), 100, np.uint8)).save(path)


def _label(path, arr, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(arr) if mode is None else Image.fromarray(arr).convert(mode)
    im.save(path)


def _values(h=6, w=8, vals=(0, 1)):
    a = np.zeros((h, w), np.int64)
    for i, v in enumerate(vals):
        a.flat[i] = v
    return a


def test_ade150_reduce_zero_label(tmp_path):
    base = tmp_path / "ADEChallengeData2016"
    _img(base / "images" / "validation" / "ADE_val_00000001.jpg")
    _label(base / "annotations" / "validation" / "ADE_val_00000001.png", _values(vals=(0, 1, 150, 13)).astype(np.uint8))
    ds = ADE20K150(tmp_path, image_size=16)
    assert len(ds.classes) == 150 and ds.classes[0] == "wall" and ds.classes[149] == "flag"
    _, lab = ds.raw(0)
    assert lab.flat[:4].tolist() == [255, 0, 149, 12] and (lab.flat[4:] == 255).all()
    s = ds[0]
    assert s["label"].shape == (16, 16) and (s["label"][12:] == 255).all()


def test_ade847_tif_and_class_file(tmp_path):
    base = tmp_path / "ADE20K_2021_17_01"
    _img(base / "images_detectron2" / "validation" / "ADE_frame_1.jpg")
    _label(base / "annotations_detectron2" / "validation" / "ADE_frame_1.tif", _values(vals=(846, 65535, 300)).astype(np.uint16))
    with pytest.raises(DatasetLayoutError, match="ade847.json"):
        ADE20K847(tmp_path)
    (base / "ade847.json").write_text(json.dumps([f"c{i}" for i in range(847)]))
    ds = ADE20K847(tmp_path, image_size=16)
    assert ds.ignore_index == 65535 and len(ds.classes) == 847
    _, lab = ds.raw(0)
    assert lab.flat[:3].tolist() == [846, 65535, 300]
    assert (ds[0]["label"][12:] == 65535).all()  # letterbox padding uses the dataset's ignore value


@pytest.mark.parametrize("num_classes, expect", [(21, [0, 15, 255, 20]), (20, [255, 14, 255, 19])])
def test_pascal_voc(tmp_path, num_classes, expect):
    base = tmp_path / "VOCdevkit" / "VOC2012"
    for stem in ("2007_000033", "2007_000042"):
        _img(base / "JPEGImages" / f"{stem}.jpg")
        lab = Image.fromarray(_values(vals=(0, 15, 255, 20)).astype(np.uint8), mode="L").convert("P")
        lab.putpalette([0, 0, 0, 128, 0, 0] * 128)
        (base / "SegmentationClass").mkdir(exist_ok=True)
        lab.save(base / "SegmentationClass" / f"{stem}.png")
    (base / "ImageSets" / "Segmentation").mkdir(parents=True)
    (base / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000042\n")
    ds = PascalVOC(tmp_path, "val", num_classes=num_classes)
    assert len(ds) == 1 and ds[0]["image_id"] == "2007_000042"
    assert len(ds.classes) == num_classes and ds.classes[-1] == "tvmonitor"
    assert ds.raw(0)[1].flat[:4].tolist() == expect


def test_pascal_context_59_and_459(tmp_path):
    base = tmp_path / "VOCdevkit" / "VOC2010"
    _img(base / "JPEGImages" / "2008_000002.jpg")
    _label(base / "annotations_detectron2" / "pc59_val" / "2008_000002.png", _values(vals=(58, 255)).astype(np.uint8))
    _label(base / "annotations_detectron2" / "pc459_val" / "2008_000002.tif", _values(vals=(458, 65535)).astype(np.uint16))
    pc59 = PascalContext(tmp_path, 59)
    assert len(pc59.classes) == 59 and pc59.classes[-1] == "wood" and pc59.raw(0)[1].flat[:2].tolist() == [58, 255]
    with pytest.raises(DatasetLayoutError, match="pc459.json"):
        PascalContext(tmp_path, 459)
    (base / "pc459.json").write_text(json.dumps({"classes": [f"c{i}" for i in range(459)]}))
    pc459 = PascalContext(tmp_path, 459)
    assert pc459.ignore_index == 65535 and pc459.raw(0)[1].flat[:2].tolist() == [458, 65535]


def test_coco_stuff_171_mapping(tmp_path):
    base = tmp_path / "coco-stuff"
    _img(base / "images" / "val2017" / "000000000139.jpg")
    # stored values are COCO id - 1: person (0), id 12 (unused, 11), banner (91), wood (181), unlabeled (255)
    _label(base / "stuffthingmaps_trainval2017" / "val2017" / "000000000139.png", _values(vals=(0, 11, 91, 181, 255)).astype(np.uint8))
    ds = COCOStuff171(tmp_path, "val2017")
    assert len(ds.classes) == 171 and ds.classes[80] == "banner" and ds.classes[170] == "wood"
    assert ds.raw(0)[1].flat[:5].tolist() == [0, 255, 80, 170, 255]


# ----------------------------------------------------------------------------------- evaluation


def test_evaluate_runs_with_and_without_slide(tiny, tmp_path):
    generate_semseg(tmp_path, n=2, size=200, seed=1, splits=("val",))  # larger than the 128 model input
    ds = SemSegDataset(tmp_path, "val")
    for slide in (False, True):
        res = evaluate_ovss(tiny, ds, slide=slide)
        assert 0.0 <= res["mIoU"] <= 1.0 and 0.0 <= res["pACC"] <= 1.0
        assert set(res["per_class"]) == set(ds.classes) and res["n"] == 2
        table = format_iou_table(res)
        assert "| red |" in table and "**mIoU**" in table
