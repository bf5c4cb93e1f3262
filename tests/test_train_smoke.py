"""The tiny SSP-SAM must overfit one generated image/phrase/mask: gradients reach every SSP part."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from sspsam.models.build import build_model
from sspsam.data.shapes import make_scene, single_target_expressions
from sspsam.engine.step import collate, make_sample, param_groups, train_step


def _iou(model, batch) -> float:
    model.eval()
    with torch.no_grad():
        out = model(batch["image"], model.clip.tokenize(batch["text"]), batch["valid_hw"])
    pred = F.interpolate(out["mask_logits"], size=batch["mask"].shape[-2:], mode="bilinear")[:, 0] > 0
    gt = batch["mask"]
    return float((pred & gt).sum() / (pred | gt).sum())


def test_tiny_model_overfits_one_sample():
    torch.manual_seed(0)
    model = build_model("ssp-sam-tiny")
    model.freeze(["clip", "sam.image_encoder"])  # the paper's setting: only SSP + decoder learn
    scene = make_scene(3, width=128, height=96)
    exprs = single_target_expressions(scene)
    target = next(iter(exprs))
    batch = collate([make_sample(scene.render(), scene.mask(target), exprs[target][0].text, model.image_size)])
    assert batch["mask"].sum() > 100

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(param_groups(model, 1e-3, 1e-3), lr=1e-3)
    start, iou = time.time(), 0.0
    for step in range(300):
        train_step(model, batch, opt, model.config["loss"], clip_grad=1.0)
        if step % 10 == 9:
            iou = _iou(model, batch)
            if iou >= 0.9:
                break
    assert iou >= 0.9, f"IoU {iou:.3f} after {step + 1} steps"
    assert time.time() - start < 120

    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    for part in ["ssp_encoder.visual_adapter", "ssp_encoder.linguistic_adapter", "ssp_encoder.fusion",
                 "ssp_encoder.prompt_generator", "sam.mask_decoder"]:
        assert any(n.startswith(part) for n in moved), f"{part} did not learn"
    assert not any(n.startswith(("clip.", "sam.image_encoder.")) for n in moved), "frozen towers changed"
