"""Deterministic synthetic scenes of coloured shapes and their exact rasterisation.

The expressions about them are in :mod:`sspsam.data.expressions`; :mod:`sspsam.data.shapes`
gathers both (the import path every caller uses).

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


def shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[float]:
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
        poly = shape_polygon(shape, cx, cy, r)
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
