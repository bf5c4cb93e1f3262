"""Does an image look like the generated flat-shape scenes the bundled demo models were trained on?

The demo models (``shapes-demo``, ``ovss-shapes-demo``) know nothing else, and on a photograph
they still return confident-looking masks. Rather than a learned detector, the test uses what the
generator (``sspsam.data.shapes``) guarantees: a grey background (R = G = B, level 100…235,
plain or with per-pixel noise) and shapes filled flat with one of a fixed set of saturated
colours. Nearly every pixel of a generated scene is one of those; in a photograph (smooth
shading, many hues, dark and bright regions) most are neither.
"""

from __future__ import annotations

import functools

import numpy as np

DOMAIN = "generated-shapes"
# A pixel counts as background grey when its channels differ by at most GREY_SPREAD and its level
# is in the generator's range (with a margin for resampling / JPEG).
GREY_SPREAD = 8
GREY_RANGE = (92, 243)
# ... or as a shape when it is within PALETTE_TOL (per channel) of a palette colour.
PALETTE_TOL = 28
# Edges of shapes blend with the background after resizing or JPEG; photographs score far lower.
MIN_IN_DOMAIN = 0.85
_MAX_SIDE = 256


def _palette() -> np.ndarray:
    from sspsam.data.shapes import COLOURS

    return np.array(list(COLOURS.values()), np.int16)


@functools.cache
def _near_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per channel, [256, P] bool: is this channel value within PALETTE_TOL of palette colour p.
    A pixel is near colour p when all three channels are: three table lookups and an AND instead
    of an [N, P, 3] difference array (28 ms → ~3 ms per 256² image, the same answer)."""
    pal = _palette()
    v = np.arange(256, dtype=np.int16)[:, None]
    return tuple(np.abs(v - pal[None, :, c]) <= PALETTE_TOL for c in range(3))


def in_domain_fraction(rgb: np.ndarray) -> float:
    """Share of pixels that are generator grey or a generator palette colour."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.size == 0:
        raise ValueError(f"expected an HxWx3 image, got shape {rgb.shape}")
    step = max(1, -(-max(rgb.shape[:2]) // _MAX_SIDE))  # subsample: nearest pixels, no new colours
    px = rgb[::step, ::step].reshape(-1, 3)
    if px.dtype != np.uint8:
        px = np.clip(px, 0, 255).astype(np.uint8)
    lo, hi = px.min(1), px.max(1)
    total = px.astype(np.uint16).sum(1)  # level = total / 3, compared without a float division
    grey = ((hi - lo) <= GREY_SPREAD) & (total >= 3 * GREY_RANGE[0]) & (total <= 3 * GREY_RANGE[1])
    r, g, b = _near_tables()
    near = (r[px[:, 0]] & g[px[:, 1]] & b[px[:, 2]]).any(1)
    return float((grey | near).mean())


def looks_like_generated_shapes(rgb: np.ndarray) -> bool:
    return in_domain_fraction(rgb) >= MIN_IN_DOMAIN


def out_of_domain_warning(model_name: str, rgb: np.ndarray, command: str = "segment") -> str | None:
    """The warning a demo model adds to its result on an image unlike its training scenes, else None."""
    if looks_like_generated_shapes(rgb):
        return None
    return (
        f"this image does not look like the generated flat-shape scenes that '{model_name}' was trained on "
        f"(it knows only coloured circles, squares and triangles on grey), so its answer is not meaningful here; "
        f"for real photos run `sspsam weights fetch clip-vit-b16` and `sspsam weights fetch sam-vit-b`, "
        f"then `sspsam {command} IMAGE ... --model zeroshot`"
    )


def is_grayscale(rgb: np.ndarray) -> bool:
    """No pixel has colour (a grey, 16-bit grey or black-and-white image after loading)."""
    rgb = np.asarray(rgb)
    step = max(1, -(-max(rgb.shape[:2]) // _MAX_SIDE))
    px = rgb[::step, ::step].reshape(-1, 3).astype(np.int16)
    return bool(((px.max(1) - px.min(1)) <= GREY_SPREAD).mean() >= 0.999)


def grayscale_warning(model_name: str, rgb: np.ndarray) -> str | None:
    """A grey image passes the domain test (its pixels look like the generator's background), yet a
    demo that tells shapes apart by colour can only guess on it."""
    if not is_grayscale(rgb):
        return None
    return (f"this image has no colour (grayscale): '{model_name}' tells shapes apart by their colours, so whatever it "
            "answers here is a guess; for real images use `--model zeroshot`")
