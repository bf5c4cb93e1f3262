"""Never a confident wrong answer without a warning: the demo knows its vocabulary, every surface
carries the same warnings, overlays are readable in any script, and clicks refine a wrong mask."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw
from typer.testing import CliRunner

from sspsam.cli.main import app
from sspsam.data.shapes import all_expressions, make_scene
from sspsam.errors import CheckpointError, TextError
from sspsam.predict.segmenter import Segmenter

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "shapes.png"


def _cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def demo():
    return Segmenter.from_pretrained("shapes-demo", device="cpu")


def _iou(a, b) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


# ---- 1. the demo knows what it knows ----------------------------------------------------------


def test_unicorn_is_no_match_with_a_vocabulary_warning(tmp_path):
    r = _cli("segment", EXAMPLE, "a unicorn", "the blue circle", "-o", tmp_path)
    assert r.exit_code == 0, r.output
    assert "'a unicorn': no matching object" in r.stdout
    assert "'the blue circle': mask" in r.stdout
    warn = [line for line in r.stderr.splitlines() if line.startswith("warning:")]
    assert len(warn) == 1 and "'unicorn'" in warn[0] and "vocabulary of 'shapes-demo'" in warn[0] and "--allow-unknown" in warn[0]
    data = json.loads((tmp_path / "shapes.segment.json").read_text())
    unicorn, circle = data["results"]
    assert unicorn["no_target"] and unicorn["area"] == 0 and unicorn["warnings"] == data["warnings"]
    assert not circle["no_target"] and circle["warnings"] == []
    mask = np.asarray(Image.open(ROOT / "examples" / "shapes_blue_circle.png")) > 0
    assert _iou(np.asarray(Image.open(tmp_path / "shapes.segment.mask1.png")) > 0, mask) > 0.9


def test_allow_unknown_asks_the_model_and_still_warns(demo):
    res = demo.segment(EXAMPLE, ["a unicorn", "the blue unicorn"], allow_unknown_words=True)
    assert len(res.warnings) == 2 and all("'unicorn'" in w for w in res.warnings)
    assert "allow_unknown_words" not in res.warnings[0]  # asked: nothing to opt into
    refused = demo.segment(EXAMPLE, ["a unicorn", "the blue unicorn"])
    assert refused.no_target[0] and "allow_unknown_words=True" in refused.phrase_warnings[0][0]
    assert not refused.no_target[1]  # 'blue' is known: answered, with a warning that 'unicorn' was not read
    assert "may be wrong" in refused.phrase_warnings[1][0]


def test_vocabulary_covers_every_generated_phrase(demo):
    from sspsam.engine.shapes_eval import demo_scene
    from sspsam.predict.vocabulary import words

    known = demo.vocabulary.words
    for seed in range(10_000, 10_030):  # scenes the recorded list was not made from
        for e in all_expressions(demo_scene(seed)):
            assert set(words(e.text)) <= known, e.text
    res = demo.segment(EXAMPLE, demo.meta["example_phrases"])
    assert res.warnings == []  # the README's phrases draw no warning


def test_ovss_without_classes_labels_the_shapes_by_colour(tmp_path):
    r = _cli("ovss", EXAMPLE, "-o", tmp_path)
    assert r.exit_code == 0, r.output
    data = json.loads((tmp_path / "shapes.ovss.json").read_text())
    assert data["classes"] == ["background", "red", "green", "blue", "yellow"] and data["warnings"] == []
    labels = np.asarray(Image.open(tmp_path / "shapes.ovss.labels.png"))
    scene = make_scene(np.random.default_rng(12), width=256, height=192, n_objects=(4, 4), radius=(0.12, 0.2),
                       background="plain", palette=("red", "green", "blue", "yellow"))
    for k, o in enumerate(scene.objects):
        inside = labels[scene.mask(k)]
        assert (inside == data["classes"].index(o.colour)).mean() > 0.9, (o.colour, o.shape)
    r = _cli("ovss", EXAMPLE, "-c", "sky, red, Red", "-o", tmp_path)
    assert r.exit_code == 2 and r.stderr.startswith("error: class 'Red' is given twice")


# ---- 2. one set of warnings for every surface --------------------------------------------------


def _photo_like(h: int = 96, w: int = 128) -> np.ndarray:
    """Smooth gradients, texture and many hues: what a photograph has and a generated scene never does."""
    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[:h, :w] / max(h, w)
    img = np.stack([120 + 100 * np.sin(6 * xx), 60 + 150 * yy, 200 - 120 * xx * yy], -1)
    img += rng.normal(0, 18, (h, w, 3))
    return img.clip(0, 255).astype(np.uint8)


def test_batch_on_a_photo_warns_in_every_line_and_on_stderr(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(_photo_like()).save(images / "photo.png")
    Image.fromarray(_photo_like()[::-1].copy()).save(images / "photo2.png")
    (tmp_path / "p.txt").write_text("the red circle\na unicorn\n")
    out = tmp_path / "out"
    r = _cli("batch", images, "--phrases", tmp_path / "p.txt", "-o", out)
    assert r.exit_code == 0, r.output
    lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert len(lines) == 4
    for rec in lines:
        assert any("does not look like the generated" in w for w in rec["warnings"]), rec
    assert all(any("'unicorn'" in w for w in rec["warnings"]) == (rec["phrase"] == "a unicorn") for rec in lines)
    stderr = [line for line in r.stderr.splitlines() if line.startswith("warning:")]
    assert any("does not look like" in line and "(4 of 4 items)" in line for line in stderr)
    job = json.loads((out / "job.json").read_text())
    assert job["model"] == "shapes-demo" and len(job["checkpoint_sha256"]) == 64
    r = _cli("batch", images, "--phrases", tmp_path / "p.txt", "-o", out, "-m", "zeroshot-tiny")
    assert r.exit_code == 2 and "holds results of model 'shapes-demo'" in r.stderr


def test_batch_where_every_item_fails_exits_2(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(b"not a png")
    (tmp_path / "p.txt").write_text("the red circle\n")
    r = _cli("batch", images, "--phrases", tmp_path / "p.txt", "-o", tmp_path / "out")
    assert r.exit_code == 2 and "\nerror: every one of the 1 items failed" in "\n" + r.stderr


def test_image_and_model_warnings_reach_the_result(demo):
    grey = np.asarray(Image.open(EXAMPLE).convert("L").convert("RGB"))
    res = demo.segment(grey, "the blue circle")
    assert any("grayscale" in w for w in res.warnings)
    rnd = Segmenter.from_pretrained("zeroshot-tiny", device="cpu").segment(EXAMPLE, "the blue circle")
    assert any("random weights" in w for w in rnd.warnings)


def test_segment_phrases_file_and_named_refusals(tmp_path):
    (tmp_path / "p.txt").write_text("the blue circle\n\nthe purple triangle\n")
    r = _cli("segment", EXAMPLE, "--phrases", tmp_path / "p.txt", "-o", tmp_path / "o")
    assert r.exit_code == 0, r.output
    assert [x["phrase"] for x in json.loads((tmp_path / "o" / "shapes.segment.json").read_text())["results"]] == \
        ["the blue circle", "the purple triangle"]
    r = _cli("segment", EXAMPLE, "the blue circle", str(EXAMPLE), "-o", tmp_path / "o")
    assert r.exit_code == 2 and "is a file, not a phrase" in r.stderr
    with pytest.raises(CheckpointError, match="did you mean shapes-demo"):
        Segmenter.from_pretrained("shapes-dem")


# ---- 3. pictures people can read ---------------------------------------------------------------


def test_cjk_label_has_no_tofu():
    from sspsam.io.overlay import _tag, font

    fnt = font(32)
    text = "赤い丸"
    notdef = np.asarray(fnt.getmask("\U000f0000"))  # a private-use code point: the font's missing-glyph box
    for ch in text:
        glyph = np.asarray(fnt.getmask(ch))
        assert glyph.any() and (glyph.shape != notdef.shape or not np.array_equal(glyph, notdef)), ch
    # the label as the overlay draws it: its ink is the font's glyphs, on the chip
    img = Image.new("RGB", (200, 80), (0, 0, 0))
    _tag(ImageDraw.Draw(img), (10, 70), text, (255, 255, 255), fnt, (200, 80))
    ref = Image.new("L", (200, 80), 0)
    ImageDraw.Draw(ref).text((0, 0), text, fill=255, font=fnt)
    a = np.asarray(img)[..., 0]
    ys, xs = np.nonzero(a > 127)  # the white chip
    ink = (a[ys.min():ys.max() + 1, xs.min():xs.max() + 1] < 128).sum()  # black text on it
    assert abs(int(ink) - int((np.asarray(ref) > 127).sum())) <= 0.05 * ink


def test_palette_keeps_twenty_phrases_apart_and_labels_do_not_collide():
    from sspsam.io.overlay import _overlap, _place, palette

    cols = np.array(palette(20), float)
    dist = np.sqrt(((cols[:, None] - cols[None]) ** 2).sum(-1)) + np.eye(20) * 1e9
    assert dist.min() >= 40
    taken: list = []
    for _ in range(3):  # three labels for objects in the same spot
        x, y = _place((50, 50, 90, 90), (40, 14), (200, 200), taken)
        taken.append((x, y, x + 40, y + 14))
    assert all(_overlap(a, b) == 0 for i, a in enumerate(taken) for b in taken[i + 1:])


def test_overlay_has_one_box_per_object_and_a_banner(demo):
    res = demo.segment(_photo_like(), "all circles", allow_unknown_words=True)
    img = res.plot(_photo_like())
    assert isinstance(img, Image.Image) and img.height > 96 * 4  # enlarged, and a banner under it
    res = demo.segment(EXAMPLE, ["all circles"])
    assert len(res.instances[0]) == 2 and "all circles" in repr(res) and "2 objects" in repr(res)


# ---- 4. Python API parity ----------------------------------------------------------------------


def test_logits_and_per_call_thresholds(demo):
    res = demo.segment(EXAMPLE, ["the blue circle", "a unicorn"], return_logits=True)
    assert res.logits.shape == (2, 192, 256) and np.array_equal(res.logits[0] > 0, res.masks[0])
    assert np.isneginf(res.logits[1]).all()  # refused: never asked
    strict = demo.segment(EXAMPLE, "the blue circle", mask_threshold=4.0)
    assert 0 < strict.masks[0].sum() < res.masks[0].sum()
    assert demo.segment(EXAMPLE, "the blue circle", no_target_threshold=0.0).no_target[0]
    assert demo.mask_threshold == 0.0  # the model's own settings are untouched


def test_a_click_turns_a_wrong_mask_into_the_clicked_object(demo):
    from sspsam.engine.shapes_eval import HELDOUT_SEED0, demo_scene, target_mask

    scene = demo_scene(HELDOUT_SEED0 + 5)
    e = next(x for x in all_expressions(scene) if x.text == "the bottom circle")
    gt = target_mask(scene, e)
    img = scene.render()
    assert _iou(demo.segment(img, e.text).masks[0], gt) < 0.5  # the demo gets this one wrong
    o = scene.objects[e.targets[0]]
    res = demo.segment(img, e.text, points=[[o.cx, o.cy]])
    assert _iou(res.masks[0], gt) >= 0.9 and not res.no_target[0]
    with pytest.raises(TextError, match="outside"):
        demo.segment(img, e.text, points=[[-5, 3]])
