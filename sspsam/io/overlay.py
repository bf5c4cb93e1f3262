"""Overlays people can read at any image size: masks, outlines, boxes, labels, a legend and a
warning banner drawn on the image (referring results and OVSS label maps)."""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from sspsam.io.colours import class_colours, palette
from sspsam.io.instances import bbox, boxes_xyxy, min_instance_area, split_instances

# Plain PIL rather than an annotation library: `supervision` would bring matplotlib and PyAV into
# every install (or be an optional path we must test twice), it has no legend, and the pictures
# here need only four primitives (fill, contour, box, text) whose every pixel the tests can check.

NO_MATCH = "(no match)"


#: overlays of images with a short side below this are drawn on the image scaled up (nearest
#: neighbour, a whole factor) so that labels and outlines have pixels to be drawn with
MIN_OVERLAY_SIDE = 480
_MAX_UPSCALE = 8
_MAX_FONT = 72
_MAX_LINE = 40
#: an enlarged picture stays under this many pixels: a strip one pixel tall is short but long, and
#: enlarging it as a thumbnail is enlarged made a 100000×1 image an 800000×8 canvas and more
_MAX_ENLARGED_PIXELS = 16_000_000
#: the longest side an overlay is drawn with: past it no image viewer opens the PNG, and PIL's
#: drawing and encoding fail with a bare OSError
MAX_OVERLAY_SIDE = 1_000_000


def overlay_scale(height: int, width: int) -> int:
    """The whole factor a small image is enlarged by for its overlay (1 for most photos, and less
    where the enlarged picture with a legend beside it would pass 16 MP, or a side ``MAX_OVERLAY_SIDE``)."""
    short = max(1, min(height, width))
    k = max(1, min(_MAX_UPSCALE, -(-MIN_OVERLAY_SIDE // short))) if short < MIN_OVERLAY_SIDE else 1
    long_side = max(height, width)
    while k > 1 and (long_side * k * (short * k + MIN_OVERLAY_SIDE) > _MAX_ENLARGED_PIXELS or long_side * k > MAX_OVERLAY_SIDE):
        k -= 1
    return k


def check_overlay_size(height: int, width: int) -> None:
    """Refuse, by name, an image too long on one side to draw an overlay of (checked before a
    model runs, so the command fails at once and writes nothing)."""
    from sspsam.errors import OutputError

    if max(height, width) > MAX_OVERLAY_SIDE:
        raise OutputError(f"the image is {width:,}x{height:,} px; overlays are drawn for images up to {MAX_OVERLAY_SIDE:,} px "
                          "a side (a PNG that long opens in no viewer): crop or resize it")


def _scale(height: int, width: int) -> tuple[int, int]:
    """(font px, line px) for an image: readable on a 160×120 scene and on a 4000×3000 photo.

    Text is ~1/30 of the short side (a panorama's long side would make labels taller than the
    strip), never below 12 px (the smallest size people read without zooming) and never above
    72 px (beyond that a label hides more than it tells); lines ~1/250 of the long side, at least 2
    px so a contour stands out from the fill, with the long side counted as at most four short
    sides and the width capped at 40 px: a strip's long side made its contours (and the legend's
    row height) thousands of pixels wide.
    """
    long_side, short_side = max(height, width), min(height, width)
    return (max(12, min(_MAX_FONT, round(short_side / 30))),
            max(2, min(_MAX_LINE, round(min(long_side, 4 * short_side) / 250))))


@functools.lru_cache(maxsize=32)
def font(size: int) -> ImageFont.ImageFont:
    """A Unicode font with CJK glyphs (Noto Sans CJK, from the ``noto-cjk-sans-jp-regular``
    package: a phrase in Chinese or Japanese must not come out as boxes), else Pillow's embedded
    scalable font (Latin only), else its bitmap font."""
    path = unicode_font_path()
    if path is not None:
        try:
            return ImageFont.truetype(str(path), size=size)
        except OSError:
            pass
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 or no FreeType: the fixed bitmap font is better than nothing
        return ImageFont.load_default()


def unicode_font_path():
    """The packaged CJK-capable font file, or None when the package is missing."""
    try:
        import noto_cjk_sans_jp_regular as noto
    except ImportError:
        return None
    path = noto.FONT_PATH
    return path if path.is_file() else None


def _ink(colour) -> tuple[int, int, int]:
    """Black or white text, whichever reads better on ``colour`` (WCAG relative luminance)."""
    lum = sum(w * (c / 255) ** 2.2 for w, c in zip((0.2126, 0.7152, 0.0722), colour))
    return (0, 0, 0) if lum > 0.18 else (255, 255, 255)


def _erode_rows(a: np.ndarray, width: int) -> np.ndarray:
    """Along axis 0: True where all of a[i-width .. i+width] are True (outside the array = False).

    Windows grow by doubling (a window of r+s is one of r ANDed with one of s shifted by r), so a
    band of any width costs a handful of whole-array ANDs, not one per pixel of width.
    Not ``scipy.ndimage.minimum_filter``: the same band (tests/test_masks.py), but slower on large images.
    """
    k, n = 2 * width + 1, a.shape[0]
    if k > n:
        return np.zeros_like(a)
    win, r = a, 1  # win[i] = all(a[i:i+r]), valid for i <= n - r
    acc, got = None, 0  # acc[i] = all(a[i:i+got])
    rest = k
    while rest:
        if rest & 1:
            acc = win[: n - got - r + 1] if acc is None else acc[: n - got - r + 1] & win[got: n - r + 1]
            got += r
        rest >>= 1
        if rest:
            win = win[: n - 2 * r + 1] & win[r: n - r + 1]
            r *= 2
    out = np.zeros_like(a)
    out[width: width + len(acc)] = acc  # a window starting at i is centred at i + width
    return out


def _contour_crop(crop: np.ndarray, width: int) -> np.ndarray:
    return crop & ~_erode_rows(_erode_rows(crop, width).T, width).T


def contour(mask: np.ndarray, width: int) -> np.ndarray:
    """The band of ``mask`` within ``width`` pixels of its border (outside the image counts as outside):
    the mask minus its erosion by a (2·width+1)² square, computed on the mask's bounding box only."""
    b = bbox(mask)
    out = np.zeros(mask.shape, dtype=bool)
    if b is None:
        return out
    x0, y0, x1, y1 = b
    out[y0:y1 + 1, x0:x1 + 1] = _contour_crop(mask[y0:y1 + 1, x0:x1 + 1], width)
    return out


def _tint(out: np.ndarray, mask: np.ndarray, box, colour, alpha: float) -> None:
    """Blend ``colour`` into ``out`` (uint8, in place) on the mask's pixels, touching only its box."""
    x0, y0, x1, y1 = box
    region, m = out[y0:y1 + 1, x0:x1 + 1], mask[y0:y1 + 1, x0:x1 + 1]
    lut = _blend_table([colour], alpha)[0]  # [256, 3]: a byte lookup instead of float maths per pixel
    for ch in range(3):
        np.copyto(region[..., ch], lut[region[..., ch], ch], where=m)


def _blend_table(colours, alpha: float) -> np.ndarray:
    """[n, 256, 3] uint8: value v of channel c blended with colour k, v·(1−α) + colour·α."""
    v = np.arange(256, dtype=np.float32)[None, :, None]
    c = np.asarray(colours, np.float32)[:, None, :]
    return (v * np.float32(1 - alpha) + c * np.float32(alpha)).clip(0, 255).astype(np.uint8)


def _chip(draw: ImageDraw.ImageDraw, text: str, fnt) -> tuple[int, int, int, int, int]:
    """(width, height, padding, text left bearing, text top bearing) of a label chip."""
    l, t, r, b = draw.textbbox((0, 0), text, font=fnt)
    pad = max(2, fnt.size // 6) if hasattr(fnt, "size") else 2
    return r - l + 2 * pad, b - t + 2 * pad, pad, l, t


def _overlap(a, b) -> int:
    return max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))


def _place(box, size: tuple[int, int], limit: tuple[int, int], taken: list) -> tuple[int, int]:
    """Where a chip of ``size`` goes for a box (x0, y0, x1, y1): above its top-left corner as a
    legend reader expects, else the first of the other corners (inside, below, right-aligned)
    that covers no label already placed; where every spot is taken, the least covered one."""
    (w, h), (W, H) = size, limit
    x0, y0, x1, y1 = box
    spots = [(x0, y0 - h), (x0, y0), (x0, y1 + 1), (x1 + 1 - w, y0 - h), (x1 + 1 - w, y1 + 1), (x0, y1 + 1 - h),
             (x1 + 1 - w, y0)]
    best, best_cost = None, None
    for x, y in spots:
        x, y = min(max(0, x), max(0, W - w)), min(max(0, y), max(0, H - h))
        cost = sum(_overlap((x, y, x + w, y + h), r) for r in taken)
        if best is None or cost < best_cost:
            best, best_cost = (x, y), cost
        if cost == 0:
            break
    return best


def _tag(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, colour, fnt, limit: tuple[int, int],
         taken: list | None = None, box=None) -> None:
    """A label on a chip of the mask's colour: at (x, y) = its bottom-left kept inside the image,
    or with ``box`` and ``taken`` (the chips placed so far) where it covers no other label."""
    w, h, pad, l, t = _chip(draw, text, fnt)
    if box is not None and taken is not None:
        x, y = _place(box, (w, h), limit, taken)
    else:
        x = min(max(0, xy[0]), max(0, limit[0] - w))
        y = min(max(0, xy[1] - h), max(0, limit[1] - h))
    if taken is not None:
        taken.append((x, y, x + w, y + h))
    draw.rectangle((x, y, x + w - 1, y + h - 1), fill=tuple(colour))
    draw.text((x + pad - l, y + pad - t), text, fill=_ink(colour), font=fnt)


def _legend_panel(rows: list[tuple[tuple[int, int, int] | None, str]], height: int, fnt, line: int) -> Image.Image:
    """A white panel listing (colour swatch, text) rows: what each colour means; a hollow, crossed
    swatch (colour None) for a row that has nothing drawn."""
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    asc, desc = fnt.getmetrics() if hasattr(fnt, "getmetrics") else (10, 2)
    row_h = asc + desc + max(4, line * 2)
    sw = asc + desc
    margin = max(6, row_h // 3)
    text_w = max((probe.textlength(t, font=fnt) for _, t in rows), default=0)
    # only as tall as its rows: the picture it is pasted beside is white below them anyway
    panel = Image.new("RGB", (int(margin * 3 + sw + text_w), margin * 2 + row_h * len(rows)), (255, 255, 255))
    draw = ImageDraw.Draw(panel)
    for k, (colour, text) in enumerate(rows):
        y = margin + k * row_h
        x0, y0, x1, y1 = margin, y, margin + sw - 1, y + sw - 1
        draw.rectangle((x0, y0, x1, y1), fill=None if colour is None else tuple(colour), outline=(60, 60, 60), width=max(1, line // 2))
        if colour is None:
            draw.line((x0, y1, x1, y0), fill=(60, 60, 60), width=max(1, line // 2))
        draw.text((margin * 2 + sw, y), text, fill=(20, 20, 20), font=fnt)
    return panel


#: the most pixels an overlay (picture and legend) may add to the image's own: a legend beside a
#: strip one pixel tall is a canvas as long as the strip and as tall as the legend
_MAX_EXTRA_PIXELS = 50_000_000


def _beside(img: Image.Image, panel: Image.Image) -> Image.Image:
    """The picture with the legend panel to its right, on white; a named error where that canvas
    would be mostly white space the size of a photo album."""
    from sspsam.errors import OutputError

    w, h = img.width + panel.width, max(img.height, panel.height)
    if w * h > img.width * img.height + _MAX_EXTRA_PIXELS:
        raise OutputError(f"the overlay of this {img.width:,}x{img.height:,} px image with its legend would be {w:,}x{h:,} px; "
                          "overlays add at most 50 MP of legend: crop the image or ask fewer classes")
    full = Image.new("RGB", (w, h), (255, 255, 255))
    full.paste(img, (0, 0))
    full.paste(panel, (img.width, 0))
    return full


def overlay(image: np.ndarray, masks: list[np.ndarray], labels: list[str] | None = None, alpha: float = 0.45,
            legend: list[str] | None = None, instance_boxes: list[list] | None = None,
            colours: list[tuple[int, int, int]] | None = None) -> Image.Image:
    """Each mask as a translucent fill, a contour and its bounding box in its own colour, labelled
    at the box's top-left corner; with ``legend`` (one text per mask, e.g. the phrase and its score
    or "(no match)") a panel to the right says what each colour stands for.

    Sizes follow the image (``_scale``): a fixed 11 px font vanishes on a photo and a 1 px outline
    on a 4000 px image cannot be seen. The image part keeps the input's size and position, so
    pixel (x, y) of the picture is pixel (x, y) of the image. ``instance_boxes``: per mask, the
    inclusive boxes of its separate objects (one box each, as the JSON lists them); default one
    box around the whole mask. Labels never cover one another where the image has room.
    ``colours``: one per mask (a video keeps each track's colour from frame to frame), else the
    palette in mask order.
    """
    h, w = image.shape[:2]
    size, line = _scale(h, w)
    fnt = font(size)
    colours = palette(len(masks)) if colours is None else [tuple(c) for c in colours]
    boxes = [bbox(m) for m in masks]
    out = np.array(image, np.uint8, copy=True)
    for m, b, c in zip(masks, boxes, colours):
        if b is not None:
            _tint(out, m, b, c, alpha)
    for m, b, c in zip(masks, boxes, colours):
        if b is not None:
            x0, y0, x1, y1 = b
            out[y0:y1 + 1, x0:x1 + 1][_contour_crop(m[y0:y1 + 1, x0:x1 + 1], line)] = c
    img = Image.fromarray(out)
    draw = ImageDraw.Draw(img)
    per_mask = [[b] if b is not None else [] for b in boxes] if instance_boxes is None else \
        [[tuple(int(v) for v in ib) for ib in ibs] if b is not None else [] for b, ibs in zip(boxes, instance_boxes)]
    for ibs, c in zip(per_mask, colours):
        for b in ibs:
            draw.rectangle(b, outline=tuple(c), width=max(1, line // 2))
    if labels:  # a label wider than its box and a third of the image would hide the picture: its number instead
        taken: list = []
        for k, (ibs, c, text) in enumerate(zip(per_mask, colours, labels)):
            if ibs and text:
                b = ibs[0]  # the largest object carries the phrase
                if legend is not None and draw.textlength(text, font=fnt) > max(b[2] - b[0] + 1, w / 3):
                    text = str(k + 1)
                _tag(draw, (b[0], b[1]), text, c, fnt, (w, h), taken, b)
    if legend is None:
        return img
    rows = [(c if b is not None else None, f"{k + 1}  {t}") for k, (b, c, t) in enumerate(zip(boxes, colours, legend))]
    return _beside(img, _legend_panel(rows, h, fnt, line))


def wrap_words(words: list[str], fnt, width: float, draw: ImageDraw.ImageDraw) -> list[str]:
    """Lines of ``words`` that fit ``width`` pixels in ``fnt`` (a word longer than the width gets a
    line of its own rather than being cut)."""
    lines, cur = [], ""
    for word in words:
        trial = f"{cur} {word}".strip()
        if cur and draw.textlength(trial, font=fnt) > width:
            lines.append(cur)
            cur = word
        else:
            cur = trial
    lines.append(cur)
    return lines


def warning_banner(img: Image.Image, warnings: list[str]) -> Image.Image:
    """The result's warnings written across the top of the picture on an amber strip, so a frame
    read without its JSON (a video, a screenshot) still says its masks are not to be trusted.
    The picture keeps its size: a video's frames must all have one size."""
    if not warnings:
        return img
    size, line = _scale(img.height, img.width)
    fnt = font(max(10, size * 2 // 3))
    draw = ImageDraw.Draw(img)
    pad = max(2, line)
    lines = wrap_words(" ".join(warnings).split(), fnt, img.width - 2 * pad, draw)
    asc, desc = fnt.getmetrics() if hasattr(fnt, "getmetrics") else (10, 2)
    step = asc + desc
    room = max(1, (img.height // 3) // step)  # at most a third of the picture
    if len(lines) > room:
        lines = lines[:room - 1] + [lines[room - 1][: max(1, len(lines[room - 1]) - 1)] + "…"]
    draw.rectangle((0, 0, img.width - 1, len(lines) * step + 2 * pad), fill=(255, 191, 0))
    for k, text in enumerate(lines):
        draw.text((pad, pad + k * step), text, fill=(0, 0, 0), font=fnt)
    return img


def segmentation_overlay(image: np.ndarray, phrases: list[str], masks, scores, no_target, warnings: list[str] | None = None,
                         instances=None) -> Image.Image:
    """The ``sspsam segment`` / server picture: each found phrase drawn and named on the image, one
    box per object, a legend of every phrase asked ("(no match)" for those the model said are
    absent, or whose mask is empty: a phrase is never shown as found without pixels), and a banner
    under it all for ``warnings``. A small image is enlarged first (:func:`overlay_scale`) so its
    labels can be read; pixel (x, y) of the image is then the k×k block at (k·x, k·y)."""
    masks = [np.asarray(m, bool) for m in masks]
    found = [not n and m.any() for m, n in zip(masks, no_target)]
    legend = [f"{p}  {s:.2f}" if f else f"{p}  {NO_MATCH}" for p, s, f in zip(phrases, scores, found)]
    labels = [p if f else "" for p, f in zip(phrases, found)]
    h, w = np.asarray(image).shape[:2]
    k = overlay_scale(h, w)
    if instances is not None:
        boxes = [[_inclusive(b) for b in np.asarray(inst.boxes.cpu() if hasattr(inst.boxes, "cpu") else inst.boxes).reshape(-1, 4)]
                 for inst in instances]
    else:
        boxes = [[_inclusive(b) for b in boxes_xyxy(split_instances(m, min_instance_area(h, w)))] if m.any() else []
                 for m in masks]
    boxes = [[(x0 * k, y0 * k, (x1 + 1) * k - 1, (y1 + 1) * k - 1) for x0, y0, x1, y1 in bs] for bs in boxes]
    big = _enlarge(np.asarray(image, np.uint8), k)
    img = overlay(big, [_enlarge(m, k) if f else np.zeros((h * k, w * k), bool) for m, f in zip(masks, found)], labels,
                  legend=legend, instance_boxes=boxes)
    return with_banner(img, warnings or [])


def _inclusive(b) -> tuple[int, int, int, int]:
    """An xyxy box with x1/y1 one past the last pixel → the inclusive one PIL draws."""
    x0, y0, x1, y1 = (int(round(float(v))) for v in b)
    return x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)


def _enlarge(a: np.ndarray, k: int) -> np.ndarray:
    return a if k == 1 else np.repeat(np.repeat(a, k, axis=0), k, axis=1)


def with_banner(img: Image.Image, warnings: list[str], max_lines: int = 8) -> Image.Image:
    """``img`` with a pale-orange strip under it spelling out each warning (wrapped to the
    picture's width), so a saved overlay that travels without its JSON still says its answer is
    not to be trusted; ``img`` itself when there is nothing to say."""
    if not warnings:
        return img
    size = max(12, min(28, img.width // 60))
    fnt = font(size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    margin = max(6, size // 2)
    width = img.width - 2 * margin
    lines = [line for w in warnings for line in wrap_words(("warning: " + w).split(" "), fnt, width, probe)]
    if len(lines) > max_lines:
        lines = lines[: max_lines - 1] + [f"… ({len(warnings)} warnings in all: see the JSON)"]
    asc, desc = fnt.getmetrics() if hasattr(fnt, "getmetrics") else (size, 2)
    row = asc + desc + 2
    out = Image.new("RGB", (img.width, img.height + 2 * margin + row * len(lines)), (255, 244, 214))
    out.paste(img, (0, 0))
    draw = ImageDraw.Draw(out)
    draw.rectangle((0, img.height, img.width - 1, img.height + max(2, size // 6) - 1), fill=(247, 144, 9))
    for i, text in enumerate(lines):
        draw.text((margin, img.height + margin + i * row), text, fill=(122, 46, 14), font=fnt)
    return out


def label_overlay(rgb: np.ndarray, labels: np.ndarray, classes: list[str], shares: dict[str, float] | None = None,
                  alpha: float = 0.55, warnings: list[str] | None = None) -> Image.Image:
    """The image tinted by class colour (the label PNG's palette), class borders drawn, each region
    named, and a legend panel to the right of the classes present, largest first (so 150 class
    names do not bury the few that matter); a banner under it for ``warnings``. A small image is
    enlarged first, as in :func:`segmentation_overlay`."""
    labels = np.asarray(labels)
    k = overlay_scale(*labels.shape)
    if shares is None:
        counts0 = np.bincount(labels[labels >= 0].ravel(), minlength=len(classes))
        shares = {c: float(counts0[i]) / labels.size for i, c in enumerate(classes)}
    rgb, labels = _enlarge(np.asarray(rgb, np.uint8), k), _enlarge(labels, k)
    return with_banner(_label_overlay(rgb, labels, classes, shares, alpha), warnings or [])


def _label_overlay(rgb: np.ndarray, labels: np.ndarray, classes: list[str], shares: dict[str, float] | None,
                   alpha: float) -> Image.Image:
    h, w = labels.shape
    size, line = _scale(h, w)
    fnt = font(size)
    colours = class_colours(classes)
    valid = labels >= 0
    flat = labels.ravel() if valid.all() else labels[valid]
    counts = np.bincount(flat, minlength=len(classes))
    regions = {i: (labels == i,) for i in np.flatnonzero(counts).tolist()}  # class index -> (mask, box)
    regions = {i: (m, bbox(m)) for i, (m,) in regions.items()}
    if shares is None:
        shares = {c: float(counts[i]) / labels.size for i, c in enumerate(classes)}
    present = sorted((i for i in regions if shares.get(classes[i], 0) > 0), key=lambda i: -shares[classes[i]])
    # tint every labelled pixel with its class colour in one pass: a byte lookup by (class, value)
    table = _blend_table(colours, alpha)  # [n, 256, 3]
    table = np.concatenate([table, np.arange(256, dtype=np.uint8)[None, :, None].repeat(3, 2)])  # unlabelled: as is
    row = np.where(valid, labels, len(classes)).astype(np.intp) * 256
    rgb = np.asarray(rgb, np.uint8)
    out = np.empty_like(rgb)
    for ch in range(3):
        out[..., ch] = table[..., ch].ravel()[row + rgb[..., ch]]
    for i in present:
        m, (x0, y0, x1, y1) = regions[i]
        out[y0:y1 + 1, x0:x1 + 1][_contour_crop(m[y0:y1 + 1, x0:x1 + 1], max(1, line // 2))] = colours[i]
    img = Image.fromarray(out)
    draw = ImageDraw.Draw(img)
    taken: list = []
    for i in present:  # a name on each region large enough to hold it; the bulk (background) only in the legend
        if shares[classes[i]] >= 0.5:
            continue
        m, (x0, y0, x1, y1) = regions[i]
        tw = draw.textlength(classes[i], font=fnt)
        if x1 - x0 >= tw and y1 - y0 >= size:
            step = max(1, size // 4)  # a coarse grid is enough to place a label
            ys, xs = np.nonzero(m[y0:y1 + 1:step, x0:x1 + 1:step])
            k = np.argmin((xs - xs.mean()) ** 2 + (ys - ys.mean()) ** 2)  # a pixel of the region near its centre
            cx, cy = x0 + xs[k] * step, y0 + ys[k] * step
            cw, ch = _chip(draw, classes[i], fnt)[:2]
            # a box just under the centred chip: _place's first choice ("above the box") is the centre itself
            under = (int(cx - cw / 2), int(cy + ch / 2), int(cx + cw / 2), int(cy + 1.5 * ch))
            _tag(draw, (int(cx - tw / 2), int(cy + size / 2)), classes[i], colours[i], fnt, (w, h), taken, under)
    rows = [(colours[i], f"{classes[i]} {100 * shares[classes[i]]:.1f}%") for i in present]
    return _beside(img, _legend_panel(rows, h, fnt, line))
