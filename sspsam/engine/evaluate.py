"""Evaluation on the referring-segmentation benchmarks with the reference code's metrics.

Predictions go through the public :class:`~sspsam.predict.segmenter.Segmenter` — the same letterbox,
thresholds and no-target rule a user gets — and are compared with the ground truth at the
original image size (as LAVT, ReLA and PhraseCut's evaluators do). Every sentence of an image is
decoded against one image embedding.

Outputs (``out_dir``): ``metrics.json`` (all numbers + per-sample IoUs), ``table.md`` (the
paper's layout: Pr@0.5…0.9, oIoU, mIoU for RES/PhraseCut; gIoU, cIoU, N-acc, T-acc for GRES)
and ``pr_curve.png`` (precision as the IoU threshold rises from 0.5 to 0.95).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable

import numpy as np

from sspsam.io.checkpoint import atomic_write
from sspsam.errors import ConfigError, TextError
from sspsam.engine.metrics import GRESMeter, PhraseCutMeter, RESMeter, format_table

TASKS = {"refcoco": "res", "refcoco+": "res", "refcocog": "res", "grefcoco": "gres", "phrasecut": "phrasecut"}
CURVE_THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))  # 0.50 … 0.95


def task_of(dataset: str) -> str:
    if dataset not in TASKS:
        raise ConfigError(f"unknown referring dataset {dataset!r}; one of {', '.join(TASKS)}")
    return TASKS[dataset]


def open_dataset(dataset: str, root: str | Path, split: str, image_size: int, split_by: str | None = None):
    """The evaluation view of a dataset: no augmentation, original masks."""
    from sspsam.data import open_referring

    return open_referring(dataset, root, split, image_size, split_by)


SEMSEG_DATASETS = ("semseg", "ade150", "ade847", "voc20", "voc21", "pc59", "pc459", "cocostuff171")


def open_semseg(dataset: str, root: str | Path, split: str = "val"):
    """An OVSS benchmark as distributed; ``val`` means each one's validation split name."""
    import sspsam.data.semseg as S

    native = {"ade150": "validation", "ade847": "validation", "cocostuff171": "val2017"}
    split = native.get(dataset, split) if split == "val" else split
    if dataset == "semseg":
        return S.SemSegDataset(root, split)
    if dataset == "ade150":
        return S.ADE20K150(root, split)
    if dataset == "ade847":
        return S.ADE20K847(root, split)
    if dataset in ("voc20", "voc21"):
        return S.PascalVOC(root, split, num_classes=int(dataset[3:]))
    if dataset in ("pc59", "pc459"):
        return S.PascalContext(root, num_classes=int(dataset[2:]), split=split)
    if dataset == "cocostuff171":
        return S.COCOStuff171(root, split)
    raise ConfigError(f"unknown semantic-segmentation dataset {dataset!r}; one of {', '.join(SEMSEG_DATASETS)}")


def _meter(task: str):
    return {"res": RESMeter, "gres": GRESMeter, "phrasecut": PhraseCutMeter}[task]()


def _by_image(ds) -> list[list[int]]:
    """Sample indices grouped by image, in first-seen order (one encoder pass per group)."""
    groups: dict = {}
    for i in range(len(ds)):
        groups.setdefault(ds.info(i)["image_id"], []).append(i)
    return list(groups.values())


def evaluate(
    segmenter,
    dataset,
    task: str,
    *,
    max_samples: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Run ``segmenter`` over ``dataset``; returns ``{"metrics", "ious", "no_target", "gt_no_target",
    "n", "seconds"}`` (per-sample lists in dataset order)."""
    meter = _meter(task)
    groups = _by_image(dataset)
    total = len(dataset) if max_samples is None else min(len(dataset), int(max_samples))
    ious: list[float] = []
    pred_nt: list[bool] = []
    gt_nt: list[bool] = []
    done = 0
    start = time.perf_counter()
    for idx in groups:
        if done >= total:
            break
        idx = idx[: total - done]
        image, _ = dataset.raw(idx[0])
        texts = [dataset.info(i)["text"] for i in idx]
        usable = [k for k, t in enumerate(texts) if t.strip()]
        masks = np.zeros((len(idx), *image.shape[:2]), dtype=bool)
        nts = np.ones(len(idx), dtype=bool)  # an empty sentence can only be answered "nothing"
        if usable:
            try:
                res = segmenter.segment(image, [texts[k] for k in usable])
            except TextError:
                res = None
            if res is not None:
                masks[usable], nts[usable] = res.masks, res.no_target
        for k, i in enumerate(idx):
            gt = dataset.mask(i)
            if task == "gres":
                iou = meter.update(masks[k], gt, bool(nts[k]))
            else:
                iou = meter.update(masks[k], gt)
            ious.append(float(iou))
            pred_nt.append(bool(nts[k]))
            gt_nt.append(not gt.any())
        done += len(idx)
        if progress is not None:
            progress(done, total)
    metrics = meter.compute()
    if task == "gres":  # not a ReLA number: the RES-style mean IoU over the samples that have a target
        target_ious = [iou for iou, nt in zip(ious, gt_nt) if not nt]
        metrics["mIoU_target"] = float(np.mean(target_ious)) if target_ious else math.nan
    return {
        "metrics": metrics,
        "ious": ious,
        "no_target": pred_nt,
        "gt_no_target": gt_nt,
        "n": done,
        "seconds": time.perf_counter() - start,
    }


# ----------------------------------------------------------------------------------------------
# reporting


def precision_curve(ious: list[float], thresholds=CURVE_THRESHOLDS, strict: bool = False) -> list[float]:
    """Share of samples with IoU ≥ t (``strict``: > t, PhraseCut's rule) for each threshold."""
    a = np.asarray(ious, dtype=float)
    if a.size == 0:
        return [math.nan for _ in thresholds]
    return [float(np.mean(a > t if strict else a >= t)) for t in thresholds]


TABLE_KEYS = {
    "res": ["Pr@0.5", "Pr@0.6", "Pr@0.7", "Pr@0.8", "Pr@0.9", "oIoU", "mIoU"],
    "phrasecut": ["Pr@0.5", "Pr@0.6", "Pr@0.7", "Pr@0.8", "Pr@0.9", "oIoU", "mIoU"],
    "gres": ["gIoU", "cIoU", "N-acc", "T-acc", "Pr@0.7", "Pr@0.8", "Pr@0.9", "mIoU_target"],
}


def markdown_table(metrics: dict, task: str, dataset: str, split: str, model: str) -> str:
    """The paper's layout: one row per (model, dataset split), percentages to two decimals."""
    keys = TABLE_KEYS[task]
    label = f"{model} · {dataset} {split}"
    return format_table(metrics, keys, header=True, label=label) + "\n"


def plot_precision_curve(path: Path, values: list[float], title: str) -> Path:
    """``values`` = Pr@X for X in CURVE_THRESHOLDS (see :func:`precision_curve`) as a PNG (matplotlib, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.4), dpi=120)
    ax.plot(CURVE_THRESHOLDS, [100 * v for v in values], marker="o")
    for t, v in zip(CURVE_THRESHOLDS, values):
        if t in (0.5, 0.7, 0.9) and not math.isnan(v):
            ax.annotate(f"{100 * v:.1f}", (t, 100 * v), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    ax.set_xlabel("IoU threshold X")
    ax.set_ylabel("Pr@X (%)")
    ax.set_ylim(0, 105)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()

    def write(tmp):
        fig.savefig(tmp, format="png")

    atomic_write(path, write)
    plt.close(fig)
    return path


def json_safe(x):
    """Metrics for JSON: nan (an undefined metric) becomes null, numpy numbers plain ones, at any depth."""
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and math.isnan(x):
        return None
    return x


def write_report(out_dir: str | Path, result: dict, task: str, dataset: str, split: str, model: str) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = result["metrics"]
    ious = result["ious"]
    if task == "gres":  # the Pr@X of gRefCOCO counts target samples only
        ious_curve = [i for i, nt_gt in zip(ious, result["gt_no_target"]) if not nt_gt]
    else:
        ious_curve = ious
    curve = precision_curve(ious_curve, strict=task == "phrasecut")
    payload = {
        "model": model,
        "dataset": dataset,
        "split": split,
        "task": task,
        "metrics": metrics,
        "pr_curve": dict(zip([f"Pr@{t:g}" for t in CURVE_THRESHOLDS], curve)),
        "seconds": result["seconds"],
        "ious": ious,
    }
    files = {
        "json": atomic_write(out / "metrics.json", lambda p: Path(p).write_text(json.dumps(json_safe(payload), indent=1, default=float))),
        "table": atomic_write(out / "table.md", lambda p: Path(p).write_text(markdown_table(metrics, task, dataset, split, model))),
    }
    try:
        import matplotlib  # noqa: F401  (the [train] extra)
    except ImportError:  # the numbers are written; only the picture needs matplotlib
        import warnings

        warnings.warn("matplotlib is not installed (pip install 'sspsam[train]'): no pr_curve.png")
        return files
    files["plot"] = plot_precision_curve(out / "pr_curve.png", curve, f"{model} · {dataset} {split}")
    return files
