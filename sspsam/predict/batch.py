"""Batch segmentation: a folder of images or a JSONL manifest in, ``OUT/results.jsonl`` out.

``results.jsonl`` holds one line per (image, phrase) item, in input order::

    {"id", "image", "phrase", "image_size", "score", "no_target", "area", "rle", "warnings"[, "mask_png"]}
    {"id", "image", "phrase", "error"}            (an image that cannot be read; the run goes on)

``warnings`` are the result's own (an image unlike the model's training data, a phrase outside its
vocabulary, random weights), so a line read alone still says when its answer is not to be
trusted. ``OUT/job.json`` records the model (name and the sha256 of its checkpoint): a rerun with
another model is refused, since its lines would sit beside the first model's as one job's.

The ``id`` is a hash of (image, phrase), with ``-2``, ``-3``… for repeats, so it is the same on
every run of the same input. The job is resumable: all items of one image are appended together
and flushed + fsynced, so a killed run loses at most the image in flight; a rerun drops a torn
last line, checks that the file is the start of this job's output, skips the finished items and
appends the rest in order. The final file is therefore byte-identical to an uninterrupted run's.
With ``use_ray`` the images go through Ray Data (one model per actor) and come back out of order;
they are written in input order through a reorder buffer, so the file is again the same.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from sspsam.io.checkpoint import atomic_write
from sspsam.errors import ImageLoadError, SSPSamError, TextError
from sspsam.io.images import load_image
from sspsam.io.masks import encode_rle
from sspsam.predict.results import clean_phrases

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"}
RESULTS = "results.jsonl"
JOB = "job.json"


class BatchError(SSPSamError):
    """The input or the output folder of a batch job is unusable."""


@dataclass(frozen=True)
class Item:
    id: str
    phrase: str


@dataclass(frozen=True)
class Unit:
    """One image and the items asked of it: the model's unit of work and the unit of each fsync."""

    index: int
    image: str  # as written in results.jsonl (relative to the input folder / as in the manifest)
    path: str  # where to read it
    items: tuple[Item, ...]


# ---- input --------------------------------------------------------------------------------------


def read_text_file(path: Path, what: str) -> str:
    """A UTF-8 text file, or a BatchError naming the file and the first byte that is not UTF-8
    text (a binary file, a UTF-16 or Latin-1 export), instead of a UnicodeDecodeError."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise BatchError(f"cannot read the {what} {path}: {exc.strerror or exc}") from None
    if b"\x00" in raw:
        hint = " (UTF-16? save it as UTF-8)" if raw[:2] in (b"\xff\xfe", b"\xfe\xff") or raw[1:2] == b"\x00" else ""
        raise BatchError(f"the {what} {path} is not text: it holds NUL bytes{hint}; expected UTF-8 text")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise BatchError(f"the {what} {path} is not UTF-8 (byte {exc.start}: {raw[exc.start:exc.start + 1]!r}); "
                         "save it as UTF-8") from None


def read_phrases(path: Path) -> list[str]:
    """One phrase per line; blank lines are skipped."""
    lines = read_text_file(path, "phrases file").splitlines()
    phrases = [line for line in lines if line.strip()]
    if not phrases:
        raise BatchError(f"{path} holds no phrases (one per line)")
    return clean_phrases(phrases)


def _item_ids(pairs: list[tuple[str, str]]) -> list[str]:
    seen: Counter = Counter()
    ids = []
    for image, phrase in pairs:
        base = hashlib.blake2b(f"{image}\n{phrase}".encode(), digest_size=8).hexdigest()
        seen[base] += 1
        ids.append(base if seen[base] == 1 else f"{base}-{seen[base]}")
    return ids


def _units(entries: list[tuple[str, str, list[str]]]) -> list[Unit]:
    """(image key, path, phrases) per entry -> units with stable item ids."""
    ids = iter(_item_ids([(image, p) for image, _, phrases in entries for p in phrases]))
    return [Unit(i, image, path, tuple(Item(next(ids), p) for p in phrases)) for i, (image, path, phrases) in enumerate(entries)]


def collect_units(input: Path, phrases_file: Path | None = None, exclude: Path | None = None) -> list[Unit]:
    """A folder (every image in it, sorted, times the phrases file) or a JSONL manifest."""
    phrases = read_phrases(phrases_file) if phrases_file is not None else None
    if input.is_dir():
        if phrases is None:
            raise BatchError("a folder of images needs --phrases FILE (one phrase per line, asked of every image)")
        skip = exclude.resolve() if exclude is not None else None
        images = sorted(
            p.relative_to(input).as_posix()
            for p in input.rglob("*")
            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
            and not any(part.startswith(".") for part in p.relative_to(input).parts)
            and (skip is None or skip not in p.resolve().parents)
        )
        if not images:
            raise BatchError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {input}")
        return _units([(rel, str(input / rel), phrases) for rel in images])
    if input.is_file():
        return _units(_read_manifest(input, phrases))
    raise BatchError(f"input not found: {input}")


def _read_manifest(path: Path, default_phrases: list[str] | None) -> list[tuple[str, str, list[str]]]:
    entries = []
    for n, line in enumerate(read_text_file(path, "manifest").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BatchError(f"{where}: not a JSON line ({exc.msg})") from None
        except RecursionError:
            raise BatchError(f"{where}: nested too deeply to be a manifest line") from None
        if not isinstance(row, dict) or not isinstance(row.get("image"), str):
            raise BatchError(f'{where}: expected {{"image": "path", "phrase": "..."}} or "phrases": [...]')
        raw = row.get("phrases", row.get("phrase", default_phrases))
        if raw is None:
            raise BatchError(f"{where}: no 'phrase' or 'phrases' (and no --phrases file)")
        try:
            phrases = clean_phrases(raw)
        except TextError as exc:
            raise BatchError(f"{where}: {exc}") from None
        image = row["image"]
        full = Path(image) if Path(image).is_absolute() else path.parent / image
        entries.append((image, str(full), phrases))
    if not entries:
        raise BatchError(f"the manifest {path} is empty")
    return entries


# ---- one unit -----------------------------------------------------------------------------------


def segment_unit(seg, unit: Unit, out_dir: Path, png: bool) -> list[str]:
    """The results.jsonl lines of one image. Local and Ray runs both come through here, so they agree."""
    try:
        rgb = load_image(unit.path, len(unit.items))  # the pixel × phrases budget, checked from the header
    except ImageLoadError as exc:
        return [_line({"id": it.id, "image": unit.image, "phrase": it.phrase, "error": str(exc)}) for it in unit.items]
    res = seg.segment(rgb, [it.phrase for it in unit.items])
    lines = []
    for i, (it, mask, score, no_target) in enumerate(zip(unit.items, res.masks, res.scores, res.no_target)):
        rec = {"id": it.id, "image": unit.image, "phrase": it.phrase, "image_size": list(mask.shape),
               "score": round(float(score), 6), "no_target": bool(no_target), "area": int(mask.sum()), "rle": encode_rle(mask),
               "warnings": [*res.image_warnings, *res.phrase_warnings[i]]}
        if png:
            rel = f"masks/{it.id}.png"
            img = Image.fromarray(mask.astype(np.uint8) * 255)
            atomic_write(out_dir / rel, lambda p, im=img: im.save(p, format="PNG"))
            rec["mask_png"] = rel
        lines.append(_line(rec))
    return lines


def _line(rec: dict) -> str:
    return json.dumps(rec, ensure_ascii=False) + "\n"


def unit_to_json(unit: Unit) -> str:
    return json.dumps(asdict(unit))


def unit_from_json(text: str) -> Unit:
    d = json.loads(text)
    return Unit(d["index"], d["image"], d["path"], tuple(Item(**it) for it in d["items"]))


# ---- resuming ---------------------------------------------------------------------------------


def model_identity(model: str) -> dict:
    """The model a job runs, as recorded in job.json: its name and the sha256 of its checkpoint
    (of the manifest for an ONNX export; none for zeroshot, whose weights are the cache's)."""
    from sspsam.predict.segmenter import Segmenter

    kind, path, name = Segmenter.resolve(model)
    target = path / "sspsam-onnx.json" if kind == "onnx" and path is not None else path
    digest = None
    if target is not None and Path(target).is_file():
        h = hashlib.sha256()
        with open(target, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        digest = h.hexdigest()
    return {"model": name, "kind": kind, "checkpoint_sha256": digest}


def check_job(output: Path, identity: dict, has_results: bool) -> None:
    """Refuse to resume a job another model started; record this job's model when it starts."""
    job = output / JOB
    if job.exists():
        try:
            old = json.loads(job.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise BatchError(f"{job} is unreadable ({exc}); move it away to start over") from None
        if (old.get("model"), old.get("checkpoint_sha256")) != (identity["model"], identity["checkpoint_sha256"]):
            was = f"'{old.get('model')}'" + (f" (sha256 {str(old.get('checkpoint_sha256'))[:12]}…)" if old.get("checkpoint_sha256") else "")
            raise BatchError(f"{output} holds results of model {was}, not '{identity['model']}'"
                             + (f" (sha256 {identity['checkpoint_sha256'][:12]}…)" if identity["checkpoint_sha256"] else "")
                             + "; use a new output folder, or rerun with the first model to finish its job")
        return
    # results without a job.json come from a version that did not record the model: adopted as they are
    atomic_write(job, lambda p: Path(p).write_text(json.dumps(identity, indent=1)))


def finished_ids(results: Path, units: list[Unit]) -> set[str]:
    """Ids already in results.jsonl. A torn last line is cut off; a file that is not the start of
    this job's output is refused rather than appended to."""
    if not results.exists():
        return set()
    data = results.read_bytes()
    keep = data.rfind(b"\n") + 1
    if keep < len(data):  # the run was killed mid-write
        os.truncate(results, keep)
    done = []
    for n, line in enumerate(data[:keep].splitlines(), 1):
        try:
            done.append(json.loads(line)["id"])
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            raise BatchError(f"{results}:{n} is not a results line; move the file away to start over") from None
    expected = [it.id for u in units for it in u.items][: len(done)]
    if done != expected:
        raise BatchError(f"{results} was written for another input (or another order); "
                         "use a new output folder or delete the file to start over")
    return set(done)


# ---- running ----------------------------------------------------------------------------------


class _InOrderWriter:
    """Appends each unit's new lines in input order, fsyncing per unit, whatever order they finish in."""

    def __init__(self, path: Path, pending: list[Unit], done: set[str], advance: Callable[[int], None]):
        self.fh = open(path, "ab", buffering=0)  # unbuffered: nothing is left in a buffer to land later
        self.order = [u.index for u in pending]
        self.units = {u.index: u for u in pending}
        self.done, self.advance = done, advance
        self.buffer: dict[int, list[str]] = {}
        self.next = 0
        self.errors = 0
        self.warnings: Counter = Counter()  # distinct warning -> items that carry it

    def put(self, index: int, lines: list[str]) -> None:
        self.buffer[index] = lines
        while self.next < len(self.order) and self.order[self.next] in self.buffer:
            idx = self.order[self.next]
            unit, lines = self.units[idx], self.buffer.pop(idx)
            new = [line for it, line in zip(unit.items, lines) if it.id not in self.done]
            start = os.fstat(self.fh.fileno()).st_size
            try:
                data = memoryview("".join(new).encode("utf-8"))
                while data:
                    data = data[self.fh.write(data):]
                os.fsync(self.fh.fileno())
            except OSError as exc:  # a full disk: cut the torn unit off so the file stays a valid prefix
                try:
                    os.truncate(self.fh.name, start)
                except OSError:
                    pass  # a rerun drops a torn last line anyway
                raise BatchError(f"cannot write {self.fh.name}: {exc.strerror or exc}; the results so far are kept, "
                                 "rerun the same command to finish") from None
            self.errors += sum(', "error": ' in line for line in new)  # quotes inside values are escaped
            for line in new:
                if '"warnings": [' in line and '"warnings": []' not in line:
                    self.warnings.update(json.loads(line).get("warnings", []))
            self.advance(len(new))
            self.next += 1

    def close(self) -> None:
        try:
            self.fh.close()
        except OSError:  # buffered bytes that a full disk refused; put() already reported it
            pass


def load_segmenter(model: str, device: str, dtype: str = "auto", quantize: str = "none"):
    """The job's Segmenter (in the local process or a Ray actor alike), int8 where asked."""
    from sspsam.predict.precision import quantize_predictor
    from sspsam.predict.segmenter import Segmenter

    seg = Segmenter.from_pretrained(model, device=device, dtype=dtype)
    quantize_predictor(seg, quantize)
    return seg


class SegmentCallable:
    """Ray Data's model holder: one Segmenter per actor, reused for every batch of units it gets."""

    def __init__(self, model: str, device: str, out_dir: str, png: bool, threads: int, dtype: str = "auto",
                 quantize: str = "none"):
        import torch

        torch.set_num_threads(threads)  # as many as the local run, so the numbers match it
        self.seg = load_segmenter(model, device, dtype, quantize)
        self.out_dir, self.png = Path(out_dir), png

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        units = [unit_from_json(u) for u in batch["unit"]]
        lines = [json.dumps(segment_unit(self.seg, u, self.out_dir, self.png)) for u in units]
        return {"index": np.asarray([u.index for u in units]), "lines": np.asarray(lines, dtype=object)}


@dataclass
class Summary:
    items: int
    skipped: int  # finished by an earlier run
    written: int
    errors: int  # items written this run whose image could not be read
    results: Path
    warnings: Counter | None = None  # distinct warnings of this run's items -> how many items carry each
    model: dict | None = None  # name and checkpoint sha256 (job.json)


def run_batch(
    input: Path,
    output: Path,
    phrases: Path | None = None,
    model: str = "shapes-demo",
    device: str = "cpu",
    png: bool = False,
    use_ray: bool = False,
    batch_size: int = 8,
    concurrency: int = 1,
    progress: Callable[[int, int], Callable[[int], None]] | None = None,
    dtype: str = "auto",
    quantize: str = "none",
) -> Summary:
    """Run (or resume) a job. ``progress(total, already_done)`` returns an ``advance(n)`` callback.
    ``dtype`` as for :class:`~sspsam.predict.segmenter.Segmenter`; ``quantize``: 'int8' for
    dynamic int8 Linear layers on a CPU (:func:`sspsam.backbones.runtime.quantize`)."""
    if use_ray:
        import importlib.util

        if importlib.util.find_spec("ray") is None:  # before anything is written
            raise SSPSamError("--ray needs the batch extra (ray is not installed): pip install 'sspsam[batch]'")
    if output.exists() and not output.is_dir():
        raise BatchError(f"the output {output} is a file; give a folder (results.jsonl goes inside it)")
    # inputs and model first: a refused job writes nothing, not even an empty results.jsonl
    units = collect_units(input, phrases, exclude=output)
    results = output / RESULTS
    identity = model_identity(model)
    check_job(output, identity, results.exists() and results.stat().st_size > 0)
    done = finished_ids(results, units)
    pending = [u for u in units if any(it.id not in done for it in u.items)]
    total = sum(len(u.items) for u in units)
    seg = None
    if pending and not use_ray:
        seg = load_segmenter(model, device, dtype, quantize)
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BatchError(f"cannot create the output folder {output}: {exc.strerror or exc}") from None
    advance = progress(total, len(done)) if progress else (lambda n: None)
    writer = _InOrderWriter(results, pending, done, advance)
    try:
        if pending and use_ray:
            _run_ray(pending, writer, model, device, output, png, batch_size, concurrency, dtype, quantize)
        elif pending:
            for unit in pending:
                writer.put(unit.index, segment_unit(seg, unit, output, png))
    finally:
        writer.close()
    return Summary(total, len(done), total - len(done), writer.errors, results, writer.warnings, identity)


def _run_ray(pending: list[Unit], writer: _InOrderWriter, model: str, device: str, output: Path, png: bool,
             batch_size: int, concurrency: int, dtype: str = "auto", quantize: str = "none") -> None:
    import ray
    import torch

    started = not ray.is_initialized()
    if started:  # a session the caller opened (or RAY_ADDRESS's cluster) is used as it is
        ray.init(include_dashboard=False, log_to_driver=False,
                 **({} if os.environ.get("RAY_ADDRESS") else {"num_cpus": os.cpu_count() or 1}))
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False  # ours is the one to watch
        ds = ray.data.from_items([{"index": u.index, "unit": unit_to_json(u)} for u in pending])
        ds = ds.map_batches(
            SegmentCallable,
            fn_constructor_kwargs={"model": model, "device": device, "out_dir": str(output.resolve()), "png": png,
                                   "threads": torch.get_num_threads(), "dtype": dtype,
                                   "quantize": quantize},
            concurrency=concurrency,
            batch_size=batch_size,
            batch_format="numpy",
        )
        for row in ds.iter_rows():
            writer.put(int(row["index"]), json.loads(row["lines"]))
    finally:
        if started:
            ray.shutdown()
