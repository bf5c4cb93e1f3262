"""``sspsam evaluate --protocol ssp-sam``: the numbers the official SSP-SAM ``test.py`` prints.

What the official ``engine.evaluate`` + ``metric/mask_op.py::mask_pair_iou`` compute, per
(image, sentence) sample, batch size 1:

* **Ground truth** in the 512×512 model frame: the original-size mask resized (PIL bilinear, as
  ``datasets/transforms.py::SAMMaskResize``) so its longest side is 1024, thresholded ``> 0``
  (so any pixel the bilinear kernel touches is target: the mask grows by about a pixel), padded
  bottom/right to 1024², then nearest-neighbour to 512² — every second row and column.
* **Prediction**: ``sigmoid(pred_masks) >= 0.5`` on the decoder's 512² output (SAM's low-res
  logits, bilinear to SAM's input square, bilinear to 512²). The padding is part of the frame:
  a prediction that spills into it counts in the union.
* **IoU** (``mask_iou_reftr``): with a non-empty GT, ``I/U`` in float32. With an empty GT (a
  gRefCOCO no-target expression), a prediction with fewer than 50 pixels is "no target" and
  scores IoU 1 with I = U = 0; otherwise IoU 0 with I = 0 and U = its pixel count.
* **mIoU** = mean IoU over all samples (the float32 running sum the official code keeps; it
  calls it ``G_iou(Mean_iou)``), **oIoU** = ΣI / ΣU (``C_iou(Overal_iou)``), **Pr@X** = share of
  samples with ``IoU >= X`` for X = 0.50, 0.55, …, 0.90 (``Mask_Pr@X``), no-target samples
  included. On a split with an empty GT it also reports ``No_target_acc`` = (samples with IoU
  exactly 1) / (no-target samples) and ``target_acc`` = (samples with 0 < IoU < 1) / (target
  samples) — as written there, a target sample predicted perfectly counts toward
  ``No_target_acc`` and not ``target_acc``, so these two are reproduced, not endorsed.

Differences from sspsam's default protocol (:mod:`sspsam.engine.evaluate`): that one compares
the Segmenter's final mask with the GT at the original image size (as LAVT/ReLA do), thresholds
at ``logit > 0``, lets the no-target head or the 50-pixel rule empty a prediction on every
sample, scores gRefCOCO with ReLA's gIoU/cIoU/N-acc/T-acc (Pr@X over target samples only) and
gives an empty union IoU 0 on RefCOCO. Here the per-sample IoU, oIoU and Pr@X reuse
:class:`~sspsam.engine.metrics.RESMeter` (``empty_union_as_one=True``, the official thresholds):
once a sub-50-pixel prediction on an empty GT is emptied, the official IoU is exactly that
meter's, and a float32 ratio and a float64 ratio of pixel counts up to 512² fall on the same
side of every threshold.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from sspsam.engine.metrics import RESMeter, format_table
from sspsam.models.registry import OFFICIAL_PROTOCOL

SAM_SIZE = 1024
EVAL_SIZE = 512
NO_TARGET_MIN_PIXELS = 50
#: the official ``iou_thrs``: 0.5 + 0.05·i, i = 0…8, built in float64 as there
THRESHOLDS = tuple(0.5 + 0.05 * i for i in range(9))
DATASETS = ("refcoco", "refcoco+", "refcocog", "refclef", "grefcoco")
TABLE_KEYS = ["Pr@0.5", "Pr@0.6", "Pr@0.7", "Pr@0.8", "Pr@0.9", "oIoU", "mIoU"]


# ----------------------------------------------------------------------------------------------
# the 512² frame


def _scaled_hw(h: int, w: int, size: int = SAM_SIZE) -> tuple[int, int]:
    """SAM's ``get_preprocess_shape``: longest side ``size``, the other rounded half up."""
    scale = size * 1.0 / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def _nearest_to_eval(square: np.ndarray) -> np.ndarray:
    t = torch.from_numpy(square.astype(np.float32))[None, None]
    return F.interpolate(t, size=(EVAL_SIZE, EVAL_SIZE), mode="nearest")[0, 0].numpy() > 0.5


def official_gt_mask(mask: np.ndarray) -> np.ndarray:
    """An original-size GT mask (nonzero = target) → bool 512×512 as the official loader builds it."""
    m = np.asarray(mask)
    h, w = m.shape
    nh, nw = _scaled_hw(h, w)
    resized = np.asarray(Image.fromarray((m != 0).astype(np.float32)).resize((nw, nh), Image.BILINEAR)) > 0
    square = np.zeros((SAM_SIZE, SAM_SIZE), dtype=bool)
    square[:nh, :nw] = resized
    return _nearest_to_eval(square)


def prediction_to_frame(mask: np.ndarray) -> np.ndarray:
    """An original-size predicted mask → bool 512×512 (nearest neighbour, so nothing grows): for
    predictors that do not expose the decoder's square logits."""
    m = np.asarray(mask) != 0
    h, w = m.shape
    nh, nw = _scaled_hw(h, w)
    resized = np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize((nw, nh), Image.NEAREST)) > 127
    square = np.zeros((SAM_SIZE, SAM_SIZE), dtype=bool)
    square[:nh, :nw] = resized
    return _nearest_to_eval(square)


# ----------------------------------------------------------------------------------------------
# the metric


class OfficialMeter:
    """The official ``engine.evaluate`` mask metrics, fed one sample at a time (see the module doc).

    ``update(pred512, gt512)`` takes bool masks in the official frame; ``add_counts`` the same
    sample as pixel counts. ``compute()`` gives fractions (``mIoU``, ``oIoU``, ``Pr@0.5`` …
    ``Pr@0.9`` with ``Pr@0.55`` etc. between, ``n``, and ``No_target_acc``/``target_acc`` when a
    no-target sample was seen); an undefined ratio is nan where the official code would divide
    by zero.
    """

    def __init__(self, min_pixels: int = NO_TARGET_MIN_PIXELS):
        self.min_pixels = int(min_pixels)
        self.res = RESMeter(empty_union_as_one=True, thresholds=THRESHOLDS)
        self.sum_iou32 = np.float32(0.0)
        self.n_empty_gt = self.n_target_gt = self.n_iou_one = self.n_iou_between = 0

    def update(self, pred: np.ndarray, gt: np.ndarray) -> float:
        p, g = np.asarray(pred, dtype=bool), np.asarray(gt, dtype=bool)
        if p.shape != g.shape:
            raise ValueError(f"prediction shape {p.shape} != ground-truth shape {g.shape}")
        inter = int(np.count_nonzero(p & g))
        return self.add_counts(inter, int(np.count_nonzero(p | g)), int(np.count_nonzero(g)), int(np.count_nonzero(p)))

    def add_counts(self, intersection: int, union: int, gt_pixels: int, pred_pixels: int) -> float:
        """One sample from its pixel counts; returns its IoU (the float32 value, as a float)."""
        if gt_pixels == 0 and pred_pixels < self.min_pixels:  # "no target" said and right
            intersection = union = 0
        self.res.update_counts(intersection, union)
        iou32 = np.float32(1.0) if union == 0 else np.float32(intersection) / np.float32(union)
        self.sum_iou32 = np.float32(self.sum_iou32 + iou32)
        if gt_pixels == 0:
            self.n_empty_gt += 1
        else:
            self.n_target_gt += 1
        if iou32 == 1:
            self.n_iou_one += 1
        elif 0 < iou32 < 1:
            self.n_iou_between += 1
        return float(iou32)

    def __len__(self) -> int:
        return len(self.res)

    def compute(self) -> dict:
        r = self.res.compute()
        n = r["n"]
        out = {"mIoU": float(self.sum_iou32) / n if n else math.nan, "oIoU": r["oIoU"]}
        out.update({k: v for k, v in r.items() if k.startswith("Pr@")})
        out["n"] = n
        if self.n_empty_gt:
            out["No_target_acc"] = self.n_iou_one / self.n_empty_gt
            out["target_acc"] = self.n_iou_between / self.n_target_gt if self.n_target_gt else math.nan
            out["n_no_target"] = self.n_empty_gt
        return out


# ----------------------------------------------------------------------------------------------
# predictions in the 512² frame


@torch.inference_mode()
def predict_frame(segmenter, image: np.ndarray, texts: list[str], batch_size: int = 16) -> np.ndarray:
    """bool [T, 512, 512]: each phrase's mask in the official frame.

    An SSP-SAM :class:`~sspsam.predict.segmenter.Segmenter` gives the decoder's square logits
    exactly as the official model's ``pred_masks`` (a no-target head, when the model has one
    and says "nothing", empties its mask: that is the model's answer). Any other predictor's
    original-size mask is carried into the frame by nearest neighbour. The ground truth is
    always built for SAM's 1024 square, so every model is scored against the same masks; a
    model with a smaller input square covers the same (letterboxed) area of the frame.
    """
    from sspsam.predict.segmenter import Segmenter

    if not isinstance(segmenter, Segmenter):
        res = segmenter.segment(image, texts)
        return np.stack([prediction_to_frame(m) for m in np.asarray(res.masks)])
    from sspsam.models.ssp_sam.model import official_mask_logits
    from sspsam.predict.base import check_finite

    segmenter.set_image(image, len(texts))
    enc, model = segmenter._cache, segmenter.model
    out_masks = []
    with segmenter._autocast():
        for i in range(0, len(texts), batch_size):
            chunk = texts[i : i + batch_size]
            text = model.encode_text(model.tokenize(chunk).to(segmenter.device))
            out = model.decode(enc.features, text, torch.zeros(len(chunk), dtype=torch.long, device=segmenter.device))
            low = out["mask_logits"][:, 0].float()
            check_finite(segmenter.name, low, out.get("no_target_logit"))
            pred = torch.sigmoid(official_mask_logits(low[:, None], model.image_size)[:, 0]) >= 0.5
            if out.get("no_target_logit") is not None:
                pred[out["no_target_logit"].float().sigmoid() > segmenter.no_target_prob] = False
            out_masks.append(pred.cpu().numpy())
    return np.concatenate(out_masks)


# ----------------------------------------------------------------------------------------------
# the loop


def evaluate_official(segmenter, dataset, *, max_samples: int | None = None,
                      progress: Callable[[int, int], None] | None = None) -> dict:
    """Run ``segmenter`` over ``dataset`` (any sspsam referring reader) under the official
    protocol. Images are encoded once for all their sentences; the samples are scored in dataset
    order, as the official loader visits them. Returns ``{"metrics", "ious", "n", "seconds"}``."""
    from sspsam.data.official_anns import official_phrase

    total = len(dataset) if max_samples is None else min(len(dataset), int(max_samples))
    groups: dict = {}
    for i in range(total):
        groups.setdefault(dataset.info(i)["image_id"], []).append(i)
    counts: dict[int, tuple[int, int, int, int]] = {}
    start = time.perf_counter()
    done = 0
    for idx in groups.values():
        image, _ = dataset.raw(idx[0])
        # the sentence as stored (the official reader keeps it beside its already-cut text): the cut is not idempotent
        texts = [official_phrase(info.get("sentence", info["text"])) for info in map(dataset.info, idx)]
        preds = predict_frame(segmenter, image, texts)
        for k, i in enumerate(idx):
            g = official_gt_mask(dataset.mask(i))
            p = preds[k]
            counts[i] = (int(np.count_nonzero(p & g)), int(np.count_nonzero(p | g)), int(np.count_nonzero(g)), int(np.count_nonzero(p)))
        done += len(idx)
        if progress is not None:
            progress(done, total)
    meter = OfficialMeter()
    ious = [meter.add_counts(*counts[i]) for i in range(total)]
    return {"metrics": meter.compute(), "ious": ious, "n": total, "seconds": time.perf_counter() - start}


# ----------------------------------------------------------------------------------------------
# reporting


def table_keys(metrics: dict) -> list[str]:
    return TABLE_KEYS + (["No_target_acc", "target_acc"] if "No_target_acc" in metrics else [])


def markdown_table(metrics: dict, model: str, dataset: str, split: str, variant: str | None = None) -> str:
    """Our row beside the paper's (its cells "—" where no figure is known), percentages to two decimals.
    ``variant``: the model's config name, which says which of the paper's models it is (a
    checkpoint's display name, e.g. a hub name, does not)."""
    from sspsam.engine.paper_numbers import SOURCE, paper_row

    keys = table_keys(metrics)
    lines = format_table(metrics, keys, header=True, label=f"{model} · {dataset} {split} (ssp-sam protocol)").splitlines()
    row = paper_row(variant or model, dataset, split) or {}
    cells = [("—" if row.get(k) is None else f"{float(row[k]):.2f}") for k in keys]
    lines.append("| " + " | ".join([f"paper: {SOURCE}", *cells]) + " |")
    return "\n".join(lines) + "\n"


def write_report(out_dir: str | Path, result: dict, model: str, dataset: str, split: str, layout: str,
                 variant: str | None = None) -> dict[str, Path]:
    from sspsam.engine.evaluate import json_safe
    from sspsam.engine.paper_numbers import SOURCE, paper_row
    from sspsam.io.checkpoint import atomic_write

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "model": model, "dataset": dataset, "split": split, "protocol": OFFICIAL_PROTOCOL, "layout": layout,
        "metrics": result["metrics"], "paper": {"source": SOURCE, "row": paper_row(variant or model, dataset, split)},
        "seconds": result["seconds"], "ious": result["ious"],
    }
    table = markdown_table(result["metrics"], model, dataset, split, variant)
    return {
        "json": atomic_write(out / "metrics.json", lambda p: Path(p).write_text(json.dumps(json_safe(payload), indent=1, default=float))),
        "table": atomic_write(out / "table.md", lambda p: Path(p).write_text(table)),
    }
