"""Generated clips of moving shapes with exact per-frame masks: the tracking test bed.

The scenes are the shapes generator's (:mod:`sspsam.data.shapes`: saturated shapes on plain grey,
painted exactly on their COCO-rasterised masks), so the bundled demo model knows them. Objects
move along straight or back-and-forth paths; they may overlap (a later object hides an earlier
one: the masks are the visible parts) and leave the frame. The default clip is the one the
tracking tests need: two objects crossing paths and a third that
leaves on the right and comes back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from sspsam.data.shapes import COLOURS, shape_polygon, rasterize_coco


@dataclass(frozen=True)
class Mover:
    phrase: str  # what the demo model is asked ("the red circle")
    shape: str
    colour: str
    radius: float
    path: Callable[[float], tuple[float, float]]  # t in [0, 1] -> centre (x, y)


@dataclass
class Clip:
    frames: np.ndarray  # uint8 [T, H, W, 3]
    masks: np.ndarray  # bool [T, N, H, W]: the visible part of each mover
    movers: list[Mover]

    @property
    def phrases(self) -> list[str]:
        """The distinct phrases, in the movers' order."""
        return list(dict.fromkeys(m.phrase for m in self.movers))

    def phrase_masks(self) -> np.ndarray:
        """bool [T, P, H, W]: per phrase the union of its movers' visible masks."""
        return np.stack([self.masks[:, [i for i, m in enumerate(self.movers) if m.phrase == p]].any(1)
                         for p in self.phrases], 1)


def _lerp(a: tuple[float, float], b: tuple[float, float]) -> Callable[[float], tuple[float, float]]:
    return lambda t: (a[0] + (b[0] - a[0]) * t, a[1] + (b[1] - a[1]) * t)


def _there_and_back(a: tuple[float, float], b: tuple[float, float]) -> Callable[[float], tuple[float, float]]:
    return lambda t: _lerp(a, b)(1 - abs(2 * t - 1))


def crossing_movers(size: int = 256) -> list[Mover]:
    """Two circles that cross paths (one phrase, "all circles", names both, so only the tracker
    tells them apart) and a green square that leaves on the right for about a third of the clip
    and comes back. The circles pass 10 px apart: the demo model was trained on scenes whose shapes
    never touch, and it misses shapes that overlap."""
    s = size / 256
    return [
        Mover("all circles", "circle", "blue", 24 * s, _lerp((206 * s, 92 * s), (50 * s, 92 * s))),
        Mover("all circles", "circle", "red", 24 * s, _lerp((50 * s, 150 * s), (206 * s, 150 * s))),
        Mover("the green square", "square", "green", 28 * s, _there_and_back((150 * s, 212 * s), (330 * s, 212 * s))),
    ]


def make_clip(frames: int = 60, size: int = 256, movers: list[Mover] | None = None, background: int = 180) -> Clip:
    """Render ``frames`` frames of ``size``×``size``; deterministic (no randomness at all)."""
    movers = crossing_movers(size) if movers is None else movers
    out = np.empty((frames, size, size, 3), np.uint8)
    masks = np.zeros((frames, len(movers), size, size), bool)
    for f in range(frames):
        t = f / max(1, frames - 1)
        img = np.full((size, size, 3), background, np.uint8)
        full = []
        for m in movers:
            cx, cy = m.path(t)
            full.append(rasterize_coco([shape_polygon(m.shape, cx, cy, m.radius)], size, size))
        for i, m in enumerate(movers):
            img[full[i]] = COLOURS[m.colour]
            masks[f, i] = full[i]
            for j in range(i):  # a later mover hides the earlier ones
                masks[f, j] &= ~full[i]
        out[f] = img
    return Clip(out, masks, movers)
