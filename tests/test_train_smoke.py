"""The tiny SSP-SAM must overfit one generated image/phrase/mask through the shared loop: gradients
reach every SSP part, and the frozen towers stay put."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from sspsam.config import load_config
from sspsam.data.shapes import make_scene, single_target_expressions
from sspsam.engine.loop import LoopOptions, fit
from sspsam.engine.step import collate, make_sample
from sspsam.engine.tasks.referring import ReferringTask


def _iou(model, batch) -> float:
    model.eval()
    with torch.no_grad():
        out = model(batch["image"], model.clip.tokenize(batch["text"]), batch["valid_hw"])
    pred = F.interpolate(out["mask_logits"], size=batch["mask"].shape[-2:], mode="bilinear")[:, 0] > 0
    gt = batch["mask"]
    return float((pred & gt).sum() / (pred | gt).sum())


class OneSample(ReferringTask):
    """The referring task on one in-memory sample (repeated), instead of a data root."""

    def __init__(self, cfg, sample, copies: int = 8) -> None:
        super().__init__(cfg, None, lr=1e-3, decoder_lr=1e-3, warmup_steps=0, clip_grad=1.0, load_backbones=False)
        self.samples = [sample] * copies

    def open_data(self):
        return self.samples

    def dataset(self, core):
        return self.samples


def test_tiny_model_overfits_one_sample(tmp_path):
    cfg = load_config("ssp-sam-tiny")
    cfg["train"] = {"freeze": ["clip", "sam.image_encoder"]}  # the paper's setting: only SSP + decoder learn
    scene = make_scene(3, width=128, height=96)
    exprs = single_target_expressions(scene)
    target = next(iter(exprs))
    sample = make_sample(scene.render(), scene.mask(target), exprs[target][0].text, 128)
    batch = collate([sample])
    assert batch["mask"].sum() > 100

    task = OneSample(cfg, sample)
    model = {}
    ious = []

    def check(rec: dict) -> bool:  # every 10 steps; a good enough fit stops the loop
        if rec["step"] % 10:
            return False
        ious.append(_iou(model["core"], batch))
        return ious[-1] >= 0.9

    build = task.build

    def build_and_remember(seed):
        model["core"] = build(seed)
        model["before"] = {n: p.detach().clone() for n, p in model["core"].named_parameters()}
        return model["core"]

    task.build = build_and_remember
    start = time.time()
    # a constant learning rate: a cosine over 10^6 steps barely moves in 300
    res = fit(task, tmp_path / "run", LoopOptions(steps=300, total_steps=10**6, batch_size=1, seed=0, ckpt_every=0,
                                                  tensorboard=False), on_step=check)
    assert ious and ious[-1] >= 0.9, f"IoU {ious[-1] if ious else 0:.3f} after {res['step']} steps"
    assert time.time() - start < 120

    core, before = res["module"], model["before"]
    moved = {n for n, p in core.named_parameters() if not torch.equal(p, before[n])}
    for part in ["ssp_encoder.visual_adapter", "ssp_encoder.linguistic_adapter", "ssp_encoder.fusion",
                 "ssp_encoder.prompt_generator", "sam.mask_decoder"]:
        assert any(n.startswith(part) for n in moved), f"{part} did not learn"
    assert not any(n.startswith(("clip.", "sam.image_encoder.")) for n in moved), "frozen towers changed"
    assert (tmp_path / "run" / "model.pt").is_file() and not (tmp_path / "run" / "last.pt").exists()
