"""Phrase families of the shape generator: every family is produced, tagged, and true of its scene."""

from __future__ import annotations

import random

import numpy as np
import pytest

from sspsam.data.shapes import (
    FAMILIES,
    Expression,
    ShapeObject,
    Scene,
    shape_polygon,
    all_expressions,
    expressions_by_family,
    make_scene,
)
from sspsam.engine.shapes_eval import HELDOUT_SEED0, TRAIN_SEED_LIMIT, demo_scene, evaluate, pick_phrases


def _scene(specs: list[tuple[str, str, float, float]], w: int = 200, h: int = 150) -> Scene:
    objs = [ShapeObject(i, s, c, x, y, 15.0, shape_polygon(s, x, y, 15.0)) for i, (s, c, x, y) in enumerate(specs)]
    return Scene(w, h, objs, np.full((h, w, 3), 180, np.uint8))


def test_known_scene_phrases_and_families():
    # red circle left, blue square middle, green circle right (all on one row)
    scene = _scene([("circle", "red", 30, 75), ("square", "blue", 100, 75), ("circle", "green", 170, 75)])
    got = {e.text: (e.targets, e.family) for e in all_expressions(scene)}
    assert got["the blue shape"] == ((1,), "colour")
    assert got["the square"] == ((1,), "shape")
    assert got["the red circle"] == ((0,), "colour-shape")
    assert got["the shape on the left"] == ((0,), "position")
    assert got["the shape on the right"] == ((2,), "position")
    assert got["the circle left of the blue square"] == ((0,), "relation")
    assert got["the circle right of the blue square"] == ((2,), "relation")
    assert got["all circles"] == ((0, 2), "multi")
    assert got["the two circles"] == ((0, 2), "multi")
    assert got["the purple shape"] == ((), "absent")
    assert got["the red square"] == ((), "absent")  # both words present, never together
    assert "the circle" not in got  # ambiguous: two circles
    assert "the top shape" not in got  # all on one row


def test_two_of_a_colour_are_counted():
    scene = _scene([("circle", "red", 30, 40), ("triangle", "red", 100, 110), ("square", "blue", 170, 40)])
    got = {e.text: e.targets for e in all_expressions(scene)}
    assert got["the two red shapes"] == (0, 1) and got["all red shapes"] == (0, 1)


@pytest.mark.parametrize("seed", range(25))
def test_every_phrase_is_true_and_tagged(seed):
    scene = demo_scene(seed)
    texts = [e.text for e in all_expressions(scene)]
    assert len(texts) == len(set(texts))
    for e in all_expressions(scene):
        assert e.family in FAMILIES, e
        if e.family == "absent":
            assert e.no_target
            continue
        assert e.targets
        words = e.text.split()
        head = [o for o in scene.objects if o.index in e.targets]
        if e.family == "relation" and e.template == "relation-shape":
            shape, rel_colour, rel_shape = words[1], words[-2], words[-1]
            (anchor,) = scene.select(rel_colour, rel_shape)
            assert all(o.shape == shape and o.index != anchor for o in head)
            # the shape alone is ambiguous: the relation is what decides
            assert len(scene.select(shape=shape)) >= 2
        if e.template == "position":
            side = "left" if "left" in words else "right" if "right" in words else "top" if "top" in words else "bottom"
            (o,) = head
            x0, y0, x1, y1 = o.extent
            for b in scene.objects:
                if b.index == o.index:
                    continue
                bx0, by0, bx1, by1 = b.extent
                assert {"left": x1 < bx0, "right": bx1 < x0, "top": y1 < by0, "bottom": by1 < y0}[side]


def test_every_family_is_produced_across_demo_scenes():
    seen = set()
    for seed in range(40):
        seen |= {f for f, es in expressions_by_family(demo_scene(seed)).items() if es}
    assert seen == set(FAMILIES)


def test_pick_phrases_one_per_available_family():
    rng = random.Random(0)
    scene = demo_scene(3)
    picked = pick_phrases(scene, rng)
    fams = [e.family for e in picked]
    assert len(fams) == len(set(fams))
    assert set(fams) == {f for f, es in expressions_by_family(scene).items() if es}


def test_held_out_seeds_cannot_overlap_training():
    assert HELDOUT_SEED0 >= TRAIN_SEED_LIMIT
    with pytest.raises(ValueError, match="held-out"):
        evaluate(None, 1, seed0=5)


class _Oracle:
    """Answers every phrase with the generator's own truth: the harness must then score 1.0."""

    def __init__(self):
        self.scene = None

    def segment(self, image, texts):
        from types import SimpleNamespace

        from sspsam.engine.shapes_eval import target_mask

        by_text = {e.text: e for e in all_expressions(self.scene)}
        masks = np.stack([target_mask(self.scene, by_text[t]) for t in texts])
        return SimpleNamespace(masks=masks, no_target=np.array([not by_text[t].targets for t in texts]))


def test_harness_scores_a_perfect_answer_as_one(monkeypatch):
    import sspsam.engine.shapes_eval as ev

    oracle = _Oracle()
    real = ev.demo_scene

    def spy(seed):
        oracle.scene = real(seed)
        return oracle.scene

    monkeypatch.setattr(ev, "demo_scene", spy)
    r = ev.evaluate(oracle, n_scenes=10)
    assert r["mIoU"] == 1.0 and r["no_target_acc"] == 1.0
    assert all(row["score"] == 1.0 for row in r["families"].values() if row["n"])


def test_expression_family_defaults():
    assert Expression("x", (), "none", "").family == "absent"
    assert Expression("x", (1,), "single", "made-up").family == "other"
    assert make_scene(0) is not None
