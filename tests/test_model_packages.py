"""The layout of the model packages: methods share code only through models/common, the SSP head
is chosen once (the legacy head's classes live apart), every OVSS model has one method set, and
the training-free referring path is a Predictor on a model in models/zeroshot."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import numpy as np
import pytest
import torch

from sspsam.config import load_config
from sspsam.models.build import build_model

MODELS = Path(__file__).resolve().parents[1] / "sspsam" / "models"
METHODS = ("ssp_sam", "escnet", "sam_mi", "zeroshot")


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_no_method_package_imports_another():
    wrong = []
    for method in METHODS:
        for path in (MODELS / method).glob("*.py"):
            for name in _imports(path):
                for other in METHODS:
                    if other != method and name.startswith(f"sspsam.models.{other}"):
                        wrong.append(f"{method}/{path.name} -> {name}")
    assert not wrong, wrong


def test_paper_modules_carry_no_head_switch():
    from sspsam.models.ssp_sam import encoder, linguistic_adapter, prompt_generator, visual_adapter

    for module in (encoder, linguistic_adapter, prompt_generator, visual_adapter):
        assert "official:" not in inspect.getsource(module).replace("official: bool", "official:"), module.__name__
        assert "if self.official" not in inspect.getsource(module), module.__name__


@pytest.fixture(scope="module")
def heads():
    out = {}
    for head in ("legacy", "official"):
        cfg = load_config("ssp-sam-tiny")
        cfg["ssp"] = {**cfg["ssp"], "head": head}
        torch.manual_seed(0)
        out[head] = build_model(cfg).eval()
    return out


def test_the_head_is_chosen_once(heads):
    from sspsam.models.ssp_sam.encoder import SemanticSpatialPromptEncoder
    from sspsam.models.ssp_sam.legacy_head import LegacySemanticSpatialPromptEncoder

    assert type(heads["official"].ssp_encoder) is SemanticSpatialPromptEncoder
    assert type(heads["legacy"].ssp_encoder) is LegacySemanticSpatialPromptEncoder
    assert heads["official"].official and not heads["legacy"].official
    legacy, official = heads["legacy"].state_dict(), heads["official"].state_dict()
    extra = sorted(k.split("ssp_encoder.")[-1] for k in set(official) - set(legacy))
    assert extra == ["prompt_generator.norm.bias", "prompt_generator.norm.weight",
                     "visual_adapter.image_proj.bias", "visual_adapter.image_proj.weight",
                     "visual_adapter.text_proj.bias", "visual_adapter.text_proj.weight"]
    assert not set(legacy) - set(official)
    assert legacy["ssp_encoder.visual_adapter.sigma"].shape == ()
    assert official["ssp_encoder.visual_adapter.sigma"].shape == (1,)


def test_mask_logits_512(heads):
    from sspsam.models.common.masks import official_mask_logits

    m = heads["legacy"]
    low = torch.randn(2, 1, 8, 8)
    got = m.mask_logits_512(low)
    assert got.shape == (2, 1, 512, 512) and torch.equal(got, official_mask_logits(low, m.image_size))


@pytest.mark.parametrize("name", ["escnet-tiny", "sam-mi-tiny", "zeroshot-tiny"])
def test_every_ovss_model_has_the_same_methods(name):
    torch.manual_seed(0)
    m = build_model(load_config(name)).eval()
    s = m.image_size
    x = torch.rand(1, 3, s, s) * 255
    valid = torch.tensor([[s, s * 3 // 4]])
    with torch.no_grad():
        emb = m.class_embeddings(["background", "red square"])
        split = m.decode_classes(m.encode_image(x, valid), emb)["logits"]
        whole = m(x, emb, valid_hw=valid)["logits"]
    assert emb.shape[0] == 2 and split.shape[:2] == (1, 2)
    assert torch.equal(split, whole)
    assert list(inspect.signature(m.forward).parameters) == ["images", "class_emb", "valid_hw"]
    assert list(inspect.signature(m.encode_image).parameters) == ["images", "valid_hw"]
    assert list(inspect.signature(m.decode_classes).parameters) == ["features", "class_emb"]


def test_zeroshot_res_is_a_predictor():
    from sspsam.models.zeroshot.res import ZeroShotRES
    from sspsam.predict.base import Predictor
    from sspsam.predict.zeroshot_res import ZeroShotSegmenter

    torch.manual_seed(0)
    seg = ZeroShotSegmenter(build_model(load_config("zeroshot-tiny")), device="cpu")
    assert isinstance(seg, Predictor) and isinstance(seg.model, ZeroShotRES)
    assert seg.dtype == torch.float32 and seg.model.clip is seg.model.zeroshot.clip


def test_zero_shot_refuses_what_only_a_trained_decoder_can_do():
    """Clicks and logits come from a trained model's prompt tokens; the training-free predictor
    refuses them by name instead of answering as if they had been used."""
    from sspsam.errors import ConfigError
    from sspsam.models.build import load_zeroshot
    from sspsam.predict.zeroshot_res import ZeroShotSegmenter

    seg = ZeroShotSegmenter(load_zeroshot("zeroshot-tiny"), "cpu")
    img = np.zeros((32, 32, 3), np.uint8)
    for kw in ({"points": [[5, 5]]}, {"boxes": [[0, 0, 10, 10]]}, {"return_logits": True}):
        with pytest.raises(ConfigError, match="training-free path"):
            seg.segment(img, "a thing", **kw)
