"""SSP-SAM against the official code (WayneTomas/SSP-SAM), on the golden fixtures in tests/golden.

The fixtures hold the official model's inputs and outputs for random weights that
``sspsam.tools.golden`` regenerates bit for bit. Each fixture is checked once (module scope)
through the public loading path — the official state dict is written as an official-layout
checkpoint file and loaded by the official-checkpoint loader — by the same check functions that
`sspsam tools fidelity` prints. The CLIP towers are real size (ViT-B/16, ViT-L/14@336);
the SAM image encoder is not run: the fixture gives the embeddings, as the official pipeline
caches them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sspsam.models.build import read_sspsam_checkpoint
from sspsam.errors import CheckpointError, SSPSamError
from sspsam.predict.segmenter import Segmenter
import sspsam.models.build as build
import sspsam.models.ssp_sam.official_checkpoint as official_checkpoint
from sspsam.models.ssp_sam.official_inputs import centered_geometry, clip_input, format_phrase
import sspsam.tools.fidelity as fidelity
import sspsam.tools.golden as golden
from sspsam.models.common.masks import official_mask_logits

QUANTITIES = {
    "clip_image (from the raw images)", "word_id (from the phrases)", "clip_sentence", "phrase_attn_weights",
    "phrase_embedding", "similarity_map", "verify_score", "prompt_tokens", "bbox_token", "pred_boxes",
    "low_res_masks", "iou_predictions", "pred_masks (512x512 logits)",
}
ONLY_224 = {"clip_image_tokens", "clip_words"}  # the 336 fixture does not store these arrays
SMALL = {"phrase_attn_weights", "similarity_map", "verify_score"}


# The opt-in speed settings must keep >= 99 % of the official masks. Checked on the 224 fixture
# only: the 336 one's CLIP-L forward is slow on a CPU, and bf16 autocast slower still without bf16
# matmul units (`sspsam tools fidelity --fixture ssp_sam_336 --precision bf16,int8` measures it).
PRECISIONS = {"ssp_sam_224": ("bf16", "int8"), "ssp_sam_336": ()}


@pytest.mark.parametrize("name", ["ssp_sam_224", "ssp_sam_336"])
def test_matches_official_code(name, tmp_path, monkeypatch):
    rows = fidelity.CHECKS[name](tmp_path, PRECISIONS[name])
    by_q = {r["quantity"]: r for r in rows}
    reduced = {f"pred_masks, {p} vs official fp32" for p in PRECISIONS[name]}
    assert set(by_q) == QUANTITIES | (ONLY_224 if name == "ssp_sam_224" else set()) | reduced
    for q in reduced:
        r = by_q.pop(q)
        # the fraction of decided pixels (|official logit| >= 1e-4) whose mask decision differs
        assert r["mask_disagreement"] <= 0.01 and r["flips_all_pixels"] <= 0.01 * 2 * 512 * 512, r
    for q, r in by_q.items():  # the tolerances asked of the reimplementation (fixtures' README)
        expected = 0.0 if q.startswith("word_id") else 1e-5 if q in SMALL or q.startswith("clip_image (") else 1e-4
        assert r["tolerance"] == expected, q
    bad = [r for r in rows if not fidelity.passed(r)]
    assert not bad, "\n" + fidelity.table(bad)
    masks = by_q["pred_masks (512x512 logits)"]
    # binarised masks identical at 512x512 except where the official logit is within 1e-4 of 0
    assert masks["mask_disagreement"] == 0.0 and masks["flips_all_pixels"] <= 0.0002 * 2 * 512 * 512, masks
    if name == "ssp_sam_224":
        # The same file through the predictor. Its CLIP comes from the weights cache (the file's
        # encoder.* keys are dropped, as the official test.py drops them): with an empty cache the
        # one error names both backbones; with the fixture's CLIP there, only SAM ViT-H is missing
        # (the file carries no sam.image_encoder.*), so the CLIP step was passed.
        ckpt = tmp_path / f"{name}_official.pth"
        monkeypatch.setenv("SSPSAM_HOME", str(tmp_path / "empty-cache"))
        monkeypatch.setenv("SSPSAM_OFFLINE", "1")
        with pytest.raises(SSPSamError, match="clip-vit-b16.*sam-vit-h") as err:
            Segmenter.from_pretrained(ckpt)
        assert "\n" not in str(err.value)
        with fidelity.pretrained_clip(tmp_path / "cached", golden.generate(name)):
            with pytest.raises(SSPSamError, match="sam-vit-h") as err:
                Segmenter.from_pretrained(ckpt)
        assert "clip-vit-b16" not in str(err.value)


# ---- preprocessing and the checkpoint layout, without the big towers ---------------------------


@pytest.mark.parametrize("size, hw, expected", [
    (224, (240, 320), (168, 224, 28, 0)), (224, (300, 200), (224, 149, 0, 37)),
    (336, (240, 320), (252, 336, 42, 0)), (336, (300, 200), (336, 224, 0, 56)),
])
def test_centered_geometry_known_answers(size, hw, expected):
    """The fixtures' README: long side → size with Python round, top = round((S-h)/2 - 0.1)."""
    assert centered_geometry(hw, size) == expected


def test_clip_input_is_zero_outside_the_centred_image():
    rgb = np.full((300, 200, 3), 255, np.uint8)
    x = clip_input(rgb, 224)
    assert x.shape == (3, 224, 224)
    assert (x[:, :, :37] == 0).all() and (x[:, :, 37 + 149 :] == 0).all()
    white = (1 - torch.tensor([0.48145466, 0.4578275, 0.40821073])) / torch.tensor([0.26862954, 0.26130258, 0.27577711])
    torch.testing.assert_close(x[:, :, 37 : 37 + 149], white.view(3, 1, 1).expand(3, 224, 149))


def test_format_phrase_matches_the_official_text():
    meta = golden.run_meta("ssp_sam_224")
    assert [format_phrase(p) for p in meta["phrases"]] == meta["texts_tokenised"]
    assert format_phrase("  Red CAR ") == "red car."


def _official_shapes(name: str) -> dict[str, torch.Tensor]:
    """An official state dict with the fixture's keys and shapes but no values (meta tensors)."""
    man = golden.load_manifest(golden.fixture_dir(name))
    return {e["key"]: torch.empty(e["shape"], device="meta") for e in man["entries"]}


def _trained_shapes(size: str) -> dict[str, torch.Tensor]:
    """A checkpoint's state dict exactly as ``official_trained_layout/keys.json`` lists it (meta tensors)."""
    dtypes = {"float32": torch.float32, "float64": torch.float64, "int64": torch.int64}
    return {k: torch.empty(shape, dtype=dtypes[dt], device="meta")
            for k, shape, dt in golden.trained_layout_keys(size)["state_dict_keys_after_training"]}


@pytest.mark.parametrize("name, size, variant", [("ssp_sam_224", "224", "ssp-sam-b16-h"),
                                                 ("ssp_sam_336", "336", "ssp-sam-l14-336-h")])
def test_official_layout_is_recognised_and_mapped(name, size, variant):
    """Both layouts (before the first forward: the fixtures' manifests; as training writes it:
    keys.json) map onto sspsam's model; CLIP is dropped (taken from the weights cache) and SAM's
    image encoder is used when the file carries it."""
    before = _official_shapes(name)
    trained = _trained_shapes(size)
    spec = golden.trained_layout_keys(size)
    # the fixture helper writes exactly the keys training writes (keys.json also has SAM's image encoder)
    made = golden.trained_layout(before)
    assert set(made) == {k for k in trained if not k.startswith("sam.image_encoder.")}
    assert set(made) - set(before) == set(spec["keys_only_after_first_forward"])
    assert set(before) - set(made) == set(spec["keys_only_before_first_forward"])
    assert all(tuple(made[k].shape) == tuple(trained[k].shape) for k in made)
    for sd, layout in ((before, "before-first-forward"), (trained, "trained")):
        assert official_checkpoint.is_official(sd)
        assert official_checkpoint.normalise_layout(sd)[1] == layout
        ckpt = build.to_sspsam_checkpoint(sd, sam_image_encoder=False)
        assert ckpt["config"]["name"] == variant and ckpt["config"]["ssp"]["head"] == "official"
        assert ckpt["external_backbones"] == ["clip"] and ckpt["official"]["clip"] == ckpt["config"]["clip"]["weights"]
        # besides CLIP, exactly the two unused official modules are dropped, nothing else
        assert sorted(ckpt["official"]["dropped"]) == sorted(k for k in sd if k.startswith(("img2img_attn.", "norm_text_cond_img.")))
        assert not any(k.startswith("clip.") for k in ckpt["state_dict"])
        pg = "ssp_encoder.prompt_generator."
        assert ckpt["state_dict"][pg + "prompt_tokens"].shape == (1, 128, 256)
        assert ckpt["state_dict"][pg + "box_token"].shape == (1, 1, 256)
    # keys.json's file carries SAM ViT-H's image encoder, which the full model then uses; the
    # fixture's file does not, so SAM comes from the weights cache
    full = build.to_sspsam_checkpoint(trained)
    assert full["external_backbones"] == ["clip"]
    n_enc = sum(k.startswith("sam.image_encoder.") for k in trained)
    assert n_enc > 400 and sum(k.startswith("sam.image_encoder.") for k in full["state_dict"]) == n_enc
    assert build.to_sspsam_checkpoint(before)["external_backbones"] == ["clip", "sam"]


def test_trained_checkpoint_containers_load_weights_only(tmp_path):
    """The container training writes ({'model', 'epoch', 'args': argparse.Namespace}) reads with
    weights_only=True; what authors re-upload (bare, under 'state_dict', DDP's 'module.' prefixes,
    .safetensors) reads the same. Small stand-in tensors: only the containers are under test."""
    import argparse
    import fractions

    from safetensors.torch import save_file

    from sspsam.io.checkpoint import unwrap_state_dict, torch_load

    sd = {"phrase_attn.fc.weight": torch.ones(1, 1024), "reg_token.weight": torch.zeros(1, 256),
          "vl_transformer.encoder.layers.0.linear1.weight": torch.zeros(4, 4)}
    forms = {
        "trained.pth": {"model": sd, "epoch": 19, "args": argparse.Namespace(lr=1e-4, dataset="unc")},
        "bare.pt": sd,
        "nested.pth": {"state_dict": sd},
        "ddp.pth": {"model": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3},
    }
    for fname, obj in forms.items():
        torch.save(obj, tmp_path / fname)
        got = unwrap_state_dict(torch_load(tmp_path / fname, "checkpoint"))
        assert set(got) == set(sd) and all(torch.equal(got[k], sd[k]) for k in sd), fname
        with pytest.raises(CheckpointError, match="official SSP-SAM checkpoint"):  # recognised, then named as incomplete
            read_sspsam_checkpoint(tmp_path / fname)
    save_file(sd, str(tmp_path / "w.safetensors"))
    with pytest.raises(CheckpointError, match="official SSP-SAM checkpoint"):
        read_sspsam_checkpoint(tmp_path / "w.safetensors")
    # any other class pickled beside the weights is still refused by the weights-only reader
    torch.save({"model": sd, "args": argparse.Namespace(lr=fractions.Fraction(1, 3))}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="corrupt"):
        torch_load(tmp_path / "evil.pth", "checkpoint")


def test_official_layout_errors_name_the_keys():
    sd = _official_shapes("ssp_sam_224")
    with pytest.raises(CheckpointError, match=r"no rule maps: extra_head\.weight"):
        build.to_sspsam_checkpoint({**sd, "extra_head.weight": torch.empty(2, device="meta")})
    lacking = {k: v for k, v in sd.items() if k != "norm.weight"}
    with pytest.raises(CheckpointError, match=r"missing 1 keys: ssp_encoder\.prompt_generator\.norm\.weight"):
        build.to_sspsam_checkpoint(lacking, sam_image_encoder=False)
    bad = {**sd, "mlp.weight": torch.empty(256, 768, device="meta")}
    with pytest.raises(CheckpointError, match=r"shape mismatch.*fusion\.proj\.weight"):
        build.to_sspsam_checkpoint(bad, sam_image_encoder=False)
    other = {**sd, "encoder.visual.conv1.weight": torch.empty(768, 3, 32, 32, device="meta")}
    with pytest.raises(CheckpointError, match=r"SSP head is ViT-B/16@224.*CLIP tower is unknown: conv1 \(768, 3, 32, 32\)"):
        build.to_sspsam_checkpoint(other)
    head = {**sd, "vl_pos_embed.weight": torch.empty(300, 256, device="meta")}
    with pytest.raises(CheckpointError, match=r"unknown SSP head: 300 prompt-generator positions"):
        build.to_sspsam_checkpoint(head)


def test_incomplete_official_file_is_a_one_line_error(tmp_path):
    """A file with the official markers but not the whole model: the loaders name what is missing."""
    sd = {k: torch.zeros(v.shape) for k, v in _official_shapes("ssp_sam_224").items()
          if k.startswith(("phrase_attn.", "reg_token.", "vl_transformer.encoder.layers.0.", "encoder.visual.conv1",
                           "encoder.visual.positional_embedding"))}
    path = tmp_path / "ssp_sam_partial.pth"
    torch.save({"model": sd, "epoch": 3}, path)
    with pytest.raises(CheckpointError, match="official SSP-SAM checkpoint .*missing") as err:
        read_sspsam_checkpoint(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)
    with pytest.raises(CheckpointError, match="missing"):
        Segmenter.from_pretrained(path)



def test_official_head_in_the_predictor():
    """A tiny model with ``ssp.head: official``: the predictor feeds CLIP the centred official input
    built from the raw image and formats the phrase as the official dataset does."""
    from sspsam.models.build import build_model
    from sspsam.config import load_config
    from sspsam.models.ssp_sam.official_inputs import clip_input_from_letterbox
    from sspsam.io.transforms import model_input

    cfg = load_config("ssp-sam-tiny")
    cfg["ssp"].update(head="official", no_target_head=False)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    assert model.ssp_encoder.prompt_generator.norm is not None and model.ssp_encoder.visual_adapter.sigma.shape == (1,)
    assert torch.equal(model.tokenize(["  A Dog "]), model.clip.tokenize(["a dog."]))
    rgb = np.random.RandomState(0).randint(0, 256, (90, 120, 3)).astype(np.uint8)
    seg = Segmenter(model)
    res = seg.segment(rgb, ["A dog", "the cat"])
    assert res.masks.shape == (2, 90, 120)
    exact = clip_input(rgb, model.clip.image_size)[None]
    with torch.no_grad():
        patches, glob = model.encode_clip(exact)
    torch.testing.assert_close(seg._cache.features.clip_patches, patches)
    torch.testing.assert_close(seg._cache.features.clip_global, glob)
    # Paths that only keep SAM's letterbox rebuild the same layout (resampled twice, so only close).
    x, valid, _ = model_input(rgb, model.image_size)
    approx = clip_input_from_letterbox(x, valid, model.clip.image_size)
    s = model.clip.image_size
    nh, nw, top, left = centered_geometry(rgb.shape[:2], s)
    inside = torch.zeros(s, s, dtype=torch.bool)
    inside[top : top + nh, left : left + nw] = True
    assert (exact[..., ~inside] == 0).all() and (approx[..., ~inside] == 0).all()
    assert (approx - exact)[..., inside].abs().mean() < 0.1


def test_fidelity_table_takes_the_clip_rows(monkeypatch, capsys):
    """`sspsam tools fidelity` (``fidelity.report``) appends ``fidelity_clip.checks()`` rows (label rows carry
    no max abs diff) and fails when any row fails."""
    import sys
    import types

    fake = types.ModuleType("sspsam.tools.fidelity_clip")
    fake.checks = lambda: [
        {"fixture": "sclip", "quantity": "dense_224", "max_abs_diff": 3e-6, "tolerance": 1e-4, "mask_disagreement": None},
        {"fixture": "sclip", "quantity": "seg_pred", "max_abs_diff": None, "tolerance": 1e-3, "mask_disagreement": 0.0},
    ]
    monkeypatch.setitem(sys.modules, "sspsam.tools.fidelity_clip", fake)
    # once the real module was imported, `from . import fidelity_clip` finds it on the package
    monkeypatch.setattr(sys.modules["sspsam.tools"], "fidelity_clip", fake, raising=False)
    monkeypatch.setattr(fidelity, "CHECKS", {})
    assert fidelity.report() == 0
    out = capsys.readouterr().out
    assert "| sclip " in out and "dense_224" in out and "seg_pred" in out and "NO" not in out
    fake.checks = lambda: [{"fixture": "sclip", "quantity": "seg_pred", "max_abs_diff": None, "tolerance": 1e-3,
                            "mask_disagreement": 0.01}]
    assert fidelity.report() == 1
    assert "NO" in capsys.readouterr().out


def test_box_targets_move_into_the_official_box_frame():
    """The official box head predicts in the centred CLIP canvas: a box given in SAM's letterbox
    (what the datasets carry) must land where the official code puts it. Known answer first, then
    the fixture: its predicted boxes, mapped to original pixels by the official post-processing,
    come back to the predicted canvas boxes."""
    from sspsam.models.ssp_sam.official_inputs import letterbox_box_to_clip

    # 100×200 image: SAM 1024 letterbox 512×1024 (top-left); CLIP 224 canvas 112×224 at top 56
    full = torch.tensor([[0.5, 0.25, 1.0, 0.5], [0.0, 0.0, 0.0, 0.0]])
    got = letterbox_box_to_clip(full, torch.tensor([[512, 1024], [512, 1024]]), 1024, 224)
    assert torch.allclose(got, torch.tensor([[0.5, 0.5, 1.0, 0.5], [0.0, 0.0, 0.0, 0.0]]))

    inp, out = golden.arrays("ssp_sam_224", "inputs"), golden.arrays("ssp_sam_224", "outputs")
    rows, hw = [], []
    for (x0, y0, x1, y1), (h, w) in zip(out["post_boxes_xyxy_orig"], inp["ori_size"]):
        m = max(h, w)  # SAM's letterbox scales by 1024 / max(h, w), top-left aligned
        rows.append([(x0 + x1) / 2 / m, (y0 + y1) / 2 / m, (x1 - x0) / m, (y1 - y0) / m])
        hw.append([round(h * 1024 / m), round(w * 1024 / m)])
    got = letterbox_box_to_clip(torch.tensor(rows), torch.tensor(hw), 1024, 224)
    np.testing.assert_allclose(got.numpy(), out["pred_boxes"][:, 0], atol=3e-3)


def test_trained_checkpoint_through_from_pretrained_matches_the_official_masks(tmp_path, monkeypatch):
    """The user's path end to end: a checkpoint in the layout official training writes, loaded by
    ``Segmenter.from_pretrained`` (CLIP from the weights cache, as the official test.py takes it),
    reproduces the official masks. The fixture holds no SAM ViT-H image encoder (its outputs were made
    from given embeddings), so the cache entry ``sam-vit-h`` is a sparse placeholder of the registered
    size whose load is skipped: the encoder keeps its random init, which this forward never runs."""
    import sspsam.io.weights as weights
    from sspsam.backbones.sam import SAMBackbone

    ckpt = tmp_path / "checkpoint_best_miou.pth"
    sd = fidelity.write_trained_checkpoint("ssp_sam_224", ckpt)
    with fidelity.pretrained_clip(tmp_path, sd):
        del sd
        placeholder = weights.local_path("sam-vit-h")
        with open(placeholder, "wb") as fh:
            fh.truncate(weights.get_spec("sam-vit-h").size)  # sparse: no disk used
        monkeypatch.setattr(SAMBackbone, "load_checkpoint", lambda self, path: None)
        seg = Segmenter.from_pretrained(ckpt, device="cpu", dtype="fp32")
    assert seg.model.config["name"] == "ssp-sam-b16-h"
    inp, ref = golden.arrays("ssp_sam_224", "inputs"), golden.arrays("ssp_sam_224", "outputs")
    emb = golden.generate("ssp_sam_224", "inputs")["sam_image_embedding"]
    with torch.no_grad():
        _, _, _, out = fidelity._forward(seg.model, inp, emb)
        pred = official_mask_logits(out["mask_logits"], seg.model.sam.img_size)
    r = fidelity.row("ssp_sam_224", "pred_masks", pred, ref["pred_masks"], 1e-4, mask=True)
    assert r["mask_disagreement"] == 0.0 and r["max_abs_diff"] <= 1e-4, r
    pt = fidelity.row("ssp_sam_224", "prompt_tokens", out["prompts"], ref["prompt_tokens"], 1e-4)
    assert pt["max_abs_diff"] <= 1e-4, pt
