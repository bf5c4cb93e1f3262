"""`sspsam ovss`: label every pixel of an image with one of a list of class names.

Registered by ``sspsam/cli.py`` as ``app.command("ovss")(cli_ovss.ovss)``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from .cli_common import check_input_file, check_output_dir, fail, output_stem, say_warning
from .errors import SSPSamError

if TYPE_CHECKING:  # numpy/PIL load when the command runs, not for `sspsam --help`
    import numpy as np
    from PIL import Image

_LEGEND_ROW = 14


def _fail(exc: Exception) -> None:
    raise fail(exc)


def label_overlay(rgb: "np.ndarray", labels: "np.ndarray", classes: list[str], shares: dict[str, float], alpha: float = 0.55) -> "Image.Image":
    """The image tinted by class colour, with a legend panel (colour, name, share) to its right.

    The legend lists classes present in the image, largest first, so 150 class names do not
    bury the few that matter.
    """
    import numpy as np
    from PIL import Image, ImageDraw

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
    output: Path = typer.Option(Path("out"), "-o", "--output", help="Folder for <name>.ovss.json, <name>.ovss.labels.png and <name>.ovss.overlay.png."),
    model: str = typer.Option("ovss-shapes-demo", "--model", "-m", help="Bundled model, 'zeroshot' (CLIP + SAM from the weights cache), an OVSS variant or a checkpoint path."),
    device: str = typer.Option("auto", "--device", help="torch device: auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:1, mps."),
    offline: bool = typer.Option(False, "--offline", help="Never download missing weights (also: SSPSAM_OFFLINE=1)."),
    slide: Optional[bool] = typer.Option(None, "--slide/--no-slide", help="Sliding-window inference; default: automatic for large images."),
) -> None:
    """Label every pixel with one class.

    Writes, for IMAGE named <name>.<ext>: <name>.ovss.labels.png (class index per pixel), <name>.ovss.overlay.png
    and <name>.ovss.json (classes, pixel shares, warnings) — names distinct from `sspsam segment`'s.
    """
    try:  # cheap checks first: a bad image or class list should not wait for a model to load
        check_input_file(image)
        from .cli import _offline
        from .device import resolve_device
        from .imageio import load_image
        from .ovss.predictor import OVSS, clean_classes

        rgb = load_image(image)
        names = clean_classes(classes)
        if len(names) > 256:
            raise SSPSamError(f"{len(names)} classes do not fit an 8-bit label PNG; give at most 256")
        dev = resolve_device(device)
        check_output_dir(output, create=False)
        with _offline(offline):
            seg = OVSS.from_pretrained(model, device=str(dev))
        res = seg.segment(rgb, names, slide=slide)
    except SSPSamError as exc:
        _fail(exc)
    import numpy as np
    from PIL import Image

    from .checkpoint import atomic_write

    for w in res.warnings:
        say_warning(w)
    stem = output_stem(image)
    written = []
    try:
        check_output_dir(output)
        labels_png = Image.fromarray(res.labels.astype(np.uint8), mode="L")
        written.append(atomic_write(output / f"{stem}.ovss.labels.png", lambda p: labels_png.save(p, format="PNG")))
        ov = label_overlay(rgb, res.labels, res.classes, res.shares)
        written.append(atomic_write(output / f"{stem}.ovss.overlay.png", lambda p: ov.save(p, format="PNG")))
        payload = {"image": str(image), "model": seg.name, **res.to_json()}
        written.append(atomic_write(output / f"{stem}.ovss.json", lambda p: Path(p).write_text(json.dumps(payload, indent=1))))
    except (OSError, SSPSamError) as exc:
        _fail(exc)
    for c in sorted(res.classes, key=lambda c: -res.shares[c]):
        if res.shares[c] > 0:
            print(f"{c}: {100 * res.shares[c]:.1f}%")
    for w in written:
        print(f"wrote {w}")
