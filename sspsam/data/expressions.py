"""Referring expressions about a shapes :class:`~sspsam.data.scenes.Scene` that are TRUE of it.

:func:`single_target_expressions`, :func:`multi_target_expressions` and
:func:`no_target_expressions` compute each sentence's referents from the scene, so a sentence is
only emitted when it is true (and, for single-target ones, unambiguous). Every template belongs to
one phrase family (:data:`FAMILIES`), which is what the demo model is evaluated on.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from sspsam.data.scenes import (COLOURS, NUMBER_WORDS, PLURAL, SHAPES, Scene, ShapeObject)

# ----------------------------------------------------------------------------------------------
# expressions


@dataclass(frozen=True)
class Expression:
    text: str
    targets: tuple[int, ...]  # object indices; () for no-target
    kind: str  # single / multi / none
    template: str = ""

    @property
    def no_target(self) -> bool:
        return not self.targets

    @property
    def family(self) -> str:
        """The phrase family (see :data:`FAMILIES`): what a model must understand to answer it."""
        return TEMPLATE_FAMILY.get(self.template, "absent" if self.no_target else "other")


# Phrase families, as the demo model is evaluated on them. A template belongs to the family of
# the hardest thing it asks: "the blue circle on the left" needs position, "the circle left of
# the red square" a relation between two objects.
FAMILIES: tuple[str, ...] = ("colour", "shape", "colour-shape", "position", "relation", "size", "multi", "absent")
TEMPLATE_FAMILY: dict[str, str] = {
    "colour": "colour",
    "shape": "shape",
    "colour-shape": "colour-shape",
    "colour-shape-position": "position",
    "group-position": "position",
    "position": "position",
    "relation": "relation",
    "relation-shape": "relation",
    "comparative-size": "size",
    "all-colour": "multi",
    "count-shape": "multi",
    "all-shape": "multi",
    "colour-shapes": "multi",
    "count-colour": "multi",
    "conjunction": "multi",
    "absent-colour": "absent",
    "absent-colour-only": "absent",
    "absent-shape": "absent",
    "absent-pair": "absent",
}


def _left_of(a: ShapeObject, b: ShapeObject) -> bool:
    return a.extent[2] < b.extent[0]


def _above(a: ShapeObject, b: ShapeObject) -> bool:
    return a.extent[3] < b.extent[1]


def single_target_expressions(scene: Scene) -> dict[int, list[Expression]]:
    """For every object, the templates that pick it out uniquely (may be empty for some)."""
    out: dict[int, list[Expression]] = {o.index: [] for o in scene.objects}
    objs = scene.objects

    def add(i: int, text: str, template: str) -> None:
        if all(e.text != text for e in out[i]):
            out[i].append(Expression(text, (i,), "single", template))

    for o in objs:
        same_cs = scene.select(o.colour, o.shape)
        same_s = scene.select(shape=o.shape)
        same_c = scene.select(colour=o.colour)
        desc = f"{o.colour} {o.shape}"
        if len(same_cs) == 1:
            add(o.index, f"the {desc}", "colour-shape")
            if o.horizontal in ("left", "right"):
                add(o.index, f"the {desc} on the {o.horizontal}", "colour-shape-position")
            if o.vertical in ("top", "bottom"):
                add(o.index, f"the {desc} at the {o.vertical}", "colour-shape-position")
        if len(same_s) == 1:
            add(o.index, f"the {o.shape}", "shape")
        if len(same_c) == 1:
            add(o.index, f"the {o.colour} shape", "colour")
        # the left/right one of a group sharing the description (with a clear gap)
        for group, noun in ((same_cs, desc), (same_s, o.shape)):
            if len(group) < 2:
                continue
            others = [objs[j] for j in group if j != o.index]
            if all(_left_of(o, b) for b in others):
                add(o.index, f"the leftmost {noun}" if len(group) > 2 else f"the {noun} on the left", "group-position")
            if all(_left_of(b, o) for b in others):
                add(o.index, f"the rightmost {noun}" if len(group) > 2 else f"the {noun} on the right", "group-position")
            if all(_above(o, b) for b in others):
                add(o.index, f"the top {noun}", "group-position")
            if all(_above(b, o) for b in others):
                add(o.index, f"the bottom {noun}", "group-position")
            if len(group) == 2:
                b = others[0]
                if o.radius > b.radius * 1.3:
                    add(o.index, f"the larger {noun}", "comparative-size")
                elif b.radius > o.radius * 1.3:
                    add(o.index, f"the smaller {noun}", "comparative-size")
        # relations to another uniquely described object
        if len(same_cs) == 1:
            for b in objs:
                if b.index == o.index or len(scene.select(b.colour, b.shape)) != 1:
                    continue
                other = f"{b.colour} {b.shape}"
                if _left_of(o, b):
                    add(o.index, f"the {desc} left of the {other}", "relation")
                elif _left_of(b, o):
                    add(o.index, f"the {desc} right of the {other}", "relation")
                if _above(o, b):
                    add(o.index, f"the {desc} above the {other}", "relation")
                elif _above(b, o):
                    add(o.index, f"the {desc} below the {other}", "relation")
    return out


def multi_target_expressions(scene: Scene) -> list[Expression]:
    """Expressions whose referent is 2+ objects (gRefCOCO's multi-target kind)."""
    out: list[Expression] = []
    for colour in COLOURS:
        idx = scene.select(colour=colour)
        if len(idx) >= 2:
            out.append(Expression(f"all {colour} shapes", tuple(idx), "multi", "all-colour"))
    for shape in SHAPES:
        idx = scene.select(shape=shape)
        if len(idx) >= 2:
            word = NUMBER_WORDS.get(len(idx))
            if word:
                out.append(Expression(f"the {word} {PLURAL[shape]}", tuple(idx), "multi", "count-shape"))
            out.append(Expression(f"all {PLURAL[shape]}", tuple(idx), "multi", "all-shape"))
        for colour in COLOURS:
            idx = scene.select(colour, shape)
            if len(idx) >= 2:
                out.append(Expression(f"the {colour} {PLURAL[shape]}", tuple(idx), "multi", "colour-shapes"))
    # two uniquely named objects together
    uniq = [o for o in scene.objects if len(scene.select(o.colour, o.shape)) == 1]
    for a, b in zip(uniq, uniq[1:]):
        out.append(
            Expression(f"the {a.colour} {a.shape} and the {b.colour} {b.shape}", (a.index, b.index), "multi", "conjunction")
        )
    return out


def no_target_expressions(scene: Scene, colours: Iterable[str] | None = None) -> list[Expression]:
    """Expressions that mention a colour, shape or colour–shape pair absent from the scene.

    ``colours`` limits the absent colours named to a palette (default: every colour), so that a
    set drawn from a palette never mentions a colour its images can't show."""
    out: list[Expression] = []
    present_c = {o.colour for o in scene.objects}
    present_s = {o.shape for o in scene.objects}
    for colour in (COLOURS if colours is None else colours):
        if colour not in present_c:
            for shape in sorted(present_s):
                out.append(Expression(f"the {colour} {shape}", (), "none", "absent-colour"))
            out.append(Expression(f"the {colour} shape", (), "none", "absent-colour-only"))
    for shape in SHAPES:
        if shape not in present_s:
            for colour in sorted(present_c):
                out.append(Expression(f"the {colour} {shape}", (), "none", "absent-shape"))
    for colour in sorted(present_c):
        for shape in sorted(present_s):
            if not scene.select(colour, shape):
                out.append(Expression(f"the {colour} {shape}", (), "none", "absent-pair"))
    return out


def phrasecut_phrases(scene: Scene) -> list[tuple[str, tuple[int, ...], dict]]:
    """PhraseCut-style phrases: a phrase refers to EVERY instance that matches it.

    Returns (phrase, target indices, phrase_structure) with phrase_structure in PhraseCut's
    layout: name, attributes, relation_ids, relation_descriptions, type.
    """
    out = []
    for shape in SHAPES:
        idx = scene.select(shape=shape)
        if idx:
            out.append((shape, tuple(idx), _structure(shape, [], [], "name")))
        for colour in COLOURS:
            idx = scene.select(colour, shape)
            if idx:
                out.append((f"{colour} {shape}", tuple(idx), _structure(shape, [colour], [], "attribute")))
        for size in ("small", "large"):
            idx = [o.index for o in scene.objects if o.shape == shape and o.size == size]
            if idx:
                out.append((f"{size} {shape}", tuple(idx), _structure(shape, [size], [], "attribute")))
    uniq = [o for o in scene.objects if len(scene.select(o.colour, o.shape)) == 1]
    for shape in SHAPES:
        for b in uniq:
            idx = [o.index for o in scene.objects if o.shape == shape and o.index != b.index and _left_of(o, b)]
            if idx:
                rel = ["to the left of", f"{b.colour} {b.shape}"]
                out.append((f"{shape} to the left of {b.colour} {b.shape}", tuple(idx), _structure(shape, [], [rel], "relation")))
    return out


def _structure(name: str, attributes: list[str], relations: list[list[str]], kind: str) -> dict:
    return {
        "name": name,
        "attributes": list(attributes),
        "relation_ids": list(range(len(relations))),
        "relation_descriptions": [list(r) for r in relations],
        "type": kind,
    }


# ----------------------------------------------------------------------------------------------
# text helpers shared by the generators


def tokenize(sentence: str) -> list[str]:
    """refer-style tokens: lower case words (the released files were tokenised the same way)."""
    return re.findall(r"[a-z0-9]+", sentence.lower())


def raw_form(sentence: str, rng: np.random.Generator | None = None) -> str:
    """A 'raw' annotator string for a clean sentence: capitalised, sometimes with a full stop."""
    text = sentence[:1].upper() + sentence[1:]
    if rng is None or rng.random() < 0.5:
        text += "."
    return text


# ----------------------------------------------------------------------------------------------
# every phrase family at once (the demo model's training and evaluation draw from here)


def position_expressions(scene: Scene) -> list[Expression]:
    """'the shape on the left', 'the top shape': an object apart from ALL others on one side."""
    out = []
    for o in scene.objects:
        others = [b for b in scene.objects if b.index != o.index]
        if all(_left_of(o, b) for b in others):
            out.append(Expression("the shape on the left", (o.index,), "single", "position"))
        if all(_left_of(b, o) for b in others):
            out.append(Expression("the shape on the right", (o.index,), "single", "position"))
        if all(_above(o, b) for b in others):
            out.append(Expression("the top shape", (o.index,), "single", "position"))
        if all(_above(b, o) for b in others):
            out.append(Expression("the bottom shape", (o.index,), "single", "position"))
    return out


def relation_expressions(scene: Scene) -> list[Expression]:
    """'the circle left of the red square': the shape word alone is ambiguous, the relation to a
    uniquely named object is what picks the referent out."""
    out = []
    relations = (("left of", _left_of), ("right of", lambda a, b: _left_of(b, a)),
                 ("above", _above), ("below", lambda a, b: _above(b, a)))
    for b in scene.objects:
        if len(scene.select(b.colour, b.shape)) != 1:
            continue
        for shape in SHAPES:
            group = [o for o in scene.objects if o.shape == shape and o.index != b.index]
            if len(scene.select(shape=shape)) < 2:
                continue  # the shape word alone already says which one
            for word, test in relations:
                hits = [o for o in group if test(o, b)]
                if len(hits) == 1:
                    out.append(Expression(f"the {shape} {word} the {b.colour} {b.shape}", (hits[0].index,), "single", "relation-shape"))
    return out


def all_expressions(scene: Scene) -> list[Expression]:
    """Every true phrase the generator makes for ``scene``, each tagged with its ``family``;
    a text appears once (the first template that made it wins)."""
    exprs = [e for es in single_target_expressions(scene).values() for e in es]
    exprs += position_expressions(scene) + relation_expressions(scene)
    exprs += multi_target_expressions(scene)
    for colour in COLOURS:  # 'the two red shapes'
        idx = scene.select(colour=colour)
        if len(idx) in NUMBER_WORDS:
            exprs.append(Expression(f"the {NUMBER_WORDS[len(idx)]} {colour} shapes", tuple(idx), "multi", "count-colour"))
    exprs += no_target_expressions(scene)
    seen: set[str] = set()
    out = []
    for e in exprs:
        if e.text not in seen:
            seen.add(e.text)
            out.append(e)
    return out


def expressions_by_family(scene: Scene) -> dict[str, list[Expression]]:
    out: dict[str, list[Expression]] = {f: [] for f in FAMILIES}
    for e in all_expressions(scene):
        out.setdefault(e.family, []).append(e)
    return out
