"""Checks of dataset files at the edge: a malformed annotation is named (file, field, what was
expected) when the reader is built, before a model loads or a run folder is written, instead of
surfacing as a KeyError or a silent empty mask hours into a run.

Only the records a split uses are checked, so opening a split costs what reading it costs anyway.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from sspsam.data import DatasetLayoutError


class SplitError(DatasetLayoutError, ValueError):
    """The split asked for is not in the data. A ValueError too: callers written before it was a
    named error caught ValueError."""


def _shown(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, list):
        return f"a list of {len(value)}"
    if isinstance(value, dict):
        return "an object"
    return f"{type(value).__name__} {repr(value)[:40]}"


def read_json(path: Path, what: str = "annotation file") -> Any:
    """The parsed JSON of ``path``, or a DatasetLayoutError naming the file and the byte or line at fault
    (a binary file, another encoding, a cut file, nesting too deep to parse)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DatasetLayoutError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        kind = "a binary file" if b"\x00" in raw[:4096] else "not UTF-8 text"
        raise DatasetLayoutError(f"{what} {path} is {kind} (byte {exc.start}: {raw[exc.start:exc.start + 1]!r}); "
                                 "expected UTF-8 JSON") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetLayoutError(f"{path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    except RecursionError:
        raise DatasetLayoutError(f"{path} is nested too deeply to be an annotation file") from None


def require_list(data: Any, key: str, path: Path, expected: str) -> list:
    """``data[key]`` as a list of mappings, or an error naming the field and what it should hold."""
    if not isinstance(data, dict):
        raise DatasetLayoutError(f"{path}: expected a JSON object with '{key}', found {_shown(data)}")
    if key not in data:
        raise DatasetLayoutError(f"{path}: no '{key}' field; expected {expected}")
    value = data[key]
    if not isinstance(value, list):
        raise DatasetLayoutError(f"{path}: '{key}' is {_shown(value)}; expected {expected}")
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise DatasetLayoutError(f"{path}: {key}[{i}] is {_shown(item)}; expected {expected}")
    return value


def positive_int(record: dict, field: str, where: str) -> int:
    value = record.get(field)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or int(value) != value or value < 1:
        raise DatasetLayoutError(f"{where}: '{field}' is {_shown(value)}; expected a positive whole number")
    return int(value)


def check_image_record(img: dict, path: Path) -> None:
    where = f"{path}: image {img.get('id')!r}"
    if not isinstance(img.get("file_name"), str) or not img["file_name"].strip():
        raise DatasetLayoutError(f"{where}: 'file_name' is {_shown(img.get('file_name'))}; expected the image's file name")
    positive_int(img, "height", where)
    positive_int(img, "width", where)


def _finite_numbers(values: Any) -> bool:
    return isinstance(values, list) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)


def check_coco_segmentation(ann: dict, path: Path) -> Any:
    """An annotation's ``segmentation``: polygons of x, y pairs or an RLE. Polygons with fewer than
    three points are tolerated next to a usable one (COCO ships a few; they are dropped when
    rasterised, as detectron2 does); an annotation with no usable polygon is refused, since its
    target would be empty."""
    where = f"{path}: annotation {ann.get('id')!r}"
    if "segmentation" not in ann:
        raise DatasetLayoutError(f"{where} has no 'segmentation'; expected polygons [[x1, y1, x2, y2, x3, y3, ...]] or an RLE")
    seg = ann["segmentation"]
    if isinstance(seg, list):
        if not seg:
            raise DatasetLayoutError(f"{where}: 'segmentation' is an empty list; expected at least one polygon of 3 points")
        for k, poly in enumerate(seg):
            if not _finite_numbers(poly):
                raise DatasetLayoutError(f"{where}: segmentation[{k}] is {_shown(poly)}; expected a flat list of finite x, y numbers")
            if len(poly) % 2:
                raise DatasetLayoutError(f"{where}: segmentation[{k}] has {len(poly)} numbers; expected x, y pairs (an even count)")
        if not any(len(p) >= 6 for p in seg):
            n = max(len(p) for p in seg)
            raise DatasetLayoutError(f"{where}: its polygons have at most {n} coordinates; "
                                     "expected at least 6 (3 points) to enclose an area")
        return seg
    if isinstance(seg, dict):
        size, counts = seg.get("size"), seg.get("counts")
        if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)):
            raise DatasetLayoutError(f"{where}: RLE 'size' is {_shown(size)}; expected [height, width]")
        if not (isinstance(counts, str) or (isinstance(counts, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in counts))):
            raise DatasetLayoutError(f"{where}: RLE 'counts' is {_shown(counts)}; expected a string or a list of run lengths")
        return seg
    raise DatasetLayoutError(f"{where}: 'segmentation' is {_shown(seg)}; expected polygons or an RLE")


def sentence_text(sent: Any, text_field: str, where: str) -> str:
    """The text of one sentence record. An empty string is kept (the released RefCOCO files hold a
    few; evaluation answers them "nothing"); a sentence with no text field at all, or text that is
    not a string, is a broken file."""
    if not isinstance(sent, dict):
        raise DatasetLayoutError(f"{where}: a sentence is {_shown(sent)}; expected {{\"sent_id\": ..., \"sent\": \"text\"}}")
    for key in (text_field, "sent", "raw"):
        value = sent.get(key)
        if isinstance(value, str) and value.strip():
            return value
    for key in (text_field, "sent", "raw"):
        if key in sent and not isinstance(sent[key], str):
            raise DatasetLayoutError(f"{where}: sentence {sent.get('sent_id')!r} '{key}' is {_shown(sent[key])}; expected text")
    if not any(key in sent for key in (text_field, "sent", "raw")):
        raise DatasetLayoutError(f"{where}: sentence {sent.get('sent_id')!r} has no text ('{text_field}', 'sent' or 'raw')")
    return ""


def split_error(split: str | None, available: list[str], known: tuple[str, ...], where: str) -> SplitError:
    """The error for a split the data lacks: the nearest known name (a typo) and the splits present."""
    import difflib

    near = difflib.get_close_matches(str(split), list(dict.fromkeys([*available, *known])), n=1, cutoff=0.5)
    hint = f" (did you mean '{near[0]}'?)" if near and near[0] != split else ""
    return SplitError(f"no split {split!r} in {where}{hint}; splits present: {', '.join(available) or 'none'}")
