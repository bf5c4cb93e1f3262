"""Dataset readers against synthetic datasets written in the real distributed layouts.

The generators write RefCOCO (lichengunc/refer), gRefCOCO (ReLA) and VGPhraseCut layouts; the
readers must read them back. Masks are checked against rasterisations made independently of the
reader (an analytic rectangle, and a pixel-centre point-in-polygon test), not against the
reader's own decoder.
"""

from __future__ import annotations

import json
import pickle
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from sspsam.data import (
    DatasetLayoutError,
    GRefCOCODataset,
    PhraseCutDataset,
    RefCOCODataset,
    collate,
    generate_grefcoco,
    generate_phrasecut,
    generate_refer,
)
from sspsam.data.base import swap_left_right
from sspsam.data.shapes import (
    COLOURS,
    make_scene,
    multi_target_expressions,
    no_target_expressions,
    single_target_expressions,
)
from sspsam.io.transforms import Letterbox, letterbox_image, letterbox_mask

S = 256


# ----------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def refer_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("refer")
    summary = generate_refer(root, "refcoco", "unc", n_images=8, seed=0)
    summary_g = generate_refer(root, "refcocog", "umd", n_images=5, seed=3)
    return root, summary, summary_g


@pytest.fixture(scope="module")
def gref_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("gref")
    return root, generate_grefcoco(root, n_images=8, seed=1)


@pytest.fixture(scope="module")
def pc_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("phrasecut") / "VGPhraseCut_v0"
    return root, generate_phrasecut(root, n_images=6, seed=2)


def _instances(path):
    data = json.loads(path.read_text())
    return {im["id"]: im for im in data["images"]}, {a["id"]: a for a in data["annotations"]}


# ----------------------------------------------------------------------------------------------
# independent rasterisation helpers


def _grid_centres(h, w, offset):
    ys, xs = np.mgrid[0:h, 0:w]
    return xs + offset, ys + offset


def _inside_polygon(pts, px, py):
    """Even-odd rule at the points (px, py); pts is an (N, 2) array."""
    inside = np.zeros(px.shape, dtype=bool)
    n = len(pts)
    for k in range(n):
        (x1, y1), (x2, y2) = pts[k], pts[(k + 1) % n]
        crosses = (y1 > py) != (y2 > py)
        with np.errstate(divide="ignore", invalid="ignore"):
            xint = x1 + (py - y1) * (x2 - x1) / (y2 - y1)
        inside ^= crosses & (px < xint)
    return inside


def _edge_distance(pts, px, py):
    d = np.full(px.shape, np.inf)
    n = len(pts)
    for k in range(n):
        a, b = pts[k], pts[(k + 1) % n]
        ab = b - a
        t = np.clip(((px - a[0]) * ab[0] + (py - a[1]) * ab[1]) / max(float(ab @ ab), 1e-12), 0, 1)
        d = np.minimum(d, np.hypot(px - (a[0] + t * ab[0]), py - (a[1] + t * ab[1])))
    return d


def _extent(mask):
    ys, xs = np.nonzero(mask)
    return xs.min(), ys.min(), xs.max() + 1, ys.max() + 1


def _dilate(m, r):
    out = m.copy()
    for _ in range(r):
        e = out.copy()
        e[1:] |= out[:-1]
        e[:-1] |= out[1:]
        e[:, 1:] |= out[:, :-1]
        e[:, :-1] |= out[:, 1:]
        out = e
    return out


def _erode(m, r):
    return ~_dilate(~m, r)


# ----------------------------------------------------------------------------------------------
# RefCOCO


def test_refer_files_have_the_real_layout(refer_root):
    root, summary, _ = refer_root
    assert (root / "refcoco" / "instances.json").is_file()
    assert (root / "refcoco" / "refs(unc).p").is_file()
    assert (root / "refcocog" / "refs(umd).p").is_file()
    image_dir = root / "images" / "mscoco" / "images" / "train2014"
    inst = json.loads((root / "refcoco" / "instances.json").read_text())
    assert set(inst) >= {"images", "annotations", "categories"}
    for im in inst["images"]:
        assert im["file_name"] == "COCO_train2014_%012d.jpg" % im["id"]
        assert (image_dir / im["file_name"]).is_file()
        with Image.open(image_dir / im["file_name"]) as f:
            assert f.format == "JPEG" and f.size == (im["width"], im["height"])
    ann = inst["annotations"][0]
    assert set(ann) >= {"segmentation", "area", "iscrowd", "image_id", "bbox", "category_id", "id"}
    assert isinstance(ann["segmentation"], list) and isinstance(ann["segmentation"][0], list)
    assert set(inst["categories"][0]) == {"supercategory", "id", "name"}

    with open(root / "refcoco" / "refs(unc).p", "rb") as f:
        refs = pickle.load(f)
    assert isinstance(refs, list) and refs
    for ref in refs:
        assert set(ref) == {"ref_id", "ann_id", "image_id", "split", "sentences", "file_name", "category_id", "sent_ids"}
        assert ref["split"] in {"train", "val", "testA", "testB"}
        assert ref["file_name"] == "COCO_train2014_%012d_%d.jpg" % (ref["image_id"], ref["ann_id"])
        assert ref["sent_ids"] == [s["sent_id"] for s in ref["sentences"]]
        for s in ref["sentences"]:
            assert set(s) == {"tokens", "raw", "sent_id", "sent"}
            assert s["tokens"] == s["sent"].split()
    assert set(summary["refs"]) == {"train", "val", "testA", "testB"}


def test_refer_split_sizes_and_sentence_counts(refer_root):
    root, summary, summary_g = refer_root
    total = 0
    for split in ("train", "val", "testA", "testB"):
        ds = RefCOCODataset(root, "refcoco", "unc", split=split, image_size=S)
        assert len(ds) == summary["sentences"][split]
        assert len({ds.info(i)["ref_id"] for i in range(len(ds))}) == summary["refs"][split]
        assert all(ds.info(i)["split"] == split for i in range(len(ds)))
        total += len(ds)
    assert len(RefCOCODataset(root, "refcoco", split=None, image_size=S)) == total
    # refer.py semantics: 'test' covers testA and testB
    n_test = summary["sentences"]["testA"] + summary["sentences"]["testB"]
    assert len(RefCOCODataset(root, "refcoco", split="test", image_size=S)) == n_test
    # refcocog defaults to the umd split (train/val/test)
    for split in ("train", "val", "test"):
        assert len(RefCOCODataset(root, "refcocog", split=split, image_size=S)) == summary_g["sentences"][split]
    with pytest.raises(ValueError, match="splits present"):
        RefCOCODataset(root, "refcocog", split="testA", image_size=S)


def test_refer_square_masks_are_pixel_exact(refer_root):
    """Axis-aligned squares with integer corners: COCO's rasteriser covers exactly columns
    x0..x1-1 and rows y0..y1-1 — an analytic answer independent of the reader."""
    root, _, _ = refer_root
    _, anns = _instances(root / "refcoco" / "instances.json")
    ds = RefCOCODataset(root, "refcoco", split=None, image_size=S)
    checked = 0
    for i in range(len(ds)):
        info = ds.info(i)
        ann = anns[info["ann_ids"][0]]
        if ann["category_id"] != 2:  # square
            continue
        xs, ys = ann["segmentation"][0][0::2], ann["segmentation"][0][1::2]
        x0, x1, y0, y1 = int(min(xs)), int(max(xs)), int(min(ys)), int(max(ys))
        expected = np.zeros((info["height"], info["width"]), dtype=bool)
        expected[y0:y1, x0:x1] = True
        np.testing.assert_array_equal(ds.mask(i), expected)
        checked += 1
    assert checked >= 1


def test_refer_masks_match_an_independent_point_in_polygon(refer_root):
    """Every target (circles and triangles too) against a pixel-centre even-odd test; only
    pixels whose centre lies within 0.25 px of an edge may differ (pycocotools samples at 1/5 px)."""
    root, _, _ = refer_root
    _, anns = _instances(root / "refcoco" / "instances.json")
    ds = RefCOCODataset(root, "refcoco", split=None, image_size=S)
    for i in range(len(ds)):
        info = ds.info(i)
        poly = np.asarray(anns[info["ann_ids"][0]]["segmentation"][0], dtype=float).reshape(-1, 2)
        px, py = _grid_centres(info["height"], info["width"], 0.5)
        expected = _inside_polygon(poly, px, py)
        band = _edge_distance(poly, px, py) < 0.25
        got = ds.mask(i)
        assert got.any()
        assert np.array_equal(got[~band], expected[~band]), f"sample {i}: {info['text']}"
        perimeter = np.linalg.norm(np.roll(poly, -1, axis=0) - poly, axis=1).sum()
        assert band.sum() <= perimeter + 8  # the excluded band is thin (≤ one pixel row per edge)


def test_refer_sample_dict(refer_root):
    root, _, _ = refer_root
    ds = RefCOCODataset(root, "refcoco", split="train", image_size=S, return_orig_mask=True)
    s = ds[0]
    assert s["image"].shape == (3, S, S) and s["image"].dtype == torch.float32
    assert 0 <= float(s["image"].min()) and float(s["image"].max()) <= 255
    assert s["mask"].shape == (S, S) and s["mask"].dtype == torch.bool and s["mask"].any()
    assert isinstance(s["text"], str) and s["text"] == ds.info(0)["text"]
    assert s["no_target"] is False
    assert isinstance(s["image_id"], int) and isinstance(s["sent_id"], int)
    H, W = s["orig_size"].tolist()
    assert s["orig_mask"].shape == (H, W)
    image, mask = ds.raw(0)
    assert image.shape == (H, W, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(mask, s["orig_mask"].numpy())
    # the letterboxed mask is the contract's letterbox of the original mask
    np.testing.assert_array_equal(s["mask"].numpy(), letterbox_mask(mask, Letterbox.fit((H, W), S)))
    np.testing.assert_array_equal(s["image"].permute(1, 2, 0).numpy().astype(np.uint8), letterbox_image(image, S)[0])


def test_box_is_the_normalised_target_box_in_the_letterboxed_frame(refer_root):
    root, _, _ = refer_root
    ds = RefCOCODataset(root, "refcoco", split=None, image_size=S)
    for i in range(len(ds)):
        s = ds[i]
        x0, y0, x1, y1 = _extent(s["mask"].numpy())
        cx, cy, w, h = (s["box"] * S).tolist()
        tol = 0.5 + S / max(s["orig_size"].tolist())  # nearest-neighbour resizing moves edges ≤ 1 source pixel
        assert abs((cx - w / 2) - x0) <= tol and abs((cx + w / 2) - x1) <= tol
        assert abs((cy - h / 2) - y0) <= tol and abs((cy + h / 2) - y1) <= tol


def test_letterboxing_keeps_image_and_mask_aligned(refer_root):
    """The target's colour fills the letterboxed mask and does not spill around it."""
    root, _, _ = refer_root
    ds = RefCOCODataset(root, "refcoco", split=None, image_size=S)
    palette = np.array(list(COLOURS.values()), dtype=float)
    for i in range(len(ds)):
        image, mask = ds.raw(i)
        colour = np.median(image[_erode(mask, 1)].astype(float), axis=0)
        colour = palette[np.argmin(np.abs(palette - colour).sum(1))]  # the painted colour
        s = ds[i]
        img = s["image"].permute(1, 2, 0).numpy()
        m = s["mask"].numpy()
        near = np.abs(img - colour).max(axis=2) < 40
        interior = _erode(m, 1)
        assert near[interior].mean() > 0.97, ds.info(i)["text"]
        ring = _dilate(m, 3) & ~_dilate(m, 1)
        assert near[ring].mean() < 0.05, ds.info(i)["text"]
        # nothing of the target colour in the zero padding
        H, W = s["orig_size"].tolist()
        sh, sw = Letterbox.fit((H, W), S).scaled_hw
        assert not m[sh:].any() and not m[:, sw:].any()
        assert float(s["image"][:, sh:].abs().sum()) == 0 and float(s["image"][:, :, sw:].abs().sum()) == 0


def test_png_images_match_the_polygons_pixel_for_pixel(tmp_path):
    """Lossless images: each annotation's pixels carry exactly one palette colour, and the
    palette-coloured pixels are exactly the union of the annotations' pycocotools masks."""
    generate_refer(tmp_path, "refcoco", "unc", n_images=3, seed=5, image_ext="png")
    imgs, anns = _instances(tmp_path / "refcoco" / "instances.json")
    palette = np.array(list(COLOURS.values()))
    for iid, im in imgs.items():
        image = np.asarray(Image.open(tmp_path / "images/mscoco/images/train2014" / im["file_name"]))
        union = np.zeros(image.shape[:2], dtype=bool)
        for a in anns.values():
            if a["image_id"] != iid:
                continue
            rle = mask_utils.frPyObjects(a["segmentation"], im["height"], im["width"])
            m = mask_utils.decode(rle).any(axis=2)
            assert m.sum() == a["area"]
            assert len(np.unique(image[m], axis=0)) == 1
            union |= m
        is_palette = (image[:, :, None, :] == palette[None, None]).all(-1).any(-1)
        np.testing.assert_array_equal(is_palette, union)


# ----------------------------------------------------------------------------------------------
# gRefCOCO


def test_grefcoco_layout_and_fields(gref_root):
    root, summary = gref_root
    refs = json.loads((root / "grefcoco" / "grefs(unc).json").read_text())
    assert (root / "grefcoco" / "instances.json").is_file()
    assert summary["kinds"]["none"] > 0 and summary["kinds"]["multi"] > 0 and summary["kinds"]["single"] > 0
    for ref in refs:
        assert set(ref) == {"ref_id", "ann_id", "image_id", "split", "sentences", "file_name", "category_id", "sent_ids", "no_target"}
        assert isinstance(ref["ann_id"], list) and isinstance(ref["category_id"], list)
        assert ref["no_target"] == (ref["ann_id"] == [-1])
        if ref["no_target"]:
            assert ref["category_id"] == [-1]
        assert (root / "images" / "train2014" / ref["file_name"]).is_file()
    for split in ("train", "val", "testA", "testB"):
        ds = GRefCOCODataset(root, split=split, image_size=S)
        assert len(ds) == summary["sentences"][split]


def test_grefcoco_no_target_is_empty_and_multi_target_is_the_union(gref_root):
    root, _ = gref_root
    imgs, anns = _instances(root / "grefcoco" / "instances.json")
    ds = GRefCOCODataset(root, split=None, image_size=S)
    n_none = n_multi = 0
    for i in range(len(ds)):
        info = ds.info(i)
        s = ds[i]
        if info["no_target"]:
            n_none += 1
            assert s["no_target"] is True
            assert not s["mask"].any() and not ds.mask(i).any()
            assert torch.equal(s["box"], torch.zeros(4))
            continue
        assert s["no_target"] is False and s["mask"].any()
        im = imgs[info["image_id"]]
        parts = [
            mask_utils.decode(mask_utils.frPyObjects(anns[a]["segmentation"], im["height"], im["width"])).any(axis=2)
            for a in info["ann_ids"]
        ]
        union = np.logical_or.reduce(parts)
        np.testing.assert_array_equal(ds.mask(i), union)
        if len(parts) > 1:
            n_multi += 1
            assert all(union.sum() > p.sum() for p in parts)
    assert n_none > 0 and n_multi > 0


# ----------------------------------------------------------------------------------------------
# PhraseCut


def test_phrasecut_layout_and_counts(pc_root):
    root, summary = pc_root
    infos = json.loads((root / "image_data_split.json").read_text())
    assert set(infos[0]) >= {"image_id", "width", "height", "split"}
    for split in ("train", "val", "test", "miniv"):
        tasks = json.loads((root / f"refer_{split}.json").read_text())
        inputs = json.loads((root / f"refer_input_{split}.json").read_text())
        assert [t["task_id"] for t in tasks] == [t["task_id"] for t in inputs]
        for t in tasks:
            assert set(t) == {"task_id", "image_id", "ann_ids", "instance_boxes", "Polygons", "phrase", "phrase_structure"}
            assert len(t["Polygons"]) == len(t["instance_boxes"]) == len(t["ann_ids"])
            assert set(t["phrase_structure"]) == {"name", "attributes", "relation_ids", "relation_descriptions", "type"}
            assert (root / "images" / f"{t['image_id']}.jpg").is_file()
        if tasks:
            assert len(PhraseCutDataset(root, split=split, image_size=S)) == summary["sentences"][split]
    both = PhraseCutDataset(root, split="val_miniv", image_size=S)
    assert len(both) == summary["sentences"]["val"] + summary["sentences"]["miniv"]
    # a folder above VGPhraseCut_v0 is accepted too
    assert len(PhraseCutDataset(root.parent, split="train", image_size=S)) == summary["sentences"]["train"]


def test_phrasecut_masks_follow_its_reference_rasteriser(pc_root):
    """PhraseCut draws int vertices with PIL (outline included): squares cover x0..x1 inclusive;
    for other shapes, centres deeper than 1 px inside are in, farther than 1 px outside are out."""
    root, _ = pc_root
    ds = PhraseCutDataset(root, split="train_val_test_miniv", image_size=S)
    squares = 0
    for i in range(len(ds)):
        info = ds.info(i)
        got = ds.mask(i)
        px, py = _grid_centres(info["height"], info["width"], 0.0)
        task_polys = [poly for inst in _task(root, info["sent_id"])["Polygons"] for poly in inst]
        deep_in = np.zeros_like(got)
        far_out = np.ones_like(got)
        for poly in task_polys:
            pts = np.asarray(poly, dtype=float)
            inside = _inside_polygon(pts, px, py)
            dist = _edge_distance(pts, px, py)
            deep_in |= inside & (dist > 1.0)
            far_out &= ~inside & (dist > 1.0)
            xs, ys = pts[:, 0], pts[:, 1]
            if len(pts) == 4 and len(set(xs)) == 2 and len(set(ys)) == 2:
                exact = np.zeros_like(got)
                exact[int(ys.min()) : int(ys.max()) + 1, int(xs.min()) : int(xs.max()) + 1] = True
                assert (got & exact).sum() == exact.sum()
                squares += 1
        assert got[deep_in].all() and not got[far_out].any()
        s = ds[i]
        assert isinstance(s["sent_id"], str) and s["no_target"] is False and s["mask"].any()
    assert squares >= 1


def _task(root, task_id):
    for split in ("train", "val", "test", "miniv"):
        for t in json.loads((root / f"refer_{split}.json").read_text()):
            if t["task_id"] == task_id:
                return t
    raise KeyError(task_id)


# ----------------------------------------------------------------------------------------------
# layout errors


def test_missing_refer_files_name_the_file(tmp_path):
    generate_refer(tmp_path, "refcoco", "unc", n_images=2, seed=0)
    assert issubclass(DatasetLayoutError, RuntimeError)
    with pytest.raises(DatasetLayoutError, match=r"refs\(google\)\.p") as exc:
        RefCOCODataset(tmp_path, "refcoco", "google")
    assert "refs(unc).p" in str(exc.value)  # says what is there
    with pytest.raises(DatasetLayoutError, match=r"refcoco\+"):
        RefCOCODataset(tmp_path, "refcoco+")
    (tmp_path / "refcoco" / "instances.json").rename(tmp_path / "instances.bak")
    with pytest.raises(DatasetLayoutError, match="instances.json") as exc:
        RefCOCODataset(tmp_path, "refcoco", split=None)
    assert str(tmp_path / "refcoco" / "instances.json") in str(exc.value)
    (tmp_path / "instances.bak").rename(tmp_path / "refcoco" / "instances.json")
    shutil.rmtree(tmp_path / "images")
    with pytest.raises(DatasetLayoutError, match="train2014"):
        RefCOCODataset(tmp_path, "refcoco", split=None)
    with pytest.raises(DatasetLayoutError, match="does not exist"):
        RefCOCODataset(tmp_path / "nowhere", "refcoco")


def test_missing_image_file_names_the_image(tmp_path):
    generate_refer(tmp_path, "refcoco", "unc", n_images=2, seed=0)
    ds = RefCOCODataset(tmp_path, "refcoco", split=None, image_size=64)
    path = ds.info(0)["image_path"]
    (tmp_path / path).unlink()
    with pytest.raises(DatasetLayoutError, match=path.split("/")[-1]):
        ds[0]


def test_missing_grefcoco_and_phrasecut_files(tmp_path):
    generate_grefcoco(tmp_path / "g", n_images=2, seed=0)
    (tmp_path / "g" / "grefcoco" / "grefs(unc).json").unlink()
    with pytest.raises(DatasetLayoutError, match=r"grefs\(unc\)\.json"):
        GRefCOCODataset(tmp_path / "g")
    generate_phrasecut(tmp_path / "p", n_images=2, seed=0)
    (tmp_path / "p" / "refer_val.json").unlink()
    with pytest.raises(DatasetLayoutError, match="refer_val.json"):
        PhraseCutDataset(tmp_path / "p", split="val")
    (tmp_path / "p" / "image_data_split.json").unlink()
    with pytest.raises(DatasetLayoutError, match="image_data_split.json"):
        PhraseCutDataset(tmp_path / "p", split="train")


# ----------------------------------------------------------------------------------------------
# batching, tokens, augmentation


def test_collate_and_tokenizer(refer_root, pc_root):
    root, _, _ = refer_root

    def tokenizer(texts):
        out = torch.zeros(len(texts), 77, dtype=torch.long)
        for k, t in enumerate(texts):
            out[k, : len(t.split())] = 1
        return out

    ds = RefCOCODataset(root, "refcoco", split=None, image_size=S, tokenizer=tokenizer, return_orig_mask=True)
    loader = torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=collate)
    b = next(iter(loader))
    assert b["image"].shape == (3, 3, S, S) and b["mask"].shape == (3, S, S) and b["mask"].dtype == torch.bool
    assert b["box"].shape == (3, 4) and b["tokens"].shape == (3, 77) and b["tokens"].dtype == torch.long
    assert b["no_target"].dtype == torch.bool and b["image_id"].dtype == torch.long
    assert isinstance(b["text"], list) and len(b["text"]) == 3
    assert int(b["tokens"][0].sum()) == len(b["text"][0].split())
    assert isinstance(b["orig_mask"], list) or b["orig_mask"].shape[0] == 3
    pc = PhraseCutDataset(pc_root[0], split="train", image_size=S)
    b = collate([pc[0], pc[1]])
    assert isinstance(b["sent_id"], list) and all(isinstance(v, str) for v in b["sent_id"])


def test_swap_left_right():
    assert swap_left_right("the red circle on the left") == "the red circle on the right"
    assert swap_left_right("Left of the rightmost square") == "Right of the leftmost square"
    assert swap_left_right("bright light") == "bright light"


def test_flip_rewrites_text_and_mirrors_mask(refer_root):
    root, _, _ = refer_root
    plain = RefCOCODataset(root, "refcoco", split=None, image_size=S)
    aug = RefCOCODataset(
        root, "refcoco", split=None, image_size=S, train=True, flip=True, scale_range=(1.0, 1.0), colour_jitter=0.0
    )
    i = next(k for k in range(len(plain)) if "left" in plain.info(k)["text"] or "right" in plain.info(k)["text"])
    _, mask = plain.raw(i)
    lb = Letterbox.fit(mask.shape, S)
    seen = set()
    torch.manual_seed(0)
    for _ in range(30):
        s = aug[i]
        if s["text"] == plain.info(i)["text"]:
            np.testing.assert_array_equal(s["mask"].numpy(), letterbox_mask(mask, lb))
            seen.add("same")
        else:
            assert s["text"] == swap_left_right(plain.info(i)["text"])
            np.testing.assert_array_equal(s["mask"].numpy(), letterbox_mask(mask[:, ::-1].copy(), lb))
            seen.add("flipped")
    assert seen == {"same", "flipped"}
    # flipping is off unless asked for
    off = RefCOCODataset(root, "refcoco", split=None, image_size=S, train=True)
    assert all(off[i]["text"] == plain.info(i)["text"] for _ in range(5))


def test_scale_jitter_keeps_target_and_box_consistent(refer_root):
    root, _, _ = refer_root
    torch.manual_seed(1)
    for scale in ((0.5, 0.8), (1.4, 1.6)):
        ds = RefCOCODataset(root, "refcoco", split=None, image_size=S, train=True, scale_range=scale)
        for i in range(0, len(ds), 3):
            s = ds[i]
            m = s["mask"].numpy()
            assert m.any()
            x0, y0, x1, y1 = _extent(m)
            cx, cy, w, h = (s["box"] * S).tolist()
            tol = 0.5 + scale[1] * S / max(s["orig_size"].tolist())
            assert abs((cx - w / 2) - x0) <= tol and abs((cx + w / 2) - x1) <= tol
            assert abs((cy - h / 2) - y0) <= tol and abs((cy + h / 2) - y1) <= tol
            assert 0 <= float(s["image"].min()) and float(s["image"].max()) <= 255


# ----------------------------------------------------------------------------------------------
# generator


def test_generation_is_deterministic(tmp_path):
    a = generate_grefcoco(tmp_path / "a", n_images=3, seed=7)
    b = generate_grefcoco(tmp_path / "b", n_images=3, seed=7)
    assert a["sentences"] == b["sentences"]
    for name in ("grefs(unc).json", "instances.json"):
        assert (tmp_path / "a/grefcoco" / name).read_text() == (tmp_path / "b/grefcoco" / name).read_text()
    for p in (tmp_path / "a/images/train2014").iterdir():
        assert np.array_equal(np.asarray(Image.open(p)), np.asarray(Image.open(tmp_path / "b/images/train2014" / p.name)))
    c = generate_grefcoco(tmp_path / "c", n_images=3, seed=8)
    assert (tmp_path / "c/grefcoco/grefs(unc).json").read_text() != (tmp_path / "a/grefcoco/grefs(unc).json").read_text()
    assert c


def test_expressions_are_true_of_their_scene():
    for seed in range(20):
        scene = make_scene(seed)
        for idx, exprs in single_target_expressions(scene).items():
            o = scene.objects[idx]
            for e in exprs:
                words = e.text.split()
                assert e.targets == (idx,)
                named = [w for w in words if w in COLOURS]
                if named:
                    assert named[0] == o.colour, e.text
                shapes = [w for w in words if w in ("circle", "square", "triangle")]
                assert not shapes or shapes[0] == o.shape, e.text
        for e in multi_target_expressions(scene):
            assert len(e.targets) >= 2
        for e in no_target_expressions(scene):
            _, colour, shape = e.text.split()
            assert not scene.select(colour, shape) and e.no_target


def test_cli(tmp_path):
    """`sspsam tools generate-data` and `generate-semseg` write the sets and print their summaries;
    a request that cannot be written is one error line, exit 2."""
    from typer.testing import CliRunner

    from sspsam.cli.main import app

    runner = CliRunner()
    res = runner.invoke(app, ["tools", "generate-data", "phrasecut", str(tmp_path / "pc"), "--n", "2", "--seed", "4"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "pc" / "image_data_split.json").is_file() and json.loads(res.stdout)["images"]
    res = runner.invoke(app, ["tools", "generate-data", "refcocog", str(tmp_path / "r"), "--n", "2"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "r" / "refcocog" / "refs(umd).p").is_file()
    for bad in (["phrasecut", str(tmp_path / "x"), "--official"], ["refcoco", str(tmp_path / "x"), "--n", "0"],
                ["coco", str(tmp_path / "x")]):
        res = runner.invoke(app, ["tools", "generate-data", *bad])
        assert res.exit_code == 2 and res.output.count("error:") == 1, res.output
    res = runner.invoke(app, ["tools", "generate-semseg", str(tmp_path / "s"), "--n", "1", "--size", "96", "--splits", "val"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["images"] == {"val": 1} and (tmp_path / "s").is_dir()
    res = runner.invoke(app, ["tools", "generate-semseg", str(tmp_path / "t"), "--size", "8"])
    assert res.exit_code == 2 and res.output.count("error:") == 1, res.output
