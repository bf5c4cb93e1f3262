"""Semantic-segmentation datasets for open-vocabulary segmentation (ESC-Net, SAM-MI).

Readers (``torch.utils.data.Dataset``; one sample per image):

* :class:`SemSegDataset` — the generic layout ``ROOT/images/<split>/*.jpg|png``,
  ``ROOT/annotations/<split>/*.png`` (single-channel labels, same stem) and
  ``ROOT/classes.json`` = ``{"classes": [...], "ignore_index": 255}``.
* The benchmarks in their distributed (or detectron2/CAT-Seg prepared) layouts, ``root`` being
  either the dataset folder or the folder that holds it (detectron2's ``DETECTRON2_DATASETS``):
  :class:`ADE20K150` (``ADEChallengeData2016``, reduce-zero-label), :class:`ADE20K847`
  (``ADE20K_2021_17_01/{images,annotations}_detectron2``, tif, ignore 65535),
  :class:`PascalVOC` (21 or 20 classes), :class:`PascalContext` (59 or 459, detectron2-prepared)
  and :class:`COCOStuff171` (raw ``stuffthingmaps_trainval2017``).

A sample is a dict: ``image`` FloatTensor 3×S×S 0..255 (letterboxed, SAM's geometry) or 3×H×W
without ``image_size``; ``label`` LongTensor S×S (H×W) with ``ignore_index`` in the padding;
``classes`` (list of names); ``orig_size`` LongTensor (H, W); ``image_id`` (file stem); ``index``.
``raw(i)`` gives the original image and label for evaluation at full resolution.

:func:`generate_semseg` writes the generic layout from synthetic shape scenes whose classes are
colour names, so a class name alone determines its pixels (`sspsam tools
generate-semseg ROOT --n N`).
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from sspsam.errors import ImageLoadError
from sspsam.io.transforms import letterbox_image, to_tensor
from sspsam.data import DatasetLayoutError
import sspsam.data.classnames as names
from sspsam.data.base import find_dir, read_image, require_file
from sspsam.data.shapes import COLOURS, make_scene

IMAGE_EXTS = (".jpg", ".jpeg", ".png")


def read_label(path: Path) -> np.ndarray:
    """A label map (8-bit or palette PNG, 16-bit PNG/TIFF) → int64 H×W, palette indices kept."""
    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L", "F"):
                raise DatasetLayoutError(f"{path} is a {im.mode} image; a label map must be single-channel")
            return np.asarray(im).astype(np.int64)
    except FileNotFoundError:
        raise DatasetLayoutError(f"label map not found: {path}") from None
    except OSError as exc:
        raise ImageLoadError(f"{path} is corrupt or not a label image ({exc})") from None


def letterbox_label(label: np.ndarray, size: int, ignore_index: int) -> np.ndarray:
    """int H×W → size×size, nearest neighbour, padding = ``ignore_index`` (the image's letterbox)."""
    _, box = letterbox_image(np.zeros((*label.shape, 3), dtype=np.uint8), size)
    sh, sw = box.scaled_hw
    resized = np.asarray(Image.fromarray(label.astype(np.int32), mode="I").resize((sw, sh), Image.NEAREST))
    out = np.full((size, size), ignore_index, dtype=np.int64)
    out[:sh, :sw] = resized
    return out


def read_classnames(path: Path) -> list[str]:
    """A class list file: a JSON list, a JSON object with ``classes``, or one name per line."""
    text = require_file(path, "a class list (JSON list or one name per line)").read_text()
    if path.suffix == ".json":
        data = json.loads(text)
        data = data["classes"] if isinstance(data, dict) else data
        return [str(c) for c in data]
    return [line.strip() for line in text.splitlines() if line.strip()]


class SemSegBase(Dataset):
    """Shared sample building; subclasses set ``pairs`` [(image, label)], ``classes``,
    ``ignore_index`` and optionally ``label_map`` (raw label values → class ids)."""

    pairs: list[tuple[Path, Path]]
    classes: list[str]
    ignore_index: int = 255
    label_map: Callable[[np.ndarray], np.ndarray] | None = None

    def __init__(self, image_size: int | None = None):
        if image_size is not None and int(image_size) <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.image_size = None if image_size is None else int(image_size)

    def _pair(self, label_dir: Path, image_dir: Path, label_ext: str, stems: Sequence[str] | None = None) -> None:
        """Pair each label file with the image of the same stem (``stems`` restricts and orders)."""
        if stems is None:
            labels = sorted(label_dir.glob(f"*{label_ext}"))
            if not labels:
                raise DatasetLayoutError(f"no *{label_ext} label maps in {label_dir}")
        else:
            labels = [label_dir / f"{s}{label_ext}" for s in stems]
        self.pairs = []
        for lab in labels:
            require_file(lab, f"the label map of image {lab.stem}")
            img = next((image_dir / f"{lab.stem}{e}" for e in IMAGE_EXTS if (image_dir / f"{lab.stem}{e}").is_file()), None)
            if img is None:
                raise DatasetLayoutError(f"missing image {image_dir / (lab.stem + '.jpg')} for label map {lab}")
            self.pairs.append((img, lab))

    def __len__(self) -> int:
        return len(self.pairs)

    def raw(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(HxWx3 uint8 image, HxW int64 class-id label with ``ignore_index``)."""
        img_path, lab_path = self.pairs[i]
        label = read_label(lab_path)
        if self.label_map is not None:
            label = self.label_map(label)
        image = read_image(img_path, label.shape)
        return image, label

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} images")
        i %= len(self)
        image, label = self.raw(i)
        h, w = label.shape
        if self.image_size is not None:
            image, _ = letterbox_image(image, self.image_size)
            label = letterbox_label(label, self.image_size, self.ignore_index)
        else:
            image = np.array(image)  # writable, for torch
        return {
            "image": to_tensor(image),
            "label": torch.from_numpy(np.ascontiguousarray(label)),
            "classes": list(self.classes),
            "orig_size": torch.tensor([h, w], dtype=torch.long),
            "image_id": self.pairs[i][0].stem,
            "index": i,
        }


def _dataset_dir(root: Path, name: str) -> Path:
    root = Path(root)
    return root / name if (root / name).is_dir() else root


# ----------------------------------------------------------------------------------------------
# the generic layout


class SemSegDataset(SemSegBase):
    """``ROOT/images/<split>``, ``ROOT/annotations/<split>`` (PNG labels), ``ROOT/classes.json``."""

    def __init__(self, root: str | Path, split: str = "val", image_size: int | None = None):
        super().__init__(image_size)
        root = Path(root)
        from sspsam.data.validate import read_json

        meta = read_json(require_file(root / "classes.json", '{"classes": [...], "ignore_index": 255}'), "class list")
        if not isinstance(meta, dict) or not isinstance(meta.get("classes"), list) or not meta["classes"] \
                or not all(isinstance(c, str) and c.strip() for c in meta["classes"]) \
                or not isinstance(meta.get("ignore_index", 255), int):
            raise DatasetLayoutError(f"{root / 'classes.json'} must hold {{\"classes\": [names...], \"ignore_index\": 255}}")
        self.classes = [str(c) for c in meta["classes"]]
        self.ignore_index = int(meta.get("ignore_index", 255))
        hint = "expected ROOT/images/<split>/*.jpg|png and ROOT/annotations/<split>/*.png"
        images = find_dir([root / "images" / split], f"images/{split}", hint)
        labels = find_dir([root / "annotations" / split], f"annotations/{split}", hint)
        self._pair(labels, images, ".png")


# ----------------------------------------------------------------------------------------------
# the benchmarks


class ADE20K150(SemSegBase):
    """ADE20K-150 (``ADEChallengeData2016/images/<split>``, ``annotations/<split>``; split
    ``validation`` or ``training``). Labels use reduce-zero-label: 0 (other) → 255, k → k−1."""

    def __init__(self, root: str | Path, split: str = "validation", image_size: int | None = None):
        super().__init__(image_size)
        base = _dataset_dir(root, "ADEChallengeData2016")
        hint = "expected ADEChallengeData2016/{images,annotations}/<split> (the SceneParsing release)"
        images = find_dir([base / "images" / split], f"ADE20K images/{split}", hint)
        labels = find_dir([base / "annotations" / split], f"ADE20K annotations/{split}", hint)
        self.classes = list(names.ADE150)
        self._pair(labels, images, ".png")

    @staticmethod
    def label_map(label: np.ndarray) -> np.ndarray:
        return np.where(label == 0, 255, label - 1)


class ADE20K847(SemSegBase):
    """ADE20K-847 as detectron2/CAT-Seg prepare it from ADE20K_2021_17_01: ``images_detectron2/<split>``
    (jpg) and ``annotations_detectron2/<split>`` (16-bit tif, class ids 0..846, 65535 = ignore).

    The 847 names are read from ``classnames`` or ``ade847.json`` (CAT-Seg's file) in the dataset
    folder or its parent; they are not bundled.
    """

    ignore_index = 65535

    def __init__(self, root: str | Path, split: str = "validation", image_size: int | None = None,
                 classnames: str | Path | None = None):
        super().__init__(image_size)
        base = _dataset_dir(root, "ADE20K_2021_17_01")
        hint = "expected ADE20K_2021_17_01/{images,annotations}_detectron2/<split> (CAT-Seg's prepare_ade20k_full.py)"
        images = find_dir([base / "images_detectron2" / split], f"images_detectron2/{split}", hint)
        labels = find_dir([base / "annotations_detectron2" / split], f"annotations_detectron2/{split}", hint)
        self.classes = _class_file(classnames, [base / "ade847.json", base.parent / "ade847.json"], 847)
        self._pair(labels, images, ".tif")


class PascalVOC(SemSegBase):
    """PASCAL VOC 2012 (``VOCdevkit/VOC2012``: JPEGImages, SegmentationClass palette PNGs,
    ImageSets/Segmentation/<split>.txt). 255 marks object boundaries (ignored). ``num_classes=21``
    keeps background as class 0; ``20`` ignores it (0 → 255, k → k−1), the VOC-20 protocol."""

    def __init__(self, root: str | Path, split: str = "val", image_size: int | None = None, num_classes: int = 21):
        super().__init__(image_size)
        if num_classes not in (20, 21):
            raise ValueError(f"PASCAL VOC has 20 or 21 classes, got {num_classes}")
        root = Path(root)
        base = next((c for c in (root / "VOCdevkit" / "VOC2012", root / "VOC2012") if c.is_dir()), root)
        hint = "expected VOCdevkit/VOC2012/{JPEGImages,SegmentationClass,ImageSets/Segmentation}"
        images = find_dir([base / "JPEGImages"], "JPEGImages", hint)
        labels = find_dir([base / "SegmentationClass"], "SegmentationClass", hint)
        ids = require_file(base / "ImageSets" / "Segmentation" / f"{split}.txt", "the image ids of the split").read_text().split()
        self.classes = list(names.VOC21 if num_classes == 21 else names.VOC20)
        self.label_map = None if num_classes == 21 else (lambda y: np.where((y == 0) | (y == 255), 255, y - 1))
        self._pair(labels, images, ".png", ids)


class PascalContext(SemSegBase):
    """PASCAL Context as detectron2/CAT-Seg prepare it: ``VOCdevkit/VOC2010/JPEGImages`` and
    ``VOC2010/annotations_detectron2/pc59_val`` (PNG, 0..58, 255 ignore) or ``pc459_val``
    (16-bit tif, 0..458, 65535 ignore). PC-459 names come from ``classnames`` or ``pc459.json``."""

    def __init__(self, root: str | Path, num_classes: int = 59, image_size: int | None = None,
                 classnames: str | Path | None = None, split: str = "val"):
        super().__init__(image_size)
        if num_classes not in (59, 459):
            raise ValueError(f"PASCAL Context has 59 or 459 classes, got {num_classes}")
        root = Path(root)
        base = next((c for c in (root / "VOCdevkit" / "VOC2010", root / "VOC2010") if c.is_dir()), root)
        hint = "expected VOCdevkit/VOC2010/JPEGImages and VOC2010/annotations_detectron2/pc{59,459}_<split> (CAT-Seg's prepare scripts)"
        images = find_dir([base / "JPEGImages"], "JPEGImages", hint)
        labels = find_dir([base / "annotations_detectron2" / f"pc{num_classes}_{split}"], f"annotations_detectron2/pc{num_classes}_{split}", hint)
        if num_classes == 59:
            self.classes, ext = list(names.PC59), ".png"
        else:
            self.classes = _class_file(classnames, [base / "pc459.json", root / "pc459.json"], 459)
            self.ignore_index, ext = 65535, ".tif"
        self._pair(labels, images, ext)


class COCOStuff171(SemSegBase):
    """COCO-Stuff-164k with its 171 used classes. Images: ``images/<split>`` or ``<split>``
    (e.g. ``val2017``); labels: the raw ``stuffthingmaps_trainval2017/<split>`` (or
    ``annotations/<split>``) PNGs holding COCO id − 1 (255 unlabeled), mapped to 0..170."""

    def __init__(self, root: str | Path, split: str = "val2017", image_size: int | None = None):
        super().__init__(image_size)
        base = _dataset_dir(root, "coco-stuff")
        hint = "expected <split>/ or images/<split>/ with stuffthingmaps_trainval2017/<split>/ (or annotations/<split>/)"
        images = find_dir([base / "images" / split, base / split], f"COCO images {split}", hint)
        labels = find_dir([base / "stuffthingmaps_trainval2017" / split, base / "annotations" / split], f"stuffthingmaps {split}", hint)
        lut = np.full(256, 255, dtype=np.int64)
        for k, (cid, _) in enumerate(names.COCO_STUFF171_IDS):
            lut[cid - 1] = k
        self._lut = lut
        self.classes = list(names.COCO_STUFF171)
        self._pair(labels, images, ".png")

    def label_map(self, label: np.ndarray) -> np.ndarray:
        return self._lut[np.clip(label, 0, 255)]


def _class_file(given: str | Path | None, candidates: list[Path], expect: int) -> list[str]:
    paths = [Path(given)] if given is not None else candidates
    for p in paths:
        if p.is_file():
            classes = read_classnames(p)
            if len(classes) != expect:
                raise DatasetLayoutError(f"{p} lists {len(classes)} classes, expected {expect}")
            return classes
    tried = ", ".join(str(p) for p in paths)
    raise DatasetLayoutError(f"missing class list: tried {tried} (a JSON list of {expect} names, e.g. CAT-Seg's)")


# ----------------------------------------------------------------------------------------------
# synthetic data


SHAPE_CLASSES = ("background", "red", "green", "blue", "yellow")


def generate_semseg(
    root: str | Path,
    n: int = 64,
    size: int = 128,
    seed: int = 0,
    splits: Sequence[str] = ("train", "val"),
    classes: Sequence[str] = SHAPE_CLASSES,
    n_objects: tuple[int, int] = (2, 4),
) -> dict:
    """Write ``n`` images per split in the generic layout: coloured shapes on grey.

    ``classes[0]`` is the background; the others are colour names from
    :data:`sspsam.data.shapes.COLOURS`, so every pixel's class is its colour and shape is
    irrelevant. Images are lossless PNGs, ``size`` on the long side with a random aspect (so
    the letterbox pads); each split's images depend only on (seed, split name). Returns a summary dict.
    """
    root = Path(root)
    palette = tuple(classes[1:])
    if unknown := [c for c in palette if c not in COLOURS]:
        raise ValueError(f"classes after the background must be colours from {sorted(COLOURS)}; got {unknown}")
    root.mkdir(parents=True, exist_ok=True)
    (root / "classes.json").write_text(json.dumps({"classes": list(classes), "ignore_index": 255}, indent=1))
    counts = {}
    for split in splits:
        img_dir, lab_dir = root / "images" / split, root / "annotations" / split
        img_dir.mkdir(parents=True, exist_ok=True)
        lab_dir.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng([seed, zlib.crc32(split.encode())])
        for i in range(n):
            short = int(rng.integers(int(size * 0.75), size + 1))
            w, h = (size, short) if rng.random() < 0.5 else (short, size)
            scene = make_scene(rng, width=w, height=h, n_objects=n_objects, palette=palette)
            label = np.zeros((h, w), dtype=np.uint8)
            for k, obj in enumerate(scene.objects):
                label[scene.mask(k)] = classes.index(obj.colour)
            name = f"{split}_{i:05d}"
            Image.fromarray(scene.render()).save(img_dir / f"{name}.png")
            Image.fromarray(label, mode="L").save(lab_dir / f"{name}.png")
        counts[split] = n
    return {"root": str(root), "classes": list(classes), "images": counts}
