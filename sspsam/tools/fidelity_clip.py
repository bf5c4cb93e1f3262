"""Fidelity of the training-free CLIP paths (SCLIP, CLIP-Surgery) and MobileSAM's TinyViT against
the golden outputs of their official code (``tests/golden/``; what each array is: its README).

Every check regenerates the fixture's random weights with :mod:`sspsam.tools.golden`, writes
them as the checkpoint a user would have (an OpenAI-format CLIP ``.pt`` state dict; a MobileSAM
checkpoint with ``image_encoder.*`` keys) and loads it through sspsam's public loaders, so the
loaders are under test too. ``checks()`` returns one row per compared quantity::

    {"fixture", "quantity", "max_abs_diff", "tolerance", "mask_disagreement"}

``mask_disagreement`` is, for label maps, the fraction of pixels whose label differs among the
pixels where the reference's top-1/top-2 margin exceeds ``tolerance`` (random weights leave
near-ties that float rounding may break either way); those rows have no ``max_abs_diff``.
``tests/test_golden_clip.py`` asserts these same rows; `sspsam tools fidelity-clip`
prints them.
"""

from __future__ import annotations

import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

import sspsam.tools.golden as golden

FEATURE_TOL = 1e-4  # O(1) features: CLIP tokens, TinyViT embedding
PROTOCOL_TOL = 1e-3  # SCLIP protocol logits / probabilities
LABEL_MARGIN = 1e-5  # labels are compared where the reference's top-1/top-2 margin exceeds this
# (SCLIP's seg_pred: 99.97 % of the pixels; the probabilities agree to ~3e-7, far inside it)


def _row(fixture: str, quantity: str, ours, ref, tol: float) -> dict:
    ours = ours.detach().cpu().numpy() if isinstance(ours, torch.Tensor) else np.asarray(ours)
    if ours.shape != ref.shape:
        raise AssertionError(f"{fixture}/{quantity}: shape {ours.shape}, reference {ref.shape}")
    diff = float(np.abs(ours.astype(np.float64) - ref.astype(np.float64)).max())
    return {"fixture": fixture, "quantity": quantity, "max_abs_diff": diff, "tolerance": tol, "mask_disagreement": None}


def _label_row(fixture: str, quantity: str, ours, ref, margin, tol: float) -> dict:
    ours = ours.detach().cpu().numpy() if isinstance(ours, torch.Tensor) else np.asarray(ours)
    if ours.shape != ref.shape:
        raise AssertionError(f"{fixture}/{quantity}: shape {ours.shape}, reference {ref.shape}")
    decided = np.asarray(margin) > tol
    wrong = (ours != ref) & decided
    return {"fixture": fixture, "quantity": quantity, "max_abs_diff": None, "tolerance": tol,
            "mask_disagreement": float(wrong.sum() / max(int(decided.sum()), 1))}


def _margin(scores: np.ndarray, axis: int = 0) -> np.ndarray:
    top = np.sort(scores, axis=axis)
    return np.take(top, -1, axis=axis) - np.take(top, -2, axis=axis)


# ---- models from the fixtures' weights, through the public loaders ---------------------------
@lru_cache(maxsize=1)
def clip_model():
    """CLIP ViT-B/16 with the sclip/clip_surgery weights, loaded as a user's ``ViT-B-16.pt``."""
    from sspsam.backbones.clip import CLIPBackbone

    clip = CLIPBackbone.from_config({"arch": "ViT-B-16", "quick_gelu": True, "surgery_layers": 6})
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ViT-B-16.pt"
        torch.save(golden.generate("sclip"), path)  # OpenAI key names, as in OpenAI's release
        clip.load_checkpoint(path)
    return clip.eval()


def tinyvit_model():
    """MobileSAM (TinyViT) loaded from a checkpoint whose image encoder is the fixture's weights."""
    from sspsam.backbones.sam import SAMBackbone

    sam = SAMBackbone(encoder="tiny_vit", img_size=1024, prompt_dim=256)
    ckpt = {f"image_encoder.{k}": v for k, v in golden.generate("mobile_sam_tinyvit").items()}
    ckpt |= {k: v for k, v in sam.state_dict().items() if not k.startswith("image_encoder.")}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mobile_sam.pt"
        torch.save(ckpt, path)
        sam.load_checkpoint(path)
    return sam.eval()


# ---- SCLIP -----------------------------------------------------------------------------------
@torch.inference_mode()
def sclip_dense(size: int) -> list[dict]:
    """CSA features of every token (SCLIP's ``encode_image(x, return_all=True, csa=True)``)."""
    from sspsam.models.cost import sclip_tokens

    clip = clip_model()
    n = _batch(size)
    x = torch.from_numpy(golden.arrays("sclip", "inputs")[f"input_{size}"][:n])
    ref = golden.arrays("sclip", "outputs")[f"dense_{size}"][:n]
    return [_row("sclip", _name(f"dense_{size}", n), sclip_tokens(clip, x), ref, FEATURE_TOL)]


def _batch(size: int) -> int:
    """Images compared per fixture: both at 224, the first at 448 (the interpolated-position path
    is the same for both images, and one 448 image costs as much as four at 224)."""
    return 2 if size == 224 else 1


def _name(quantity: str, n: int) -> str:
    return quantity if n == 2 else f"{quantity}[:{n}]"


def _class_lines() -> list[str]:
    return golden.run_meta("sclip")["class_lines"]


@torch.inference_mode()
def sclip_protocol() -> list[dict]:
    """SCLIP's segmentation protocol on ``seg_image``: query features, resize, input, slide
    logits, class probabilities and labels."""
    from sspsam.models.zeroshot.sclip import SCLIPProtocol, rescale_size, resize_bilinear

    inp, out = golden.arrays("sclip", "inputs"), golden.arrays("sclip", "outputs")
    proto = SCLIPProtocol(clip_model(), _class_lines())
    rows = [
        _row("sclip", "query_idx", proto.query_idx, out["query_idx"], 0.0),
        _row("sclip", "query_features", proto.query_features(), out["query_features"], FEATURE_TOL),
    ]
    img = inp["seg_image"]
    h, w = img.shape[:2]
    resized = resize_bilinear(img, *rescale_size(h, w))
    rows.append(_row("sclip", "seg_image_resized", resized, inp["seg_image_resized"], 0.0))
    x = proto.preprocess(img)
    rows.append(_row("sclip", "seg_input", x, inp["seg_input"], 1e-5))
    logits = proto.slide_logits(x, (h, w))
    probs, pred = proto.postprocess(logits)
    rows += [
        _row("sclip", "seg_slide_logits", logits, out["seg_slide_logits"], PROTOCOL_TOL),
        _row("sclip", "seg_probs", probs, out["seg_probs"], PROTOCOL_TOL),
        _label_row("sclip", "seg_pred", pred[None], out["seg_pred"], _margin(out["seg_probs"])[None], LABEL_MARGIN),
    ]
    return rows


# ---- CLIP-Surgery ----------------------------------------------------------------------------
@torch.inference_mode()
def surgery_features(size: int) -> list[dict]:
    """Token 0 = global embedding (original path), tokens 1.. = v-v path, at 224 or 448."""
    clip = clip_model()
    n = _batch(size)
    x = torch.from_numpy(golden.arrays("clip_surgery", "inputs")[f"input_{size}"][:n])
    patches, glob = clip.encode_normalised(x)
    ours = torch.cat([glob[:, None], patches], dim=1)
    ref = golden.arrays("clip_surgery", "outputs")[f"image_features_{size}"][:n]
    return [_row("clip_surgery", _name(f"image_features_{size}", n), ours, ref, FEATURE_TOL)]


@torch.inference_mode()
def surgery_text_and_similarity() -> list[dict]:
    """demo.py's flow: 85-template prompt ensemble, feature surgery on the 224 features, similarity maps."""
    from sspsam.models.cost import SURGERY_TEMPLATES, class_embeddings, feature_surgery, similarity_map

    clip = clip_model()
    out = golden.arrays("clip_surgery", "outputs")
    text = class_embeddings(clip, golden.run_meta("clip_surgery")["class_names"], SURGERY_TEMPLATES)
    feats = torch.from_numpy(out["image_features_224"])  # the stored features isolate this step
    sim = feature_surgery(feats / feats.norm(dim=-1, keepdim=True), text)
    maps = similarity_map(sim[:, 1:], (224, 224))  # [2,224,224,5]
    m = maps.numpy()
    return [
        _row("clip_surgery", "text_features_ensemble", text, out["text_features_ensemble"], FEATURE_TOL),
        _row("clip_surgery", "feature_surgery_similarity", sim, out["feature_surgery_similarity"], 1e-5),
        _row("clip_surgery", "similarity_map_224_mean", maps.mean((1, 2)), out["similarity_map_224_mean"], 1e-5),
        _label_row("clip_surgery", "similarity_map_224_argmax", maps.argmax(-1), out["similarity_map_224_argmax"],
                   _margin(m, axis=-1), LABEL_MARGIN),
    ]


# ---- MobileSAM TinyViT -----------------------------------------------------------------------
@torch.inference_mode()
def tinyvit_embedding() -> list[dict]:
    sam = tinyvit_model()
    x = golden.generate("mobile_sam_tinyvit", "inputs")["image"]
    ref = golden.arrays("mobile_sam_tinyvit", "outputs")["image_embedding"]
    return [_row("mobile_sam_tinyvit", "image_embedding", sam.image_encoder(x), ref, FEATURE_TOL)]


def checks() -> list[dict]:
    """Every row of this module (loads CLIP ViT-B/16 once; ~1 min on two busy cores)."""
    return [
        *sclip_dense(224), *sclip_dense(448), *sclip_protocol(),
        *surgery_features(224), *surgery_features(448), *surgery_text_and_similarity(),
        *tinyvit_embedding(),
    ]


def passed(row: dict) -> bool:
    if row["mask_disagreement"] is not None:
        return row["mask_disagreement"] == 0.0
    return row["max_abs_diff"] <= row["tolerance"]


def format_rows(rows: list[dict]) -> str:
    lines = ["| fixture | quantity | max abs diff | tolerance | mask disagreement | ok |", "|---|---|---|---|---|---|"]
    for r in rows:
        d = "–" if r["max_abs_diff"] is None else f"{r['max_abs_diff']:.2e}"
        m = "–" if r["mask_disagreement"] is None else f"{r['mask_disagreement']:.4f}"
        ok = "yes" if passed(r) else "NO"
        lines.append(f"| {r['fixture']} | {r['quantity']} | {d} | {r['tolerance']:.0e} | {m} | {ok} |")
    return "\n".join(lines)
