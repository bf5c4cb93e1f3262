"""Deterministic synthetic scenes of coloured shapes, with referring expressions that are TRUE.

A :class:`Scene` holds non-overlapping circles, squares and triangles on a grey (plain or noisy)
background. Every object carries its polygon, bbox, category and attributes (colour, shape, size,
horizontal/vertical position). :func:`single_target_expressions`, :func:`multi_target_expressions`
and :func:`no_target_expressions` produce sentences whose referents are computed from the scene,
so a sentence is only emitted when it is true (and, for single-target ones, unambiguous).

Scenes are painted exactly on their masks, so image pixels and ground-truth masks agree (the
rasterisation conventions of COCO and PhraseCut are described in :mod:`sspsam.data.scenes`).

The scenes and their rasterisation live in :mod:`sspsam.data.scenes`, the expressions in
:mod:`sspsam.data.expressions`; this module gathers them (the import path every caller uses) and
holds the demo's scene distribution and vocabulary.
"""

from __future__ import annotations

import numpy as np

from sspsam.data.expressions import (  # noqa: F401 (re-exported)
    Expression,
    single_target_expressions,
    multi_target_expressions,
    no_target_expressions,
    phrasecut_phrases,
    tokenize,
    raw_form,
    position_expressions,
    relation_expressions,
    all_expressions,
    expressions_by_family,
    FAMILIES,
    TEMPLATE_FAMILY,
)
from sspsam.data.scenes import (  # noqa: F401 (re-exported)
    rasterize_coco,
    rasterize_phrasecut,
    ShapeObject,
    Scene,
    shape_polygon,
    make_scene,
    COLOURS,
    SHAPES,
    CATEGORIES,
    CATEGORY_ID,
    PLURAL,
    NUMBER_WORDS,
)


#: image sides of the demo's scenes (width and height drawn independently)
SIDES = (128, 160, 192, 224, 256)


def demo_scene(seed: int) -> Scene:
    """The demo's scene distribution: 3–5 shapes big enough to be read after the model's
    128-pixel letterbox (radius ≥ 10 % of the shorter side)."""
    rng = np.random.default_rng(seed)
    w, h = (int(rng.choice(SIDES)) for _ in range(2))
    return make_scene(rng, width=w, height=h, n_objects=(3, 5), radius=(0.1, 0.22))


def shapes_vocabulary(scenes: int = 400) -> list[str]:
    """Every word the shapes generator puts in a phrase (what the bundled ``shapes-demo`` was trained
    on): the word lists themselves, plus the template words found by generating the phrases of
    ``scenes`` demo scenes, so a template added to the generator is recorded without a list here."""
    out = set(COLOURS) | set(SHAPES) | set(PLURAL.values()) | set(NUMBER_WORDS.values()) | {"shape", "shapes"}
    for seed in range(scenes):
        for e in all_expressions(demo_scene(seed)):
            out.update(tokenize(e.text))
    return sorted(out)


_polygon = shape_polygon  # the earlier private name, kept for one release
