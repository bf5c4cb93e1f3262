"""The official SSP-SAM training recipe (``train.recipe: official``): schedule, loss, freezing, stages.

Every expected number below is worked out by hand from the official code's formulas (written out
next to it), not produced by running sspsam.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

import sspsam.engine.recipe as recipe
from sspsam.config import load_config
from sspsam.engine.losses import box_losses, ssp_loss
from sspsam.engine.trainer import official_schedule, train


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------------------------
# (a) the schedule


def _lrs_by_epoch(stage, base_lrs, steps_per_epoch, epochs):
    """Drive a real AdamW + LambdaLR as the trainer does; the lr of every group at the first
    optimizer step of each epoch (and check it is constant through the epoch)."""
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in base_lrs]
    opt = torch.optim.AdamW([{"params": [p], "lr": b} for p, b in zip(params, base_lrs)], lr=base_lrs[0])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, official_schedule(stage, base_lrs, steps_per_epoch))
    out = []
    for e in range(epochs):
        seen = []
        for _ in range(steps_per_epoch):
            seen.append([g["lr"] for g in opt.param_groups])
            opt.step()
            sched.step()
        assert all(s == seen[0] for s in seen), f"lr changed inside epoch {e}"
        out.append(seen[0])
    return out


def test_official_schedule_stage2_both_groups():
    st = recipe.stage(load_config("ssp-sam-b16-h"), 2)
    assert (st.epochs, st.warmup_epochs, st.min_lr, st.warmup_lr) == (80, 5, 1e-6, 1e-6)
    lrs = _lrs_by_epoch(st, [1e-4, 1e-5], steps_per_epoch=2, epochs=81)
    # timm CosineLRScheduler(t_initial=80, lr_min=1e-6, warmup_t=5, warmup_lr_init=1e-6), per epoch e:
    #   e < 5:  lr = 1e-6 + e * (base - 1e-6) / 5         (SSP group step 1.98e-5, decoder group 1.8e-6)
    #   e >= 5: lr = 1e-6 + 0.5 * (base - 1e-6) * (1 + cos(pi * e / 80))   (cosine NOT shifted by the warm-up)
    #   e >= 80: lr = 1e-6
    # cos(pi/16) = 0.9807852804, cos(79 pi/80) = -0.9992290362
    expected = {
        0: (1e-6, 1e-6),                                   # start: warmup_lr_init for both groups
        2: (1e-6 + 2 * 1.98e-5, 1e-6 + 2 * 1.8e-6),        # inside warm-up: 4.06e-5, 4.6e-6
        4: (8.02e-5, 8.2e-6),                              # last warm-up epoch: 1e-6 + 4 * step
        5: (1e-6 + 49.5e-6 * 1.9807852804, 1e-6 + 4.5e-6 * 1.9807852804),  # end of warm-up: 9.90489e-5, 9.91353e-6
        40: (5.05e-5, 5.5e-6),                             # mid-training: cos(pi/2) = 0 -> 1e-6 + half the span
        79: (1e-6 + 49.5e-6 * 0.0007709638, 1e-6 + 4.5e-6 * 0.0007709638),  # last epoch: 1.03816e-6, 1.00347e-6
        80: (1e-6, 1e-6),                                  # floor (after the last scheduler step)
    }
    for e, (a, b) in expected.items():
        assert lrs[e][0] == pytest.approx(a, rel=1e-9), e
        assert lrs[e][1] == pytest.approx(b, rel=1e-9), e
    assert max(lr for lr, _ in lrs) < 1e-4  # warmup_prefix=False: the peak is never reached


def test_official_schedule_stage1_has_no_warmup():
    st = recipe.stage(load_config("ssp-sam-vitb"), 1)
    assert (st.epochs, st.warmup_epochs, st.box_only, st.dataset) == (20, 0, True, "refcoco-merged")
    lrs = _lrs_by_epoch(st, [1e-4, 1e-5], steps_per_epoch=2, epochs=20)
    # warmup_t=0: cosine from epoch 0; cos(19 pi/20) = -0.9876883406
    assert lrs[0] == pytest.approx([1e-4, 1e-5], rel=1e-12)
    assert lrs[10] == pytest.approx([5.05e-5, 5.5e-6], rel=1e-12)
    assert lrs[19] == pytest.approx([1e-6 + 49.5e-6 * 0.0123116594, 1e-6 + 4.5e-6 * 0.0123116594], rel=1e-8)


def test_paper_variants_use_the_official_recipe_and_tiny_does_not():
    for name in ("ssp-sam-vitb", "ssp-sam-b16-h", "ssp-sam-l14-336-h", "ssp-sam-mobile"):
        cfg = load_config(name)
        assert recipe.is_official(cfg), name
        assert cfg["train"]["freeze"] == ["clip", "sam.image_encoder", "sam.prompt_encoder"]
        assert (cfg["train"]["clip_grad"], cfg["train"]["weight_decay"]) == (0.1, 1e-4)
        assert cfg["loss"]["reduction"] == "official" and cfg["loss"]["mask_size"] == 512
        for k in ("scale_range", "colour_jitter", "flip"):
            assert k not in cfg["train"]  # sspsam's own augmentations are opt-in
    tiny = load_config("ssp-sam-tiny")
    assert not recipe.is_official(tiny) and "reduction" not in tiny["loss"]


# ----------------------------------------------------------------------------------------------
# (b) the loss


LN2, LN43 = math.log(2.0), math.log(4.0 / 3.0)
W = {"dice": 4.0, "focal": 4.0, "focal_alpha": 0.25, "focal_gamma": 2.0, "box_l1": 5.0, "box_giou": 2.0}


def _case():
    """Two samples of 2x2 logits. Sample 0: logits [[0, 0], [ln 3, -ln 3]] -> p = [.5, .5, .75, .25],
    target [[1, 0], [1, 0]]. Sample 1: logits 0 (p = .5), empty target."""
    l3 = math.log(3.0)
    logits = torch.tensor([[[0.0, 0.0], [l3, -l3]], [[0.0, 0.0], [0.0, 0.0]]])
    mask = torch.tensor([[[1, 0], [1, 0]], [[0, 0], [0, 0]]], dtype=torch.bool)
    # cxcywh: box 0 pred (.5,.5,.2,.2) -> xyxy (.4,.4,.6,.6); gt (.6,.5,.2,.4) -> (.5,.3,.7,.7). box 1 exact.
    pred = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.2, 0.2]])
    gt = torch.tensor([[0.6, 0.5, 0.2, 0.4], [0.3, 0.3, 0.2, 0.2]])
    return logits, mask, pred, gt


# dice (+1 smoothing), per sample, mean over samples:
#   sample 0: 1 - (2*(.5+.75) + 1) / ((.5+.5+.75+.25) + 2 + 1) = 1 - 3.5/5 = 0.3
#   sample 1: 1 - (0 + 1) / (2 + 0 + 1) = 2/3
DICE = (0.3 + 2.0 / 3.0) / 2
# focal = alpha_t (1 - p_t)^2 (-ln p_t), alpha_t = .25 (t=1) / .75 (t=0), mean over all 8 pixels:
#   sample 0: .25*.25*ln2 + .75*.25*ln2 + .25*.0625*ln(4/3) + .75*.0625*ln(4/3) = .25 ln2 + .0625 ln(4/3)
#   sample 1: 4 * .75*.25*ln2 = .75 ln2
FOCAL = (LN2 + 0.0625 * LN43) / 8
# L1: |.5-.6| + 0 + 0 + |.2-.4| = 0.3 for box 0, 0 for box 1. Official: summed over coordinates,
# divided by the number of boxes (2) -> 0.15; sspsam's old mean over the 8 numbers -> 0.0375 (4x smaller).
L1_OFFICIAL, L1_MEAN = 0.15, 0.0375
# GIoU box 0: inter (.6-.5)*(.6-.4) = .02; areas .04 and .08 -> union .10, IoU .2;
# hull (.7-.4)*(.7-.3) = .12 -> GIoU = .2 - (.12-.10)/.12 = 1/30; box 1: GIoU 1. Mean of 1-GIoU = (29/30)/2.
GIOU = (29.0 / 30.0) / 2


def test_official_loss_hand_computed():
    logits, mask, pred, gt = _case()
    out = {"mask_logits": logits[:, None], "box": pred}
    got = ssp_loss(out, mask, gt, torch.zeros(2, dtype=torch.bool), {**W, "reduction": "official"})
    assert float(got["dice"]) == pytest.approx(4 * DICE, rel=1e-6)
    assert float(got["focal"]) == pytest.approx(4 * FOCAL, rel=1e-6)
    assert float(got["box_l1"]) == pytest.approx(5 * L1_OFFICIAL, rel=1e-6)
    assert float(got["box_giou"]) == pytest.approx(2 * GIOU, rel=1e-6)
    assert float(got["total"]) == pytest.approx(4 * DICE + 4 * FOCAL + 5 * L1_OFFICIAL + 2 * GIOU, rel=1e-6)
    # the default reduction keeps its old, 4x smaller L1 (existing configs and runs unchanged)
    old = ssp_loss(out, mask, gt, torch.zeros(2, dtype=torch.bool), W)
    assert float(old["box_l1"]) == pytest.approx(5 * L1_MEAN, rel=1e-6)
    assert float(got["box_l1"]) == pytest.approx(4 * float(old["box_l1"]), rel=1e-6)
    # stage 1's box-only objective: the same two box terms
    b = box_losses(pred, gt, {**W, "reduction": "official"})
    assert float(b["total"]) == pytest.approx(5 * L1_OFFICIAL + 2 * GIOU, rel=1e-6)


def test_mask_losses_at_the_official_mask_size():
    """loss.mask_size resamples logits bilinearly and the target by nearest neighbour. A 4x4 case
    built from the 2x2 one: logits constant on 2x2 blocks (a bilinear halving averages each block
    -> the 2x2 logits), target set only on each block's top-left pixel (nearest halving picks it)."""
    logits, mask, pred, gt = _case()
    big_logits = logits.repeat_interleave(2, 1).repeat_interleave(2, 2)
    big_mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    big_mask[:, ::2, ::2] = mask
    out = {"mask_logits": big_logits[:, None], "box": pred}
    w = {**W, "reduction": "official", "mask_size": 2}
    got = ssp_loss(out, big_mask, gt, torch.zeros(2, dtype=torch.bool), w)
    assert float(got["dice"]) == pytest.approx(4 * DICE, rel=1e-6)
    assert float(got["focal"]) == pytest.approx(4 * FOCAL, rel=1e-6)
    full = ssp_loss(out, big_mask, gt, torch.zeros(2, dtype=torch.bool), {**W, "reduction": "official"})
    assert float(full["dice"]) != pytest.approx(4 * DICE, rel=1e-3)  # at 4x4 it is another number


def test_unknown_reduction_is_refused():
    logits, mask, pred, gt = _case()
    with pytest.raises(ValueError, match="reduction"):
        ssp_loss({"mask_logits": logits[:, None], "box": pred}, mask, gt, torch.zeros(2, dtype=torch.bool),
                 {**W, "reduction": "sum"})


# ----------------------------------------------------------------------------------------------
# (c) freezing, stages, data


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    from sspsam.data import generate_refer

    root = tmp_path_factory.mktemp("refer")
    generate_refer(root, "refcoco", n_images=6, seed=0)
    return root


def _tiny_official(stage2: dict, stage1: dict | None = None):
    cfg = load_config("ssp-sam-tiny")
    vitb = load_config("ssp-sam-vitb")
    cfg["train"] = {**vitb["train"], "stages": {2: stage2, **({1: stage1} if stage1 else {})}}
    cfg["loss"] = {**vitb["loss"], "mask_size": 64}
    return cfg


def _grads(module, prefix):
    return [p.grad is not None for n, p in module.named_parameters() if n.startswith(prefix)]


def test_decoder_frozen_for_the_first_epochs_prompt_encoder_always(data_root, tmp_path):
    from sspsam.models.build import build_model
    from sspsam.engine.trainer import seed_everything

    cfg = _tiny_official({"epochs": 3, "warmup_epochs": 1, "freeze_decoder_epochs": 1})
    kw = dict(batch_size=8, lr=1e-3, decoder_lr=1e-4, seed=0, load_backbones=False, tensorboard=False, ckpt_every=1000)
    seed_everything(0)
    init = build_model(cfg).state_dict()
    a = train(cfg, data_root, tmp_path / "r", steps=1, **kw)  # epoch 0: decoder frozen
    m = a["module"]
    spe = json.loads((tmp_path / "r" / "log.jsonl").read_text().splitlines()[0])
    assert spe["epoch"] == 0
    assert not any(p.requires_grad for p in m.sam.mask_decoder.parameters())
    assert not any(_grads(m, "sam.mask_decoder.")) and not any(_grads(m, "sam.prompt_encoder."))
    assert not any(_grads(m, "clip.")) and not any(_grads(m, "sam.image_encoder."))
    assert all(_grads(m, "ssp_encoder.prompt_generator."))
    sd = m.state_dict()
    assert all(torch.equal(sd[k], init[k]) for k in init if k.startswith("sam."))
    assert not all(torch.equal(sd[k], init[k]) for k in init if k.startswith("ssp_encoder."))

    # resume into epoch 1 (after the freeze): the decoder now receives gradients and moves
    n = len(a["losses"])
    from sspsam.engine.trainer import read_train_state

    total = read_train_state(tmp_path / "r" / "last.pt")["total_steps"]
    spe = total // 3
    b = train(cfg, data_root, tmp_path / "r", steps=spe + 1, resume=True, **kw)
    m = b["module"]
    assert b["losses"][-1]["epoch"] == 1 and n == 1
    # every decoder parameter trains again (the IoU head, which no loss reaches, gets no gradient)
    assert all(p.requires_grad for p in m.sam.mask_decoder.parameters())
    assert all(_grads(m, "sam.mask_decoder.transformer.")) and all(_grads(m, "sam.mask_decoder.output_upscaling."))
    assert not any(_grads(m, "sam.prompt_encoder."))
    sd = m.state_dict()
    assert not all(torch.equal(sd[k], init[k]) for k in init if k.startswith("sam.mask_decoder."))
    assert all(torch.equal(sd[k], init[k]) for k in init if k.startswith(("sam.prompt_encoder.", "sam.image_encoder.", "clip.")))
    # the logged lrs follow the stage's schedule: epoch 0 = warmup_lr for both groups, epoch 1 = cosine
    log = [json.loads(x) for x in (tmp_path / "r" / "log.jsonl").read_text().splitlines()]
    assert log[0]["lr"] == pytest.approx(1e-6) and log[0]["decoder_lr"] == pytest.approx(1e-6)
    c = 1 + math.cos(math.pi / 3)  # epoch 1 of 3: 1e-6 + 0.5 (base - 1e-6)(1 + cos(pi/3))
    assert log[-1]["lr"] == pytest.approx(1e-6 + 0.5 * (1e-3 - 1e-6) * c)
    assert log[-1]["decoder_lr"] == pytest.approx(1e-6 + 0.5 * (1e-4 - 1e-6) * c)


def test_stage1_box_only_on_merged_data_then_stage2_from_its_checkpoint(tmp_path):
    from sspsam.models.build import read_sspsam_checkpoint
    from sspsam.io.checkpoint import save_checkpoint
    from sspsam.data import generate_refer

    root = tmp_path / "refer"
    generate_refer(root, "refcoco", n_images=6, seed=0)
    cfg = _tiny_official({"epochs": 2, "warmup_epochs": 1, "freeze_decoder_epochs": 0},
                         {"epochs": 1, "warmup_epochs": 0, "freeze_decoder_epochs": 1})
    kw = dict(batch_size=8, lr=1e-3, decoder_lr=1e-4, seed=0, load_backbones=False, tensorboard=False)
    s1 = train(cfg, root, tmp_path / "s1", stage=1, steps=2, **kw)  # stage 1 reads refcoco-merged by default
    assert set(s1["losses"][0]) == {"step", "lr", "decoder_lr", "epoch", "box_l1", "box_giou", "total"}
    assert s1["losses"][0]["lr"] == pytest.approx(1e-3)  # no warm-up in stage 1
    assert not any(_grads(s1["module"], "sam."))  # SAM takes no part in stage 1
    ck = read_sspsam_checkpoint(tmp_path / "s1" / "model.pt")
    w1 = ck["state_dict"]
    # mark a frozen tensor so loading it is visible (stage 2 never changes it)
    w1["sam.prompt_encoder.no_mask_embed.weight"] = w1["sam.prompt_encoder.no_mask_embed.weight"] + 1.0
    save_checkpoint(tmp_path / "s1" / "model.pt", ck["config"], w1)

    s2 = train(cfg, root, tmp_path / "s2", stage=2, steps=1, init=tmp_path / "s1" / "model.pt", **kw)
    assert {"dice", "focal", "box_l1", "box_giou"} <= set(s2["losses"][0])
    assert s2["losses"][0]["lr"] == pytest.approx(1e-6)  # epoch 0 of a warm-up: warmup_lr
    sd = s2["module"].state_dict()
    assert torch.equal(sd["sam.prompt_encoder.no_mask_embed.weight"], w1["sam.prompt_encoder.no_mask_embed.weight"])
    # the trained SSP encoder started from stage 1's weights: one AdamW step at lr 1e-6 moves each
    # weight by at most ~1e-6 (+ decay), while stage 1 (lr 1e-3) had moved them much further from the init
    keys = [k for k in w1 if k.startswith("ssp_encoder.prompt_generator.") and w1[k].is_floating_point()]
    assert max(float((sd[k] - w1[k]).abs().max()) for k in keys) < 1e-5
    from sspsam.models.build import build_model
    from sspsam.engine.trainer import seed_everything

    seed_everything(0)
    fresh = build_model(cfg).state_dict()
    assert max(float((fresh[k] - w1[k]).abs().max()) for k in keys) > 1e-4


def test_merged_pretraining_set_drops_held_out_images(tmp_path):
    from sspsam.data import RefCOCODataset, generate_refer
    from sspsam.data.merged import MergedRefCOCODataset

    generate_refer(tmp_path, "refcoco", n_images=8, seed=0)
    generate_refer(tmp_path, "refcocog", split_by="umd", n_images=8, seed=0)
    ds = MergedRefCOCODataset(tmp_path, image_size=64)
    held = set()
    for name, by in (("refcoco", "unc"), ("refcocog", "umd")):
        held |= {r.image_id for r in RefCOCODataset(tmp_path, name, by, split=None, image_size=64).records if r.split != "train"}
    train_imgs = {r.image_id for name, by in (("refcoco", "unc"), ("refcocog", "umd"))
                  for r in RefCOCODataset(tmp_path, name, by, split="train", image_size=64).records}
    got = {r.image_id for r in ds.records}
    assert got == train_imgs - held and got
    assert set(ds.sources) == {"refcoco", "refcocog"}
    assert all(r.split == "train" for r in ds.records)
    assert ds[0]["image"].shape == (3, 64, 64)
