"""The official SSP-SAM data layout (WayneTomas/SSP-SAM: ``data_seg/data_process.py`` writes it,
``datasets/dataset.py`` reads it), and a writer that converts the refer / ReLA layouts into it::

    ROOT/                                   the official checkout's root (or ROOT = data_seg/)
      data_seg/anns/refcoco.json            refcoco+.json, refcocog_umd.json, refcocog_google.json,
                                            refclef.json, grefcoco.json
      data_seg/masks/refcoco/<mask_id>.npy  one H×W uint8 array per referent (nonzero = target)
      data/coco/train2014/COCO_train2014_<iid:012d>.jpg    RefCOCO family and gRefCOCO
      data/referit/images/<iid>.jpg                         RefClef (ReferItGame)

An anns file is ``{split: [item, ...]}`` with the splits as keys (train, val, testA, testB, test,
…). An item is ``{"iid": image id, "bbox": box, "cat_id": category, "refs": [sentence, ...],
"mask_id": ref id}``: a training item holds every sentence of its referent (the official loader
draws one at random per epoch), an evaluation item exactly one. ``bbox`` is COCO's x, y, w, h
for the RefCOCO family and RefClef and a merged x1, y1, x2, y2 for gRefCOCO (whose masks are the
union of the targets, all zero for a no-target expression). Neither box nor category is used by
the mask metrics.

Reading follows the official loader: the image is found from ``iid`` alone (the file-name
pattern above), the mask from ``mask_id``, and the phrase is lower-cased, stripped and cut at
its last ``" ||| "`` (its ``read_examples``: what follows is a second text it never uses). A
training item with several sentences becomes one sample per sentence here, where the official
loader would draw one of them at random.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np

from sspsam.data import DatasetLayoutError
from sspsam.data.base import Record, ReferringDataset, Tokenizer, read_image

#: (dataset, split_by) → (anns file, mask folder, image kind); ``None`` split_by = the only one
FILES = {
    ("refcoco", "unc"): ("refcoco.json", "refcoco", "coco"),
    ("refcoco+", "unc"): ("refcoco+.json", "refcoco+", "coco"),
    ("refcocog", "umd"): ("refcocog_umd.json", "refcocog_umd", "coco"),
    ("refcocog", "google"): ("refcocog_google.json", "refcocog_google", "coco"),
    ("refclef", "unc"): ("refclef.json", "refclef", "referit"),
    ("refclef", "berkeley"): ("refclef.json", "refclef", "referit"),
    ("grefcoco", "unc"): ("grefcoco.json", "grefcoco", "coco"),
}
DATASETS = ("refcoco", "refcoco+", "refcocog", "refclef", "grefcoco")
DEFAULT_SPLIT_BY = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd", "refclef": "unc", "grefcoco": "unc"}

#: the splits data_process.py / grefcoco_data_process.py write for each (dataset, split_by)
WRITE_SPLITS = {
    ("refcoco", "unc"): ("train", "val", "testA", "testB"),
    ("refcoco+", "unc"): ("train", "val", "testA", "testB"),
    ("refcocog", "umd"): ("train", "val", "test"),
    ("refcocog", "google"): ("train", "val"),
    ("refclef", "unc"): ("train", "val", "testA", "testB", "testC"),
    ("refclef", "berkeley"): ("train", "val", "test"),
    ("grefcoco", "unc"): ("train", "val", "testA", "testB"),
}

LAYOUT_HINT = (
    "expected the official SSP-SAM layout: ROOT/data_seg/anns/{anns}, masks in ROOT/data_seg/masks/{masks}/ "
    "and images in ROOT/data/{images} (data_seg/data_process.py writes refcocog.json / masks/refcocog: "
    "rename them refcocog_umd as datasets/dataset.py expects)"
)
_SECOND_TEXT = re.compile(r"^(.*) \|\|\| (.*)$")


def official_phrase(text: str) -> str:
    """The phrase the official model is fed: lower case, stripped, the text before the last ``" ||| "``."""
    line = str(text).lower().strip()
    m = _SECOND_TEXT.match(line)
    return m.group(1) if m else line


def _key(dataset: str, split_by: str | None) -> tuple[str, str]:
    if dataset not in DATASETS:
        raise DatasetLayoutError(f"no official SSP-SAM annotation file for {dataset!r}; one of {', '.join(DATASETS)}")
    split_by = split_by or DEFAULT_SPLIT_BY[dataset]
    if (dataset, split_by) not in FILES:
        known = ", ".join(s for d, s in FILES if d == dataset)
        raise DatasetLayoutError(f"{dataset} has no split scheme {split_by!r} in the official layout; one of {known}")
    return dataset, split_by


def data_seg_dir(root: str | Path) -> Path | None:
    """The ``data_seg`` folder under ``root`` (or ``root`` itself), or None when there is none."""
    root = Path(root)
    for cand in (root / "data_seg", root):
        if (cand / "anns").is_dir():
            return cand
    return None


def is_official_layout(root: str | Path) -> bool:
    return data_seg_dir(root) is not None


def image_dir_candidates(root: Path, seg_dir: Path, kind: str) -> list[Path]:
    tails = [("data", "coco", "train2014"), ("coco", "train2014")] if kind == "coco" else [("data", "referit", "images"), ("referit", "images")]
    out = []
    for base in (root, seg_dir.parent):
        for t in tails:
            p = base.joinpath(*t)
            if p not in out:
                out.append(p)
    if kind == "coco":  # refer's and ReLA's image folders, so one COCO copy serves every layout
        out += [root / "images" / "mscoco" / "images" / "train2014", root / "images" / "train2014"]
    else:
        out += [root / "images" / "saiapr_tc-12"]
    return out


def image_name(iid, kind: str) -> str:
    return f"COCO_train2014_{int(iid):012d}.jpg" if kind == "coco" else f"{int(iid)}.jpg"


def load_anns(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise DatasetLayoutError(f"{path} is not valid JSON ({exc})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetLayoutError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
    if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
        raise DatasetLayoutError(f"{path} is not an SSP-SAM anns file: expected {{split: [item, ...]}}")
    return data


def _int_like(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool) or (isinstance(v, float) and v.is_integer())


class OfficialAnnsDataset(ReferringDataset):
    """One sample per (item, sentence) of a split of an official ``data_seg/anns/*.json``.

    ``root``: the folder holding ``data_seg/`` and ``data/`` (or the ``data_seg`` folder itself);
    ``dataset``: refcoco, refcoco+, refcocog, refclef or grefcoco; ``split_by``: umd or google for
    refcocog (default umd); ``image_root``: the image folder when it is elsewhere. The text of a
    sample is :func:`official_phrase` of the sentence. Masks are read per sample (``mask(i)``).
    """

    def __init__(
        self,
        root: str | Path,
        dataset: str = "refcoco",
        split: str | None = "val",
        image_size: int = 1024,
        tokenizer: Tokenizer | None = None,
        *,
        split_by: str | None = None,
        image_root: str | Path | None = None,
        **kwargs,
    ) -> None:
        super().__init__(image_size, tokenizer, **kwargs)
        dataset, split_by = _key(dataset, split_by)
        anns_name, mask_name, kind = FILES[(dataset, split_by)]
        root = Path(root)
        hint = LAYOUT_HINT.format(anns=anns_name, masks=mask_name,
                                  images="coco/train2014/" if kind == "coco" else "referit/images/")
        if not root.is_dir():
            raise DatasetLayoutError(f"dataset root {root} does not exist — {hint}")
        seg = data_seg_dir(root)
        if seg is None:
            raise DatasetLayoutError(f"no data_seg/anns folder under {root} — {hint}")
        anns_path = seg / "anns" / anns_name
        if not anns_path.is_file():
            present = sorted(p.name for p in (seg / "anns").iterdir() if p.suffix == ".json")
            raise DatasetLayoutError(f"missing {anns_path} (data_seg/anns holds: {', '.join(present) or 'no .json file'}) — {hint}")
        self.mask_dir = seg / "masks" / mask_name
        if image_root is not None:
            self.image_dir = Path(image_root)
            if not self.image_dir.is_dir():
                raise DatasetLayoutError(f"image folder {self.image_dir} does not exist")
        else:
            cands = image_dir_candidates(root, seg, kind)
            found = [c for c in cands if c.is_dir()]
            if not found:
                raise DatasetLayoutError(f"no image folder found (tried {', '.join(map(str, cands))}) — {hint}")
            self.image_dir = found[0]
        self.root, self.dataset, self.split_by, self.split, self.kind = root, dataset, split_by, split, kind
        self.anns_path = anns_path
        data = load_anns(anns_path)
        if split not in (None, "all") and split not in data:
            raise DatasetLayoutError(f"no split {split!r} in {anns_path}; splits present: {', '.join(data) or 'none'}")
        splits = list(data) if split in (None, "all") else [split]
        for s in splits:
            for k, item in enumerate(data[s]):
                where = f"{anns_path}: {s}[{k}]"
                if not isinstance(item, dict):
                    raise DatasetLayoutError(f"{where} is a {type(item).__name__}, not an item mapping")
                missing = [f for f in ("iid", "refs", "mask_id") if f not in item]
                if missing:
                    raise DatasetLayoutError(f"{where} lacks {', '.join(missing)}")
                if not _int_like(item["iid"]) or not _int_like(item["mask_id"]):
                    raise DatasetLayoutError(f"{where}: iid and mask_id must be integers, got {item['iid']!r}, {item['mask_id']!r}")
                refs = item["refs"]
                if not isinstance(refs, list) or not refs or not all(isinstance(t, str) for t in refs):
                    raise DatasetLayoutError(f"{where}: refs must be a non-empty list of sentences")
                iid, mid = int(item["iid"]), int(item["mask_id"])
                for j, text in enumerate(refs):
                    self.records.append(Record(
                        image_path=self.image_dir / image_name(iid, kind), height=0, width=0,
                        text=official_phrase(text), no_target=False, image_id=iid,
                        sent_id=f"{s}/{k}/{j}", ref_id=mid, split=s, kind="npy",
                        extra={"mask_path": str(self.mask_dir / f"{mid}.npy"), "sentence": text,
                               "bbox": item.get("bbox"), "cat_id": item.get("cat_id")},
                    ))
        if not self.records:
            raise DatasetLayoutError(f"split {split!r} of {anns_path} is empty; splits present: {', '.join(data) or 'none'}")

    def mask(self, i: int) -> np.ndarray:
        """The referent's mask as the official loader reads it (``np.load``; nonzero = target)."""
        path = Path(self.records[i].extra["mask_path"])
        if not path.is_file():
            raise DatasetLayoutError(f"mask not found: {path} (generate the masks with data_seg/data_process.py --generate_mask)")
        try:
            m = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise DatasetLayoutError(f"{path} is not a readable .npy mask ({exc})") from None
        if m.ndim != 2 or not (np.issubdtype(m.dtype, np.number) or m.dtype == np.bool_):
            raise DatasetLayoutError(f"{path} should hold an H×W mask, found shape {m.shape} dtype {m.dtype}")
        return m != 0

    def raw(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        m = self.mask(i)
        return read_image(self.records[i].image_path, m.shape), m

    def __repr__(self) -> str:
        return f"OfficialAnnsDataset({self.anns_path.name}, split={self.split}: {len(self)} samples)"


# ----------------------------------------------------------------------------------------------
# writing the official layout from refer / ReLA files

# data_process.py's cat_process: COCO's 91 category ids onto 0..79 (ids outside the ranges kept)
_CAT_SHIFT = ((1, 11, 1), (13, 25, 2), (27, 28, 3), (31, 44, 5), (46, 65, 6), (67, 67, 7), (70, 70, 9), (72, 82, 10), (84, 90, 11))


def coco_contiguous_category(cat: int) -> int:
    for lo, hi, shift in _CAT_SHIFT:
        if lo <= cat <= hi:
            return cat - shift
    return cat


def write_official_anns(src_root: str | Path, dst_root: str | Path, dataset: str = "refcoco",
                        split_by: str | None = None, *, copy_images: bool = True) -> dict:
    """Convert a refer-layout (RefCOCO family, RefClef) or ReLA-layout (gRefCOCO) data set at
    ``src_root`` into the official layout under ``dst_root`` as the official preprocessing
    would: items in the order of the refs file, one item per sentence outside ``train``, masks
    ``data_seg/masks/<name>/<ref_id>.npy`` (uint8 0/1, union of the targets) and the images under
    ``data/`` renamed to the official pattern. Returns ``{"anns", "splits": {split: items}}``."""
    from sspsam.data.base import decode_coco_segmentation
    from sspsam.data.refer import load_instances, load_refs_pickle, split_matches

    dataset, split_by = _key(dataset, split_by)
    anns_name, mask_name, kind = FILES[(dataset, split_by)]
    src, dst = Path(src_root), Path(dst_root)
    if dataset == "grefcoco":
        refs_path = src / "grefcoco" / f"grefs({split_by}).json"
        if not refs_path.is_file():
            raise DatasetLayoutError(f"missing {refs_path} (ReLA's gRefCOCO layout)")
        refs = json.loads(refs_path.read_text())
        inst = load_instances(src / "grefcoco" / "instances.json")
        image_dirs = [src / "images" / "train2014"]
    else:
        refs_path = src / dataset / f"refs({split_by}).p"
        if not refs_path.is_file():
            raise DatasetLayoutError(f"missing {refs_path} (lichengunc/refer layout)")
        refs = load_refs_pickle(refs_path)
        inst = load_instances(src / dataset / "instances.json")
        from sspsam.data.refer import image_dir_candidates as refer_dirs

        image_dirs = refer_dirs(src, dataset)
    imgs = {im["id"]: im for im in inst["images"]}
    anns = {a["id"]: a for a in inst["annotations"]}
    seg_dir = dst / "data_seg"
    mask_dir = seg_dir / "masks" / mask_name
    image_out = dst / "data" / ("coco/train2014" if kind == "coco" else "referit/images")
    for d in (seg_dir / "anns", mask_dir, image_out):
        d.mkdir(parents=True, exist_ok=True)

    out: dict[str, list] = {}
    for split in WRITE_SPLITS[(dataset, split_by)]:
        items = []
        for ref in refs:
            if not (split_matches(split, ref["split"]) if dataset != "grefcoco" else ref["split"] == split):
                continue
            img = imgs[ref["image_id"]]
            h, w = int(img["height"]), int(img["width"])
            ids = ref["ann_id"] if isinstance(ref["ann_id"], list) else [ref["ann_id"]]
            targets = [anns[a] for a in ids if a != -1]
            mask = np.zeros((h, w), dtype=np.uint8)
            for a in targets:
                if not a.get("iscrowd", 0):
                    mask |= decode_coco_segmentation(a["segmentation"], h, w).astype(np.uint8)
            if dataset == "grefcoco":
                boxes = [a["bbox"] for a in targets] or [[0, 0, 0, 0]]
                bbox = [min(b[0] for b in boxes), min(b[1] for b in boxes),
                        max(b[0] + b[2] for b in boxes), max(b[1] + b[3] for b in boxes)]
                cat = ref["category_id"]
            else:
                bbox = targets[0]["bbox"]
                cat = coco_contiguous_category(int(ref["category_id"]))
            sents = [s["sent"] for s in ref["sentences"]]
            base = {"iid": ref["image_id"], "bbox": bbox, "cat_id": cat}
            if split == "train":
                items.append({**base, "refs": sents, "mask_id": ref["ref_id"]})
            else:
                items += [{**base, "refs": [t], "mask_id": ref["ref_id"]} for t in sents]
            np.save(mask_dir / f"{ref['ref_id']}.npy", mask)
            if copy_images:
                target = image_out / image_name(ref["image_id"], kind)
                if not target.exists():
                    source = next((d / img["file_name"] for d in image_dirs if (d / img["file_name"]).is_file()), None)
                    if source is None:
                        raise DatasetLayoutError(f"image {img['file_name']} not found under {', '.join(map(str, image_dirs))}")
                    shutil.copyfile(source, target)
        out[split] = items
    anns_path = seg_dir / "anns" / anns_name
    anns_path.write_text(json.dumps(out))
    return {"anns": str(anns_path), "splits": {k: len(v) for k, v in out.items()}}
