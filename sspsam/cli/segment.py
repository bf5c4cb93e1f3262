"""`sspsam segment IMAGE PHRASE...`: referring segmentation of one image, written as JSON, mask PNGs and an overlay."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import typer

from sspsam.cli.common import (
    device_option,
    dtype_option,
    offline_option,
    quantize_option,
    threads_option,
    abort,
    offline_mode,
    apply_threads,
    check_input_file,
    check_output_dir,
    check_speed_options,
    dtype_of,
    load_predictor,
    output_stem,
    say_dtype,
    say_warning,
)
from sspsam.errors import SSPSamError, TextError

_OPTION_LIKE = re.compile(r"--?[A-Za-z][\w-]*(=.*)?|--?")


def _check_phrases(texts: list[str]) -> None:
    """Catch the two ways a command line silently turns into a wrong phrase. Words after ``--``
    are phrases by the user's explicit choice and may look like options."""
    from PIL import Image

    from sspsam.cli.common import after_double_dash

    image_suffixes = set(Image.registered_extensions())
    explicit = min(after_double_dash(), len(texts))
    for k, t in enumerate(texts):
        if _OPTION_LIKE.fullmatch(t.strip()) and k < len(texts) - explicit:
            raise TextError(f"'{t}' looks like an option, not a phrase: put options such as -o DIR before `--` "
                            "or give them their value (`-o out/`)")
        try:
            is_file = len(t) < 4096 and Path(t).suffix.lower() in image_suffixes and Path(t).is_file()
        except (OSError, ValueError):
            is_file = False
        if is_file:
            raise TextError(f"'{t}' is a file, not a phrase: `sspsam segment` takes ONE image and then phrases; "
                            "did you mean `sspsam batch` (many images)?")


def segment(
    image: Path = typer.Argument(..., help="Image file (JPEG, PNG, TIFF, WebP…; EXIF orientation is applied)."),
    text: Optional[list[str]] = typer.Argument(None, help="One or more phrases, each quoted: \"the man holding the baby\" (or --phrases FILE)."),
    phrases_file: Optional[Path] = typer.Option(None, "--phrases", help="Text file, one phrase per line (after any phrases given as arguments)."),
    allow_unknown: bool = typer.Option(False, "--allow-unknown", help="Ask the model even a phrase with no word it was trained on "
                                       "(default: such a phrase is answered 'no match', with a warning)."),
    output: Path = typer.Option(Path("out"), "-o", "--output", help="Folder for <name>.segment.json, .segment.overlay.png and .segment.mask<i>.png."),
    model: str = typer.Option("shapes-demo", "--model", "-m", help="Bundled model name, variant name, 'zeroshot', a checkpoint path or an `sspsam export onnx` folder (ONNX Runtime; see `sspsam models`)."),
    device: str = device_option(),
    offline: bool = offline_option(),
    threads: Optional[int] = threads_option(),
    quantize: str = quantize_option(),
    dtype: str = dtype_option(),
) -> None:
    """Segment what each phrase refers to.

    Writes, for IMAGE named <name>.<ext>: <name>.segment.json (COCO RLE per phrase, scores, no-target flags,
    COCO bbox [x, y, w, h] and the separate objects ("instances", each with bbox, score and RLE), warnings), <name>.segment.overlay.png and one 0/255 mask per phrase, <name>.segment.mask0.png, mask1, …
    in phrase order — the same names for one phrase or many.
    """
    try:  # cheap checks first: a bad image or phrase should not wait for a model to load
        check_input_file(image)
        text = list(text or [])
        _check_phrases(text)
        if phrases_file is not None:
            from sspsam.predict.batch import read_phrases

            check_input_file(phrases_file, "phrases file")
            text += read_phrases(phrases_file)
        if not text:
            raise TextError('no phrase given: `sspsam segment IMAGE "the blue circle"` or --phrases FILE')
        check_speed_options(threads, quantize, dtype)
        from sspsam.predict.device import resolve_device
        from sspsam.io.images import load_image
        from sspsam.io.masks import check_overlay_size
        from sspsam.predict.segmenter import Segmenter
        from sspsam.predict.results import clean_phrases

        phrases = clean_phrases(text)
        rgb = load_image(image, len(phrases))
        check_overlay_size(*rgb.shape[:2])  # the picture it writes must be drawable: known before the model runs
        dev = resolve_device(device)
        check_output_dir(output, create=False)
        apply_threads(threads)
        with offline_mode(offline):
            seg = load_predictor(Segmenter, model, str(dev), dtype, quantize)
        seg.surface = "cli"
        say_dtype(seg)
        res = seg.segment(rgb, phrases, **({"allow_unknown_words": True} if allow_unknown else {}))
    except SSPSamError as exc:
        abort(exc)
    _write_segment(image, output, seg.name, rgb, res, dtype_of(seg))


def _write_segment(image: Path, output: Path, model_name: str, rgb, res, dtype: str = "float32") -> None:
    import json

    import numpy as np
    from PIL import Image

    from sspsam.io.checkpoint import OutputSet
    from sspsam.io.masks import segmentation_overlay

    for w in res.warnings:
        say_warning(w)
    stem = output_stem(image)
    masks = [f"{stem}.segment.mask{i}.png" for i in range(len(res))]
    try:
        with OutputSet(output) as out:  # masks, overlay and JSON appear together or not at all
            for i, name in enumerate(masks):
                mask_png = Image.fromarray(res.masks[i].astype(np.uint8) * 255)
                out.add(name, lambda p, im=mask_png: im.save(p, format="PNG"))
            ov = segmentation_overlay(rgb, res.phrases, res.masks, res.scores, res.no_target, res.warnings, res.instances)
            out.add(f"{stem}.segment.overlay.png", lambda p: ov.save(p, format="PNG"))
            payload = {"image": str(image), "model": model_name, "dtype": dtype, **res.to_json()}
            for r, name in zip(payload["results"], masks):
                r["mask_file"] = name
            out.add(f"{stem}.segment.json", lambda p: Path(p).write_text(json.dumps(payload, indent=1)))
        written = out.paths
    except (OSError, SSPSamError) as exc:
        abort(exc)
    for p, s, n, inst in zip(res.phrases, res.scores, res.no_target, res.instances):
        boxes = "; ".join(",".join(str(int(round(float(v)))) for v in b) for b in inst.boxes)
        print(f"{p!r}: " + ("no matching object" if n else
                            f"mask, score {s:.3f}, {len(inst)} object{'s' * (len(inst) != 1)} (boxes x0,y0,x1,y1: {boxes})"))
    for w in written:
        print(f"wrote {w}")
