"""Referring segmentation through a video: every frame segmented, each phrase's instances followed
from frame to frame with a persistent track id.

Association is ByteTrack (Roboflow's ``trackers`` package, the successor of supervision's
``sv.ByteTrack``) on the instances' boxes, one tracker per phrase: an id then always means "this
instance of this phrase", and two objects named by different phrases can never swap ids when they
cross. Two things are added on top, both about when an id is given:

* a track gets its id on the frame it first appears (ByteTrack would leave it unnamed until a
  second frame confirms it; here the model's score is the confirmation, as only instances above
  ``min_score`` start tracks);
* an instance that starts a new track while another track of the same phrase is lost (missed,
  hidden, or out of the frame for up to ``lost_frames`` frames) takes over that lost track's id:
  a phrase names what it refers to, so what reappears under it is taken to be what left.

Job layout (``run_track``)::

    OUT/job.json       what the job is (video digest, phrases, model, options): a rerun checks it
    OUT/tracks.jsonl   one line per frame, in order:
                       {"frame", "time", "image_size", "instances": [{"track_id", "phrase",
                        "phrase_index", "bbox", "bbox_xyxy", "score", "area", "rle"}], "warnings"}
    OUT/annotated.mp4  the frames with masks, ids and phrases drawn (and the warnings banner)

The JSONL lines are the record, as in ``sspsam batch``: each frame's line is flushed and fsynced
before the next, a rerun drops a torn last line, replays the tracker over the finished lines (its
state is a function of the boxes and scores they hold) and goes on from the next frame. Frames go
through the image towers in batches aligned to multiples of the batch size from frame 0, so a
resumed run computes every frame exactly as an uninterrupted one. The video is drawn from the
JSONL and the input after the last frame, and moved into place whole.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from sspsam.errors import SSPSamError
from sspsam.io.masks import decode_rle, encode_rle, palette, xyxy_to_coco

TRACKS = "tracks.jsonl"
JOB = "job.json"
VIDEO = "annotated.mp4"
LOST_FRAMES = 30  # ByteTrack's default buffer (one second at 30 fps)
MIN_SCORE = 0.25  # the demo scores right masks 0.3-0.5: its scores are confidences, not calibrated


class TrackError(SSPSamError):
    """The output folder of a tracking job is unusable or holds another job."""


# ---- association ---------------------------------------------------------------------------------


def _require_trackers():
    try:
        from trackers import ByteTrackTracker
    except ImportError:
        raise SSPSamError("tracking needs the video extra (the trackers package is missing): "
                          "pip install 'sspsam[video]'") from None
    return ByteTrackTracker


class PhraseTracker:
    """One ByteTrack per phrase and one id space over all of them (see the module docstring)."""

    def __init__(self, n_phrases: int, lost_frames: int = LOST_FRAMES, min_score: float = MIN_SCORE):
        ByteTrack = _require_trackers()
        # frame_rate=30: ByteTrack scales its buffer by frame_rate / 30, and ours is in frames
        self.trackers = [ByteTrack(lost_track_buffer=lost_frames, frame_rate=30.0, track_activation_threshold=min_score,
                                   high_conf_det_threshold=min_score, minimum_consecutive_frames=1)
                         for _ in range(n_phrases)]
        self.next_id = 1

    def update(self, phrase_index: int, boxes: np.ndarray, scores: np.ndarray) -> np.ndarray:
        """Track ids (int64, -1 = a low-score instance no track took) for one phrase's instances
        in one frame, in the order given. Call once per phrase per frame, frames in order."""
        import supervision as sv

        tracker = self.trackers[phrase_index]
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        scores = np.asarray(scores, np.float32).reshape(-1)
        dets = sv.Detections(xyxy=boxes, confidence=scores, class_id=np.arange(len(boxes)))
        out = tracker.update(dets)
        ids = np.full(len(boxes), -1, np.int64)
        if len(out) == 0:
            return ids
        ids[np.asarray(out.class_id, int)] = np.asarray(out.tracker_id, np.int64)
        # ByteTrack appends one tracklet per unmatched high-score detection, in detection order,
        # and reports those detections last, in the same order, with tracker_id -1
        spawned = [t for t in tracker.tracks if t.tracker_id == -1]
        born = [int(i) for i, t in zip(np.asarray(out.class_id, int), np.asarray(out.tracker_id)) if t == -1
                and scores[int(i)] >= tracker.high_conf_det_threshold]
        if len(spawned) != len(born):  # a trackers release that spawns differently: fail loudly, not mislabel
            raise RuntimeError(f"ByteTrack spawned {len(spawned)} tracks for {len(born)} new detections")
        for tracklet, i in zip(spawned, born):
            lost = [t for t in tracker.tracks if t.tracker_id != -1 and t.time_since_update > 0]
            if lost:
                old = min(lost, key=lambda t: (t.time_since_update, t.tracker_id))
                tracker.tracks.remove(old)
                tracklet.tracker_id = old.tracker_id
            else:
                tracklet.tracker_id = self.next_id
                self.next_id += 1
            ids[i] = tracklet.tracker_id
        return ids


# ---- frames through the model ----------------------------------------------------------------------


def segment_frames(seg, frames: Iterable[np.ndarray], phrases: list[str], image_batch_size: int = 8,
                   batch_size: int = 16) -> Iterator:
    """Segmentations of ``frames`` in order. Frames go through the image towers
    ``image_batch_size`` at a time; a frame identical to an earlier one of its batch reuses its
    features and its answer (a still scene costs one frame)."""
    from sspsam.io.images import load_image
    from sspsam.io.transforms import image_key

    batch: list[np.ndarray] = []

    def flush() -> list:
        import torch

        keys = [image_key(rgb) for rgb in batch]
        first = {}
        for i, k in enumerate(keys):
            first.setdefault(k, i)
        distinct = list(first)
        done = {}
        with torch.inference_mode():  # not across a yield: the caller's code must not run in it
            encoded = dict(zip(distinct, seg._encode([batch[first[k]] for k in distinct], distinct)))
            for rgb, k in zip(batch, keys):
                if k not in done:
                    done[k] = seg._decode_phrases(encoded[k], rgb, phrases, batch_size, "np")
        # a repeated frame gets its own result object: the caller writes its track ids into it
        return [done[k] if first[k] == i else replace(done[k], extras=dict(done[k].extras)) for i, k in enumerate(keys)]

    for frame in frames:
        batch.append(load_image(frame, len(phrases)))
        if len(batch) == max(1, image_batch_size):
            yield from flush()
            batch = []
    if batch:
        yield from flush()


def track(seg, frames: Iterable, phrases: list[str], image_batch_size: int = 8, lost_frames: int = LOST_FRAMES,
          min_score: float = MIN_SCORE) -> Iterator:
    """:meth:`Segmenter.track`: per frame a Segmentation whose ``extras["track_ids"]`` holds, per
    phrase, the track id of each of its instances (int64 [K], -1 = untracked low-score instance)."""
    from sspsam.predict.results import clean_phrases

    phrases = clean_phrases(phrases)
    if isinstance(frames, (str, os.PathLike)):
        from sspsam.io.video import iter_frames, probe_video

        info = probe_video(frames)
        frames = (rgb for _, rgb in iter_frames(info.path, 0, info.frames))
    tracker = PhraseTracker(len(phrases), lost_frames, min_score)
    for res in segment_frames(seg, frames, phrases, image_batch_size):
        res.extras["track_ids"] = [tracker.update(p, inst.boxes, inst.scores) for p, inst in enumerate(res.instances)]
        yield res


# ---- the resumable job --------------------------------------------------------------------------------


def frame_record(index: int, time_s: float, res) -> dict:
    """One tracks.jsonl line (a dict) for a tracked Segmentation."""
    h, w = res.masks.shape[1:]
    instances = []
    for p, (phrase, inst, ids) in enumerate(zip(res.phrases, res.instances, res.extras["track_ids"])):
        for m, b, s, t in zip(inst.masks, inst.boxes, inst.scores, ids):
            instances.append({"track_id": None if t < 0 else int(t), "phrase": phrase, "phrase_index": p,
                              "bbox": xyxy_to_coco(b), "bbox_xyxy": [float(v) for v in b], "score": float(s),
                              "area": int(m.sum()), "rle": encode_rle(m)})
    return {"frame": index, "time": round(time_s, 6), "image_size": [int(h), int(w)], "instances": instances,
            "warnings": list(res.warnings)}


def replay(tracker: PhraseTracker, record: dict, n_phrases: int) -> None:
    """Feed one finished frame's instances to the tracker again, as the run that wrote it did."""
    per = [[] for _ in range(n_phrases)]
    for inst in record["instances"]:
        per[inst["phrase_index"]].append(inst)
    for p, items in enumerate(per):
        ids = tracker.update(p, np.array([i["bbox_xyxy"] for i in items], np.float32).reshape(-1, 4),
                             np.array([i["score"] for i in items], np.float32))
        if [None if t < 0 else int(t) for t in ids] != [i["track_id"] for i in items]:
            raise TrackError(f"frame {record['frame']} of {TRACKS} does not replay to its track ids: it was written "
                             "by another version of sspsam; use a new output folder to start over")


@dataclass
class TrackSummary:
    frames: int
    skipped: int  # finished by an earlier run
    tracks: int  # distinct track ids in the whole video
    warnings: list[str] = field(default_factory=list)
    results: Path | None = None
    video: Path | None = None


def _digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _done_records(results: Path, frames: int) -> list[dict]:
    """The finished lines; a torn last line is cut off, anything else out of place refused."""
    if not results.exists():
        return []
    data = results.read_bytes()
    keep = data.rfind(b"\n") + 1
    if keep < len(data):  # killed mid-write
        os.truncate(results, keep)
    records = []
    for n, line in enumerate(data[:keep].splitlines(), 1):
        try:
            rec = json.loads(line)
            ok = rec["frame"] == n - 1
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            ok = False
        if not ok or n > frames:
            raise TrackError(f"{results}:{n} is not the next frame's line; move the folder away to start over")
        records.append(rec)
    return records


def run_track(video: Path, output: Path, phrases: list[str], load: Callable, model: str = "shapes-demo",
              max_frames: int | None = None, image_batch_size: int = 8, lost_frames: int = LOST_FRAMES,
              min_score: float = MIN_SCORE,
              progress: Callable[[int, int], Callable[[int], None]] | None = None) -> TrackSummary:
    """Run (or resume) a tracking job. ``load()`` returns the Segmenter, called only when frames
    are left to do (the CLI applies its speed options there; a finished job loads no model);
    ``model`` is its name as recorded in job.json. ``progress(total, already_done)`` returns an
    ``advance(n)`` callback."""
    from sspsam.io.checkpoint import atomic_write
    from sspsam.io.video import probe_video
    from sspsam.predict.results import clean_phrases

    phrases = clean_phrases(phrases)
    if image_batch_size < 1 or lost_frames < 0 or not 0 < min_score <= 1:
        raise TrackError("--image-batch-size must be >= 1, --lost-frames >= 0 and --min-score in (0, 1]")
    if output.exists() and not output.is_dir():
        raise TrackError(f"the output {output} is a file; give a folder ({TRACKS} and {VIDEO} go inside it)")
    info = probe_video(video, max_frames)  # the whole video is checked before anything is written
    job = {"video": str(video), "digest": _digest(Path(video)), "frames": info.frames, "size": [info.height, info.width],
           "fps": str(info.fps), "phrases": phrases, "model": model, "image_batch_size": image_batch_size,
           "lost_frames": lost_frames, "min_score": min_score}
    results, job_file, video_out = output / TRACKS, output / JOB, output / VIDEO
    if job_file.exists():
        try:
            old = json.loads(job_file.read_text())
        except (OSError, ValueError):
            old = None
        if old != job:
            raise TrackError(f"{output} holds a tracking job for another video, phrases or options; "
                             "use a new output folder or delete it to start over")
    elif results.exists():
        raise TrackError(f"{results} exists without its {JOB}; move it away to start over")
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TrackError(f"cannot create the output folder {output}: {exc.strerror or exc}") from None
    for stale in output.glob(f".{VIDEO}.*.tmp"):  # a render killed before its rename
        stale.unlink(missing_ok=True)
    if not job_file.exists():
        atomic_write(job_file, lambda p: Path(p).write_text(json.dumps(job, indent=1)))
    records = _done_records(results, info.frames)
    done = len(records)
    advance = progress(info.frames, done) if progress else (lambda n: None)
    if done < info.frames:
        _track_rest(video, results, info, phrases, records, image_batch_size, lost_frames, min_score, load, advance)
    if not video_out.exists():
        render_video(video, results, video_out, info.fps, info.frames)
    return _summary(results, info.frames, done, video_out)


def _track_rest(video, results: Path, info, phrases, records, image_batch_size, lost_frames, min_score, load,
                advance) -> None:
    from sspsam.io.video import iter_frames

    tracker = PhraseTracker(len(phrases), lost_frames, min_score)
    for rec in records:
        replay(tracker, rec, len(phrases))
    done = len(records)
    seg = load()
    start = done // image_batch_size * image_batch_size  # the batch the first missing frame belongs to
    frames = (rgb for _, rgb in iter_frames(video, start, info.frames - start))
    with open(results, "ab", buffering=0) as fh:
        for i, res in enumerate(segment_frames(seg, frames, phrases, image_batch_size), start):
            if i < done:
                continue  # computed again only to keep the batch as it was
            res.extras["track_ids"] = [tracker.update(p, inst.boxes, inst.scores) for p, inst in enumerate(res.instances)]
            line = (json.dumps(frame_record(i, float(i / info.fps), res), ensure_ascii=False) + "\n").encode()
            at = os.fstat(fh.fileno()).st_size
            try:
                view = memoryview(line)
                while view:
                    view = view[fh.write(view):]
                os.fsync(fh.fileno())
            except OSError as exc:  # a full disk: cut the torn line so the file stays a valid prefix
                try:
                    os.truncate(results, at)
                except OSError:
                    pass
                raise TrackError(f"cannot write {results}: {exc.strerror or exc}; the frames so far are kept, "
                                 "rerun the same command to finish") from None
            advance(1)


def track_colour(track_id: int | None) -> tuple[int, int, int]:
    """A track keeps its colour in every frame; untracked instances are grey."""
    return (160, 160, 160) if track_id is None else palette(track_id + 1)[track_id]


def annotate(rgb: np.ndarray, record: dict):
    """One frame of the annotated video: each instance's mask, box and "id phrase" in its track's
    colour, and the warnings banner."""
    from sspsam.io.masks import overlay, warning_banner

    insts = record["instances"]
    masks = [decode_rle(i["rle"]) for i in insts]
    labels = [(f"{i['track_id']} " if i["track_id"] is not None else "") + i["phrase"] for i in insts]
    img = overlay(rgb, masks, labels, colours=[track_colour(i["track_id"]) for i in insts])
    return warning_banner(img, record.get("warnings", []))


def render_video(video: Path, results: Path, out: Path, fps: Fraction, frames: int) -> Path:
    """Draw tracks.jsonl over the input frames into ``out`` (written whole, then moved into place)."""
    from sspsam.io.checkpoint import atomic_write
    from sspsam.io.video import iter_frames, write_video

    def frames_drawn():
        with open(results, encoding="utf-8") as fh:
            for (i, rgb), line in zip(iter_frames(video, 0, frames), fh):
                yield np.asarray(annotate(rgb, json.loads(line)))

    return atomic_write(out, lambda p: write_video(p, frames_drawn(), fps))


def _summary(results: Path, frames: int, skipped: int, video_out: Path) -> TrackSummary:
    ids, warnings = set(), []
    with open(results, encoding="utf-8") as fh:
        for line in fh:
            rec = json.loads(line)
            ids.update(i["track_id"] for i in rec["instances"] if i["track_id"] is not None)
            warnings += [w for w in rec.get("warnings", []) if w not in warnings]
    return TrackSummary(frames, skipped, len(ids), warnings, results, video_out)
