"""The colours of masks and classes, shared by overlays, the label PNG and the web page."""

from __future__ import annotations

import colorsys

from PIL import ImageColor

#: colours people tell apart side by side (Trubetskoy's 20 distinct colours, reordered so the first
#: few are the most saturated): golden-ratio hues alone give near twins after a dozen phrases
_DISTINCT = [(230, 25, 75), (0, 130, 200), (60, 180, 75), (255, 225, 25), (145, 30, 180), (245, 130, 48),
             (70, 240, 240), (240, 50, 230), (210, 245, 60), (0, 128, 128), (170, 110, 40), (128, 0, 0),
             (250, 190, 212), (0, 0, 128), (170, 255, 195), (128, 128, 0), (220, 190, 255), (255, 215, 180),
             (128, 128, 128), (0, 0, 0)]



def palette(n: int) -> list[tuple[int, int, int]]:
    """n colours: the 20 distinct ones first, then golden-ratio hues at alternating brightness."""
    out = list(_DISTINCT[:n])
    for i in range(len(out), n):
        r, g, b = colorsys.hsv_to_rgb((0.02 + i * 0.618034) % 1.0, 0.85, (1.0, 0.6)[i % 2])
        out.append((int(r * 255), int(g * 255), int(b * 255)))
    return out


_BACKGROUND_NAMES = {"background", "bg", "other", "others", "void", "unlabeled", "unlabelled", "stuff"}



def class_colours(classes: list[str]) -> list[tuple[int, int, int]]:
    """One colour per class name: the colour a name says ("red", "navy": CSS names) so a class
    called "blue" is never painted magenta, neutral grey for a background class, and for every
    other name the palette colour of its index. Overlay, label PNG and web page all use these."""
    out = []
    for name, fallback in zip(classes, palette(len(classes))):
        key = name.strip().lower()
        if key in _BACKGROUND_NAMES:
            out.append((128, 128, 128))
        elif key.replace(" ", "") in ImageColor.colormap:
            out.append(ImageColor.getrgb(key.replace(" ", "")))
        else:
            out.append(fallback)
    return out
