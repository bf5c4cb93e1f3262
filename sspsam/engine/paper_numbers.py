"""The SSP-SAM paper's reported numbers, printed beside an ``--protocol ssp-sam`` run.

Source: Tang, Liu, Sun, Li, "SSP-SAM: SAM with Semantic-Spatial Prompt for Referring Expression
Segmentation", IEEE TCSVT, arXiv:2603.18086. Values are percentages as printed in the paper's
tables; ``None`` is a cell nobody has transcribed from the paper yet and prints as "—". Only
fill a cell from the paper itself (not from another paper's comparison table, which may have
been measured under a different protocol), one row per (sspsam variant, dataset, split).
"""

from __future__ import annotations

SOURCE = "SSP-SAM paper (arXiv:2603.18086, IEEE TCSVT)"

#: the variants whose configs follow the paper's two models
VARIANTS = ("ssp-sam-b16-h", "ssp-sam-l14-336-h")
#: the metrics a row may hold (the official test.py's mask metrics)
METRICS = ("Pr@0.5", "Pr@0.6", "Pr@0.7", "Pr@0.8", "Pr@0.9", "oIoU", "mIoU")

_SPLITS = {
    "refcoco": ("val", "testA", "testB"),
    "refcoco+": ("val", "testA", "testB"),
    "refcocog": ("val", "test"),
    "grefcoco": ("val", "testA", "testB"),
}

#: (variant, dataset, split) → {metric: percentage or None}
PAPER: dict[tuple[str, str, str], dict[str, float | None]] = {
    (v, d, s): {m: None for m in METRICS} for v in VARIANTS for d, splits in _SPLITS.items() for s in splits
}
# The paper's text: "On the RefCOCO val split, SSP-SAM-336 achieves a Pr@0.9 of 47.77 %"
# (shared/papers/ssp-sam-summary.txt quotes it).
PAPER[("ssp-sam-l14-336-h", "refcoco", "val")]["Pr@0.9"] = 47.77


def paper_row(model_name: str, dataset: str, split: str) -> dict[str, float | None] | None:
    """The paper's row for this model, data set and split: None when the model is not one of the
    paper's variants or the paper has no such row; a dict with None cells where not transcribed."""
    row = PAPER.get((str(model_name), dataset, split))
    return dict(row) if row is not None else None
