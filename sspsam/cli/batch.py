"""`sspsam batch`: segment a folder or a manifest of images into a resumable results.jsonl."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from sspsam.cli.common import (apply_threads, check_speed_options, device_option, dtype_option, fail, model_dtype_args,
                               offline_mode, offline_option, quantize_option, threads_option)
from sspsam.errors import SSPSamError


def batch(
    input: Path = typer.Argument(..., help="A folder of images (searched recursively), or a JSONL manifest of "
                                 '{"image": path, "phrase": "..."} or {"image": path, "phrases": [...]} lines.'),
    phrases: Optional[Path] = typer.Option(None, "--phrases", help="Text file, one phrase per line, asked of every "
                                           "image of a folder (and of manifest lines without their own)."),
    output: Path = typer.Option(..., "-o", "--output", help="Output folder: results.jsonl (and masks/ with --png)."),
    model: str = typer.Option("shapes-demo", "--model", "-m", help="Bundled model name, variant name, checkpoint path or `sspsam export onnx` folder."),
    device: str = device_option(),
    png: bool = typer.Option(False, "--png", help="Also write one mask PNG per item, OUT/masks/<id>.png."),
    ray: bool = typer.Option(False, "--ray", help="Run on Ray Data (local, or the cluster in RAY_ADDRESS)."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="With --ray: images per model call batch."),
    concurrency: int = typer.Option(1, "--concurrency", min=1, help="With --ray: model actors (each loads the model)."),
    dtype: str = dtype_option(" A resumed job should keep the first run's."),
    offline: bool = offline_option(),
    threads: Optional[int] = threads_option(),
    quantize: str = quantize_option(),
) -> None:
    """Segment every (image, phrase) into OUT/results.jsonl, one COCO-RLE line each, in input order.
    Rerun the same command after an interruption: finished items are skipped, the rest appended.
    OUT/job.json records the model (name, checkpoint sha256); a rerun with another model is refused."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from sspsam.predict.batch import run_batch
    from sspsam.predict.device import resolve_device

    err = Console(stderr=True, highlight=False, soft_wrap=True)
    bar = Progress(TextColumn("[bold]segmenting"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=err)

    def progress(total: int, done: int):
        task = bar.add_task("items", total=total, completed=done)
        return lambda n: bar.advance(task, n)

    try:
        check_speed_options(threads, quantize, dtype)
        device = str(resolve_device(device))
        apply_threads(threads)
        with bar, offline_mode(offline):
            summary = run_batch(input, output, phrases, model=model, device=device, png=png, use_ray=ray,
                                batch_size=batch_size, concurrency=concurrency, progress=progress,
                                dtype=model_dtype_args(dtype, quantize), quantize=quantize)
    except (SSPSamError, ValueError) as exc:  # ValueError: a dtype this device cannot run
        raise fail(exc) from None
    from sspsam.cli.common import say_warning

    for w, n in (summary.warnings or {}).items():
        say_warning(f"{w} ({n} of {summary.written} items)")
    if summary.written and summary.errors == summary.written:
        raise fail(f"every one of the {summary.written} items failed (no image could be read; see the \"error\" field of "
                   f"each line in {summary.results})")
    resumed = f", {summary.skipped} already done" if summary.skipped else ""
    failed = f", {summary.errors} with unreadable images" if summary.errors else ""
    print(f"{summary.items} items{resumed}; wrote {summary.written}{failed} -> {summary.results}")
