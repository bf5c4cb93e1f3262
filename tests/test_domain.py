"""The demo models say when an image is unlike the generated shape scenes they were trained on:
in the Python result, its JSON (so the HTTP API), and on the CLI's stderr. The domain test is
checked on generated scenes (also resized and JPEG-compressed: no warning) and on synthetic
photo-like images (smooth gradients, noise, many colours: warning)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from sspsam.io.checkpoint import save_checkpoint
from sspsam.cli.main import app
from sspsam.models.build import build_model
from sspsam.config import load_config
from sspsam.data.shapes import make_scene
from sspsam.predict.domain import DOMAIN, in_domain_fraction, looks_like_generated_shapes, out_of_domain_warning
from sspsam.predict.ovss import OVSS
from sspsam.predict.segmenter import Segmenter


def photo_like(h: int = 180, w: int = 240, seed: int = 0) -> np.ndarray:
    """Smooth colour gradients, a soft blob, shading and sensor noise: what a photograph has and a
    generated scene has not (nothing committed, made at test time)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    f = rng.uniform(1.5, 4.0, 3)
    img = np.stack([128 + 100 * np.sin(f[0] * x + 1), 110 + 90 * np.cos(f[1] * y), 90 + 70 * np.sin(f[2] * (x + y))], -1)
    blob = np.exp(-(((x - 0.5) ** 2 + (y - 0.4) ** 2) / 0.02))[..., None]
    img = img * (1 - blob) + blob * np.array([200, 160, 120])
    img += rng.normal(0, 8, img.shape)
    return img.clip(0, 255).astype(np.uint8)


def _jpeg(rgb: np.ndarray, quality: int = 85) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def test_generated_scenes_are_in_domain():
    for seed in range(30):
        rgb = make_scene(seed).render()
        assert looks_like_generated_shapes(rgb), seed
        big = np.asarray(Image.fromarray(rgb).resize((rgb.shape[1] * 2, rgb.shape[0] * 2), Image.BILINEAR))
        assert looks_like_generated_shapes(big), seed  # a user's upscaled copy
        assert looks_like_generated_shapes(_jpeg(rgb)), seed  # or a JPEG of it
    for background in ("plain", "noise"):
        assert in_domain_fraction(make_scene(7, background=background).render()) > 0.95


def test_photo_like_images_are_out_of_domain():
    for seed in range(10):
        assert in_domain_fraction(photo_like(seed=seed)) < 0.5, seed
    dark = (photo_like(seed=3).mean(2, keepdims=True).repeat(3, 2) * 0.4).astype(np.uint8)  # a dim grey photo
    assert not looks_like_generated_shapes(dark)
    text = out_of_domain_warning("shapes-demo", photo_like(), "segment")
    assert "--model zeroshot" in text and "sspsam weights fetch clip-vit-b16" in text and "sspsam weights fetch sam-vit-b" in text
    assert out_of_domain_warning("shapes-demo", make_scene(1).render()) is None


def test_fraction_is_the_per_pixel_rule():
    """The table lookup in ``in_domain_fraction`` gives the rule written out pixel by pixel: grey
    (channel spread <= 8, mean level in [92, 243]) or within 28 per channel of a palette colour;
    on noise, photos, scenes and the grey levels at the range's edges."""
    from sspsam.predict import domain

    def rule(rgb):
        px = rgb.reshape(-1, 3).astype(int)
        pal = domain._palette().astype(int)
        grey = (px.max(1) - px.min(1) <= 8) & (px.mean(1) >= 92) & (px.mean(1) <= 243)
        near = (np.abs(px[:, None] - pal[None]).max(2) <= 28).any(1)
        return float((grey | near).mean())

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (120, 160, 3), dtype=np.uint8), photo_like(), make_scene(4).render()]
    images += [np.full((4, 4, 3), v, np.uint8) for v in (91, 92, 243, 244)] + [np.array([[[92, 92, 93], [91, 92, 93]]], np.uint8)]
    for im in images:
        assert in_domain_fraction(im) == rule(im)


def test_the_domain_check_runs_once_per_image(monkeypatch):
    """Every further phrase on a cached image reuses its warning (the check was most of a demo
    phrase's time)."""
    import sspsam.predict.domain as domain

    calls = []
    real = domain.out_of_domain_warning
    monkeypatch.setattr(domain, "out_of_domain_warning", lambda *a: calls.append(1) or real(*a))
    seg = Segmenter.from_pretrained("shapes-demo")
    first = seg.segment(photo_like(), "the red circle")
    again = seg.segment(photo_like(), "the blue square")
    assert len(calls) == 1 and first.warnings == again.warnings and len(first.warnings) == 1
    seg.segment(make_scene(2).render(), "the red circle")
    assert len(calls) == 2


def test_segmenter_warns_on_a_photo_only():
    seg = Segmenter.from_pretrained("shapes-demo")
    assert seg.domain == DOMAIN and isinstance(seg.meta, dict) and "steps" in seg.meta
    res = seg.segment(photo_like(), ["the red circle"])
    assert len(res.warnings) == 1 and "'shapes-demo'" in res.warnings[0]
    assert res.to_json()["warnings"] == res.warnings
    assert seg.segment(make_scene(2).render(), ["the red circle"]).to_json()["warnings"] == []


def test_ovss_warns_on_a_photo_only():
    ovss = OVSS.from_pretrained("ovss-shapes-demo")
    assert ovss.domain == DOMAIN and isinstance(ovss.meta, dict)
    res = ovss.segment(photo_like(), ["background", "red", "blue"])
    assert len(res.warnings) == 1 and "sspsam ovss IMAGE ... --model zeroshot" in res.warnings[0]
    assert res.to_json()["warnings"] == res.warnings
    assert ovss.segment(make_scene(2).render(), ["background", "red"]).warnings == []


def test_meta_domain_decides_for_other_checkpoints(tmp_path):
    torch.manual_seed(0)
    cfg = load_config("ssp-sam-tiny")
    sd = build_model(cfg).state_dict()
    plain, shapes = tmp_path / "plain.pt", tmp_path / "shapes.pt"
    save_checkpoint(plain, cfg, sd, meta={"trained_on": "refcoco"})
    save_checkpoint(shapes, cfg, sd, meta={"domain": DOMAIN})
    img = photo_like(90, 120)
    a = Segmenter.from_pretrained(plain)
    assert a.meta == {"trained_on": "refcoco"} and a.domain is None and a.segment(img, "x").warnings == []
    b = Segmenter.from_pretrained(shapes)
    assert b.meta["domain"] == DOMAIN and len(b.segment(img, "x").warnings) == 1


def test_cli_prints_the_warning_and_writes_it_to_json(tmp_path):
    photo = tmp_path / "photo.jpg"
    Image.fromarray(photo_like()).save(photo, quality=90)
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["segment", str(photo), "the red circle", "-o", str(out)])  # words it knows: one warning
    assert r.exit_code == 0, r.output
    warn = [line for line in r.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warn) == 1 and "--model zeroshot" in warn[0]
    import json

    assert len(json.loads((out / "photo.segment.json").read_text())["warnings"]) == 1
    r = CliRunner().invoke(app, ["ovss", str(photo), "-c", "background,red", "-o", str(out)])
    assert r.exit_code == 0 and "warning: " in r.stderr and "--model zeroshot" in r.stderr
    assert len(json.loads((out / "photo.ovss.json").read_text())["warnings"]) == 1


@pytest.mark.parametrize("path, field", [("/v1/segment", "phrases"), ("/v1/ovss", "classes")])
def test_http_api_carries_the_warning(path, field):
    from fastapi.testclient import TestClient

    from sspsam.serve import create_app

    api = create_app(model="shapes-demo", ovss_model="ovss-shapes-demo", timeout_s=60)
    buf = io.BytesIO()
    Image.fromarray(photo_like()).save(buf, format="PNG")
    with TestClient(api) as client:
        texts = "the red circle" if field == "phrases" else "background, red"  # words the model knows: one warning
        r = client.post(path, files={"image": ("p.png", buf.getvalue(), "image/png")}, data={field: texts})
        assert r.status_code == 200, r.text
        assert len(r.json()["warnings"]) == 1 and "--model zeroshot" in r.json()["warnings"][0]
        if field == "phrases":  # a phrase outside the vocabulary: "no match", and the warning names the HTTP switch
            r = client.post(path, files={"image": ("p.png", buf.getvalue(), "image/png")}, data={field: "a unicorn"})
            body = r.json()
            assert body["results"][0]["no_target"] and "allow_unknown=true" in body["results"][0]["warnings"][0]
            assert body["results"][0]["warnings"][0] in body["warnings"]
