"""ESC-Net / SAM-MI modules on tiny configs, their hand-checkable parts, ESC-Net's paper
configuration (stage shapes at 24×24, the shifted-window mask, per-region prompts, learning-rate
groups, CAT-Seg's loss), the bundled OVSS demo's outputs, and the semseg readers."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sspsam.config import load_config
from sspsam.data import DatasetLayoutError
from sspsam.data.semseg import (
    ADE20K150,
    ADE20K847,
    COCOStuff171,
    PascalContext,
    PascalVOC,
    SemSegDataset,
    generate_semseg,
)
from sspsam.data.shapes import COLOURS
from sspsam.models.cost import class_embeddings
from sspsam.models.escnet.escnet import PseudoPromptGenerator, kmeans
from sspsam.models.common.cost_aggregation import SwinTransformerBlock, shifted_window_mask
from sspsam.engine.evaluate_ovss import evaluate_ovss, format_iou_table
from sspsam.engine.train_ovss import catseg_bce_loss, param_groups, train_ovss
from sspsam.models.build import _model_from_checkpoint, build_model
from sspsam.models.sam_mi.smagg import shallow_mask_aggregation


@pytest.fixture(scope="module", params=["escnet-tiny", "sam-mi-tiny"])
def tiny(request):
    torch.manual_seed(0)
    return build_model(load_config(request.param))


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("semseg")
    generate_semseg(root, n=3, size=128, seed=5)
    return root


# ---------------------------------------------------------------------------------------- models


def test_model_contract_and_shapes(tiny):
    classes = ["background", "red", "blue"]
    emb = class_embeddings(tiny.clip, classes)
    with torch.no_grad():
        out = tiny(torch.rand(2, 3, 128, 128) * 255, emb)
    assert tiny.image_size == tiny.sam.img_size == 128
    assert tiny.config["model"] in ("escnet", "sam-mi")
    assert out["logits"].shape == (2, 3, 64, 64)  # 16x16 CLIP grid, two 2x decoder stages
    assert torch.isfinite(out["logits"]).all()
    assert all(a.shape[:2] == (2, 3) for a in out["aux_logits"])


def test_model_backward_and_freeze():
    torch.manual_seed(0)
    model = build_model(load_config("escnet-tiny"))
    model.freeze(["clip"])
    emb = class_embeddings(model.clip, ["a", "b"])
    model(torch.rand(1, 3, 128, 128) * 255, emb)["logits"].sum().backward()
    assert all(p.grad is None for p in model.clip.parameters())
    assert model.sam.mask_decoder.transformer.layers[0].self_attn.q_proj.weight.grad is not None  # the SAM block trains
    assert model.decoder.head.weight.grad is not None


def test_kmeans_two_clusters():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(20, 2, generator=g) * 0.5
    b = torch.randn(20, 2, generator=g) * 0.5 + 10
    far = torch.full((5, 2), 100.0)  # invalid points must be ignored
    pts = torch.cat([a, b, far])[torch.randperm(45, generator=g)]
    valid = (pts < 50).all(1)
    cent, assign = kmeans(pts[None], valid[None], k=2)
    cent = cent[0][cent[0, :, 0].argsort()]
    assert torch.allclose(cent[0], a.mean(0), atol=1e-4)
    assert torch.allclose(cent[1], b.mean(0), atol=1e-4)
    assert (assign[0][~valid] == -1).all()
    near_b = pts[:, 0] > 5
    assert len(set(assign[0][valid & near_b].tolist())) == 1 and len(set(assign[0][valid & ~near_b].tolist())) == 1
    again, _ = kmeans(pts[None], valid[None], k=2)  # deterministic
    assert torch.equal(again[0][again[0, :, 0].argsort()], cent)


def test_pseudo_prompts_pick_the_argmax_of_each_region():
    score = torch.zeros(1, 2, 8, 8)
    score[0, 0, 1:3, 0:3] = 1.0  # class 0: two blobs, peaks at (x=1, y=2) and (x=6, y=5)
    score[0, 0, 2, 1] = 2.0
    score[0, 0, 4:7, 5:8] = 1.0
    score[0, 0, 5, 6] = 3.0
    score[0, 1] = 0.5  # class 1 wins where class 0 scores 0
    ppg = PseudoPromptGenerator(num_regions=2, alpha=0.5, temperature=0.1)
    prob, points, labels = ppg.points(score)
    assert prob.shape == (1, 2, 8, 8)
    assert sorted(map(tuple, points[0, 0].tolist())) == [(1.0, 2.0), (6.0, 5.0)]
    assert labels[0, 0].tolist() == [1, 1]
    assert (labels[0, 1] == 1).all()


def test_pseudo_prompts_empty_class_is_not_a_point():
    score = torch.zeros(1, 2, 4, 4)
    score[0, 0] = 5.0  # class 1 never exceeds alpha
    _, _, labels = PseudoPromptGenerator(num_regions=3, alpha=0.5, temperature=0.1).points(score)
    assert labels[0, 1].tolist() == [-1, -1, -1]


# ------------------------------------------------------------------ ESC-Net, paper configuration

# The paper's modules on the tiny widths, so the trainer and the groups can be exercised in seconds.
PAPER_KEYS = {
    "dense": "clip", "clip_size": 128, "spatial": "swin", "window": 4, "appearance_guidance_dim": 16, "class_pool": 2,
    "decoder": "catseg", "guidance_proj_dims": [8, 8], "finetune": "attention", "templates": ["A photo of a {} in the scene"],
    "prompts": {"num_regions": 3, "alpha": 0.5, "temperature": 0.05, "iters": 5, "mask": "region"},
}


def _paper_tiny():
    cfg = load_config("escnet-tiny")
    cfg["escnet"].update(PAPER_KEYS)
    cfg["train"].update({"lr": 2e-4, "backbone_lr": 2e-6, "loss": "catseg", "aux_weight": 0.0})
    torch.manual_seed(0)
    return cfg, build_model(cfg)


def test_escnet_vitb_stage_shapes_at_paper_resolution():
    """ViT-B/16 fed 384 px with interpolated positions: a 24×24 cost map through every stage.
    Depths that do not change a shape are cut (CLIP vision 8 blocks, enough for the taps 3 and 7;
    text 1 block; the SAM image encoder, which ESC-Net never runs, 1 small block)."""
    cfg = load_config("escnet-vitb")
    cfg["clip"]["vision"] = {"layers": 8}
    cfg["clip"]["text"] = {"layers": 1}
    cfg["sam"]["encoder_overrides"] = {"depth": 1, "embed_dim": 64, "num_heads": 1, "global_attn_indexes": [0]}
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    shapes = {}

    def keep(name):
        def hook(module, args, out):
            shapes[name] = tuple((out[0] if isinstance(out, (tuple, list)) else out).shape)
        return hook

    blk = model.blocks[0]
    for name, module in {"ppg": blk.ppg, "fuse": blk.fuse, "swin": blk.vlf.spatial, "vlf": blk.vlf, "guidance": model.guidance,
                         "appearance": model.appearance, "decoder_up1": model.decoder.convs[0]}.items():
        module.register_forward_hook(keep(name))
    k, n_o = 3, 5
    with torch.no_grad():
        out = model(torch.rand(1, 3, 384, 384) * 255, torch.randn(k, 512))
    assert model.clip.image_size == 224 and model.clip_size == 384
    assert out["corr"].shape == (1, k, 24, 24)  # 384 / 16
    assert shapes["ppg"] == (k, n_o + 1, 256)  # sparse: one point per region + SAM's padding point
    assert out["prompts"]["regions"].shape == (1, k, n_o, 24, 24)
    assert shapes["fuse"] == (k, 128, 24, 24)
    assert shapes["swin"] == (k, 128, 24, 24) and shapes["vlf"] == (1, k, 128, 24, 24)
    assert shapes["appearance"] == (1, 128, 24, 24)
    assert shapes["guidance"] == (1, 256, 48, 48)  # block 3 tokens, ×2 transposed conv
    assert shapes["decoder_up1"] == (k, 64, 48, 48)
    assert out["logits"].shape == (1, k, 96, 96)
    assert [a.shape for a in out["aux_logits"]] == [(1, k, 24, 24)] * 4
    g = model.guidance.proj[1](torch.zeros(1, 768, 24, 24))
    assert g.shape == (1, 128, 96, 96)  # block 7 tokens, ×4


def test_escnet_l14_cost_grid_is_24():
    from sspsam.backbones.clip import open_clip_config

    cfg = load_config("escnet-l14")
    vision = open_clip_config(cfg["clip"]["arch"])["vision_cfg"]
    assert cfg["escnet"]["clip_size"] // vision["patch_size"] == 24
    assert max(cfg["escnet"]["guidance_layers"]) < vision["layers"]


def test_shifted_window_mask_hand_built():
    m = -100.0
    expect = torch.tensor([
        [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]],  # top-left window: one region
        [[0, m, 0, m], [m, 0, m, 0], [0, m, 0, m], [m, 0, m, 0]],  # top-right: columns 2 | 3 were apart
        [[0, 0, m, m], [0, 0, m, m], [m, m, 0, 0], [m, m, 0, 0]],  # bottom-left: rows 2 | 3
        [[0, m, m, m], [m, 0, m, m], [m, m, 0, m], [m, m, m, 0]],  # bottom-right: four wrapped corners
    ])
    assert torch.equal(shifted_window_mask(4, 4, 2, 1), expect)
    assert torch.equal(shifted_window_mask(4, 4, 2, 0), torch.zeros(4, 4, 4))


def test_shifted_window_attention_does_not_leak_across_the_wrap():
    """After the cyclic shift, image corners (0,0), (0,3), (3,0), (3,3) share a window; the mask
    keeps them apart, while true neighbours in a shifted window do mix."""
    torch.manual_seed(0)
    block = SwinTransformerBlock(8, heads=2, window=2, shift=1).eval()
    x = torch.randn(1, 8, 4, 4)
    bump = torch.randn(8) * 3  # not a constant: LayerNorm would erase that
    y = x.clone()
    y[0, :, 0, 0] += bump
    with torch.no_grad():
        a, b = block(x), block(y)
    changed = (a - b).abs().amax(1)[0] > 1e-6
    assert changed[0, 0] and changed.sum() == 1  # only the pixel itself: no leak to the other corners
    y = x.clone()
    y[0, :, 1, 1] += bump  # (1,1) shares the shifted window with (1,2), (2,1), (2,2)
    with torch.no_grad():
        changed = (block(x) - block(y)).abs().amax(1)[0] > 1e-6
    assert changed.nonzero().tolist() == [[1, 1], [1, 2], [2, 1], [2, 2]]


def test_one_point_and_one_mask_prompt_per_region():
    torch.manual_seed(0)
    model = build_model(load_config("escnet-tiny"))
    sam = model.sam
    score = torch.zeros(1, 2, 8, 8)
    score[0, 0, 0:3, 0:3] = 1.0  # class 0: two blobs, peaks at (x=1, y=1) and (x=6, y=6)
    score[0, 0, 1, 1] = 2.0
    score[0, 0, 5:8, 5:8] = 1.0
    score[0, 0, 6, 6] = 3.0
    score[0, 1] = 0.5  # class 1 owns the rest
    score[0, 1, 0:3, 0:3] = score[0, 1, 5:8, 5:8] = 0.8
    ppg = PseudoPromptGenerator(num_regions=2, alpha=0.5, temperature=0.1, mask="region")
    with torch.no_grad():
        sparse, dense, prompts = ppg(score, sam)
    regions, points, labels = prompts["regions"][0, 0], prompts["points"][0, 0], prompts["labels"][0, 0]
    blobs = {(0, 3), (5, 8)}
    got = set()
    for r in range(2):  # each region is one blob, and its point is that blob's peak
        ys, xs = regions[r].nonzero(as_tuple=True)
        got.add((int(ys.min()), int(ys.max()) + 1))
        assert (int(xs.min()), int(xs.max()) + 1) == (int(ys.min()), int(ys.max()) + 1)
        x, y = points[r].long().tolist()
        assert regions[r, y, x] and score[0, 0, y, x] == score[0, 0][regions[r]].max()
    assert got == blobs and labels.tolist() == [1, 1]
    assert sparse.shape == (2, 3, 64)  # per class: a point per region + SAM's padding point
    # the dense prompt of class 0 is the mean of SAM's embeddings of the two region masks
    prob = (score / 0.1).softmax(1)
    logit = torch.logit(prob.clamp(1e-4, 1 - 1e-4)).clamp(-10, 10)[0, 0]
    with torch.no_grad():
        embs = []
        for r in range(2):
            m = torch.where(regions[r], logit, torch.tensor(-10.0))[None, None]
            embs.append(sam.prompt_encoder.mask_downscaling(torch.nn.functional.interpolate(m, size=(32, 32), mode="bilinear", align_corners=False)))
        assert torch.allclose(dense[0], (embs[0] + embs[1])[0] / 2, atol=1e-5, rtol=1e-5)
        # the point tokens are SAM's own embedding of those points (cell centres in SAM's 128 px frame)
        coords = (points.float() + 0.5) * 16 - 0.5
        expect, _ = sam.prompt_encoder(points=(coords[None], labels[None]), boxes=None, masks=None)
        assert torch.allclose(sparse[0], expect[0], atol=1e-5)  # sin/cos features: batched float noise
    empty = PseudoPromptGenerator(num_regions=2, alpha=0.5, temperature=0.1, mask="region")
    with torch.no_grad():
        _, dense, prompts = empty(torch.stack([torch.full((4, 4), 5.0), torch.zeros(4, 4)])[None], sam)
    assert prompts["labels"][0, 1].tolist() == [-1, -1]  # a class without a region: no points and SAM's "no mask"
    assert torch.equal(dense[1], sam.prompt_encoder.no_mask_embed.weight.reshape(-1, 1, 1).expand(-1, 4, 4))


def test_paper_parameter_groups_and_learning_rates():
    cfg, model = _paper_tiny()
    groups = param_groups(model, 2e-4, 2e-6, 1e-4)
    assert [(g["name"], g["lr"], g["weight_decay"]) for g in groups] == [
        ("new", 2e-4, 1e-4), ("new_no_decay", 2e-4, 0.0), ("clip_attention", 2e-6, 0.0),
        ("sam_block", 2e-6, 1e-4), ("sam_block_no_decay", 2e-6, 0.0)]
    names = {id(p): n for n, p in model.named_parameters()}
    by_group = {g["name"]: {names[id(p)] for p in g["params"]} for g in groups}
    expect = {n for n, _ in model.named_parameters() if n.startswith("clip.") and ".attn.in_proj_" in n}
    assert by_group["clip_attention"] == expect and any(n.startswith("clip.model.visual.") for n in expect)
    assert any(n.startswith("clip.model.transformer.") for n in expect)  # the text tower's attention trains too
    sam_names = by_group["sam_block"] | by_group["sam_block_no_decay"]
    assert sam_names and all(n.startswith(("sam.mask_decoder.transformer.", "sam.mask_decoder.iou_token", "sam.mask_decoder.mask_tokens", "sam.prompt_encoder.")) for n in sam_names)
    assert {n for n, p in model.named_parameters() if p.requires_grad and n.startswith("sam.")} == sam_names
    assert {"sam.mask_decoder.iou_token.weight", "sam.prompt_encoder.no_mask_embed.weight"} <= by_group["sam_block_no_decay"]
    assert "blocks.0.vlf.spatial.block_1.norm1.weight" in by_group["new_no_decay"] and "decoder.head.weight" in by_group["new"]
    assert all(not n.startswith(("clip.", "sam.")) for n in by_group["new"] | by_group["new_no_decay"])
    # one AdamW step: q and v rows of the fused in-projection move, k rows and out_proj do not
    opt = torch.optim.AdamW(groups)
    attn = model.clip.model.visual.transformer.resblocks[0].attn
    text_attn = model.clip.model.transformer.resblocks[0].attn
    before = attn.in_proj_weight.detach().clone(), text_attn.in_proj_weight.detach().clone(), attn.out_proj.weight.detach().clone()
    emb = model.class_embeddings(["red", "blue"])
    model(torch.rand(1, 3, 128, 128) * 255, emb)["logits"].sum().backward()
    opt.step()
    c = attn.embed_dim
    assert torch.equal(attn.in_proj_weight[c : 2 * c], before[0][c : 2 * c])
    assert not torch.equal(attn.in_proj_weight[:c], before[0][:c]) and not torch.equal(attn.in_proj_weight[2 * c :], before[0][2 * c :])
    assert not torch.equal(text_attn.in_proj_weight[:c], before[1][:c])
    assert torch.equal(attn.out_proj.weight, before[2])
    # the tiny default keeps its two groups: clip.* and sam.* at backbone_lr
    tiny = build_model(load_config("escnet-tiny"))
    assert [(g["name"], g["lr"]) for g in param_groups(tiny, 1e-3, 1e-5, 0.0)] == [("new", 1e-3), ("backbone", 1e-5)]


def test_paper_config_learning_rates_reach_the_optimizer(tmp_path, monkeypatch):
    """The trainer builds its optimizer from the model's groups with the config's lr / backbone_lr,
    and CAT-Seg's cosine schedule (no warm-up) scales every group: 1 at step 0, 1/2 at step 1 of 2."""
    cfg, _ = _paper_tiny()
    cfg["train"]["schedule"] = "cosine"
    root = tmp_path / "data"
    generate_semseg(root, n=2, size=128, seed=0, splits=("train",))
    seen = []

    class Spy(torch.optim.AdamW):
        def step(self, closure=None):
            seen.append({g["name"]: (g["lr"], g["weight_decay"]) for g in self.param_groups})
            return super().step(closure)

    monkeypatch.setattr(torch.optim, "AdamW", Spy)
    res = train_ovss(cfg, root, tmp_path / "out", steps=2, batch_size=1, seed=0, log_every=0)
    full = {"new": (2e-4, 1e-4), "new_no_decay": (2e-4, 0.0), "clip_attention": (2e-6, 0.0),
            "sam_block": (2e-6, 1e-4), "sam_block_no_decay": (2e-6, 0.0)}
    assert seen[0] == full
    assert seen[1] == {k: (pytest.approx(lr / 2), wd) for k, (lr, wd) in full.items()}
    assert res["steps"] == 2 and math.isfinite(res["loss"])
    again = _model_from_checkpoint(res["checkpoint"]).eval()  # the paper modules round-trip through a checkpoint
    img = torch.rand(1, 3, 128, 128) * 255
    with torch.no_grad():
        a = res["model"].eval()(img, res["model"].class_embeddings(["red", "blue"]))["logits"]
        b = again(img, again.class_embeddings(["red", "blue"]))["logits"]
    assert torch.equal(a, b)
    vitb = load_config("escnet-vitb")["train"]
    assert (vitb["lr"], vitb["backbone_lr"], vitb["loss"], vitb["schedule"]) == (2e-4, 2e-6, "catseg", "cosine")


def test_catseg_bce_hand_computed():
    logits = torch.tensor([[[[2.0, -1.0]], [[0.5, 3.0]]]])  # [B=1, K=2, 1, 2]
    label = torch.tensor([[[1, 255]]])
    sp = lambda z: math.log1p(math.exp(z))  # noqa: E731  BCE(z, 1) = softplus(-z), BCE(z, 0) = softplus(z)
    # pixel 0 is class 1: targets (0, 1); pixel 1 is ignored: CAT-Seg keeps it with targets (0, 0)
    expect = (sp(2.0) + sp(-0.5) + sp(-1.0) + sp(3.0)) / 4
    assert abs(catseg_bce_loss(logits, label).item() - expect) < 1e-6


# ------------------------------------------------------------------------- the bundled OVSS demo

DEMO = Path(__file__).resolve().parents[1] / "sspsam" / "assets" / "ovss-shapes-demo.pt"
DEMO_OUTPUTS = Path(__file__).parent / "data" / "ovss_demo_outputs.npz"


def _demo_outputs():
    """The bundled ESC-Net tiny on a fixed three-rectangle image (what tests/data stores)."""
    model = _model_from_checkpoint(DEMO).eval()
    img = torch.full((1, 3, 128, 128), 128.0)
    img[0, :, 10:50, 20:70] = torch.tensor([220.0, 30, 30])[:, None, None]
    img[0, :, 60:120, 70:110] = torch.tensor([30.0, 30, 220])[:, None, None]
    img[0, :, 80:110, 5:40] = torch.tensor([30.0, 200, 30])[:, None, None]
    with torch.no_grad():
        return model(img, model.class_embeddings(["background", "red", "green", "blue", "yellow"]))


def _demo_weights_sha256() -> str:
    """Of the weights alone: the checkpoint's meta (example classes, domain) may change freely."""
    from sspsam.models.build import read_sspsam_checkpoint

    sd = read_sspsam_checkpoint(DEMO)["state_dict"]
    h = hashlib.sha256()
    for k in sorted(sd):
        h.update(k.encode())
        h.update(sd[k].contiguous().numpy().tobytes())
    return h.hexdigest()


def test_bundled_demo_outputs_unchanged():
    """The paper modules sit behind config keys: the bundled ESC-Net tiny gives what it gave before
    them (reference written by ``python tests/test_ovss_models.py`` from the code before the change)."""
    ref = np.load(DEMO_OUTPUTS)
    assert str(ref["sha256"]) == _demo_weights_sha256(), (
        "sspsam/assets/ovss-shapes-demo.pt has new weights: regenerate tests/data/ovss_demo_outputs.npz")
    out = _demo_outputs()
    assert torch.allclose(out["logits"], torch.from_numpy(ref["logits"]), atol=1e-5, rtol=0)
    assert torch.equal(out["logits"].argmax(1), torch.from_numpy(ref["logits"]).argmax(1))
    assert torch.equal(out["prompts"]["points"], torch.from_numpy(ref["points"]))


def _box(y0, y1, x0, x1, size=24):
    m = torch.zeros(size, size)
    m[y0:y1, x0:x1] = 1.0
    return m


def test_smagg_merges_parts_and_keeps_objects_apart():
    left, right = _box(2, 10, 2, 6), _box(2, 10, 6, 10)  # two halves of one square object
    other = _box(15, 22, 15, 22)  # a second object, far away
    touching = _box(2, 10, 10, 14)  # touches the square but looks different
    masks = torch.stack([left, right, other, touching])
    feats = torch.tensor([[1.0, 0.0, 0.0], [0.95, 0.1, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    merged, group = shallow_mask_aggregation(masks, feats, similarity=0.8)
    assert group[0] == group[1]
    assert len({int(group[0]), int(group[2]), int(group[3])}) == 3
    assert merged.shape == (3, 24, 24)
    assert torch.equal(merged[group[0]], torch.maximum(left, right))


def test_smagg_containment_without_features():
    whole = _box(2, 12, 2, 12)
    part = _box(4, 8, 4, 8)
    apart = _box(14, 20, 14, 20)
    merged, group = shallow_mask_aggregation(torch.stack([whole, part, apart]), valid=torch.tensor([True, True, True]))
    assert group.tolist()[0] == group.tolist()[1] != group.tolist()[2]
    assert torch.equal(merged[group[0]], whole)
    _, group = shallow_mask_aggregation(torch.stack([whole, part]), valid=torch.tensor([True, False]))
    assert group.tolist() == [0, -1]


# ----------------------------------------------------------------------------------- generic data


def test_generated_semseg_round_trip(shapes_root):
    ds = SemSegDataset(shapes_root, "val", image_size=128)
    meta = json.loads((shapes_root / "classes.json").read_text())
    assert ds.classes == meta["classes"] and ds.ignore_index == 255 and len(ds) == 3
    for i in range(len(ds)):
        s = ds[i]
        h, w = s["orig_size"].tolist()
        assert max(h, w) == 128 and min(h, w) < 128  # the letterbox pads
        label, image = s["label"], s["image"]
        assert label.dtype == torch.int64 and label.shape == (128, 128)
        assert (label[h:] == 255).all() and (label[:, w:] == 255).all()
        assert (label[:h, :w] != 255).all()
        assert set(label.unique().tolist()) <= {0, 1, 2, 3, 4, 255}
        for k, name in enumerate(ds.classes[1:], start=1):  # a class's name determines its pixels
            px = image[:, label == k]
            if px.numel():
                assert torch.equal(px.T.unique(dim=0), torch.tensor([COLOURS[name]], dtype=torch.float32))
    raw_image, raw_label = ds.raw(0)
    full = SemSegDataset(shapes_root, "val")[0]
    assert full["image"].shape[1:] == raw_label.shape and torch.equal(full["label"], torch.from_numpy(raw_label))
    assert raw_image.shape[:2] == raw_label.shape


def test_generation_is_deterministic(tmp_path, shapes_root):
    generate_semseg(tmp_path, n=3, size=128, seed=5, splits=("val",))
    for a, b in zip(sorted((tmp_path / "annotations" / "val").iterdir()), sorted((shapes_root / "annotations" / "val").iterdir())):
        assert a.read_bytes() == b.read_bytes()


def test_layout_errors_name_the_missing_path(tmp_path, shapes_root):
    with pytest.raises(DatasetLayoutError, match="classes.json"):
        SemSegDataset(tmp_path, "val")
    (tmp_path / "classes.json").write_text(json.dumps({"classes": ["a"], "ignore_index": 255}))
    with pytest.raises(DatasetLayoutError, match=r"images/val"):
        SemSegDataset(tmp_path, "val")
    (tmp_path / "images" / "val").mkdir(parents=True)
    (tmp_path / "annotations" / "val").mkdir(parents=True)
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "annotations" / "val" / "x1.png")
    with pytest.raises(DatasetLayoutError, match=r"x1\.jpg"):
        SemSegDataset(tmp_path, "val")
    with pytest.raises(DatasetLayoutError, match="ADEChallengeData2016"):
        ADE20K150(tmp_path)
    with pytest.raises(DatasetLayoutError, match=r"val\.txt"):
        (tmp_path / "VOCdevkit" / "VOC2012" / "JPEGImages").mkdir(parents=True)
        (tmp_path / "VOCdevkit" / "VOC2012" / "SegmentationClass").mkdir()
        PascalVOC(tmp_path)


# ----------------------------------------------------------------------------- benchmark readers


def _img(path, h=6, w=8):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), 100, np.uint8)).save(path)


def _label(path, arr, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(arr) if mode is None else Image.fromarray(arr).convert(mode)
    im.save(path)


def _values(h=6, w=8, vals=(0, 1)):
    a = np.zeros((h, w), np.int64)
    for i, v in enumerate(vals):
        a.flat[i] = v
    return a


def test_ade150_reduce_zero_label(tmp_path):
    base = tmp_path / "ADEChallengeData2016"
    _img(base / "images" / "validation" / "ADE_val_00000001.jpg")
    _label(base / "annotations" / "validation" / "ADE_val_00000001.png", _values(vals=(0, 1, 150, 13)).astype(np.uint8))
    ds = ADE20K150(tmp_path, image_size=16)
    assert len(ds.classes) == 150 and ds.classes[0] == "wall" and ds.classes[149] == "flag"
    _, lab = ds.raw(0)
    assert lab.flat[:4].tolist() == [255, 0, 149, 12] and (lab.flat[4:] == 255).all()
    s = ds[0]
    assert s["label"].shape == (16, 16) and (s["label"][12:] == 255).all()


def test_ade847_tif_and_class_file(tmp_path):
    base = tmp_path / "ADE20K_2021_17_01"
    _img(base / "images_detectron2" / "validation" / "ADE_frame_1.jpg")
    _label(base / "annotations_detectron2" / "validation" / "ADE_frame_1.tif", _values(vals=(846, 65535, 300)).astype(np.uint16))
    with pytest.raises(DatasetLayoutError, match="ade847.json"):
        ADE20K847(tmp_path)
    (base / "ade847.json").write_text(json.dumps([f"c{i}" for i in range(847)]))
    ds = ADE20K847(tmp_path, image_size=16)
    assert ds.ignore_index == 65535 and len(ds.classes) == 847
    _, lab = ds.raw(0)
    assert lab.flat[:3].tolist() == [846, 65535, 300]
    assert (ds[0]["label"][12:] == 65535).all()  # letterbox padding uses the dataset's ignore value


@pytest.mark.parametrize("num_classes, expect", [(21, [0, 15, 255, 20]), (20, [255, 14, 255, 19])])
def test_pascal_voc(tmp_path, num_classes, expect):
    base = tmp_path / "VOCdevkit" / "VOC2012"
    for stem in ("2007_000033", "2007_000042"):
        _img(base / "JPEGImages" / f"{stem}.jpg")
        lab = Image.fromarray(_values(vals=(0, 15, 255, 20)).astype(np.uint8), mode="L").convert("P")
        lab.putpalette([0, 0, 0, 128, 0, 0] * 128)
        (base / "SegmentationClass").mkdir(exist_ok=True)
        lab.save(base / "SegmentationClass" / f"{stem}.png")
    (base / "ImageSets" / "Segmentation").mkdir(parents=True)
    (base / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000042\n")
    ds = PascalVOC(tmp_path, "val", num_classes=num_classes)
    assert len(ds) == 1 and ds[0]["image_id"] == "2007_000042"
    assert len(ds.classes) == num_classes and ds.classes[-1] == "tvmonitor"
    assert ds.raw(0)[1].flat[:4].tolist() == expect


def test_pascal_context_59_and_459(tmp_path):
    base = tmp_path / "VOCdevkit" / "VOC2010"
    _img(base / "JPEGImages" / "2008_000002.jpg")
    _label(base / "annotations_detectron2" / "pc59_val" / "2008_000002.png", _values(vals=(58, 255)).astype(np.uint8))
    _label(base / "annotations_detectron2" / "pc459_val" / "2008_000002.tif", _values(vals=(458, 65535)).astype(np.uint16))
    pc59 = PascalContext(tmp_path, 59)
    assert len(pc59.classes) == 59 and pc59.classes[-1] == "wood" and pc59.raw(0)[1].flat[:2].tolist() == [58, 255]
    with pytest.raises(DatasetLayoutError, match="pc459.json"):
        PascalContext(tmp_path, 459)
    (base / "pc459.json").write_text(json.dumps({"classes": [f"c{i}" for i in range(459)]}))
    pc459 = PascalContext(tmp_path, 459)
    assert pc459.ignore_index == 65535 and pc459.raw(0)[1].flat[:2].tolist() == [458, 65535]


def test_coco_stuff_171_mapping(tmp_path):
    base = tmp_path / "coco-stuff"
    _img(base / "images" / "val2017" / "000000000139.jpg")
    # stored values are COCO id - 1: person (0), id 12 (unused, 11), banner (91), wood (181), unlabeled (255)
    _label(base / "stuffthingmaps_trainval2017" / "val2017" / "000000000139.png", _values(vals=(0, 11, 91, 181, 255)).astype(np.uint8))
    ds = COCOStuff171(tmp_path, "val2017")
    assert len(ds.classes) == 171 and ds.classes[80] == "banner" and ds.classes[170] == "wood"
    assert ds.raw(0)[1].flat[:5].tolist() == [0, 255, 80, 170, 255]


# ----------------------------------------------------------------------------------- evaluation


def test_evaluate_runs_with_and_without_slide(tiny, tmp_path):
    generate_semseg(tmp_path, n=2, size=200, seed=1, splits=("val",))  # larger than the 128 model input
    ds = SemSegDataset(tmp_path, "val")
    for slide in (False, True):
        res = evaluate_ovss(tiny, ds, slide=slide)
        assert 0.0 <= res["mIoU"] <= 1.0 and 0.0 <= res["pACC"] <= 1.0
        assert set(res["per_class"]) == set(ds.classes) and res["n"] == 2
        table = format_iou_table(res)
        assert "| red |" in table and "**mIoU**" in table


if __name__ == "__main__":  # rewrite the demo's reference outputs (after replacing the bundled demo on purpose)
    out = _demo_outputs()
    np.savez_compressed(DEMO_OUTPUTS, logits=out["logits"].numpy(), points=out["prompts"]["points"].numpy(),
                        sha256=np.array(_demo_weights_sha256()))
