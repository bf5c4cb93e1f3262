"""Golden tests of the training-free CLIP paths and MobileSAM's TinyViT against the official code.

The weights are regenerated from the fixtures' manifests (``sspsam.tools.golden``) and go through
the public loaders: an OpenAI-format CLIP ``.pt`` → ``CLIPBackbone.load_checkpoint``; a MobileSAM
checkpoint (``image_encoder.*``) → ``SAMBackbone.load_checkpoint``. The rows are those of
``sspsam.tools.fidelity_clip`` (what ``sspsam tools fidelity-clip`` prints).
"""

from __future__ import annotations

import pytest

import sspsam.tools.fidelity_clip as fc


@pytest.fixture(scope="module", autouse=True)
def _release_clip():
    """One CLIP ViT-B/16 serves the whole module; free its ~600 MB afterwards."""
    yield
    fc.clip_model.cache_clear()


def _check(rows: list[dict]) -> None:
    assert rows
    bad = [r for r in rows if not fc.passed(r)]
    assert not bad, fc.format_rows(bad)


@pytest.mark.parametrize("size", [224, 448])
def test_sclip_dense_features(size):
    """SCLIP's CSA last block (with its FFN) and, at 448, its bicubic scale-factor positions."""
    _check(fc.sclip_dense(size))


def test_sclip_protocol():
    """Query features, mmseg resize (bit-exact), input, slide logits, probabilities and labels."""
    rows = {r["quantity"]: r for r in fc.sclip_protocol()}
    _check(list(rows.values()))
    assert rows["seg_image_resized"]["max_abs_diff"] == 0.0 and rows["seg_pred"]["mask_disagreement"] == 0.0


@pytest.mark.parametrize("size", [224, 448])
def test_clip_surgery_features(size):
    """Global token from the original path, patch tokens from the v-v path; bilinear positions at 448."""
    _check(fc.surgery_features(size))


def test_clip_surgery_text_and_feature_surgery():
    _check(fc.surgery_text_and_similarity())


def test_mobile_sam_tinyvit_embedding():
    _check(fc.tinyvit_embedding())
