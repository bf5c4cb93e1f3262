"""gRefCOCO (GRES, CVPR 2023) in the layout of ReLA (henghuiding/ReLA ``datasets/DATASET.md``)::

    ROOT/
      grefcoco/  grefs(unc).json  instances.json
      images/train2014/COCO_train2014_000000xxxxxx.jpg

``grefs(unc).json`` (ReLA's ``grefer.py`` also accepts a pickled ``grefs(unc).p``) is a list of
refs like refer's, except that ``ann_id`` and ``category_id`` are LISTS (several targets), a
no-target ref has ``ann_id == [-1]`` (and ``category_id == [-1]``) and a boolean ``no_target``.
Splits: train, val, testA, testB. Following ReLA's loader, crowd annotations are skipped and the
target mask is the union of the targets' masks; a no-target sample has an all-zero mask.
"""

from __future__ import annotations

import json
from pathlib import Path

from sspsam.data import DatasetLayoutError
from sspsam.data.base import ReferringDataset, Tokenizer, find_dir, sentence_records
from sspsam.data.refer import load_instances
from sspsam.data.validate import check_coco_segmentation, check_image_record, read_json, split_error

LAYOUT_HINT = (
    "expected the gRefCOCO layout: ROOT/{dataset}/grefs({split_by}).json, ROOT/{dataset}/instances.json "
    "and images in ROOT/images/train2014/ (see henghuiding/ReLA datasets/DATASET.md)"
)


def _as_list(x) -> list:
    return x if isinstance(x, list) else [x]


class GRefCOCODataset(ReferringDataset):
    """One sample per (ref, sentence) of a gRefCOCO split; multi-target and no-target included.

    Parameters as :class:`~sspsam.data.RefCOCODataset`; ``dataset`` is the folder name
    (``grefcoco``) and ``split`` one of train/val/testA/testB (or None for all).
    """

    def __init__(
        self,
        root: str | Path,
        split: str | None = "val",
        image_size: int = 1024,
        tokenizer: Tokenizer | None = None,
        *,
        split_by: str = "unc",
        dataset: str = "grefcoco",
        text_field: str = "sent",
        image_root: str | Path | None = None,
        **kwargs,
    ) -> None:
        super().__init__(image_size, tokenizer, **kwargs)
        if text_field not in ("sent", "raw"):
            raise ValueError(f"text_field must be 'sent' or 'raw', got {text_field!r}")
        root = Path(root)
        hint = LAYOUT_HINT.format(dataset=dataset, split_by=split_by)
        if not root.is_dir():
            raise DatasetLayoutError(f"dataset root {root} does not exist — {hint}")
        self.root, self.split, self.split_by = root, split, split_by
        data_dir = root / dataset
        json_path, pickle_path = data_dir / f"grefs({split_by}).json", data_dir / f"grefs({split_by}).p"
        if json_path.is_file():
            refs_path = json_path
            refs = read_json(json_path, "gRefCOCO refs file")
        elif pickle_path.is_file():
            refs_path = pickle_path
            from sspsam.data.safe_pickle import safe_load  # no code runs while reading: a downloaded pickle is untrusted

            refs = safe_load(pickle_path.read_bytes(), str(pickle_path))
        else:
            found = ""
            if data_dir.is_dir():
                found = f" (that folder holds: {', '.join(sorted(p.name for p in data_dir.iterdir())) or 'nothing'})"
            elif not data_dir.exists():
                found = f" (folder {data_dir} does not exist)"
            raise DatasetLayoutError(f"missing grefs({split_by}).json: expected {json_path}{found} — {hint}")
        inst_path = data_dir / "instances.json"
        if not inst_path.is_file():
            raise DatasetLayoutError(f"missing instances.json: expected {inst_path} — {hint}")
        if not isinstance(refs, list):
            raise DatasetLayoutError(f"{refs_path} should hold a list of refs, found {type(refs).__name__}")
        self.image_dir = (
            Path(image_root)
            if image_root is not None
            else find_dir(
                [
                    root / "images" / "train2014",
                    root / "images" / "mscoco" / "images" / "train2014",
                    root / "images" / "mscoco" / "train2014",
                    root / "train2014",
                ],
                "COCO train2014 image",
                hint,
            )
        )
        if not self.image_dir.is_dir():
            raise DatasetLayoutError(f"image folder {self.image_dir} does not exist")

        instances = load_instances(inst_path)
        imgs = {im["id"]: im for im in instances["images"]}
        anns = {a["id"]: a for a in instances["annotations"]}
        self.categories = {c["id"]: c["name"] for c in instances["categories"]}
        self.refs = refs

        for i, ref in enumerate(refs):
            if not isinstance(ref, dict):
                raise DatasetLayoutError(f"{refs_path}: ref [{i}] is a {type(ref).__name__}, not a mapping")
        available = sorted({str(r.get("split", "?")) for r in refs})
        if split not in (None, "all") and split not in available:
            raise split_error(split, available, ("train", "val", "testA", "testB"), refs_path)
        for ref in refs:
            for key in ("ref_id", "ann_id", "image_id", "split", "sentences"):
                if key not in ref:
                    raise DatasetLayoutError(f"{refs_path}: ref {ref.get('ref_id')} lacks '{key}'")
            if split not in (None, "all") and ref["split"] != split:
                continue
            img = imgs.get(ref["image_id"])
            if img is None:
                raise DatasetLayoutError(f"{refs_path}: ref {ref['ref_id']} names image {ref['image_id']}, absent from {inst_path}")
            check_image_record(img, inst_path)
            ann_ids = _as_list(ref["ann_id"])
            no_target = ann_ids == [-1]
            if "no_target" in ref and bool(ref["no_target"]) != no_target:
                raise DatasetLayoutError(
                    f"{refs_path}: ref {ref['ref_id']} has no_target={ref['no_target']} but ann_id={ann_ids}"
                )
            segs = []
            if not no_target:
                for aid in ann_ids:
                    ann = anns.get(aid)
                    if ann is None:
                        raise DatasetLayoutError(f"{refs_path}: ref {ref['ref_id']} names annotation {aid}, absent from {inst_path}")
                    if ann.get("iscrowd", 0):
                        continue  # as ReLA's loader
                    segs.append(check_coco_segmentation(ann, inst_path))
            self.records.extend(
                sentence_records(ref, img, self.image_dir, segs, no_target=no_target, ann_ids=[] if no_target else ann_ids,
                                 text_field=text_field, where=str(refs_path))
            )
        if not self.records:
            raise split_error(split, available, ("train", "val", "testA", "testB"), refs_path)

    def __repr__(self) -> str:
        n_nt = sum(r.no_target for r in self.records)
        return f"GRefCOCODataset(split={self.split}: {len(self)} sentences, {n_nt} no-target)"
