"""`sspsam ovss`: label every pixel of an image with one of a list of class names.

Registered by ``sspsam/cli.py`` as ``app.command("ovss")(cli_ovss.ovss)``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from .checkpoint import atomic_write
from .errors import SSPSamError

err = Console(stderr=True)


def _fail(exc: Exception) -> None:
    err.print(f"[bold red]error:[/] {exc}", markup=True, highlight=False, soft_wrap=True)
    raise typer.Exit(code=1)


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
    from .masks import label_overlay, label_png
    from .ovss.predictor import OVSS, clean_classes

    try:  # cheap checks first: a bad image or class list should not wait for a model to load
        rgb = load_image(image)
        names = clean_classes(classes)
        if len(names) > 256:
            raise SSPSamError(f"{len(names)} classes do not fit an 8-bit label PNG; give at most 256")
        seg = OVSS.from_pretrained(model, device=device)
        res = seg.segment(rgb, names, slide=slide)
    except (SSPSamError, RuntimeError) as exc:  # RuntimeError: e.g. an unavailable CUDA device
        _fail(exc)
    stem = image.stem
    written = []
    labels_png = label_png(res.labels, res.classes)  # palette PNG: class index per pixel, shown in colour
    written.append(atomic_write(output / f"{stem}_labels.png", lambda p: labels_png.save(p, format="PNG")))
    ov = label_overlay(rgb, res.labels, res.classes, res.shares)
    written.append(atomic_write(output / f"{stem}_overlay.png", lambda p: ov.save(p, format="PNG")))
    payload = {"image": str(image), "model": seg.name, **res.to_json()}
    written.append(atomic_write(output / f"{stem}.json", lambda p: Path(p).write_text(json.dumps(payload, indent=1))))
    for c in sorted(res.classes, key=lambda c: -res.shares[c]):
        if res.shares[c] > 0:
            print(f"{c}: {100 * res.shares[c]:.1f}%")
    for w in written:
        print(f"wrote {w}")
