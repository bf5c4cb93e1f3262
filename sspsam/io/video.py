"""Video files through PyAV (FFmpeg's decoders and encoders): what users have (MP4, MKV, WebM,
MOV, AVI, GIF…) in, H.264 MP4 out.

A video is checked whole before any work starts (readable, has a video stream, at least one
frame, one frame size throughout, at most ``max_frames`` frames), so a bad input is one error and
never a half-processed output. The check decodes every frame without converting it to RGB: the
decoder is cheap next to the model, and a container's frame count in the header is often missing
or wrong.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from sspsam.errors import SSPSamError

MAX_FRAMES = 3600  # two minutes at 30 fps: beyond it a user must say --max-frames on purpose
DEFAULT_FPS = Fraction(30)


class VideoError(SSPSamError):
    """The video is missing, unreadable, empty, changes frame size, or is longer than allowed."""


@dataclass(frozen=True)
class VideoInfo:
    path: str
    frames: int  # decoded frames that will be used (at most max_frames)
    width: int
    height: int
    fps: Fraction


def _open(path: str | os.PathLike):
    import av

    p = Path(path)
    if not p.exists():
        raise VideoError(f"video not found: {p}")
    if not p.is_file():
        raise VideoError(f"video is not a file: {p}")
    try:
        container = av.open(str(p), "r")
    except (av.FFmpegError, OSError, UnicodeDecodeError, ValueError) as exc:
        raise VideoError(f"{p} is not a video FFmpeg can read ({_reason(exc)})") from None
    if not container.streams.video:
        container.close()
        raise VideoError(f"{p} has no video stream (is it an audio file or an image?)")
    return container


def _reason(exc: BaseException) -> str:
    return " ".join(str(getattr(exc, "strerror", None) or exc).split())[:200] or type(exc).__name__


def probe_video(path: str | os.PathLike, max_frames: int | None = None) -> VideoInfo:
    """Check the whole video and return its size, rate and usable frame count.

    ``max_frames``: use only the first N frames; None refuses a video longer than
    :data:`MAX_FRAMES` (a mistaken hour-long input would otherwise run for a day)."""
    limit = MAX_FRAMES if max_frames is None else max_frames
    if limit < 1:
        raise VideoError(f"--max-frames must be >= 1, got {limit}")
    import av

    container = _open(path)
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        if max_frames is None and stream.frames and stream.frames > limit:
            raise VideoError(f"{path} has {stream.frames} frames, more than {MAX_FRAMES}: "
                             "pass --max-frames N to process the first N (or all of them)")
        fps = stream.average_rate or stream.guessed_rate or DEFAULT_FPS
        n, size = 0, None
        try:
            for frame in container.decode(stream):
                if size is None:
                    size = (frame.width, frame.height)
                elif (frame.width, frame.height) != size:
                    raise VideoError(f"{path} changes frame size at frame {n} ({size[0]}x{size[1]} -> "
                                     f"{frame.width}x{frame.height}); re-encode it to one size first")
                n += 1
                if n == limit:
                    if max_frames is None and _has_more(container, stream):
                        raise VideoError(f"{path} has more than {MAX_FRAMES} frames: "
                                         "pass --max-frames N to process the first N (or all of them)")
                    break
        except av.FFmpegError as exc:
            if n == 0:
                raise VideoError(f"{path} is not a video FFmpeg can decode ({_reason(exc)})") from None
            raise VideoError(f"{path} is damaged at frame {n} ({_reason(exc)})") from None
        if n == 0 or size is None:
            raise VideoError(f"{path} has no frames")
        if size[0] < 1 or size[1] < 1:
            raise VideoError(f"{path} has empty frames ({size[0]}x{size[1]})")
        return VideoInfo(str(path), n, size[0], size[1], Fraction(fps))
    finally:
        container.close()


def _has_more(container, stream) -> bool:
    for _ in container.decode(stream):
        return True
    return False


def iter_frames(path: str | os.PathLike, start: int = 0, count: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """(index, uint8 RGB [H, W, 3]) for frames ``start`` .. ``start + count - 1``, decoded in order
    (frames before ``start`` are decoded and dropped: seeking lands on key frames, not on a frame)."""
    container = _open(path)
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for i, frame in enumerate(container.decode(stream)):
            if count is not None and i >= start + count:
                break
            if i >= start:
                yield i, frame.to_ndarray(format="rgb24")
    finally:
        container.close()


def write_video(path: str | os.PathLike, frames: Iterable[np.ndarray], fps: Fraction | float | int,
                lossless: bool = False) -> None:
    """Encode RGB frames as H.264 in ``path`` (MP4/MKV by its suffix). ``lossless``: 4:4:4 at qp 0
    (test clips whose pixels must survive); else 4:2:0 at CRF 18, which every player shows.

    One encoder thread: x264's output then depends only on the frames and settings, so a rerun
    (a resumed job) writes the same bytes."""
    import av

    fps = Fraction(fps).limit_denominator(1001 * 1000)
    with av.open(str(path), "w", format=_format(path)) as out:
        stream = None
        for rgb in frames:
            rgb = np.ascontiguousarray(rgb, np.uint8)
            if stream is None:
                h, w = rgb.shape[:2]
                options = {"qp": "0", "preset": "medium"} if lossless else {"crf": "18", "preset": "medium"}
                stream = out.add_stream("libx264", rate=fps, options={**options, "threads": "1"})
                stream.width, stream.height = w + (w % 2 and not lossless), h + (h % 2 and not lossless)
                stream.pix_fmt = "yuv444p" if lossless else "yuv420p"
                stream.codec_context.thread_count = 1
            if rgb.shape[1] != stream.width or rgb.shape[0] != stream.height:  # 4:2:0 needs even sides
                rgb = np.pad(rgb, ((0, stream.height - rgb.shape[0]), (0, stream.width - rgb.shape[1]), (0, 0)), mode="edge")
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        if stream is None:
            raise VideoError(f"no frames to write to {path}")
        for packet in stream.encode():
            out.mux(packet)


def _format(path: str | os.PathLike) -> str:
    """The container from the final name: ``atomic_write`` hands over a temporary name."""
    name = str(path).lower()
    for suffix, fmt in ((".mkv", "matroska"), (".mov", "mov"), (".mp4", "mp4")):
        if name.endswith(suffix) or f"{suffix}." in name:
            return fmt
    return "mp4"
