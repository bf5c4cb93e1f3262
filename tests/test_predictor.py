"""Predictor, image loading and the `sspsam segment` CLI on tiny random-init models."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from sspsam.io.checkpoint import save_checkpoint
from sspsam.cli.main import app
from sspsam.models.build import build_model
from sspsam.config import load_config
from sspsam.errors import CheckpointError, ImageLoadError, ImageTooLargeError, TextError
from sspsam.io.images import load_image
from sspsam.io.masks import decode_rle
from sspsam.predict.segmenter import Segmenter


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    cfg = load_config("ssp-sam-tiny")
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint(path, cfg, build_model(cfg).state_dict())
    return path


@pytest.fixture(scope="module")
def seg(tiny_ckpt):
    s = Segmenter.from_pretrained(tiny_ckpt)
    s.no_target_prob = 1.01  # never call no-target, so masks are compared for real
    return s


def _photo(h=90, w=120, seed=0):
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), np.uint8) + 128
    img[20:60, 10:50] = (220, 30, 30)
    return (img + rng.integers(0, 20, img.shape)).astype(np.uint8)


# ---- image loading -----------------------------------------------------------------------
def test_exif_rotation_is_applied(tmp_path):
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :10] = 255  # white band on the left of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° CW to display"
    p = tmp_path / "rot.jpg"
    Image.fromarray(arr).save(p, exif=exif.tobytes(), quality=100)
    out = load_image(p)
    assert out.shape == (40, 20, 3)  # displayed upright: portrait
    assert out[:10].mean() > 200 and out[-10:].mean() < 50  # the band is now on top


def test_rgba_grayscale_16bit(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:4, :, 3] = 255  # top opaque red, bottom transparent
    p = tmp_path / "a.png"
    Image.fromarray(rgba, "RGBA").save(p)
    out = load_image(p)
    assert out.shape == (8, 8, 3) and tuple(out[0, 0]) == (255, 0, 0) and tuple(out[7, 7]) == (255, 255, 255)

    g = tmp_path / "g.png"
    Image.fromarray(np.full((5, 6), 77, np.uint8), "L").save(g)
    out = load_image(g)
    assert out.shape == (5, 6, 3) and (out == 77).all()

    p16 = tmp_path / "d.png"
    v = np.array([[0, 65535], [32768, 1000]], np.uint16)
    Image.fromarray(v).save(p16)
    assert Image.open(p16).mode.startswith("I")
    out = load_image(p16)
    assert out[0, 0, 0] == 0 and out[0, 1, 0] == 255 and out[1, 0, 0] == 128 and out[1, 1, 0] == 4


def test_bad_images(tmp_path):
    with pytest.raises(ImageLoadError, match="not found"):
        load_image(tmp_path / "nope.jpg")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"definitely not a jpeg")
    with pytest.raises(ImageLoadError, match="not an image"):
        load_image(bad)
    buf = io.BytesIO()
    Image.fromarray(_photo()).save(buf, format="PNG")
    trunc = tmp_path / "trunc.png"
    trunc.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageLoadError, match="corrupt or truncated"):
        load_image(trunc)


def test_huge_image_refused(monkeypatch):
    import sspsam.io.images as io_mod

    monkeypatch.setattr(io_mod, "MAX_PIXELS", 100)
    with pytest.raises(ImageTooLargeError, match="pixel limit"):
        load_image(np.zeros((20, 20, 3), np.uint8))


# ---- predictor ---------------------------------------------------------------------------
def test_masks_in_original_size_and_embedding_reuse(seg):
    img = _photo()
    many = seg.segment(img, ["the red square", "the thing on the right", "a blue circle"])
    assert many.masks.shape == (3, 90, 120) and many.masks.dtype == bool
    assert many.scores.shape == (3,) and ((many.scores >= 0) & (many.scores <= 1)).all()
    for i, phrase in enumerate(many.phrases):
        alone = seg.segment(img, phrase)
        assert np.array_equal(alone.masks[0], many.masks[i])
        np.testing.assert_allclose(alone.scores[0], many.scores[i], rtol=1e-5, atol=1e-6)
    # batching through the decoder changes nothing either
    chunked = seg.segment(img, many.phrases, batch_size=2)
    assert np.array_equal(chunked.masks, many.masks)


def test_image_encoded_once(seg, monkeypatch):
    img = _photo(seed=5)
    calls = []
    orig = seg.model.encode_image
    monkeypatch.setattr(seg.model, "encode_image", lambda *a, **k: calls.append(1) or orig(*a, **k))
    seg.segment(img, "one")
    seg.segment(img, ["two", "three"])
    assert len(calls) == 1
    seg.segment(_photo(seed=6), "four")
    assert len(calls) == 2


def test_inputs_path_pil_numpy_agree(seg, tmp_path):
    img = _photo()
    p = tmp_path / "x.png"
    Image.fromarray(img).save(p)
    a = seg.segment(p, "the red square").masks
    b = seg.segment(Image.fromarray(img), "the red square").masks
    c = seg.segment(img, "the red square").masks
    assert np.array_equal(a, b) and np.array_equal(b, c)


def test_text_validation(seg):
    img = _photo()
    for bad in ["", "   ", "\n\t", []]:
        with pytest.raises(TextError):
            seg.segment(img, bad)
    with pytest.raises(TextError, match="at most"):
        seg.segment(img, "word " * 500)
    with pytest.raises(TextError, match="must be text"):
        seg.segment(img, [3])


def test_no_target_zeroes_mask(tiny_ckpt):
    s = Segmenter.from_pretrained(tiny_ckpt)
    s.no_target_prob = -1.0  # everything is "no target"
    res = s.segment(_photo(), ["a", "b"])
    assert res.no_target.all() and not res.masks.any()
    assert all(r["no_target"] and r["area"] == 0 for r in res.to_json()["results"])


def test_unknown_model_and_bad_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="unknown model"):
        Segmenter.from_pretrained("no-such-model")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        Segmenter.from_pretrained(junk)


def test_variant_without_weights_names_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv("SSPSAM_HOME", str(tmp_path))
    with pytest.raises(CheckpointError) as info:  # an architecture name: say to pass a trained checkpoint
        Segmenter.from_pretrained("ssp-sam-vitb")
    assert "no trained weights are published" in str(info.value) and "sspsam train ssp-sam-vitb" in str(info.value)


# ---- CLI ---------------------------------------------------------------------------------
def test_cli_segment_writes_three_files(tiny_ckpt, tmp_path):
    img = tmp_path / "photo.jpg"
    Image.fromarray(_photo()).save(img)
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["segment", str(img), "the red square", "-o", str(out), "--model", str(tiny_ckpt)])
    assert r.exit_code == 0, r.output
    mask = np.asarray(Image.open(out / "photo.segment.mask0.png"))
    assert mask.shape == (90, 120) and set(np.unique(mask)) <= {0, 255}
    ov = Image.open(out / "photo.segment.overlay.png")
    from sspsam.io.masks import overlay_scale

    k = overlay_scale(90, 120)  # a small image is drawn enlarged so its labels can be read
    assert ov.height >= 90 * k and ov.width > 120 * k  # the image, then the legend panel (and any warning banner)
    data = json.loads((out / "photo.segment.json").read_text())
    res = data["results"][0]
    assert res["phrase"] == "the red square" and isinstance(res["no_target"], bool)
    assert np.array_equal(decode_rle(res["rle"]), mask > 0)
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_cli_bundled_default_runs(tmp_path):
    img = tmp_path / "scene.png"
    Image.fromarray(_photo()).save(img)
    r = CliRunner().invoke(app, ["segment", str(img), "the red square", "-o", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    assert {p.name for p in (tmp_path / "o").iterdir()} == {"scene.segment.mask0.png", "scene.segment.overlay.png", "scene.segment.json"}


@pytest.mark.parametrize(
    "args, message",
    [
        (["segment", "/no/such/image.jpg", "dog"], "image not found"),
        (["segment", "IMG", "   "], "empty phrase"),
        (["segment", "IMG", "dog", "--model", "ssp-sam-vitb"], "no trained weights are published"),
    ],
)
def test_cli_errors_are_one_line(args, message, tmp_path, monkeypatch):
    monkeypatch.setenv("SSPSAM_HOME", str(tmp_path / "home"))
    img = tmp_path / "i.png"
    Image.fromarray(_photo()).save(img)
    args = [str(img) if a == "IMG" else a for a in args]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2
    assert message in r.output and "Traceback" not in r.output
