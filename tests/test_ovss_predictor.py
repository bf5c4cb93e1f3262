"""OVSS predictor and `sspsam ovss` CLI on the tiny training-free model and a hand-made fake model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import typer
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from sspsam.io.checkpoint import save_checkpoint
from sspsam.cli.ovss import ovss as ovss_command
from sspsam.models.build import build_model
from sspsam.config import load_config
from sspsam.errors import CheckpointError, TextError
from sspsam.predict.ovss import MAX_CLASSES, OVSS, SemanticSegmentation, clean_classes
from sspsam.io.weights import WeightsMissingError


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    cfg = load_config("zeroshot-tiny")
    path = tmp_path_factory.mktemp("ckpt") / "zs-tiny.pt"
    save_checkpoint(path, cfg, build_model(cfg).state_dict())
    return path


@pytest.fixture(scope="module")
def predictor(tiny_ckpt):
    return OVSS.from_pretrained(tiny_ckpt)


def _image(h=90, w=120, seed=0):
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 100, np.uint8)
    img[h // 4 : h // 2, w // 8 : w // 2] = (220, 30, 30)
    return (img + rng.integers(0, 30, img.shape)).astype(np.uint8)


class RedModel(nn.Module):
    """Forward-only stand-in: class 0 where the red channel is high, class 1 elsewhere (4x down)."""

    config = {"model": "escnet", "name": "red"}
    image_size = 64

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.calls = 0

    def class_embeddings(self, classes):
        return torch.eye(len(classes))

    def forward(self, images, class_emb):
        self.calls += 1
        r = F.avg_pool2d(images[:, :1] / 255.0, 4)
        logits = torch.cat([10 * (r - 0.5), 10 * (0.5 - r)] + [torch.full_like(r, -20)] * (class_emb.shape[0] - 2), 1)
        return {"logits": logits}


# ---- classes -------------------------------------------------------------------------------
def test_clean_classes():
    assert clean_classes("sky, road,car") == ["sky", "road", "car"]
    assert clean_classes(["  traffic   light ", "Sky", "", "road"]) == ["traffic light", "Sky", "road"]
    with pytest.raises(TextError, match="'sky' is given twice"):  # which label would its pixels get?
        clean_classes(["Sky", "road", "sky"])
    for bad in ("", " , ,", [], ["", "  "]):
        with pytest.raises(TextError):
            clean_classes(bad)
    with pytest.raises(TextError, match="at most"):
        clean_classes([f"c{i}" for i in range(MAX_CLASSES + 1)])
    with pytest.raises(TextError, match="characters"):
        clean_classes(["x" * 500])
    with pytest.raises(TextError):
        clean_classes(["sky", 3])


# ---- predictor -------------------------------------------------------------------------------
def test_output_original_size_and_shares(predictor):
    res = predictor.segment(_image(), "sky, road, car")
    assert isinstance(res, SemanticSegmentation)
    assert res.labels.shape == (90, 120) and res.labels.dtype == np.int32
    assert res.labels.min() >= 0 and res.labels.max() < 3
    assert res.scores.shape == (90, 120) and res.scores.dtype == np.float32
    assert (res.scores >= 1 / 3 - 1e-5).all() and (res.scores <= 1 + 1e-6).all()  # max of 3 probabilities
    assert sum(res.shares.values()) == pytest.approx(1.0)
    for i, c in enumerate(res.classes):
        assert res.shares[c] == pytest.approx((res.labels == i).mean())
    assert res.to_json() == {"image_size": [90, 120], "classes": ["sky", "road", "car"], "shares": res.shares, "warnings": []}


def test_image_and_class_caches(predictor, monkeypatch):
    n_img, n_cls = [], []
    enc, cls_emb = predictor.model.encode_image, predictor.model.class_embeddings
    monkeypatch.setattr(predictor.model, "encode_image", lambda *a, **k: n_img.append(1) or enc(*a, **k))
    monkeypatch.setattr(predictor.model, "class_embeddings", lambda *a, **k: n_cls.append(1) or cls_emb(*a, **k))
    img = _image(seed=5)
    a = predictor.segment(img, "sky, road")
    b = predictor.segment(img.copy(), ["sky", "road"])  # same pixels, new array
    assert len(n_img) == 1 and len(n_cls) == 1 and np.array_equal(a.labels, b.labels)
    predictor.segment(img, "sky, road, person")  # new classes: image features reused
    assert len(n_img) == 1 and len(n_cls) == 2
    predictor.segment(_image(seed=6), "sky, road, person")  # new image: classes reused
    assert len(n_img) == 2 and len(n_cls) == 2


def test_slide_on_fitting_image_equals_no_slide(predictor):
    img = _image(70, 100, seed=2)
    plain = predictor.segment(img, "sky, road, car", slide=False)
    slid = predictor.segment(img, "sky, road, car", slide=True)
    assert len(predictor._image.views) == 2  # global view + one window that is the same letterbox
    assert np.array_equal(plain.labels, slid.labels)
    np.testing.assert_allclose(plain.scores, slid.scores, atol=1e-5)


def test_auto_slide_on_large_image(predictor):
    res = predictor.segment(_image(300, 420, seed=3), "sky, road, car")  # long side > 1.5 x 128
    assert len(predictor._image.views) > 2
    assert res.labels.shape == (300, 420) and sum(res.shares.values()) == pytest.approx(1.0)


def test_sliding_windows_land_in_the_right_place():
    model = RedModel()
    ov = OVSS(model, max_gflop=None)  # no work bound: its FLOP count would run the model once more
    img = np.full((200, 300, 3), 40, np.uint8)
    img[30:120, 170:280] = (240, 10, 10)
    truth = np.zeros((200, 300), bool)
    truth[30:120, 170:280] = True
    res = ov.segment(img, "red, other", slide=True)
    assert len(ov._image.views) > 2 and model.calls == len(ov._image.views)
    assert ((res.labels == 0) == truth).mean() > 0.98
    glob = ov.segment(img, "red, other", slide=False)
    assert ((glob.labels == 0) == truth).mean() > 0.97


def test_from_pretrained_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("SSPSAM_HOME", str(tmp_path / "empty"))
    with pytest.raises(WeightsMissingError, match="sspsam weights fetch"):
        OVSS.from_pretrained("zeroshot")
    with pytest.raises(CheckpointError, match="unknown OVSS model"):
        OVSS.from_pretrained("no-such-model")
    cfg = load_config("ssp-sam-tiny")
    ssp = tmp_path / "ssp.pt"
    save_checkpoint(ssp, cfg, build_model(cfg).state_dict())
    with pytest.raises(CheckpointError, match="not an OVSS model"):
        OVSS.from_pretrained(ssp)


# ---- CLI ---------------------------------------------------------------------------------
def _app():
    app = typer.Typer()
    app.command("ovss")(ovss_command)
    app.command("noop")(lambda: None)  # two commands, so "ovss" stays a subcommand
    return app


def test_cli_writes_three_files(tiny_ckpt, tmp_path):
    img_path = tmp_path / "street.png"
    Image.fromarray(_image(60, 80)).save(img_path)
    out = tmp_path / "out"
    r = CliRunner().invoke(_app(), ["ovss", str(img_path), "--classes", "sky, road,car", "-o", str(out), "--model", str(tiny_ckpt)])
    assert r.exit_code == 0, r.output
    assert Image.open(out / "street.ovss.labels.png").mode == "P"  # palette PNG: class indices, shown in colour
    labels = np.asarray(Image.open(out / "street.ovss.labels.png"))
    assert labels.shape == (60, 80) and labels.dtype == np.uint8 and labels.max() < 3
    overlay = Image.open(out / "street.ovss.overlay.png")
    assert overlay.height >= 60 and overlay.width > 80  # image plus legend panel
    data = json.loads((out / "street.ovss.json").read_text())
    assert data["classes"] == ["sky", "road", "car"] and data["image_size"] == [60, 80]
    assert sum(data["shares"].values()) == pytest.approx(1.0)
    assert data["shares"]["road"] == pytest.approx((labels == 1).mean())
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temporaries


def test_cli_one_line_errors(tmp_path):
    img_path = tmp_path / "x.png"
    Image.fromarray(_image(20, 20)).save(img_path)
    r = CliRunner().invoke(_app(), ["ovss", str(img_path), "--classes", " , ", "-o", str(tmp_path / "o")])
    assert r.exit_code == 2 and "no class names" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(_app(), ["ovss", str(tmp_path / "missing.png"), "-o", str(tmp_path / "o")])
    assert r.exit_code == 2 and "error" in r.output and "Traceback" not in r.output
