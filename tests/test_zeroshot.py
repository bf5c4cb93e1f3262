"""Training-free path: cost maps, dense CLIP modes, TSPP rule, SMAgg, the OVSS forward and RES."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sspsam.models.build import build_model
from sspsam.config import load_config
from sspsam.errors import ConfigError
import sspsam.models.cost as cost
from sspsam.predict.results import Segmentation
from sspsam.predict.segmenter import Segmenter
from sspsam.io.weights import WeightsMissingError
from sspsam.models.zeroshot.pipeline import ZeroShot, inject_masks, tspp_points
from sspsam.predict.zeroshot_res import ZeroShotSegmenter, calibrate_threshold
from sspsam.models.zeroshot.mask_merge import OverlapMaskMerge as ShallowMaskAggregation


@pytest.fixture(scope="module")
def tiny() -> ZeroShot:
    torch.manual_seed(0)
    return build_model("zeroshot-tiny").eval()


# ---- cost maps ---------------------------------------------------------------------------
def test_correlation_hand_made():
    text = F.normalize(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]), dim=-1)
    dense = torch.zeros(1, 4, 2, 3)
    dense[0, :, 0, 0] = torch.tensor([3.0, 0, 0, 0])  # equal (up to norm) to class 0
    dense[0, :, 1, 2] = torch.tensor([0, 0, 5.0, 0])  # orthogonal to both
    dense[0, :, 0, 1] = torch.tensor([1.0, 1.0, 0, 0])  # 45° to both
    c = cost.correlation(dense, text)
    assert c.shape == (1, 2, 2, 3)
    assert c[0, 0, 0, 0] == pytest.approx(1.0) and c[0, 1, 0, 0] == pytest.approx(0.0)
    assert c[0, :, 1, 2].abs().max() < 1e-6
    assert c[0, 0, 0, 1] == pytest.approx(2**-0.5, abs=1e-6)
    up = cost.upsample_cost(c, 12)
    assert up.shape == (1, 2, 12, 12)
    p = cost.class_probabilities(c)  # SCLIP's scale 40: cosine 1 vs 0 is near-certain
    assert torch.allclose(p.sum(1), torch.ones(1, 2, 3)) and p[0, 0, 0, 0] > 0.999


def test_templates():
    assert len(cost.IMAGENET_TEMPLATES) == 80 == len(set(cost.IMAGENET_TEMPLATES))
    assert cost.resolve_templates("imagenet80") == cost.IMAGENET_TEMPLATES
    with pytest.raises(ConfigError):
        cost.resolve_templates("nope")
    with pytest.raises(ConfigError):
        cost.resolve_templates(["no placeholder"])


def test_dense_modes_shapes(tiny):
    x = torch.rand(2, 3, 128, 128) * 255
    outs = {m: cost.dense_features(tiny.clip, x, m) for m in cost.DENSE_MODES}
    g = tiny.clip.grid_size
    for m, f in outs.items():
        assert f.shape == (2, tiny.clip.embed_dim, g, g), m
        assert torch.allclose(f.norm(dim=1), torch.ones(2, g, g), atol=1e-5)
    assert not torch.allclose(outs["sclip"], outs["maskclip"])
    assert cost.dense_features(tiny.clip, x, "sclip", size=128).shape[-1] == 2 * g  # larger CLIP input, finer grid
    with pytest.raises(ConfigError):
        cost.dense_features(tiny.clip, x, "bogus")
    e = cost.class_embeddings(tiny.clip, ["cat", "dog", "sky"], "imagenet80")
    assert e.shape == (3, tiny.clip.embed_dim)
    assert cost.cost_map(tiny.clip, x, e, "maskclip", size=32).shape == (2, 3, 32, 32)


# ---- TSPP rule ---------------------------------------------------------------------------
def _blob(h, w, y, x, s=1.5):
    yy, xx = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    return torch.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * s * s))


def test_tspp_picks_known_peaks():
    h = w = 24
    logits = torch.zeros(3, h, w)
    logits[0] = 6 * _blob(h, w, 4, 5) + 5 * _blob(h, w, 18, 16)  # class 0: two objects
    logits[1] = 6 * _blob(h, w, 12, 20)  # class 1: one
    logits[0] += 5 * _blob(h, w, 4, 9, s=0.8)  # a weaker peak of class 0 only 4 px from (4, 5): suppressed
    logits[2] = 0.5 * _blob(h, w, 20, 3)  # class 2: never dominant enough -> no point
    prob = logits.softmax(0)
    pts = tspp_points(prob, points_per_class=4, threshold=0.5, distance=5)
    got = {(int(c), int(x - 0.5), int(y - 0.5)) for c, (x, y) in zip(pts.classes, pts.coords)}
    assert got == {(0, 5, 4), (0, 16, 18), (1, 20, 12)}  # (class, x, y)
    assert (pts.scores >= 0.5).all()
    one = tspp_points(prob, points_per_class=1, threshold=0.5, distance=5)  # top-k keeps the strongest
    assert sorted(one.classes.tolist()) == [0, 1]
    cut = tspp_points(prob, points_per_class=4, threshold=0.5, distance=5, valid_hw=(14, 24))  # padding excluded
    assert all(y < 14 for _, y in cut.coords.tolist()) and len(cut.classes) == 2


# ---- SMAgg -------------------------------------------------------------------------------
def test_smagg_merges_parts_keeps_instances_apart():
    m = torch.zeros(5, 20, 20, dtype=torch.bool)
    m[0, 2:10, 2:10] = True  # object A
    m[1, 3:6, 3:6] = True  # a part of A
    m[2, 2:10, 3:11] = True  # a near-duplicate of A
    m[3, 12:18, 12:18] = True  # another instance, same class, disjoint
    m[4, 2:10, 2:10] = True  # the same pixels as A but prompted by another class
    scores = torch.tensor([0.9, 0.5, 0.8, 0.7, 0.6])
    groups = torch.tensor([0, 0, 0, 0, 1])
    agg = ShallowMaskAggregation(iou_thr=0.6, contain_thr=0.8)(m, scores, groups)
    members = sorted(sorted(x) for x in agg.members)
    assert members == [[0, 1, 2], [3], [4]]
    a = agg.members.index(next(x for x in agg.members if 0 in x))
    assert torch.equal(agg.masks[a], m[0] | m[1] | m[2]) and agg.scores[a] == pytest.approx(0.9)
    assert int(agg.groups[a]) == 0


def test_inject_masks_blends_only_covered_pixels():
    logits = torch.zeros(2, 4, 4)
    logits[0, 0, 0] = 4.0  # one confident pixel inside the mask
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, :2, :2] = True
    out, pooled = inject_masks(logits, mask, 0.5)
    assert pooled[0].tolist() == [1.0, 0.0]  # mean of class 0 over the 4 mask pixels
    assert out[0, 1, 1] == pytest.approx(0.5) and out[0, 0, 0] == pytest.approx(2.5)
    assert torch.equal(out[:, 2:], logits[:, 2:])  # outside every mask: unchanged


# ---- the OVSS forward --------------------------------------------------------------------
def test_zeroshot_forward_shapes(tiny):
    torch.manual_seed(1)
    x = torch.rand(2, 3, 128, 128) * 255
    emb = tiny.class_embeddings(["sky", "road", "car"])
    out = tiny(x, emb, valid_hw=torch.tensor([[128, 128], [96, 128]]))
    assert out["logits"].shape == (2, 3, 32, 32) and torch.isfinite(out["logits"]).all()
    assert out["cost"].shape == (2, 3, 32, 32)
    assert (out["num_prompts"] <= 3 * tiny.cfg["points_per_class"]).all()
    assert all(a.masks.shape[-2:] == (32, 32) for a in out["masks"])
    assert all(not a.masks[:, 24:].any() for a in out["masks"][1:])  # nothing in image 1's padding
    feats = tiny.encode_image(x)
    old = dict(tiny.cfg)
    try:
        tiny.cfg.update(mask_weight=0.0)
        plain = tiny.decode_classes(feats, emb)
        assert torch.allclose(plain["logits"], plain["cost"] * 40.0)
        tiny.cfg.update(prompt="grid", grid_points=4, mask_weight=0.5)
        grid = tiny.decode_classes(feats, emb)
        assert grid["num_prompts"].tolist() == [16, 16] and grid["logits"].shape == (2, 3, 32, 32)
    finally:
        tiny.cfg.clear()
        tiny.cfg.update(old)


def test_zeroshot_config_errors():
    cfg = load_config("zeroshot-tiny")
    cfg["zeroshot"]["typo_key"] = 1
    with pytest.raises(ConfigError, match="typo_key"):
        build_model(cfg)


# ---- RES -----------------------------------------------------------------------------------
def _red_square_image():
    img = np.full((64, 64, 3), 60, np.uint8)
    img[16:48, 36:60] = (230, 20, 20)
    return img


def _redness(crops, text):  # a stand-in for CLIP: how red the masked crop is
    return ((crops[:, 0] - crops[:, 1]) > 100).float().mean((1, 2))


def test_res_rescoring_picks_matching_candidate_and_no_target(tiny, monkeypatch):
    seg = ZeroShotSegmenter(tiny)
    o = tiny.mask_size  # 32; the 64x64 image is letterboxed at 2x, so mask frame = image / 2
    cands = torch.full((1, 3, o, o), -10.0)
    cands[0, 0, 8:24, 2:14] = 10.0  # left block: no red
    cands[0, 1, 8:24, 18:30] = 10.0  # the red square
    cands[0, 2] = 10.0  # the whole image
    monkeypatch.setattr(tiny, "sam_decode", lambda emb, coords, multimask: (cands, torch.ones(1, 3)))
    monkeypatch.setattr(seg, "clip_scores", _redness)
    seg.no_target_threshold = 0.3
    res = seg.segment(_red_square_image(), ["the red square", "another phrase"])
    assert isinstance(res, Segmentation) and res.masks.shape == (2, 64, 64)
    truth = np.zeros((64, 64), bool)
    truth[16:48, 36:60] = True
    iou = (res.masks[0] & truth).sum() / (res.masks[0] | truth).sum()
    assert iou > 0.9 and not res.no_target[0] and res.scores[0] > 0.5
    seg.no_target_threshold = 0.99  # nothing is that red: no target, empty mask
    res = seg.segment(_red_square_image(), "the red square")
    assert res.no_target[0] and not res.masks[0].any() and res.scores[0] < 0.5


def test_calibrate_threshold():
    thr = calibrate_threshold(np.array([0.1, 0.15, 0.3, 0.4]), np.array([False, False, True, True]))
    assert 0.15 < thr < 0.3


def test_segmenter_zeroshot_branch(monkeypatch, tmp_path):
    monkeypatch.setenv("SSPSAM_HOME", str(tmp_path / "empty"))
    with pytest.raises(WeightsMissingError) as exc:
        Segmenter.from_pretrained("zeroshot")
    msg = str(exc.value)
    assert "sspsam weights fetch clip-vit-b16" in msg and "sspsam weights import sam-vit-b" in msg
    torch.manual_seed(0)
    seg = Segmenter.from_pretrained("zeroshot-tiny")  # no weights in the tiny config: random init
    assert isinstance(seg, ZeroShotSegmenter)
    res = seg.segment(_red_square_image()[:50], ["a", "b"])
    assert res.masks.shape == (2, 50, 64) and res.masks.dtype == bool and res.scores.shape == (2,)
    assert len(res.to_json()["results"]) == 2
