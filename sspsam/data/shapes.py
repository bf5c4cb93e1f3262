"""Deterministic synthetic scenes of coloured shapes, with referring expressions that are TRUE.

A :class:`Scene` holds non-overlapping circles, squares and triangles on a grey (plain or noisy)
background. Every object carries its polygon, bbox, category and attributes (colour, shape, size,
horizontal/vertical position). :func:`single_target_expressions`, :func:`multi_target_expressions`
and :func:`no_target_expressions` produce sentences whose referents are computed from the scene,
so a sentence is only emitted when it is true (and, for single-target ones, unambiguous).

Rasterisation conventions (they differ between benchmarks, so both are here):

* ``"coco"`` — pycocotools ``frPyObjects`` + ``decode`` (what ``refer.py`` / ``grefer.py`` do).
  Pixel (x, y) covers the square [x, x+1)×[y, y+1); it is inside when its centre
  (x+0.5, y+0.5) is inside the polygon (up to pycocotools' 1/5-pixel sub-sampling). An
  axis-aligned square with integer corners x0..x1 covers pixel columns x0..x1-1 exactly.
* ``"phrasecut"`` — PhraseCut's ``polygons_to_mask``: vertices truncated with ``int()``, then
  ``PIL.ImageDraw.polygon(fill=1, outline=1)`` (pixel centres on integer coordinates, outline
  included), union over all polygons.

Scenes are rendered by painting each object's colour exactly on its mask under the chosen
convention, so image pixels and ground-truth masks agree (before any JPEG compression).
Colours are saturated and the background is grey (R=G=B), so colour words stay unambiguous.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (40, 70, 225),
    "yellow": (240, 215, 25),
    "purple": (140, 45, 175),
    "orange": (245, 135, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
CATEGORIES: list[dict] = [
    {"supercategory": "shape", "id": i + 1, "name": name} for i, name in enumerate(SHAPES)
]
CATEGORY_ID = {c["name"]: c["id"] for c in CATEGORIES}
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles"}
NUMBER_WORDS = {2: "two", 3: "three", 4: "four", 5: "five"}


# ----------------------------------------------------------------------------------------------
# rasterisation


def rasterize_coco(polygons: list[list[float]], height: int, width: int) -> np.ndarray:
    """COCO polygons (list of flat [x0, y0, x1, y1, ...]) → bool HxW, exactly as refer.py does."""
    if not polygons:
        return np.zeros((height, width), dtype=bool)
    rles = mask_utils.frPyObjects([list(map(float, p)) for p in polygons], height, width)
    return mask_utils.decode(rles).any(axis=2)


def rasterize_phrasecut(polygons: list[list[list[float]]], height: int, width: int) -> np.ndarray:
    """PhraseCut polygons (list of [[x, y], ...]) → bool HxW, the reference's convention
    (int-truncated vertices, PIL polygon with outline, union; polygons with < 2 points skipped)."""
    out = np.zeros((height, width), dtype=bool)
    for poly in polygons:
        if len(poly) < 2:
            continue
        img = Image.new("L", (width, height), 0)
        ImageDraw.Draw(img).polygon([(int(x), int(y)) for x, y in poly], outline=1, fill=1)
        out |= np.asarray(img) > 0
    return out


# ----------------------------------------------------------------------------------------------
# scenes


@dataclass
class ShapeObject:
    """One shape. ``polygon`` is a flat COCO-style [x0, y0, x1, y1, ...] list in pixel units."""

    index: int
    shape: str
    colour: str
    cx: float
    cy: float
    radius: float
    polygon: list[float]
    size: str = "medium"  # small / medium / large, relative to the scene
    horizontal: str = "center"  # left / center / right (image thirds)
    vertical: str = "middle"  # top / middle / bottom (image thirds)

    @property
    def rgb(self) -> tuple[int, int, int]:
        return COLOURS[self.colour]

    @property
    def category_id(self) -> int:
        return CATEGORY_ID[self.shape]

    @property
    def points(self) -> list[list[float]]:
        p = self.polygon
        return [[p[i], p[i + 1]] for i in range(0, len(p), 2)]

    @property
    def extent(self) -> tuple[float, float, float, float]:
        """Polygon extents x_min, y_min, x_max, y_max."""
        xs, ys = self.polygon[0::2], self.polygon[1::2]
        return min(xs), min(ys), max(xs), max(ys)

    @property
    def attributes(self) -> dict[str, str]:
        return {
            "colour": self.colour,
            "shape": self.shape,
            "size": self.size,
            "horizontal": self.horizontal,
            "vertical": self.vertical,
        }


@dataclass
class Scene:
    width: int
    height: int
    objects: list[ShapeObject]
    background: np.ndarray  # HxWx3 uint8, grey
    seed: int | None = None
    _masks: dict = field(default_factory=dict, repr=False)

    def mask(self, index: int, convention: str = "coco") -> np.ndarray:
        key = (index, convention)
        if key not in self._masks:
            obj = self.objects[index]
            if convention == "coco":
                m = rasterize_coco([obj.polygon], self.height, self.width)
            elif convention == "phrasecut":
                m = rasterize_phrasecut([obj.points], self.height, self.width)
            else:
                raise ValueError(f"unknown rasterisation convention {convention!r} (coco, phrasecut)")
            self._masks[key] = m
        return self._masks[key]

    def masks(self, convention: str = "coco") -> list[np.ndarray]:
        return [self.mask(i, convention) for i in range(len(self.objects))]

    def render(self, convention: str = "coco") -> np.ndarray:
        """HxWx3 uint8: the background with every object painted exactly on its mask."""
        img = self.background.copy()
        for i, obj in enumerate(self.objects):
            img[self.mask(i, convention)] = obj.rgb
        return img

    # small helpers used by the expression templates
    def select(self, colour: str | None = None, shape: str | None = None) -> list[int]:
        return [
            o.index
            for o in self.objects
            if (colour is None or o.colour == colour) and (shape is None or o.shape == shape)
        ]


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[float]:
    if shape == "square":
        # axis-aligned, integer corners: the COCO mask is exactly columns x0..x1-1, rows y0..y1-1
        h = max(2, int(round(r * 0.8)))
        x0, y0 = int(round(cx)) - h, int(round(cy)) - h
        x1, y1 = x0 + 2 * h, y0 + 2 * h
        return [float(v) for v in (x0, y0, x1, y0, x1, y1, x0, y1)]
    if shape == "triangle":
        pts = []
        for k in range(3):
            a = -math.pi / 2 + k * 2 * math.pi / 3
            pts += [round(cx + r * math.cos(a), 2), round(cy + r * math.sin(a), 2)]
        return pts
    if shape == "circle":
        n = 32
        pts = []
        for k in range(n):
            a = k * 2 * math.pi / n
            pts += [round(cx + r * math.cos(a), 2), round(cy + r * math.sin(a), 2)]
        return pts
    raise ValueError(f"unknown shape {shape!r}")


def make_scene(
    seed: int | np.random.Generator,
    *,
    width: int | None = None,
    height: int | None = None,
    n_objects: tuple[int, int] = (3, 6),
    background: str = "mixed",
    integer_vertices: bool = False,
    palette: tuple[str, ...] | None = None,
    radius: tuple[float, float] = (0.07, 0.2),
) -> Scene:
    """A scene of 2+ non-overlapping shapes, fully determined by ``seed``.

    ``width``/``height`` default to a random landscape or portrait size (so letterboxing is
    exercised); ``background`` is ``"plain"``, ``"noise"`` or ``"mixed"`` (either, by the seed);
    ``integer_vertices`` rounds every vertex to an integer (PhraseCut's loader truncates them);
    ``radius`` is the range of shape radii as fractions of the shorter image side.
    """
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    seed_int = None if isinstance(seed, np.random.Generator) else int(seed)
    if width is None or height is None:
        long_side, short_side = int(rng.integers(200, 321)), int(rng.integers(140, 200))
        if rng.random() < 0.5:
            width, height = long_side, short_side
        else:
            width, height = short_side, long_side
    colours = tuple(palette or COLOURS)

    kind = background if background != "mixed" else ("plain" if rng.random() < 0.5 else "noise")
    level = int(rng.integers(150, 215))
    if kind == "plain":
        bg = np.full((height, width, 3), level, dtype=np.uint8)
    elif kind == "noise":
        g = rng.normal(level, 12.0, size=(height, width)).clip(100, 235).astype(np.uint8)
        bg = np.repeat(g[..., None], 3, axis=2)
    else:
        raise ValueError(f"background must be plain, noise or mixed, got {background!r}")

    lo, hi = n_objects
    target_n = int(rng.integers(lo, hi + 1))
    r_min = max(8.0, min(width, height) * radius[0])
    r_max = max(r_min + 1, min(width, height) * radius[1])
    placed: list[tuple[float, float, float]] = []
    specs = []
    for _ in range(400):
        if len(specs) >= target_n:
            break
        r = float(rng.uniform(r_min, r_max))
        cx = float(rng.uniform(r + 3, width - r - 3))
        cy = float(rng.uniform(r + 3, height - r - 3))
        if any(math.hypot(cx - px, cy - py) < r + pr + 4 for px, py, pr in placed):
            continue
        placed.append((cx, cy, r))
        specs.append((str(rng.choice(SHAPES)), str(rng.choice(colours)), cx, cy, r))
    if len(specs) < 2:
        raise RuntimeError("could not place two shapes; use a larger image")

    radii = sorted(s[4] for s in specs)
    objects = []
    for i, (shape, colour, cx, cy, r) in enumerate(specs):
        poly = _polygon(shape, cx, cy, r)
        if integer_vertices:
            poly = [float(int(round(v))) for v in poly]
        size = "medium"
        if len(radii) >= 2:
            if r <= radii[0] * 1.0001 and r < radii[-1] / 1.4:
                size = "small"
            elif r >= radii[-1] * 0.9999 and r > radii[0] * 1.4:
                size = "large"
        horizontal = "left" if cx < width / 3 else ("right" if cx > 2 * width / 3 else "center")
        vertical = "top" if cy < height / 3 else ("bottom" if cy > 2 * height / 3 else "middle")
        objects.append(ShapeObject(i, shape, colour, cx, cy, r, poly, size, horizontal, vertical))
    return Scene(width, height, objects, bg, seed_int)


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
