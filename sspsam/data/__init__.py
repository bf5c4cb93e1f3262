"""Referring-segmentation datasets in their distributed formats, and tiny synthetic stand-ins.

Readers (``torch.utils.data.Dataset``; one sample per (referent, sentence)):

* :class:`RefCOCODataset` — RefCOCO / RefCOCO+ / RefCOCOg in lichengunc/refer's layout
  (``ROOT/<dataset>/instances.json`` + ``ROOT/<dataset>/refs(<split_by>).p``).
* :class:`GRefCOCODataset` — gRefCOCO in ReLA's layout (``ROOT/grefcoco/grefs(unc).json`` +
  ``instances.json``; multi-target and no-target refs).
* :class:`PhraseCutDataset` — VGPhraseCut (``refer_<split>.json`` + ``image_data_split.json``).
* :class:`OfficialAnnsDataset` — the official SSP-SAM layout (``data_seg/anns/<dataset>.json`` +
  ``data_seg/masks/<dataset>/<mask_id>.npy``); :func:`write_official_anns` converts to it.

Generators writing the same layouts from synthetic shape scenes: :func:`generate_refer`,
:func:`generate_grefcoco`, :func:`generate_phrasecut` (also ``sspsam tools generate-data``).
"""

from __future__ import annotations

from sspsam.errors import SSPSamError


class DatasetLayoutError(SSPSamError):
    """A dataset file or folder is missing or malformed; the message names the path and the
    layout that was expected. (SSPSamError is a RuntimeError.)"""


REFERRING_DATASETS = ("refcoco", "refcoco+", "refcocog", "grefcoco", "phrasecut")


def open_referring(name: str, root, split: str | None, image_size: int, split_by: str | None = None, **kwargs):
    """The reader for a referring benchmark by name (``split_by``: the reader's default when None;
    PhraseCut has none); ``kwargs`` go to the reader (augmentation switches for training)."""
    from sspsam.errors import ConfigError

    kwargs.update(split=split, image_size=image_size)
    if split_by is not None and name != "phrasecut":
        kwargs["split_by"] = split_by
    if name in ("refcoco", "refcoco+", "refcocog"):
        from sspsam.data.refer import RefCOCODataset

        return RefCOCODataset(root, dataset=name, **kwargs)
    if name == "grefcoco":
        from sspsam.data.grefcoco import GRefCOCODataset

        return GRefCOCODataset(root, **kwargs)
    if name == "phrasecut":
        from sspsam.data.phrasecut import PhraseCutDataset

        return PhraseCutDataset(root, **kwargs)
    raise ConfigError(f"unknown referring dataset {name!r}; one of {', '.join(REFERRING_DATASETS)}")


_LAZY = {
    "ReferringDataset": ".base",
    "collate": ".base",
    "generate_refer": ".generate",
    "generate_grefcoco": ".generate",
    "generate_phrasecut": ".generate",
    "GRefCOCODataset": ".grefcoco",
    "PhraseCutDataset": ".phrasecut",
    "RefCOCODataset": ".refer",
    "OfficialAnnsDataset": ".official_anns",
    "write_official_anns": ".official_anns",
}


def __getattr__(name: str):
    # lazy: `import sspsam.data` stays cheap, and a data set module loads only when its class is asked for
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["DatasetLayoutError", "REFERRING_DATASETS", "open_referring", *_LAZY]
