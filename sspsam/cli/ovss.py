"""`sspsam ovss`: label every pixel of an image with one of a list of class names.

Registered by ``sspsam/cli/main.py`` as ``app.command("ovss")(cli_ovss.ovss)``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from sspsam.cli.common import (
    device_option,
    dtype_option,
    offline_option,
    quantize_option,
    threads_option,
    apply_threads,
    check_input_file,
    check_output_dir,
    check_speed_options,
    dtype_of,
    fail,
    load_predictor,
    output_stem,
    say_dtype,
    say_warning,
)
from sspsam.errors import SSPSamError


def abort(exc: Exception) -> None:
    raise fail(exc)


def ovss(
    image: Path = typer.Argument(..., help="Image file (JPEG, PNG, TIFF, WebP…; EXIF orientation is applied)."),
    classes: Optional[str] = typer.Option(None, "--classes", "-c", help="Comma-separated class names: \"sky, road, car\" "
                                          "(default: the model's own classes, e.g. the bundled demo's colours)."),
    output: Path = typer.Option(Path("out"), "-o", "--output", help="Folder for <name>.ovss.json, <name>.ovss.labels.png and <name>.ovss.overlay.png."),
    model: str = typer.Option("ovss-shapes-demo", "--model", "-m", help="Bundled model, 'zeroshot' (CLIP + SAM from the weights cache), an OVSS variant or a checkpoint path."),
    device: str = device_option(),
    offline: bool = offline_option(),
    slide: Optional[bool] = typer.Option(None, "--slide/--no-slide", help="Sliding-window inference; default: automatic for large images."),
    threads: Optional[int] = threads_option(),
    quantize: str = quantize_option(),
    dtype: str = dtype_option(),
) -> None:
    """Label every pixel with one class.

    Writes, for IMAGE named <name>.<ext>: <name>.ovss.labels.png (class index per pixel), <name>.ovss.overlay.png
    and <name>.ovss.json (classes, pixel shares, warnings) — names distinct from `sspsam segment`'s.
    """
    try:  # cheap checks first: a bad image or class list should not wait for a model to load
        check_input_file(image)
        check_speed_options(threads, quantize, dtype)
        from sspsam.cli.common import offline_mode
        from sspsam.predict.device import resolve_device
        from sspsam.io.images import load_image
        from sspsam.io.masks import check_overlay_size
        from sspsam.predict.ovss import OVSS, clean_classes

        names = clean_classes(classes) if classes is not None else None
        rgb = load_image(image, len(names or ()) or 1)
        check_overlay_size(*rgb.shape[:2])  # the picture it writes must be drawable: known before the model runs
        dev = resolve_device(device)
        check_output_dir(output, create=False)
        apply_threads(threads)
        with offline_mode(offline):
            seg = load_predictor(OVSS, model, str(dev), dtype, quantize)
        seg.surface = "cli"
        names = clean_classes(seg._classes_or_default(names))
        if len(names) > 256:
            raise SSPSamError(f"{len(names)} classes do not fit an 8-bit label PNG; give at most 256")
        load_image(rgb, len(names))  # the pixels × classes budget, now that the classes are known
        say_dtype(seg)
        res = seg.segment(rgb, names, slide=slide)
    except SSPSamError as exc:
        abort(exc)
    from sspsam.io.checkpoint import OutputSet
    from sspsam.io.masks import label_overlay, label_png

    for w in res.warnings:
        say_warning(w)
    stem = output_stem(image)
    try:
        with OutputSet(output) as out:  # the three files appear together or not at all
            labels_png = label_png(res.labels, res.classes)  # palette PNG: class index per pixel, shown in colour
            out.add(f"{stem}.ovss.labels.png", lambda p: labels_png.save(p, format="PNG"))
            ov = label_overlay(rgb, res.labels, res.classes, res.shares, warnings=res.warnings)
            out.add(f"{stem}.ovss.overlay.png", lambda p: ov.save(p, format="PNG"))
            payload = {"image": str(image), "model": seg.name, "dtype": dtype_of(seg), **res.to_json()}
            out.add(f"{stem}.ovss.json", lambda p: Path(p).write_text(json.dumps(payload, indent=1)))
        written = out.paths
    except (OSError, SSPSamError) as exc:
        abort(exc)
    for c in sorted(res.classes, key=lambda c: -res.shares[c]):
        if res.shares[c] > 0:
            print(f"{c}: {100 * res.shares[c]:.1f}%")
    for w in written:
        print(f"wrote {w}")
