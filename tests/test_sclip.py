"""SCLIP's protocol pieces on known answers, the dense modes, and the protocol behind the OVSS
predictor and `sspsam evaluate --protocol sclip` (tiny random CLIP; the numbers against SCLIP's
own code are in test_golden_clip.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from sspsam.models.build import build_model
from sspsam.errors import TextError
import sspsam.models.cost as cost
from sspsam.predict.ovss import OVSS
from sspsam.models.zeroshot.sclip import (SCLIPProtocol, parse_class_names, read_class_names, rescale_size, resize_bilinear,
                               slide_windows)
import sspsam.tools.golden as golden


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_model("zeroshot-tiny").eval()


def test_resize_matches_opencv():
    """OpenCV INTER_LINEAR, bit for bit: SCLIP's own resized image, and a hand-computed row."""
    inp = golden.arrays("sclip", "inputs")
    h, w = inp["seg_image"].shape[:2]
    assert rescale_size(h, w) == (336, 448)
    assert np.array_equal(resize_bilinear(inp["seg_image"], 336, 448), inp["seg_image_resized"])
    # [0, 255] → 4 px: taps at -0.25 (pinned), 0.25, 0.75, 1.25 (pinned): 0, 63.75→64, 191.25→191, 255
    row = np.array([[[0], [255]]], np.uint8)
    assert resize_bilinear(row, 1, 4)[0, :, 0].tolist() == [0, 64, 191, 255]
    # an exact half size is OpenCV's 2x2 area mean, rounded half up
    q = np.array([[1, 2], [3, 5]], np.uint8)[:, :, None]
    assert resize_bilinear(q, 1, 1)[0, 0, 0] == 3  # (11 + 2) >> 2
    with pytest.raises(ValueError):
        resize_bilinear(np.zeros((4, 4)), 2, 2)


def test_rescale_and_slide_grid():
    assert rescale_size(100, 2000) == (102, 2048)  # the long side caps the scale
    assert rescale_size(500, 375) == (448, 336)
    assert slide_windows(336, 448, 224, 112) == [
        (0, 224, 0, 224), (0, 224, 112, 336), (0, 224, 224, 448),
        (112, 336, 0, 224), (112, 336, 112, 336), (112, 336, 224, 448),
    ]
    assert slide_windows(200, 300, 224, 112) == [(0, 200, 0, 224), (0, 200, 76, 300)]  # short side: one row


def test_class_names(tmp_path):
    names, idx = parse_class_names(golden.run_meta("sclip")["class_lines"])
    assert names == ["grass", "dog", "puppy", "car", "tree", "sky"] and idx == [0, 1, 1, 2, 3, 4]
    f = tmp_path / "cls.txt"
    f.write_text("background, wall\ncat\n", encoding="utf-8")
    assert read_class_names(f) == (["background", "wall", "cat"], [0, 0, 1])
    for bad in ([], ["cat", "dog, "]):
        with pytest.raises(TextError):
            parse_class_names(bad)
    with pytest.raises(TextError, match="not found"):
        read_class_names(tmp_path / "missing.txt")


def test_postprocess_synonyms_and_thresholds(tiny):
    """softmax(40·cos) over queries, max over synonyms, then area and probability thresholds."""
    p = SCLIPProtocol(tiny.clip, ["bg", "dog, puppy", "car"])
    logits = torch.zeros(1, 4, 2, 5)  # queries: bg, dog, puppy, car
    logits[0, 0, :, 0] = 1.0  # bg wins column 0
    logits[0, 2, :, 1:4] = 1.0  # "puppy" wins columns 1-3 -> class 1
    logits[0, 3, :, 4] = 1.0  # car wins column 4 (2 of 10 px)
    probs, pred = p.postprocess(logits)
    assert probs.shape == (3, 2, 5) and pred.tolist() == [[0, 1, 1, 1, 2]] * 2
    top = torch.softmax(torch.tensor([40.0, 0, 0, 0]), 0)[0]
    assert torch.allclose(probs[1, :, 1], top.expand(2))
    p.area_thd = 0.3  # car covers 2/8 of the non-background pixels: dropped, its pixels go to the
    assert p.postprocess(logits)[1].tolist() == [[0, 1, 1, 1, 0]] * 2  # best remaining class (a tie: first)
    p.area_thd, p.prob_thd = None, 0.999  # everything below 0.999 becomes background
    assert p.postprocess(logits)[1].tolist() == [[0, 1, 1, 1, 2]] * 2
    logits[0, 2, 0, 1] = 0.0  # a tie at one pixel: max probability 0.25 < 0.999
    assert p.postprocess(logits)[1][0, 1] == 0
    with pytest.raises(ValueError):
        SCLIPProtocol(tiny.clip, ["a"], prob_thd=2.0)


def test_dense_modes_sclip_keeps_the_ffn(tiny):
    """'sclip' = x + CSA then x + FFN; 'csa-no-ffn' = the former FFN-less variant, unchanged."""
    clip = tiny.clip
    x = torch.rand(1, 3, 64, 64) * 255
    vis = clip.model.visual
    t = clip.embed_patches(cost._preprocess(clip, x, None))
    for blk in vis.transformer.resblocks[:-1]:
        t = blk(t)
    last = vis.transformer.resblocks[-1]
    no_ffn = t + cost.csa_attention(last.attn, last.ln_1(t))
    with_ffn = no_ffn + last.mlp(last.ln_2(no_ffn))
    for mode, tokens in (("csa-no-ffn", no_ffn), ("sclip", with_ffn)):
        ref = F.normalize(vis.ln_post(tokens[:, 1:]) @ vis.proj, dim=-1)
        ours = cost.dense_features(clip, x, mode).flatten(2).transpose(1, 2)
        assert torch.allclose(ours, ref, atol=1e-5), mode
    assert "csa-no-ffn" in cost.DENSE_MODES


def test_ovss_predictor_sclip_protocol(tiny):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)
    pred = OVSS(tiny, protocol="sclip", sclip_options={"crop": 64, "stride": 32, "scale": (512, 96)})
    seg = pred.segment(img, ["sky", "dog, puppy", "car"])
    assert seg.classes == ["sky", "dog", "car"] and seg.labels.shape == (50, 70)
    direct = SCLIPProtocol(tiny.clip, ["sky", "dog, puppy", "car"], crop=64, stride=32, scale=(512, 96))
    labels, scores = direct(img)
    assert np.array_equal(seg.labels, labels) and np.allclose(seg.scores, scores)
    assert seg.scores.min() >= 1 / 4 - 1e-6  # the best of 4 queries
    assert abs(sum(seg.shares.values()) - 1) < 1e-9
    text = pred.segment(img, "sky\ndog, puppy\ncar\n")  # SCLIP's class-file text
    assert np.array_equal(text.labels, labels)
    with pytest.raises(ValueError, match="protocol"):
        OVSS(tiny, protocol="nope")


def test_cli_evaluate_protocol_sclip(tmp_path):
    from sspsam.cli.main import app
    from sspsam.data.semseg import SHAPE_CLASSES, generate_semseg

    generate_semseg(tmp_path / "ss", n=2, seed=5, splits=("val",))
    names = tmp_path / "cls.txt"
    names.write_text("\n".join(f"{c}, {c} shape" for c in SHAPE_CLASSES) + "\n", encoding="utf-8")
    out = tmp_path / "eval"
    args = ["evaluate", "zeroshot-tiny", "--dataset", "semseg", "--data", str(tmp_path / "ss"), "--split", "val"]
    r = CliRunner().invoke(app, [*args, "--protocol", "sclip", "--class-names", str(names), "--prob-thd", "0.1",
                                 "-o", str(out)])
    assert r.exit_code == 0, r.output
    m = json.loads((out / "metrics.json").read_text())
    assert m["protocol"] == "sclip" and m["metrics"]["n"] == 2
    assert list(m["metrics"]["per_class"]) == list(SHAPE_CLASSES)  # the first synonym of each line
    names.write_text("one\ntwo\n", encoding="utf-8")
    bad = CliRunner().invoke(app, [*args, "--protocol", "sclip", "--class-names", str(names), "-o", str(out)])
    assert bad.exit_code == 2 and "class lines" in bad.output
    bad = CliRunner().invoke(app, [*args, "--protocol", "nope", "-o", str(out)])
    assert bad.exit_code == 2 and "--protocol" in bad.output
