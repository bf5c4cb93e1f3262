"""`sspsam ovss`: label every pixel of an image with one of a list of class names.

Registered by ``sspsam/cli.py`` as ``app.command("ovss")(cli_ovss.ovss)``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import typer
from PIL import Image, ImageDraw
from rich.console import Console

from .checkpoint import atomic_write
from .errors import SSPSamError

err = Console(stderr=True)
_LEGEND_ROW = 14


def _fail(exc: Exception) -> None:
    # markup off: user text (a file name like "[/red].png") must never be read as Rich markup
    err.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True, style="bold red")
    raise typer.Exit(code=2)


def label_overlay(rgb: np.ndarray, labels: np.ndarray, classes: list[str], shares: dict[str, float], alpha: float = 0.55) -> Image.Image:
    """The image tinted by class colour, with a legend panel (colour, name, share) to its right.

    The legend lists classes present in the image, largest first, so 150 class names do not
    bury the few that matter.
    """
    from .masks import palette

    colours = np.array(palette(len(classes)), np.float32)
    tinted = rgb.astype(np.float32) * (1 - alpha) + colours[labels] * alpha
    body = Image.fromarray(tinted.clip(0, 255).astype(np.uint8))
    present = sorted((i for i, c in enumerate(classes) if shares.get(c, 0) > 0), key=lambda i: -shares[classes[i]])
    draw_probe = ImageDraw.Draw(body)
    text_w = max((draw_probe.textlength(f"{classes[i]} {100 * shares[classes[i]]:.1f}%") for i in present), default=0)
    panel_w = int(text_w) + 28
    h = max(body.height, _LEGEND_ROW * len(present) + 8)
    out = Image.new("RGB", (body.width + panel_w, h), (255, 255, 255))
    out.paste(body, (0, 0))
    draw = ImageDraw.Draw(out)
    for row, i in enumerate(present):
        y = 4 + row * _LEGEND_ROW
        x = body.width + 4
        draw.rectangle((x, y, x + 10, y + 10), fill=tuple(int(v) for v in colours[i]), outline=(0, 0, 0))
        draw.text((x + 16, y), f"{classes[i]} {100 * shares[classes[i]]:.1f}%", fill=(0, 0, 0))
    return out


def ovss(
    image: Path = typer.Argument(..., help="Image file (JPEG, PNG, TIFF, WebP…; EXIF orientation is applied)."),
    classes: str = typer.Option("sky,road,car,person", "--classes", "-c", help="Comma-separated class names: \"sky, road, car\"."),
    output: Path = typer.Option(Path("out"), "-o", "--output", help="Folder for the label PNG, overlay PNG and JSON."),
    model: str = typer.Option("ovss-shapes-demo", "--model", "-m", help="Bundled model, 'zeroshot' (CLIP + SAM from the weights cache), an OVSS variant or a checkpoint path."),
    device: str = typer.Option("cpu", "--device", help="torch device: cpu, cuda, cuda:1, mps."),
    slide: Optional[bool] = typer.Option(None, "--slide/--no-slide", help="Sliding-window inference; default: automatic for large images."),
) -> None:
    """Label every pixel with one class. Writes <name>_labels.png (class indices), <name>_overlay.png and <name>.json."""
    from .imageio import load_image
    from .ovss.predictor import OVSS, clean_classes

    try:  # cheap checks first: a bad image or class list should not wait for a model to load
        names = clean_classes(classes)
        rgb = load_image(image, len(names))
        if len(names) > 256:
            raise SSPSamError(f"{len(names)} classes do not fit an 8-bit label PNG; give at most 256")
        seg = OVSS.from_pretrained(model, device=device)
        res = seg.segment(rgb, names, slide=slide)
    except (SSPSamError, RuntimeError) as exc:  # RuntimeError: e.g. an unavailable CUDA device
        _fail(exc)
    stem = image.stem
    written = []
    labels_png = Image.fromarray(res.labels.astype(np.uint8), mode="L")
    ov = label_overlay(rgb, res.labels, res.classes, res.shares)
    payload = {"image": str(image), "model": seg.name, **res.to_json()}
    try:  # each file atomic: a full disk leaves the previous ones intact
        written.append(atomic_write(output / f"{stem}_labels.png", lambda p: labels_png.save(p, format="PNG")))
        written.append(atomic_write(output / f"{stem}_overlay.png", lambda p: ov.save(p, format="PNG")))
        written.append(atomic_write(output / f"{stem}.json", lambda p: Path(p).write_text(json.dumps(payload, indent=1))))
    except SSPSamError as exc:
        _fail(exc)
    for c in sorted(res.classes, key=lambda c: -res.shares[c]):
        if res.shares[c] > 0:
            print(f"{c}: {100 * res.shares[c]:.1f}%")
    for w in written:
        print(f"wrote {w}")
