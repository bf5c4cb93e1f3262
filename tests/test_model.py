"""Model tests: shapes, parameter counts, CLIP parity with open_clip, the SSP modules' invariants,
checkpoint round trips and errors, losses with hand-computed values, and gradient flow.

Everything runs on random-init tiny models except the real-size parameter counts, which build
ssp-sam-vitb once (about 7 s on CPU, no forward pass).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sspsam.backbones.clip import CLIPBackbone, TextFeatures
from sspsam.backbones.sam import SAMBackbone
from sspsam.backbones.tiny_vit import TinyViT
from sspsam.io.checkpoint import read_state_dict, save_checkpoint
from sspsam.models.build import build_model, read_sspsam_checkpoint
from sspsam.config import load_config
from sspsam.errors import CheckpointError
from sspsam.engine.losses import box_cxcywh_to_xyxy, dice_loss, generalized_box_iou, sigmoid_focal_loss, ssp_loss
from sspsam.models.ssp_sam.legacy_head import LegacyLinguisticAttentionAdapter as LinguisticAttentionAdapter
from sspsam.models.ssp_sam.legacy_head import LegacyVisualAttentionAdapter as VisualAttentionAdapter

EOT = 49407
PHRASES = ["the red square", "a small blue circle on the left", "green"]
MOBILE_OVERRIDES = dict(embed_dims=[16, 32, 48, 64], depths=[1, 1, 1, 1], num_heads=[1, 2, 3, 4], window_sizes=[2, 2, 4, 2])


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _mobile_cfg() -> dict:
    cfg = load_config("ssp-sam-tiny")
    cfg["sam"]["encoder"] = "tiny_vit"
    cfg["sam"]["encoder_overrides"] = dict(MOBILE_OVERRIDES)
    return cfg


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 255


def _slice_text(text: TextFeatures, idx) -> TextFeatures:
    return TextFeatures(words=text.words[idx], sentence=text.sentence[idx], pad_mask=text.pad_mask[idx])


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The models here are tiny: one intra-op thread is faster than two, and far faster when
    the cores are shared (OpenMP workers spin-waiting on a busy CPU)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return build_model("ssp-sam-tiny").eval()


@pytest.fixture(scope="module")
def mobile_model():
    torch.manual_seed(1)
    return build_model(_mobile_cfg()).eval()


@pytest.fixture(scope="module")
def vitb_model():
    torch.manual_seed(0)
    return build_model("ssp-sam-vitb")


@pytest.fixture(scope="module")
def tiny_clip_cfg() -> dict:
    return {k: v for k, v in load_config("ssp-sam-tiny")["clip"].items() if k != "weights"}


# ---- 1. shapes and dtypes of decode ------------------------------------------------------------


@pytest.mark.parametrize("which", ["tiny_model", "mobile_model"])
def test_decode_shapes_and_image_index(which, request):
    model = request.getfixturevalue(which)
    s = model.image_size
    assert s == 128
    if which == "mobile_model":
        assert isinstance(model.sam.image_encoder, TinyViT)
    images = _images(2, s)
    tokens = model.clip.tokenize(PHRASES)
    image_index = torch.tensor([0, 1, 0])
    with torch.no_grad():
        feats = model.encode_image(images)
        text = model.encode_text(tokens)
        out = model.decode(feats, text, image_index)

    assert feats.sam.shape == (2, model.sam.prompt_encoder.embed_dim, s // 16, s // 16)
    assert feats.clip_patches.shape == (2, model.clip.grid_size**2, model.clip.embed_dim)
    t = len(PHRASES)
    expected = {"mask_logits": (t, 1, s // 4, s // 4), "iou": (t,), "box": (t, 4), "no_target_logit": (t,)}
    for key, shape in expected.items():
        assert out[key].shape == shape, key
        assert out[key].dtype == torch.float32, key
        assert torch.isfinite(out[key]).all(), key
    assert ((out["box"] >= 0) & (out["box"] <= 1)).all()

    # Each phrase's result equals decoding that phrase alone against the image it maps to.
    for ti, b in enumerate(image_index.tolist()):
        single_img = type(feats)(sam=feats.sam[b : b + 1], clip_patches=feats.clip_patches[b : b + 1])
        with torch.no_grad():
            alone = model.decode(single_img, _slice_text(text, [ti]), torch.tensor([0]))
        for key in ("mask_logits", "iou", "box", "no_target_logit"):
            torch.testing.assert_close(out[key][ti : ti + 1], alone[key], atol=1e-5, rtol=1e-4)
    # ... and phrase 0 against image 1 is a different answer (the mapping matters).
    with torch.no_grad():
        swapped = model.decode(feats, _slice_text(text, [0]), torch.tensor([1]))
    assert not torch.allclose(swapped["mask_logits"], out["mask_logits"][:1])


def test_forward_is_one_phrase_per_image(tiny_model):
    images = _images(2, 128, seed=3)
    tokens = tiny_model.clip.tokenize(PHRASES[:2])
    with torch.no_grad():
        out = tiny_model(images, tokens)
        ref = tiny_model.decode(tiny_model.encode_image(images), tiny_model.encode_text(tokens), torch.tensor([0, 1]))
    assert out["mask_logits"].shape == (2, 1, 32, 32)
    torch.testing.assert_close(out["mask_logits"], ref["mask_logits"])


# ---- 2. real-size parameter counts -------------------------------------------------------------


def test_vitb_parameter_counts(vitb_model):
    sam = _params(vitb_model.sam)
    clip = _params(vitb_model.clip)
    assert abs(sam - 93.7e6) <= 0.2e6, sam  # SAM ViT-B: 93.7M
    assert abs(clip - 149.6e6) <= 0.1e6, clip  # CLIP ViT-B/16: 149.6M
    pg = vitb_model.ssp_encoder.prompt_generator
    assert pg.num_prompts == 128
    assert pg.prompt_tokens.shape == (1, 128, 256)
    assert len(pg.layers) == 6
    assert vitb_model.clip.grid_size == 14
    assert pg.pos_embed.shape == (1, 1 + 128 + 14 * 14, 256)
    assert vitb_model.no_target_head is None
    assert vitb_model.clip.surgery_layers == 6


# ---- 3. CLIP backbone ---------------------------------------------------------------------------


@pytest.mark.parametrize("surgery", [0, 1, 2])
def test_clip_global_embedding_matches_open_clip(tiny_clip_cfg, surgery):
    torch.manual_seed(10)
    clip = CLIPBackbone.from_config({**tiny_clip_cfg, "surgery_layers": surgery}).eval()
    x = _images(2, 96, seed=4)  # not 64 px: preprocess resizes
    with torch.no_grad():
        patches, glob = clip.encode_image(x)
        ref = clip.model.encode_image(clip.preprocess(x))
    torch.testing.assert_close(glob, ref, atol=1e-5, rtol=1e-5)
    assert patches.shape == (2, clip.grid_size**2, clip.embed_dim)
    if surgery == 0:  # plain last-layer tokens: open_clip's own token output, projected
        clip.model.visual.output_tokens = True
        try:
            with torch.no_grad():
                _, tokens = clip.model.visual(clip.preprocess(x))
        finally:
            clip.model.visual.output_tokens = False
        torch.testing.assert_close(patches, tokens @ clip.model.visual.proj, atol=1e-5, rtol=1e-5)


def test_clip_surgery_changes_dense_path_only(tiny_clip_cfg):
    torch.manual_seed(11)
    plain = CLIPBackbone.from_config({**tiny_clip_cfg, "surgery_layers": 0}).eval()
    dual = CLIPBackbone.from_config({**tiny_clip_cfg, "surgery_layers": 2}).eval()
    dual.load_state_dict(plain.state_dict())
    x = _images(1, 64, seed=5)
    with torch.no_grad():
        p0, g0 = plain.encode_image(x)
        p2, g2 = dual.encode_image(x)
    torch.testing.assert_close(g0, g2, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(p0, p2, atol=1e-3)


def test_clip_text_embeddings_and_pad_mask(tiny_model):
    clip = tiny_model.clip
    tokens = clip.tokenize(PHRASES)
    with torch.no_grad():
        text = clip.encode_text(tokens)
        ref = clip.model.encode_text(tokens)
    torch.testing.assert_close(text.sentence, ref, atol=1e-5, rtol=1e-5)
    assert text.words.shape == (len(PHRASES), clip.context_length, clip.embed_dim)
    for i in range(len(PHRASES)):
        eot = (tokens[i] == EOT).nonzero().item()
        expected = torch.arange(tokens.shape[1]) > eot
        assert torch.equal(text.pad_mask[i], expected)
        assert (tokens[i][text.pad_mask[i]] == 0).all()
        torch.testing.assert_close(text.words[i, eot], text.sentence[i])
    # "green" is SOT, one word, EOT: three real positions.
    assert (~text.pad_mask[2]).sum().item() == 3


def test_clip_positional_interpolation(tiny_clip_cfg):
    torch.manual_seed(12)
    clip = CLIPBackbone.from_config(tiny_clip_cfg).eval()
    assert clip.image_size == 64 and clip.grid_size == 4
    pos = clip.model.visual.positional_embedding
    assert torch.equal(clip._positional(4, 4), pos)  # native grid: untouched
    big = clip._positional(8, 8)
    assert big.shape == (1 + 64, pos.shape[1])
    assert torch.equal(big[0], pos[0])  # the class position is never interpolated
    # Bicubic interpolation keeps a grid that is constant per channel constant.
    with torch.no_grad():
        pos[1:] = torch.linspace(-1, 1, pos.shape[1])
    torch.testing.assert_close(clip._positional(8, 8)[1:], pos[1:2].expand(64, -1), atol=1e-5, rtol=0)

    # encode_image resizes to CLIP's size, so 128 px gives the native 4x4 grid ...
    x = _images(1, 128, seed=6)
    with torch.no_grad():
        assert clip.encode_image(x)[0].shape == (1, 16, clip.embed_dim)
    # ... while an un-resized 128 px input runs through the interpolated positions: 8x8 patches.
    clip.preprocess = lambda im: (im - clip.mean) / clip.std
    with torch.no_grad():
        patches, glob = clip.encode_image(x)
    assert patches.shape == (1, 64, clip.embed_dim)
    assert glob.shape == (1, clip.embed_dim) and torch.isfinite(patches).all()


# ---- 4. the adapters ----------------------------------------------------------------------------


def test_sentence_map_is_min_max_normalised():
    g = torch.Generator().manual_seed(7)
    patches, sentence = torch.randn(3, 20, 32, generator=g), torch.randn(3, 32, generator=g)
    m = VisualAttentionAdapter.sentence_map(patches, sentence)
    assert m.shape == (3, 20)
    assert ((m >= 0) & (m <= 1)).all()
    torch.testing.assert_close(m.amin(1), torch.zeros(3))
    torch.testing.assert_close(m.amax(1), torch.ones(3))
    # The patch most aligned with the sentence gets 1: make patch 5 the sentence itself.
    patches[:, 5] = sentence * 3.0
    m = VisualAttentionAdapter.sentence_map(patches, sentence)
    assert (m.argmax(1) == 5).all() and torch.allclose(m[:, 5], torch.ones(3))


def test_gaussian_score_known_values():
    vaa = VisualAttentionAdapter(32, 16, num_heads=2, sigma_init=0.5, scale_init=2.5)
    cos = torch.tensor([1.0, 0.5, 0.0, -1.0])
    got = vaa.gaussian_score(cos).detach()
    expected = 2.5 * torch.exp(-((1 - cos) ** 2) / (2 * 0.25))
    torch.testing.assert_close(got, expected)
    assert got[0].item() == pytest.approx(2.5)  # cos = 1 -> scale
    assert got[1].item() == pytest.approx(2.5 * math.exp(-0.5))  # one sigma away
    assert (got[:-1] > got[1:]).all()  # decreasing in 1 - cos


def test_linguistic_adapter_ignores_padding():
    torch.manual_seed(8)
    laa = LinguisticAttentionAdapter(32, 16).eval()
    lengths = torch.tensor([3, 7, 1])
    L = 10
    pad = torch.arange(L)[None] >= lengths[:, None]
    words = torch.randn(3, L, 32)
    with torch.no_grad():
        phrase, w, weights = laa(words, pad)
    assert phrase.shape == (3, 16) and w.shape == (3, L, 16) and weights.shape == (3, L)
    assert (weights[pad] == 0).all()
    assert (weights[~pad] > 0).all()
    torch.testing.assert_close(weights.sum(1), torch.ones(3))
    assert weights[2, 0].item() == pytest.approx(1.0)  # a single real token takes all the weight

    changed = words.clone()
    changed[pad] = torch.randn(int(pad.sum()), 32) * 100
    with torch.no_grad():
        phrase2, _, weights2 = laa(changed, pad)
    torch.testing.assert_close(phrase2, phrase, atol=1e-6, rtol=0)
    torch.testing.assert_close(weights2, weights, atol=1e-7, rtol=0)
    # Changing a real token does change the phrase vector.
    changed[0, 1] += 5.0
    with torch.no_grad():
        phrase3, _, _ = laa(changed, pad)
    assert not torch.allclose(phrase3[0], phrase[0])
    torch.testing.assert_close(phrase3[1:], phrase[1:], atol=1e-6, rtol=0)


def test_model_ignores_tokens_after_eot(tiny_model):
    """End to end: content beyond EOT in the word features leaves the prediction unchanged."""
    tokens = tiny_model.clip.tokenize(PHRASES[:1])
    images = _images(1, 128, seed=9)
    with torch.no_grad():
        feats = tiny_model.encode_image(images)
        text = tiny_model.encode_text(tokens)
        out = tiny_model.decode(feats, text)
        words = text.words.clone()
        words[text.pad_mask] = torch.randn(int(text.pad_mask.sum()), words.shape[-1]) * 50
        out2 = tiny_model.decode(feats, TextFeatures(words, text.sentence, text.pad_mask))
    torch.testing.assert_close(out2["mask_logits"], out["mask_logits"], atol=1e-5, rtol=1e-5)
    assert (out["word_weights"][text.pad_mask] == 0).all()


# ---- 5. checkpoints -----------------------------------------------------------------------------


def test_state_dict_round_trip(tiny_model, tmp_path):
    path = tmp_path / "model.pt"
    save_checkpoint(path, tiny_model.config, tiny_model.state_dict(), epoch=3)
    ck = read_sspsam_checkpoint(path)
    assert ck["epoch"] == 3 and ck["config"]["name"] == "ssp-sam-tiny"
    torch.manual_seed(1234)
    fresh = build_model(ck["config"]).eval()
    images, tokens = _images(2, 128, seed=2), tiny_model.clip.tokenize(PHRASES[:2])
    with torch.no_grad():
        ref = tiny_model(images, tokens)
        before = fresh(images, tokens)
    assert not torch.allclose(before["mask_logits"], ref["mask_logits"])  # random init differs
    fresh.load_state_dict(ck["state_dict"])
    with torch.no_grad():
        after = fresh(images, tokens)
    for key in ref:
        assert torch.equal(after[key], ref[key]), key
    # read_state_dict also unwraps an sspsam file to the plain state dict.
    sd = read_state_dict(path)
    assert sd.keys() == tiny_model.state_dict().keys()


def test_truncated_checkpoint(tiny_model, tmp_path):
    path = tmp_path / "model.pt"
    save_checkpoint(path, tiny_model.config, tiny_model.state_dict())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        read_sspsam_checkpoint(path)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        read_state_dict(path)


def test_sam_checkpoint_shape_mismatch(tmp_path):
    cfg = load_config("ssp-sam-tiny")["sam"]
    sam = SAMBackbone.from_config(cfg)
    sd = sam.state_dict()
    good = tmp_path / "sam_ok.pth"
    torch.save(sd, good)
    other = SAMBackbone.from_config(cfg)
    other.load_checkpoint(good)  # a correct file loads
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), sd.values()))

    key = "mask_decoder.iou_token.weight"
    sd = dict(sd)
    sd[key] = torch.zeros(2, sd[key].shape[1] + 1)
    bad = tmp_path / "sam_bad.pth"
    torch.save(sd, bad)
    with pytest.raises(CheckpointError, match="shape mismatch") as err:
        other.load_checkpoint(bad)
    assert key in str(err.value)


def test_clip_checkpoint_errors(tiny_clip_cfg, tmp_path):
    clip = CLIPBackbone.from_config(tiny_clip_cfg)
    sd = clip.model.state_dict()
    good = tmp_path / "clip_ok.pt"
    torch.save(sd, good)
    CLIPBackbone.from_config(tiny_clip_cfg).load_checkpoint(good)

    missing = dict(sd)
    del missing["ln_final.weight"], missing["visual.proj"]
    path = tmp_path / "clip_missing.pt"
    torch.save(missing, path)
    with pytest.raises(CheckpointError, match="2 missing keys"):
        clip.load_checkpoint(path)

    junk = tmp_path / "junk.pt"
    junk.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(CheckpointError):
        clip.load_checkpoint(junk)

    with pytest.raises(CheckpointError, match="not found"):
        clip.load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="not found"):
        read_sspsam_checkpoint(tmp_path / "nope.pt")


def test_backbone_file_is_not_a_model_checkpoint(tmp_path):
    path = tmp_path / "sam.pth"
    torch.save({"a": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match="not an sspsam model checkpoint"):
        read_sspsam_checkpoint(path)


# ---- 6. losses ----------------------------------------------------------------------------------


def test_dice_loss_known_values():
    target = torch.zeros(2, 16, 16, dtype=torch.bool)
    target[0, 4:12, 4:12] = True
    target[1, :8] = True
    perfect = torch.where(target, 30.0, -30.0)
    assert dice_loss(perfect, target).item() == pytest.approx(0.0, abs=1e-6)
    # Empty target, empty prediction: 0 thanks to the +1 smoothing.
    assert dice_loss(torch.full((1, 8, 8), -30.0), torch.zeros(1, 8, 8)).item() == pytest.approx(0.0, abs=1e-6)
    # Completely wrong: 1 - 1 / (|P| + |T| + 1) for one sample with 64 target and 192 predicted pixels.
    wrong = torch.where(target[:1], -30.0, 30.0)
    assert dice_loss(wrong, target[:1]).item() == pytest.approx(1 - 1 / (192 + 64 + 1), abs=1e-6)
    # Logit 0 everywhere: p = 0.5; dice = 1 - (2*0.5*64 + 1) / (128 + 64 + 1)
    assert dice_loss(torch.zeros(1, 16, 16), target[:1]).item() == pytest.approx(1 - 65 / 193, abs=1e-6)
    # Focal loss of a confident, correct prediction is ~0 and of a wrong one large.
    assert sigmoid_focal_loss(perfect, target).item() < 1e-8
    assert sigmoid_focal_loss(-perfect, target).item() > 1.0


def test_generalized_box_iou_known_values():
    a = torch.tensor([[0.1, 0.2, 0.5, 0.6], [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[2.0, 0.0, 3.0, 1.0], [0.0, 0.0, 1.0, 1.0], [1.0, 1.0, 3.0, 3.0]])
    torch.testing.assert_close(generalized_box_iou(a, a), torch.ones(3))
    # Disjoint [0,0,1,1] vs [2,0,3,1]: IoU 0, union 2, hull 3x1 -> 0 - (3 - 2) / 3.
    g = generalized_box_iou(torch.tensor([[0.0, 0.0, 1.0, 1.0]]), b[:1])
    assert g.item() == pytest.approx(-1 / 3, abs=1e-6)
    assert (generalized_box_iou(a[:1], b[:1]) < 0).all()
    # Partial overlap [0,0,2,2] vs [1,1,3,3]: inter 1, union 7, hull 9 -> 1/7 - 2/9.
    assert generalized_box_iou(a[2:], b[2:]).item() == pytest.approx(1 / 7 - 2 / 9, abs=1e-6)
    # cxcywh -> xyxy
    torch.testing.assert_close(box_cxcywh_to_xyxy(torch.tensor([[0.5, 0.5, 0.2, 0.4]])), torch.tensor([[0.4, 0.3, 0.6, 0.7]]))


def _fake_out(t: int, with_head: bool, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {"mask_logits": torch.randn(t, 1, 8, 8, generator=g), "box": torch.rand(t, 4, generator=g) * 0.5 + 0.25}
    if with_head:
        out["no_target_logit"] = torch.randn(t, generator=g)
    return out


def test_ssp_loss_parts_and_total():
    weights = load_config("ssp-sam-tiny")["loss"]
    mask = torch.zeros(3, 32, 32, dtype=torch.bool)
    mask[0, 4:20, 4:20] = True
    mask[1, 10:30, 0:16] = True
    box = torch.tensor([[0.375, 0.375, 0.5, 0.5], [0.25, 0.625, 0.5, 0.625], [0.5, 0.5, 0.1, 0.1]])
    no_target = torch.tensor([False, False, True])

    out = _fake_out(3, with_head=True)
    losses = ssp_loss(out, mask, box, no_target, weights)
    assert set(losses) == {"dice", "focal", "box_l1", "box_giou", "no_target", "total"}
    parts = sum(v for k, v in losses.items() if k != "total")
    torch.testing.assert_close(losses["total"], parts)
    # The box losses only see the phrases that have a target.
    pb, gb = out["box"][:2], box[:2]
    torch.testing.assert_close(losses["box_l1"], 5.0 * F.l1_loss(pb, gb))
    torch.testing.assert_close(
        losses["no_target"], 1.0 * F.binary_cross_entropy_with_logits(out["no_target_logit"], no_target.float())
    )

    no_head = ssp_loss(_fake_out(3, with_head=False), mask, box, no_target, weights)
    assert "no_target" not in no_head
    torch.testing.assert_close(no_head["total"], sum(v for k, v in no_head.items() if k != "total"))

    all_empty = ssp_loss(_fake_out(3, with_head=True), mask, box, torch.ones(3, dtype=torch.bool), weights)
    assert "box_l1" not in all_empty and "box_giou" not in all_empty


# ---- 7. gradients -------------------------------------------------------------------------------


def test_gradients_reach_trainable_modules():
    torch.manual_seed(5)
    model = build_model("ssp-sam-tiny").train()
    images = _images(2, 128, seed=11)
    tokens = model.clip.tokenize(PHRASES[:2])
    mask = torch.zeros(2, 128, 128, dtype=torch.bool)
    mask[0, 20:80, 30:90] = True
    mask[1, 64:, :64] = True
    box = torch.tensor([[0.47, 0.39, 0.47, 0.47], [0.25, 0.75, 0.5, 0.5]])
    losses = ssp_loss(model(images, tokens), mask, box, torch.zeros(2, dtype=torch.bool), model.config["loss"])
    assert torch.isfinite(losses["total"])
    losses["total"].backward()

    def nonzero(module: torch.nn.Module) -> bool:
        return any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())

    enc = model.ssp_encoder
    for name in ("visual_adapter", "linguistic_adapter", "prompt_generator", "fusion"):
        assert nonzero(getattr(enc, name)), name
    assert nonzero(model.sam.mask_decoder)
    assert nonzero(model.no_target_head)
    # Specific parameters a broken wiring would leave without gradient.
    for p in (
        enc.visual_adapter.sigma,
        enc.visual_adapter.scale,
        enc.visual_adapter.word_attention.in_proj_weight,
        enc.linguistic_adapter.phrase_attention.weight,
        enc.linguistic_adapter.gru.weight_ih_l0_reverse,
        enc.fusion.proj.weight,
        enc.prompt_generator.prompt_tokens,
        enc.prompt_generator.box_head.layers[0].weight,
        model.sam.mask_decoder.output_upscaling[0].weight,
    ):
        assert p.grad is not None and p.grad.abs().sum() > 0
