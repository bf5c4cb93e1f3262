"""RefCOCO / RefCOCO+ / RefCOCOg in the layout of lichengunc/refer (the files everyone ships)::

    ROOT/
      images/mscoco/images/train2014/COCO_train2014_000000xxxxxx.jpg
      refcoco/   instances.json  refs(unc).p  refs(google).p
      refcoco+/  instances.json  refs(unc).p
      refcocog/  instances.json  refs(umd).p  refs(google).p

``instances.json`` is COCO detection format (images, annotations with polygon
``segmentation``, ``bbox`` [x, y, w, h], ``area``, ``iscrowd``, ``category_id``; categories).
``refs(<split_by>).p`` is a pickled list of refs, each
``{ref_id, ann_id, image_id, category_id, split, file_name, sent_ids, sentences}`` with
``sentences = [{sent_id, sent, raw, tokens}]``. Splits: unc → train/val/testA/testB,
umd → train/val/test, google → train/val (RefCOCOg) or train/val/test (RefCOCO).
The image folder may also be ``ROOT/images/train2014`` (ReLA/LAVT style) or given explicitly.
"""

from __future__ import annotations

import json
from pathlib import Path

from sspsam.data import DatasetLayoutError
from sspsam.data.base import ReferringDataset, Tokenizer, find_dir, require_file, sentence_records
from sspsam.data.validate import check_coco_segmentation, check_image_record, split_error

DATASETS = ("refcoco", "refcoco+", "refcocog", "refclef")
DEFAULT_SPLIT_BY = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd", "refclef": "unc"}
LAYOUT_HINT = (
    "expected the lichengunc/refer layout: ROOT/{dataset}/instances.json, "
    "ROOT/{dataset}/refs({split_by}).p and images in ROOT/images/mscoco/images/train2014/"
)


def image_dir_candidates(root: Path, dataset: str) -> list[Path]:
    if dataset == "refclef":
        return [root / "images" / "saiapr_tc-12"]
    return [
        root / "images" / "mscoco" / "images" / "train2014",
        root / "images" / "mscoco" / "train2014",
        root / "images" / "train2014",
        root / "train2014",
    ]


def load_instances(path: Path) -> dict:
    """A COCO instances file with its three lists checked (entries are checked where a split uses them)."""
    from sspsam.data.validate import read_json, require_list

    data = read_json(path, "COCO instances file")
    require_list(data, "images", path, "a list of {id, file_name, height, width}")
    require_list(data, "annotations", path, "a list of {id, image_id, segmentation, ...}")
    require_list(data, "categories", path, "a list of {id, name}")
    for key in ("images", "annotations", "categories"):
        for i, rec in enumerate(data[key]):
            if "id" not in rec:
                raise DatasetLayoutError(f"{path}: {key}[{i}] has no 'id'")
    return data


def load_refs_pickle(path: Path) -> list[dict]:
    """refs(*).p files were written by Python 2; plain ASCII strings load as str."""
    from sspsam.data.safe_pickle import safe_load  # no code runs while reading: a downloaded pickle is untrusted

    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise DatasetLayoutError(f"cannot read {path}: {exc.strerror or exc}") from None
    refs = safe_load(data, str(path))
    if isinstance(refs, dict) and "refs" in refs:
        refs = refs["refs"]
    if not isinstance(refs, list):
        raise DatasetLayoutError(f"{path} should hold a list of refs, found {type(refs).__name__}")
    return refs


def split_matches(wanted: str | None, ref_split: str) -> bool:
    """refer.py's getRefIds semantics: testA/testB/testC match on the letter, 'test' matches any
    test split, train/val match exactly."""
    if wanted is None or wanted == "all":
        return True
    if wanted in ("testA", "testB", "testC"):
        return ref_split.startswith("test") and wanted[-1] in ref_split[4:]
    if wanted == "test":
        return ref_split.startswith("test")
    return ref_split == wanted


KNOWN_SPLITS = ("train", "val", "test", "testA", "testB", "testC")
REF_KEYS = ("ref_id", "ann_id", "image_id", "split", "sentences")


class RefCOCODataset(ReferringDataset):
    """One sample per (ref, sentence) of a RefCOCO-family split.

    Parameters
    ----------
    root: the folder holding ``refcoco/`` etc. and ``images/``.
    dataset: refcoco, refcoco+, refcocog (refclef is read too, with its RLE masks).
    split_by: unc, umd or google; default unc, and umd for refcocog.
    split: train, val, testA, testB, test, or None for every ref.
    text_field: which sentence field is the text: "sent" (cleaned, lower case) or "raw".
    image_root: the train2014 folder when it is not in one of the usual places.
    train, scale_range, colour_jitter, flip, return_orig_mask: see :class:`ReferringDataset`.
    """

    def __init__(
        self,
        root: str | Path,
        dataset: str = "refcoco",
        split_by: str | None = None,
        split: str | None = "val",
        image_size: int = 1024,
        tokenizer: Tokenizer | None = None,
        *,
        text_field: str = "sent",
        image_root: str | Path | None = None,
        **kwargs,
    ) -> None:
        super().__init__(image_size, tokenizer, **kwargs)
        if dataset not in DATASETS:
            raise ValueError(f"unknown dataset {dataset!r}; one of {', '.join(DATASETS)}")
        if text_field not in ("sent", "raw"):
            raise ValueError(f"text_field must be 'sent' or 'raw', got {text_field!r}")
        split_by = split_by or DEFAULT_SPLIT_BY[dataset]
        root = Path(root)
        if not root.is_dir():
            raise DatasetLayoutError(f"dataset root {root} does not exist — {LAYOUT_HINT.format(dataset=dataset, split_by=split_by)}")
        self.root, self.dataset, self.split_by, self.split = root, dataset, split_by, split
        hint = LAYOUT_HINT.format(dataset=dataset, split_by=split_by) + " (see https://github.com/lichengunc/refer)"
        data_dir = root / dataset
        refs_path = require_file(data_dir / f"refs({split_by}).p", hint)
        inst_path = require_file(data_dir / "instances.json", hint)
        self.image_dir = (
            Path(image_root)
            if image_root is not None
            else find_dir(image_dir_candidates(root, dataset), "COCO train2014 image", hint)
        )
        if not self.image_dir.is_dir():
            raise DatasetLayoutError(f"image folder {self.image_dir} does not exist")

        instances = load_instances(inst_path)
        refs = load_refs_pickle(refs_path)
        imgs = {im["id"]: im for im in instances["images"]}
        anns = {a["id"]: a for a in instances["annotations"]}
        self.categories = {c["id"]: c.get("name") for c in instances["categories"]}
        self.refs = refs

        for ref in refs:
            if not isinstance(ref, dict):
                raise DatasetLayoutError(f"{refs_path}: a ref is a {type(ref).__name__}, not a mapping")
        available = sorted({str(r.get("split", "?")) for r in refs})
        for ref in refs:
            missing = [k for k in REF_KEYS if k not in ref]
            if missing:
                raise DatasetLayoutError(f"{refs_path}: ref {ref.get('ref_id')} lacks {', '.join(missing)}")
            if not isinstance(ref["split"], str) or not split_matches(split, ref["split"]):
                continue
            img = imgs.get(ref["image_id"])
            if img is None:
                raise DatasetLayoutError(f"{refs_path}: ref {ref['ref_id']} names image {ref['image_id']}, absent from {inst_path}")
            check_image_record(img, inst_path)
            ann_ids = ref["ann_id"] if isinstance(ref["ann_id"], list) else [ref["ann_id"]]
            segs = []
            for aid in ann_ids:
                if aid not in anns:
                    raise DatasetLayoutError(f"{refs_path}: ref {ref['ref_id']} names annotation {aid}, absent from {inst_path}")
                segs.append(check_coco_segmentation(anns[aid], inst_path))
            self.records.extend(
                sentence_records(ref, img, self.image_dir, segs, no_target=False, ann_ids=ann_ids, text_field=text_field,
                                 where=str(refs_path))
            )
        if not self.records:
            raise split_error(split, available, KNOWN_SPLITS, refs_path)

    def __repr__(self) -> str:
        return (
            f"RefCOCODataset({self.dataset}, split_by={self.split_by}, split={self.split}: "
            f"{len(self)} sentences, {len({r.ref_id for r in self.records})} refs)"
        )
