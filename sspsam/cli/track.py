"""`sspsam track VIDEO PHRASE... -o OUT`: segment every frame and follow each phrase's instances
with persistent track ids, into a resumable tracks.jsonl and an annotated video."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from sspsam.cli.common import (
    dtype_option,
    load_predictor,
    device_option,
    offline_option,
    quantize_option,
    threads_option,
    offline_mode,
    apply_threads,
    check_speed_options,
    fail,
    say_warning,
)
from sspsam.errors import SSPSamError


def track(
    video: Path = typer.Argument(..., help="Video file (MP4, MKV, WebM, MOV, AVI, GIF… anything FFmpeg decodes)."),
    text: list[str] = typer.Argument(..., help="One or more phrases, each quoted: \"the red circle\"."),
    output: Path = typer.Option(..., "-o", "--output", help="Output folder: tracks.jsonl, annotated.mp4 and job.json."),
    model: str = typer.Option("shapes-demo", "--model", "-m", help="Bundled model name, variant name, checkpoint path or `sspsam export onnx` folder."),
    device: str = device_option(),
    max_frames: Optional[int] = typer.Option(None, "--max-frames", min=1, help="Use the first N frames (default: all, "
                                             "and a video of more than 3600 frames is refused without it)."),
    image_batch_size: int = typer.Option(8, "--image-batch-size", min=1, help="Frames through the image towers at once."),
    lost_frames: int = typer.Option(30, "--lost-frames", min=0, help="Frames a lost track (hidden, missed, out of the "
                                    "frame) keeps its id for an instance of its phrase that comes back."),
    min_score: float = typer.Option(0.25, "--min-score", min=0.0, max=1.0, help="Score an instance needs to start a "
                                    "track; lower-scored ones only continue tracks (ByteTrack's two stages)."),
    offline: bool = offline_option(),
    threads: Optional[int] = threads_option(),
    quantize: str = quantize_option(),
    dtype: str = dtype_option(),
) -> None:
    """Segment what each phrase refers to in every frame and give each object a track id that it
    keeps while it moves, crosses others and briefly disappears. Writes OUT/tracks.jsonl (one line
    per frame: per instance its track id, phrase, COCO RLE, box and score), OUT/annotated.mp4 and
    OUT/job.json. Rerun the same command after an interruption: finished frames are skipped and
    the outputs come out as an uninterrupted run's."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    err = Console(stderr=True, highlight=False, soft_wrap=True)
    bar = Progress(TextColumn("[bold]tracking"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=err)

    def progress(total: int, done: int):
        task = bar.add_task("frames", total=total, completed=done)
        return lambda n: bar.advance(task, n)

    try:
        check_speed_options(threads, quantize, dtype)
        from sspsam.predict.device import resolve_device
        from sspsam.predict.track import run_track

        dev = str(resolve_device(device))

        def load():
            from sspsam.predict.segmenter import Segmenter

            apply_threads(threads)
            with offline_mode(offline):
                return load_predictor(Segmenter, model, dev, dtype, quantize)

        with bar:
            summary = run_track(video, output, text, load, model=model, max_frames=max_frames,
                                image_batch_size=image_batch_size, lost_frames=lost_frames, min_score=min_score,
                                progress=progress)
    except SSPSamError as exc:
        raise fail(exc) from None
    except OSError as exc:
        raise fail(exc) from None
    for w in summary.warnings:
        say_warning(w)
    resumed = f", {summary.skipped} already done" if summary.skipped else ""
    print(f"{summary.frames} frames{resumed}; {summary.tracks} tracks -> {summary.results}, {summary.video}")
