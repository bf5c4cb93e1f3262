"""Overlays and label PNGs, checked pixel by pixel: where the box lies, that the legend is there,
that text and lines grow with the image, and that the palette label PNG keeps the class indices."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from sspsam.io.masks import NO_MATCH, bbox, overlay_scale, class_colours, contour, label_overlay, label_png, overlay, palette, segmentation_overlay


def _disc(h: int, w: int, cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def _is(img: np.ndarray, colour) -> np.ndarray:
    return (img == np.array(colour, np.uint8)).all(-1)


def _chip_height(h: int, w: int) -> int:
    """Height of the label chip drawn above a disc's box (the mask-coloured pixels above the box)."""
    m = _disc(h, w, h * 0.6, w * 0.5, min(h, w) * 0.2)
    out = np.asarray(overlay(np.zeros((h, w, 3), np.uint8), [m], ["circle"]))
    x0, y0, x1, y1 = bbox(m)
    rows = np.nonzero(_is(out[:y0], palette(1)[0]).any(1))[0]
    return int(rows.max() - rows.min() + 1)


def test_box_outline_lies_on_the_mask_bbox():
    h, w = 120, 160
    m = _disc(h, w, 60, 70, 30)
    c = palette(1)[0]
    out = np.asarray(overlay(np.zeros((h, w, 3), np.uint8), [m]))
    assert out.shape == (h, w, 3)  # no legend asked: the picture is the image's size
    x0, y0, x1, y1 = bbox(m)
    solid = _is(out, c)
    # the box: every pixel of the bbox's four edges, in the mask's colour
    assert solid[y0, x0:x1 + 1].all() and solid[y1, x0:x1 + 1].all()
    assert solid[y0:y1 + 1, x0].all() and solid[y0:y1 + 1, x1].all()
    # nothing drawn outside the box, and the box's corners are outside the disc (it is the box, not the contour)
    outside = np.ones_like(solid)
    outside[y0:y1 + 1, x0:x1 + 1] = False
    assert not out[outside].any()
    assert not m[y0, x0] and not m[y1, x1]
    # inside the mask: the contour band in full colour, the rest a translucent fill (between image and colour)
    band = contour(m, 2)
    assert solid[band].all()
    inner = m & ~band
    inner[y0:y0 + 3] = inner[y1 - 2:] = False
    fill = out[inner].astype(int)
    assert (fill > 0).any(1).all() and not _is(out[inner][:, None], c).any()


def test_contour_and_box_lines_grow_with_the_image():
    h, w = 1500, 2000
    m = _disc(h, w, 750, 1000, 400)
    out = np.asarray(overlay(np.zeros((h, w, 3), np.uint8), [m]))
    solid = _is(out, palette(1)[0])
    # along the middle row the contour band is a run of solid pixels at the disc's left edge
    row = solid[750]
    left = int(np.argmax(m[750]))
    run = int(np.argmin(row[left:]))
    assert run >= 8, run  # ~1/250 of the long side, not a 1 px hairline
    x0, y0, x1, y1 = bbox(m)
    assert solid[y0 - 0, x0:x1 + 1].all() and solid[y0 + 3, x0 + 4:x1 - 4][:50].all()  # the box is several px thick


def test_contour_is_the_border_band_of_a_square_erosion():
    rng = np.random.default_rng(0)
    for _ in range(20):
        m = rng.random((30, 40)) > 0.35
        for width in (1, 2, 3):
            # the naive definition: a pixel is inner when its whole (2w+1)² window (outside = empty) is in the mask
            padded = np.pad(m, width)
            inner = np.ones_like(m)
            for dy in range(2 * width + 1):
                for dx in range(2 * width + 1):
                    inner &= padded[dy:dy + m.shape[0], dx:dx + m.shape[1]]
            assert np.array_equal(contour(m, width), m & ~inner)


def test_contour_matches_scipy_minimum_filter_at_any_width():
    from scipy import ndimage

    rng = np.random.default_rng(1)
    for _ in range(30):
        h, w = rng.integers(1, 50, 2)
        m = rng.random((h, w)) < rng.random()
        for width in (0, 4, 7, 12, 30):
            inner = ndimage.minimum_filter(m.view(np.uint8), size=2 * width + 1, mode="constant", cval=0).view(bool)
            assert np.array_equal(contour(m, width), m & ~inner)


def test_label_size_grows_with_image_size_up_to_a_cap():
    small = _chip_height(120, 160)
    large = _chip_height(3000, 4000)
    assert small >= 12  # readable on a 160×120 scene
    assert large >= 5 * small  # and still readable on a 4000×3000 photo
    assert _chip_height(6000, 8000) == large  # but a bigger photo does not get a bigger label: it would hide the picture


def test_segment_legend_names_every_phrase_and_no_match():
    h, w = 120, 160
    rgb = np.full((h, w, 3), 200, np.uint8)
    a, b = _disc(h, w, 40, 40, 20), _disc(h, w, 80, 120, 25)
    img = segmentation_overlay(rgb, ["the red circle", "the blue circle", "the star"],
                               [a, b, np.zeros((h, w), bool)], np.array([0.9, 0.8, 0.1]), np.array([False, False, True]))
    out = np.asarray(img)
    k = overlay_scale(h, w)  # a 160x120 scene is drawn enlarged, so its labels have pixels to be read with
    assert k >= 2
    h, w = h * k, w * k
    assert out.shape[0] == h and out.shape[1] > w + 100  # the image, then a legend panel to its right
    panel = out[:, w:]
    colours = palette(3)
    rows = []
    for c in colours[:2]:  # a filled swatch of each found phrase's colour
        ys, xs = np.nonzero(_is(panel, c))
        assert len(ys) >= 100, c
        rows.append(int(ys.mean()))
    assert rows[0] < rows[1]
    assert not _is(panel, colours[2]).any()  # the absent phrase: a hollow swatch, its colour nowhere
    assert not _is(out[:, :w], colours[2]).any()
    # the legend has text on three rows: dark pixels right of the swatches, spread over three bands
    dark = (panel < 80).all(-1)
    text_rows = np.nonzero(dark[:, 30:].any(1))[0]
    assert text_rows.max() - text_rows.min() > 2 * 12
    assert NO_MATCH == "(no match)"


def test_segment_overlay_never_draws_a_no_target_or_empty_mask():
    h, w = 60, 80
    rgb = np.full((h, w, 3), 90, np.uint8)
    m = _disc(h, w, 30, 40, 15)
    out = np.asarray(segmentation_overlay(rgb, ["x"], [m], np.array([0.5]), np.array([True])))
    w *= overlay_scale(h, w)
    assert (out[:, :w] == 90).all()  # said absent: nothing drawn on the image even though a mask came back


def test_label_png_is_a_palette_png_with_the_class_indices():
    classes = ["background", "red", "sky", "car"]
    labels = np.array([[0, 1, 2, 3], [3, 2, 1, -1]])
    buf = io.BytesIO()
    label_png(labels, classes).save(buf, format="PNG")
    back = Image.open(io.BytesIO(buf.getvalue()))
    assert back.mode == "P"
    assert np.array_equal(np.asarray(back), np.where(labels < 0, 255, labels))  # the index is the class index
    rgb = np.asarray(back.convert("RGB"))  # what a viewer shows: the overlay's class colours
    colours = class_colours(classes)
    for i in range(4):
        assert (rgb[labels == i] == colours[i]).all()
    assert (rgb[labels < 0] == 0).all()
    assert colours[0] == (128, 128, 128) and colours[1] == (255, 0, 0) and colours[2] == palette(4)[2]


def test_label_png_beyond_255_classes_is_16_bit():
    labels = np.array([[0, 299], [-1, 5]])
    img = label_png(labels, [f"c{i}" for i in range(300)])
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    back = np.asarray(Image.open(io.BytesIO(buf.getvalue())))
    assert np.array_equal(back.astype(np.int64), np.where(labels < 0, 65535, labels))
    n255 = label_png(np.array([[0, 254, -1]]), [f"c{i}" for i in range(255)])  # 255 classes + unlabelled: fits
    assert n255.mode == "P" and np.asarray(n255).tolist() == [[0, 254, 255]]
    all256 = label_png(np.array([[0, 255]]), [f"c{i}" for i in range(256)])  # 256 classes, none unlabelled: still fits
    assert all256.mode == "P" and np.asarray(all256).tolist() == [[0, 255]]


def test_label_overlay_tints_with_the_class_colours_and_lists_them():
    h, w = 90, 120
    labels = np.zeros((h, w), np.int64)
    labels[20:60, 30:90] = 1
    full = np.asarray(label_overlay(np.zeros((h, w, 3), np.uint8), labels, ["background", "blue"]))
    k = overlay_scale(h, w)
    img = full[::k, :: k]  # drawn enlarged k times: one pixel of each k×k block
    assert img.shape[0] == h and img.shape[1] > w
    assert tuple(img[25, 35]) == (0, 0, round(255 * 0.55))  # tinted with the colour the name says
    assert tuple(img[5, 5]) == (round(128 * 0.55),) * 3
    assert _is(full[:, w * k:], (0, 0, 255)).sum() >= 100 and _is(full[:, w * k:], (128, 128, 128)).sum() >= 100
