"""The OVSS work bound (classes × views × the model's per-class cost, refused before any model
work) and the memory-light ``_finalise``, which must give the same labels and scores as before."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import sspsam.predict.ovss as ovss_mod
from sspsam.errors import SSPSamError, WorkLimitError
from sspsam.predict.ovss import OVSS


@pytest.fixture(scope="module")
def ovss():
    return OVSS.from_pretrained("ovss-shapes-demo", device="cpu")


def _old_finalise(canvas, q, ent):
    """``OVSS._finalise`` as it was before its buffers were made in place (the reference)."""
    h, w = ent.orig_hw
    wh, ww = ent.work_hw
    up_hw = (round(canvas.shape[1] * q), round(canvas.shape[2] * q))
    k = canvas.shape[0]
    chunk = max(1, ovss_mod._CHUNK_PIXELS // max(1, h * w + up_hw[0] * up_hw[1]))
    best = torch.full((h, w), -torch.inf)
    label = torch.zeros((h, w), dtype=torch.long)
    lse = torch.full((h, w), -torch.inf)
    for i in range(0, k, chunk):
        c = canvas[i : i + chunk][None]
        up = F.interpolate(c, size=up_hw, mode="bilinear", align_corners=False)[..., :wh, :ww]
        if (wh, ww) != (h, w):
            up = F.interpolate(up, size=(h, w), mode="bilinear", align_corners=False)
        up = up[0]
        m, a = up.max(0)
        better = m > best
        label = torch.where(better, a + i, label)
        best = torch.where(better, m, best)
        lse = torch.logaddexp(lse, torch.logsumexp(up, 0))
    score = (best - lse).exp()
    return label.to(torch.int32).numpy(), score.float().numpy()


@pytest.mark.parametrize("chunk_pixels", [64_000_000, 3 * 700 * 500, 1])  # many classes per chunk, three, one
def test_finalise_matches_the_old_one_bit_for_bit(ovss, monkeypatch, chunk_pixels):
    monkeypatch.setattr(ovss_mod, "_CHUNK_PIXELS", chunk_pixels)
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (500, 700, 3), dtype=np.uint8)
    img[100:300, 200:500] = (220, 30, 30)
    names = ["background", "red", "green", "blue", "yellow", "circle", "square"]
    with torch.inference_mode():
        ovss.set_image(img)
        canvas, q = ovss._canvas(names)
        old_labels, old_scores = _old_finalise(canvas, q, ovss._image)
        labels, scores = ovss._finalise(canvas, q)
    assert labels.dtype == old_labels.dtype == np.int32
    assert np.array_equal(labels, old_labels)
    assert np.array_equal(scores, old_scores)
    assert len(np.unique(labels)) > 1


def test_cost_counts_classes_and_views(ovss):
    img, per_class, text = ovss.unit_gflop()
    assert img > 0 and per_class > 0 and text > 0
    assert ovss.views_for((64, 64)) == 1 and ovss.views_for((2000, 3000)) > 1
    assert ovss.cost((64, 64), 200) == pytest.approx(2 * ovss.cost((64, 64), 100) - ovss.cost((64, 64), 0))
    assert ovss.cost((2000, 3000), 10) > ovss.cost((64, 64), 10)


def test_thousand_classes_refused_by_name_before_any_work(ovss):
    names = [f"class {i}" for i in range(1000)]
    ovss.clear_cache()
    t0 = time.perf_counter()
    with pytest.raises(WorkLimitError, match=r"GFLOP work limit \(SSPSAM_MAX_OVSS_GFLOP\); at most \d+ classes fit"):
        ovss.segment(np.zeros((64, 64, 3), np.uint8), names)
    assert time.perf_counter() - t0 < 10  # refused up front, not after the model ran (that takes minutes)
    assert ovss._classes is None and ovss._image is None  # neither the text tower nor the image tower ran
    with pytest.raises(WorkLimitError):
        ovss.segment([np.zeros((64, 64, 3), np.uint8)], names)


def test_the_limit_follows_the_setting(monkeypatch):
    monkeypatch.setenv("SSPSAM_MAX_OVSS_GFLOP", "1")
    small = OVSS.from_pretrained("ovss-shapes-demo", device="cpu")
    assert small.max_gflop == 1
    with pytest.raises(WorkLimitError, match="over the 1 GFLOP"):
        small.segment(np.zeros((64, 64, 3), np.uint8), [f"c{i}" for i in range(20)])
    assert small.segment(np.zeros((64, 64, 3), np.uint8), ["a", "b"]).labels.shape == (64, 64)
    monkeypatch.setenv("SSPSAM_MAX_OVSS_GFLOP", "0")
    assert OVSS.from_pretrained("ovss-shapes-demo", device="cpu").max_gflop is None
    monkeypatch.setenv("SSPSAM_MAX_OVSS_GFLOP", "lots")
    with pytest.raises(SSPSamError, match="SSPSAM_MAX_OVSS_GFLOP must be a number"):
        OVSS.from_pretrained("ovss-shapes-demo", device="cpu")


def test_http_refuses_by_name_before_queueing(ovss):
    from fastapi.testclient import TestClient

    from sspsam.serve.app import create_app

    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(buf, format="PNG")
    image = base64.b64encode(buf.getvalue()).decode()
    app = create_app(segmenter=object(), ovss=ovss, max_classes=1000)
    with TestClient(app, raise_server_exceptions=False) as client:
        r = client.post("/v1/ovss", json={"image": image, "classes": [f"class {i}" for i in range(1000)]})
        assert r.status_code == 413
        err = r.json()["error"]
        assert err["code"] == "too_much_work" and "SSPSAM_MAX_OVSS_GFLOP" in err["message"]
        assert app.state.worker.stats["jobs"] == 0  # never queued
        r = client.post("/v1/ovss", json={"image": image, "classes": ["background", "red"]})
        assert r.status_code == 200 and r.json()["classes"] == ["background", "red"]


def test_cli_names_the_limit(tmp_path, monkeypatch):
    from PIL import Image
    from typer.testing import CliRunner

    from sspsam.cli.main import app

    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "a.png")
    monkeypatch.setenv("SSPSAM_MAX_OVSS_GFLOP", "2")
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["ovss", str(tmp_path / "a.png"), "-c", ", ".join(f"c{i}" for i in range(50)),
                                   "-o", str(out), "--device", "cpu"])
    assert res.exit_code == 2
    assert "error:" in res.output and "GFLOP work limit (SSPSAM_MAX_OVSS_GFLOP)" in res.output
    assert not out.exists() or not any(out.iterdir())


# ---- strips: overlays sized by the short side --------------------------------------------------------


def test_wide_and_tall_strip_overlays_are_drawn_small():
    from sspsam.io.overlay import _scale, label_overlay, overlay_scale

    assert _scale(3000, 4000) == (72, 16)  # a photo keeps its sizes
    assert _scale(1, 100_000) == (12, 2)  # a strip's lines do not follow its long side
    for shape in ((1, 100_000), (100_000, 1)):
        labels = np.zeros(shape, np.int32)
        labels[..., : shape[-1] // 2] = 1
        ov = label_overlay(np.zeros((*shape, 3), np.uint8), labels, ["background", "red"])
        assert ov.width * ov.height < 50_000_000
        assert overlay_scale(*shape) == 1


@pytest.mark.parametrize("command,extra", [("ovss", ["-c", "background, red"]), ("segment", ["the red bar"])])
def test_strip_far_too_long_is_refused_by_name_leaving_nothing(tmp_path, command, extra):
    from PIL import Image
    from typer.testing import CliRunner

    from sspsam.cli.main import app

    Image.new("RGB", (89_000_000, 1), (200, 20, 20)).save(tmp_path / "strip.png")
    out = tmp_path / "out"
    res = CliRunner().invoke(app, [command, str(tmp_path / "strip.png"), *extra, "-o", str(out), "--device", "cpu"])
    assert res.exit_code == 2, res.output
    assert "error: the image is 89,000,000x1 px; overlays are drawn for images up to 1,000,000 px" in res.output
    assert not out.exists()


def test_wide_strip_is_answered_by_the_cli(tmp_path):
    from PIL import Image
    from typer.testing import CliRunner

    from sspsam.cli.main import app

    Image.new("RGB", (100_000, 1), (200, 20, 20)).save(tmp_path / "strip.png")
    res = CliRunner().invoke(app, ["ovss", str(tmp_path / "strip.png"), "-c", "background, red", "-o", str(tmp_path / "o"),
                                   "--device", "cpu"])
    assert res.exit_code == 0, res.output
    ov = Image.open(tmp_path / "o" / "strip.ovss.overlay.png")
    assert ov.width >= 100_000 and ov.height < 1000
