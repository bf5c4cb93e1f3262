"""The merged referring-expression set of the official stage-1 (box-only) pretraining.

The official code pretrains on SimREC's ``merge.json`` (``datasets/dataset.py``, dataset
``'merge'``; ``legacy_data_prep_simrec.md``): the *train* refs of RefCOCO, RefCOCO+ and RefCOCOg
(plus ReferIt, Flickr30k and Visual Genome, for which sspsam has no readers), with every image that
appears in a validation or test split of RefCOCO, RefCOCO+ or RefCOCOg removed — the three share
COCO train2014 images, so without that the pretraining would see the fine-tuning benchmarks'
test images. ``VGDataset`` also drops sentences longer than 40 words in this mode.
"""

from __future__ import annotations

import logging
from pathlib import Path

from sspsam.data import DatasetLayoutError
from sspsam.data.base import ReferringDataset, Tokenizer
from sspsam.data.refer import DEFAULT_SPLIT_BY, RefCOCODataset, load_refs_pickle

log = logging.getLogger(__name__)

SOURCES = ("refcoco", "refcoco+", "refcocog")
MAX_WORDS = 40


def held_out_images(root: Path) -> set[int]:
    """Image ids in any non-train split of any ``refs(*).p`` of the three sources."""
    out: set[int] = set()
    for name in SOURCES:
        for path in sorted((root / name).glob("refs(*).p")):
            out.update(int(r["image_id"]) for r in load_refs_pickle(path) if r.get("split") != "train")
    return out


class MergedRefCOCODataset(ReferringDataset):
    """RefCOCO + RefCOCO+ + RefCOCOg train sentences (readers' default split_by), minus held-out
    images and sentences over 40 words. Sources absent under ``root`` are skipped with a warning;
    none present is an error naming the folders tried."""

    def __init__(self, root: str | Path, split: str | None = "train", image_size: int = 1024,
                 tokenizer: Tokenizer | None = None, **kwargs) -> None:
        super().__init__(image_size, tokenizer, **kwargs)
        if split not in (None, "train"):
            from sspsam.data.validate import SplitError

            raise SplitError(f"the merged pretraining set has only a train split, not {split!r}")
        root = Path(root)
        present = [n for n in SOURCES if (root / n / f"refs({DEFAULT_SPLIT_BY[n]}).p").is_file()]
        if not present:
            tried = ", ".join(str(root / n / f"refs({DEFAULT_SPLIT_BY[n]}).p") for n in SOURCES)
            raise DatasetLayoutError(f"no RefCOCO-family data to merge under {root}; tried {tried}")
        missing = [n for n in SOURCES if n not in present]
        if missing:
            log.warning("merged pretraining set: %s not found under %s, merging %s only",
                        ", ".join(missing), root, ", ".join(present))
        held = held_out_images(root)
        self.sources: dict[str, int] = {}
        for name in present:
            ds = RefCOCODataset(root, dataset=name, split="train", image_size=image_size)
            keep = [r for r in ds.records if r.image_id not in held and len(r.text.split(" ")) <= MAX_WORDS]
            for r in keep:
                r.extra = {**r.extra, "source": name}
            self.records.extend(keep)
            self.sources[name] = len(keep)
        if not self.records:
            raise DatasetLayoutError(f"the merged pretraining set under {root} is empty once val/test images are removed")

    def __repr__(self) -> str:
        parts = ", ".join(f"{k}: {v}" for k, v in self.sources.items())
        return f"MergedRefCOCODataset({len(self)} sentences; {parts})"
