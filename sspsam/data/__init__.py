"""Referring-segmentation datasets in their distributed formats, and tiny synthetic stand-ins.

Readers (``torch.utils.data.Dataset``; one sample per (referent, sentence)):

* :class:`RefCOCODataset` — RefCOCO / RefCOCO+ / RefCOCOg in lichengunc/refer's layout
  (``ROOT/<dataset>/instances.json`` + ``ROOT/<dataset>/refs(<split_by>).p``).
* :class:`GRefCOCODataset` — gRefCOCO in ReLA's layout (``ROOT/grefcoco/grefs(unc).json`` +
  ``instances.json``; multi-target and no-target refs).
* :class:`PhraseCutDataset` — VGPhraseCut (``refer_<split>.json`` + ``image_data_split.json``).

Generators writing the same layouts from synthetic shape scenes: :func:`generate_refer`,
:func:`generate_grefcoco`, :func:`generate_phrasecut` (also ``python -m sspsam.data.generate``).
"""

from __future__ import annotations

from ..errors import SSPSamError


class DatasetLayoutError(SSPSamError):
    """A dataset file or folder is missing or malformed; the message names the path and the
    layout that was expected. (SSPSamError is a RuntimeError.)"""


_LAZY = {
    "ReferringDataset": ".base",
    "collate": ".base",
    "generate_refer": ".generate",
    "generate_grefcoco": ".generate",
    "generate_phrasecut": ".generate",
    "GRefCOCODataset": ".grefcoco",
    "PhraseCutDataset": ".phrasecut",
    "RefCOCODataset": ".refer",
}


def __getattr__(name: str):
    # lazy, so ``python -m sspsam.data.generate`` does not import its own module twice
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["DatasetLayoutError", *_LAZY]
