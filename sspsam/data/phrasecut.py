"""VGPhraseCut in the layout of ChenyunWu/PhraseCutDataset (``data/VGPhraseCut_v0``)::

    VGPhraseCut_v0/
      image_data_split.json       [{image_id, width, height, split, coco_id, flickr_id, url}, ...]
      refer_train.json  refer_val.json  refer_test.json  refer_miniv.json
      refer_input_<split>.json    (inputs only, optional)
      images/<image_id>.jpg

Each ``refer_<split>.json`` is a list of tasks (phrase–region pairs)::

    {task_id, image_id, ann_ids, instance_boxes (xywh), Polygons, phrase, phrase_structure}

``Polygons`` holds, per instance, a list of polygons, each a list of [x, y] points. The
ground truth is PhraseCut's own ``polygons_to_mask`` of all polygons of all instances
(int-truncated vertices, PIL fill + outline) — not COCO's rasteriser. Splits may be joined with
'_' as the reference loader allows (``val_miniv``: the README notes ``val`` excludes miniv).
"""

from __future__ import annotations

import json
from pathlib import Path

from sspsam.data import DatasetLayoutError
from sspsam.data.base import Record, ReferringDataset, Tokenizer
from sspsam.data.validate import SplitError, positive_int, read_json, split_error

SPLITS = ("train", "val", "test", "miniv")
LAYOUT_HINT = (
    "expected the VGPhraseCut layout: ROOT/image_data_split.json, ROOT/refer_<split>.json and "
    "ROOT/images/<image_id>.jpg (ROOT = PhraseCutDataset/data/VGPhraseCut_v0)"
)
IMAGE_EXTS = (".jpg", ".png", ".jpeg")


INFO_NAMES = ("image_data_split.json", "image_data_split3000.json")  # file_paths.py / README name


def resolve_root(root: Path) -> Path:
    """Accept the VGPhraseCut_v0 folder itself, or a folder above it."""
    for cand in (root, root / "VGPhraseCut_v0", root / "data" / "VGPhraseCut_v0"):
        if any((cand / n).is_file() for n in INFO_NAMES):
            return cand
    if not root.is_dir():
        raise DatasetLayoutError(f"dataset root {root} does not exist — {LAYOUT_HINT}")
    held = ", ".join(sorted(p.name for p in root.iterdir())[:12]) or "nothing"
    raise DatasetLayoutError(
        f"missing image_data_split.json: expected {root / 'image_data_split.json'} "
        f"(that folder holds: {held}) — {LAYOUT_HINT}"
    )


def _check_polygons(polygons, where: str) -> None:
    """Polygons per instance, each a list of [x, y] points of finite numbers. Short polygons stay:
    PhraseCut's own rasteriser draws their outline, and its metric counts those pixels."""
    import math

    expected = "a list per instance of polygons [[x, y], [x, y], [x, y], ...]"
    if not isinstance(polygons, list) or not all(isinstance(inst, list) for inst in polygons):
        raise DatasetLayoutError(f"{where}: 'Polygons' is {type(polygons).__name__}; expected {expected}")
    for inst in polygons:
        for poly in inst:
            ok = isinstance(poly, list) and all(
                isinstance(pt, list) and len(pt) == 2
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in pt)
                for pt in poly)
            if not ok:
                raise DatasetLayoutError(f"{where}: a polygon is not a list of [x, y] points of finite numbers; expected {expected}")


def _image_path(image_dir: Path, image_id: int) -> Path:
    for ext in IMAGE_EXTS:
        p = image_dir / f"{image_id}{ext}"
        if p.is_file():
            return p
    return image_dir / f"{image_id}.jpg"


class PhraseCutDataset(ReferringDataset):
    """One sample per PhraseCut task (phrase → union of its instances' polygons).

    ``sent_id`` and ``ref_id`` are the task_id strings; ``no_target`` is True only for a task
    without polygons (the released data has none).
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "val",
        image_size: int = 1024,
        tokenizer: Tokenizer | None = None,
        **kwargs,
    ) -> None:
        super().__init__(image_size, tokenizer, **kwargs)
        root = resolve_root(Path(root))
        self.root, self.split = root, split
        splits = str(split).split("_")
        for s in splits:
            if s not in SPLITS:
                err = split_error(s, list(SPLITS), SPLITS, f"PhraseCut (one of {', '.join(SPLITS)}, joined with '_')")
                raise SplitError(str(err).replace("; splits present: " + ", ".join(SPLITS), ""))
        info_path = next(root / n for n in INFO_NAMES if (root / n).is_file())
        infos = read_json(info_path, "PhraseCut image list")
        if not isinstance(infos, list) or not all(isinstance(im, dict) for im in infos):
            raise DatasetLayoutError(f"{info_path}: expected a list of {{image_id, width, height, split}}")
        img_info = {}
        for im in infos:
            iid = positive_int(im, "image_id", f"{info_path}: an image")
            positive_int(im, "height", f"{info_path}: image {iid}")
            positive_int(im, "width", f"{info_path}: image {iid}")
            img_info[iid] = im
        self.image_dir = root / "images"
        if not self.image_dir.is_dir():
            raise DatasetLayoutError(f"missing images folder: expected {self.image_dir} — {LAYOUT_HINT}")

        for s in splits:
            path = root / f"refer_{s}.json"
            if not path.is_file():
                raise DatasetLayoutError(f"missing refer_{s}.json: expected {path} — {LAYOUT_HINT}")
            tasks = read_json(path, "PhraseCut task file")
            if not isinstance(tasks, list) or not all(isinstance(t, dict) for t in tasks):
                raise DatasetLayoutError(f"{path}: expected a list of tasks {{task_id, image_id, phrase, Polygons}}")
            for task in tasks:
                for key in ("task_id", "image_id", "phrase", "Polygons"):
                    if key not in task:
                        raise DatasetLayoutError(
                            f"{path}: task {task.get('task_id')} lacks '{key}'"
                            + (" (refer_input_*.json files hold no ground truth)" if key == "Polygons" else "")
                        )
                where = f"{path}: task {task['task_id']!r}"
                iid = positive_int(task, "image_id", where)
                if not isinstance(task["phrase"], str) or not task["phrase"].strip():
                    raise DatasetLayoutError(f"{where}: 'phrase' is {task['phrase']!r}; expected the phrase's text")
                _check_polygons(task["Polygons"], where)
                info = img_info.get(iid)
                if info is None:
                    raise DatasetLayoutError(f"{path}: task {task['task_id']} names image {iid}, absent from {info_path}")
                polygons = [poly for instance in task["Polygons"] for poly in instance]
                self.records.append(
                    Record(
                        image_path=_image_path(self.image_dir, iid),
                        height=int(info["height"]),
                        width=int(info["width"]),
                        text=str(task["phrase"]),
                        no_target=not any(len(p) >= 2 for p in polygons),
                        image_id=iid,
                        sent_id=str(task["task_id"]),
                        ref_id=str(task["task_id"]),
                        split=s,
                        segments=polygons,
                        kind="phrasecut",
                        extra={
                            "ann_ids": list(task.get("ann_ids", [])),
                            "instance_boxes": task.get("instance_boxes", []),
                            "phrase_structure": task.get("phrase_structure"),
                        },
                    )
                )
        if not self.records:
            raise SplitError(f"no tasks in split {split!r} under {root}")

    def __repr__(self) -> str:
        return f"PhraseCutDataset(split={self.split}: {len(self)} tasks)"
