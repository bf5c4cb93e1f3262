"""How close sspsam is to the official reference code, measured on the golden fixtures.

`sspsam tools fidelity` prints one row per fixture and quantity: the max abs
difference to the reference output, the tolerance it must meet, and for masks the fraction of
pixels whose binary decision differs, among the pixels whose reference logit is at least
``MASK_MARGIN`` from 0 (the fixtures' README: 0.013 % / 0.003 % of the logits lie closer). The golden tests call the same check functions
(:data:`CHECKS`), so the table and the tests cannot disagree. Rows of other families come from
``sspsam.tools.fidelity_clip.checks()`` when that module exists.

Each SSP-SAM check goes through the public loading path: the regenerated official state dict is
written as an official-layout checkpoint file and loaded with the official-checkpoint loader.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

import sspsam.tools.golden as golden

MASK_MARGIN = 1e-4  # logits this close to 0 may flip from float summation order alone


def row(fixture: str, quantity: str, ours, ref, tolerance: float, mask: bool = False) -> dict:
    a = np.asarray(ours, dtype=np.float64)
    b = np.asarray(ref, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"{fixture}/{quantity}: shape {a.shape} vs reference {b.shape}")
    out = {"fixture": fixture, "quantity": quantity, "max_abs_diff": float(np.abs(a - b).max()),
           "tolerance": tolerance, "mask_disagreement": None}
    if mask:
        # sigmoid >= 0.5 (the official binarisation), compared where the reference logit is
        # decided, |logit| >= MASK_MARGIN (as fidelity_clip compares labels outside near-ties)
        flip = (a >= 0) != (b >= 0)
        decided = np.abs(b) >= MASK_MARGIN
        out["mask_disagreement"] = float((flip & decided).sum() / max(int(decided.sum()), 1))
        out["flips_all_pixels"] = int(flip.sum())
    return out


# the opt-in speed settings change the numerics; their masks must still agree >= 99 % with the official fp32
PRECISIONS = ("bf16", "int8")
PRECISION_MASK_TOLERANCE = 0.01


def _forward(model, inp: dict, emb):
    """The official forward on a fixture's inputs: CLIP image and text towers, SSP head, SAM decoder."""
    import torch

    from sspsam.models.ssp_sam.model import ImageFeatures

    patches, glob = model.encode_clip(torch.from_numpy(inp["clip_image"]))
    text = model.encode_text(torch.from_numpy(inp["word_id"]))
    out = model.decode(ImageFeatures(sam=emb, clip_patches=patches, clip_global=glob), text)
    return patches, glob, text, out


def _precision_row(name: str, model, mode: str, inp: dict, emb, ref_masks) -> dict:
    """Masks of the model run as the predictor runs it under ``mode`` (bf16: weights cast except
    norms and score heads, forward under autocast; int8: dynamic int8 Linear layers) against the
    official fp32 masks. A copy is changed, so the fp32 model stays as it was."""
    import copy

    import torch

    from sspsam.backbones.runtime import quantize
    from sspsam.models.ssp_sam.model import official_mask_logits
    from sspsam.predict.precision import apply_dtype, autocast

    cpu = torch.device("cpu")
    if mode == "bf16":
        m, ctx = apply_dtype(copy.deepcopy(model), torch.bfloat16), autocast(cpu, torch.bfloat16)
    elif mode == "int8":
        m, ctx = quantize(copy.deepcopy(model), "int8"), autocast(cpu, torch.float32)
    else:
        raise ValueError(f"unknown precision {mode!r}: use one of {PRECISIONS}")
    with torch.no_grad(), ctx:
        out = _forward(m, inp, emb)[3]
    pred = official_mask_logits(out["mask_logits"].float(), model.sam.img_size)
    r = row(name, f"pred_masks, {mode} vs official fp32", pred, ref_masks, float("inf"), mask=True)
    r["mask_tolerance"] = PRECISION_MASK_TOLERANCE
    return r


@contextlib.contextmanager
def pretrained_clip(workdir: Path, official: dict):
    """A weights cache (``SSPSAM_HOME``) in ``workdir`` whose OpenAI CLIP of the variant is the
    fixture's CLIP tower, offline: the loader takes CLIP from the cache as the official ``test.py``
    takes it from the pretrained CLIP-Surgery file, and here that file is the fixture's."""
    import os

    import torch

    import sspsam.io.weights as weights
    from sspsam.config import load_config
    from sspsam.models.ssp_sam.official_checkpoint import CLIP_PREFIX, variant

    home = Path(workdir) / "sspsam-home"
    dest = home / "weights" / weights.get_spec(load_config(variant(official))["clip"]["weights"]).filename
    dest.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k[len(CLIP_PREFIX):]: v for k, v in official.items() if k.startswith(CLIP_PREFIX)}, dest)
    saved = {k: os.environ.get(k) for k in ("SSPSAM_HOME", "SSPSAM_OFFLINE")}
    os.environ.update(SSPSAM_HOME=str(home), SSPSAM_OFFLINE="1")
    try:
        yield home
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def write_trained_checkpoint(name: str, path: Path) -> dict:
    """The fixture's official weights in the container and layout official training writes
    (``{'model', 'epoch', 'args'}``, CLIP-Surgery's rebuilt attention names); returns the state dict
    in the layout before any forward."""
    import torch

    sd = golden.generate(name)
    torch.save({"model": golden.trained_layout(sd), "epoch": 19,
                "args": argparse.Namespace(is_pretrain=False, dataset="unc", clip_pretrained="CS-ViT-B-16.pt")}, path)
    return sd


def ssp_sam(name: str, workdir: Path, precisions: tuple[str, ...] = ()) -> list[dict]:
    """Official SSP-SAM (224 or 336 fixture): preprocessing, every intermediate, masks; plus one
    mask row per reduced ``precisions`` setting. The weights go through the public loading path:
    a checkpoint as official training writes it, CLIP from the weights cache."""
    import torch

    from sspsam.models.ssp_sam.model import official_mask_logits
    from sspsam.models.build import load_official

    path = Path(workdir) / f"{name}_official.pth"
    sd = write_trained_checkpoint(name, path)
    with pretrained_clip(workdir, sd):
        del sd
        gc.collect()
        model = load_official(path, sam_image_encoder=False).eval()
    inp, ref, meta = golden.arrays(name, "inputs"), golden.arrays(name, "outputs"), golden.run_meta(name)
    emb = golden.generate(name, "inputs")["sam_image_embedding"]
    rows = []
    with torch.no_grad():
        clip_x = model.clip_input([inp["image_0"], inp["image_1"]])
        rows.append(row(name, "clip_image (from the raw images)", clip_x, inp["clip_image"], 1e-5))
        tokens = model.tokenize(meta["phrases"])
        rows.append(row(name, "word_id (from the phrases)", tokens, inp["word_id"], 0.0))

        patches, glob, text, out = _forward(model, inp, emb)
        g = model.clip.grid_size
        ours = {
            "clip_image_tokens": torch.cat([glob[:, None], patches], 1),
            "clip_sentence": text.sentence,
            "clip_words": text.raw_words,
            "phrase_attn_weights": out["word_weights"],
            "phrase_embedding": out["phrase"][:, None],
            "similarity_map": out["sentence_map"].reshape(-1, g, g, 1),
            "verify_score": out["word_map"][..., None],
            "prompt_tokens": out["prompts"],
            "bbox_token": out["box_token"],
            "pred_boxes": out["box"][:, None],
            "low_res_masks": out["mask_logits"],
            "iou_predictions": out["iou"][:, None],
        }
        small = {"phrase_attn_weights", "similarity_map", "verify_score"}
        for key, value in ours.items():
            if key not in ref:  # the 336 fixture does not store the CLIP token/word arrays
                continue
            rows.append(row(name, key, value, ref[key], 1e-5 if key in small else 1e-4))
        pred = official_mask_logits(out["mask_logits"], model.sam.img_size)
        rows.append(row(name, "pred_masks (512x512 logits)", pred, ref["pred_masks"], 1e-4, mask=True))
    for mode in precisions:
        rows.append(_precision_row(name, model, mode, inp, emb, ref["pred_masks"]))
    return rows


CHECKS: dict[str, Callable[..., list[dict]]] = {  # (workdir, precisions=()) -> rows
    "ssp_sam_224": functools.partial(ssp_sam, "ssp_sam_224"),
    "ssp_sam_336": functools.partial(ssp_sam, "ssp_sam_336"),
}


def other_rows() -> list[dict]:
    try:
        import sspsam.tools.fidelity_clip as fidelity_clip  # SCLIP, CLIP-Surgery, TinyViT (written alongside)
    except ImportError:
        return []
    return list(fidelity_clip.checks())


def passed(r: dict) -> bool:
    """Within tolerance, and no binary decision flipped (rows of label maps carry no max abs diff);
    a reduced-precision row may flip up to its ``mask_tolerance``."""
    ok = r["max_abs_diff"] is None or r["max_abs_diff"] <= r["tolerance"]
    return ok and (r.get("mask_disagreement") is None or r["mask_disagreement"] <= r.get("mask_tolerance", 0.0))


def table(rows: list[dict]) -> str:
    head = f"| {'fixture':<18} | {'quantity':<34} | {'max abs diff':>12} | {'tolerance':>9} | {'mask disagreement':>17} | ok  |"
    lines = [head, "|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|"]
    for r in rows:
        md = r.get("mask_disagreement")
        md = "" if md is None else f"{md:.4%}"
        diff = "" if r["max_abs_diff"] is None else f"{r['max_abs_diff']:.3g}"
        tol = f"{r['tolerance']:.0e}" if np.isfinite(r["tolerance"]) else f"masks {r.get('mask_tolerance', 0.0):.0%}"
        lines.append(f"| {r['fixture']:<18} | {r['quantity']:<34} | {diff:>12} | {tol:>9} "
                     f"| {md:>17} | {'yes' if passed(r) else 'NO':<3} |")
    return "\n".join(lines)


def report(fixtures: list[str] | None = None, clip: bool = True, precisions: tuple[str, ...] = ()) -> int:
    """Print the table (the SSP-SAM ``fixtures``, default all; the CLIP-family rows unless
    ``clip`` is false; each fixture also in the reduced ``precisions``): 0 when every row passes, else 1.
    `sspsam tools fidelity` runs this."""
    unknown = [f for f in fixtures or () if f not in CHECKS]
    bad = [p for p in precisions if p not in PRECISIONS]
    if unknown or bad:
        raise ValueError(f"unknown fixture {unknown[0]!r} (one of {', '.join(sorted(CHECKS))})" if unknown
                         else f"unknown precision {bad[0]!r} (one of {', '.join(PRECISIONS)})")
    rows: list[dict] = []
    for name in fixtures or list(CHECKS):
        with tempfile.TemporaryDirectory(prefix="sspsam-fidelity-") as d:
            rows += CHECKS[name](Path(d), tuple(precisions))
        gc.collect()
    if clip:
        rows += other_rows()
    print(table(rows))
    return 0 if all(passed(r) for r in rows) else 1
