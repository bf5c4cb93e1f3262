"""Official SSP-SAM checkpoints (WayneTomas/SSP-SAM ``models/ssp_sam_{224,336}.py``) → sspsam.

The official model's ``state_dict()`` keeps its own module names (``encoder`` for CLIP-Surgery,
``text_proj`` for the GRU, ``vl_transformer``, ``reg_token`` …). This module recognises that
layout, picks the paper variant from the SSP head's shapes (the prompt generator's positions and the
word projection: ViT-B/16@224 → ``ssp-sam-b16-h``, ViT-L/14@336 → ``ssp-sam-l14-336-h``, both with
``ssp.head: official``) and renames every key onto sspsam's modules. Nothing is guessed: a key that
no rule maps, or a module the model needs that the file lacks, is an error that names the keys.

Two layouts exist. Before the model's first forward CLIP's blocks hold ``attn.in_proj_*`` /
``attn.out_proj.*``; CLIP-Surgery rebuilds the attention of the last blocks on the first forward,
so every checkpoint that training wrote holds ``attn.qkv.*`` / ``attn.proj.*`` there (the same
tensors) and one more copy of the first rebuilt attention as ``encoder.visual.attn.*``.
:func:`normalise_layout` maps the second onto the first.

CLIP is taken as the official ``test.py`` takes it: every ``encoder.*`` key of the file is dropped
and CLIP comes from the pretrained CLIP-Surgery file, which is OpenAI's CLIP (the weights cache's
``clip-vit-b16`` / ``clip-vit-l14-336``); official training keeps CLIP frozen, so the two agree.

Dropped on purpose (built by the official model but never used in its forward):
``img2img_attn.*`` (an ``MHAttentionRPE`` with its sine tables) and ``norm_text_cond_img.*``.
``sam.image_encoder.*`` is optional: the official pipeline caches SAM ViT-H embeddings, so a
checkpoint may lack it; the model then takes SAM ViT-H from the weights cache (``sam-vit-h``),
or is built without it (``sam_image_encoder=False``) for callers that bring embeddings.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from sspsam.errors import CheckpointError

UNUSED_PREFIXES = ("img2img_attn.", "norm_text_cond_img.")
CLIP_PREFIX = "encoder."
SAM_ENCODER_PREFIX = "sam.image_encoder."
_MARKERS = ("phrase_attn.fc.weight", "vl_transformer.encoder.layers.0.linear1.weight", "reg_token.weight")

# official key pattern → sspsam key (regex substitution), in order
_VAA = "ssp_encoder.visual_adapter."
_LAA = "ssp_encoder.linguistic_adapter."
_PG = "ssp_encoder.prompt_generator."
_RULES: list[tuple[str, object]] = [
    (r"^encoder\.(.+)$", r"clip.model.\1"),
    (r"^text_proj\.(.+)$", _LAA + r"gru.\1"),
    (r"^clip_proj\.(weight|bias)$", _LAA + r"word_proj.\1"),
    (r"^phrase_attn\.fc\.(weight|bias)$", _LAA + r"phrase_attention.\1"),
    # MLP.layers.i (ReLU applied in forward) → nn.Sequential index 2i (ReLU modules between)
    (r"^clip_img_proj\.layers\.(\d)\.(weight|bias)$", lambda m: f"{_VAA}mlp.{2 * int(m.group(1))}.{m.group(2)}"),
    (r"^img2text_attn\.(.+)$", _VAA + r"word_attention.\1"),
    (r"^imgtext_proj\.layers\.0\.(weight|bias)$", _VAA + r"text_proj.\1"),
    (r"^img_proj\.layers\.0\.(weight|bias)$", _VAA + r"image_proj.\1"),
    (r"^norm_img\.(weight|bias)$", _VAA + r"norm.\1"),
    (r"^tf_sigma$", _VAA + "sigma"),
    (r"^tf_scale$", _VAA + "scale"),
    (r"^mlp\.(weight|bias)$", r"ssp_encoder.fusion.proj.\1"),
    (r"^vl_transformer\.encoder\.layers\.(\d+)\.self_attn\.(.+)$", _PG + r"layers.\1.attn.\2"),
    (r"^vl_transformer\.encoder\.layers\.(\d+)\.linear1\.(weight|bias)$", _PG + r"layers.\1.ffn.0.\2"),
    (r"^vl_transformer\.encoder\.layers\.(\d+)\.linear2\.(weight|bias)$", _PG + r"layers.\1.ffn.3.\2"),
    (r"^vl_transformer\.encoder\.layers\.(\d+)\.(norm[12])\.(weight|bias)$", _PG + r"layers.\1.\2.\3"),
    (r"^vl_pos_embed\.weight$", _PG + "pos_embed"),
    (r"^prompt_token\.weight$", _PG + "prompt_tokens"),
    (r"^reg_token\.weight$", _PG + "box_token"),
    (r"^norm\.(weight|bias)$", _PG + r"norm.\1"),
    (r"^bbox_embed\.layers\.(\d)\.(weight|bias)$", _PG + r"box_head.layers.\1.\2"),
    (r"^sam\.(prompt_encoder|mask_decoder|image_encoder)\.(.+)$", r"sam.\1.\2"),
]
_COMPILED = [(re.compile(p), r) for p, r in _RULES]
# nn.Embedding [n, d] in the official model; a [1, n, d] parameter in sspsam
_UNSQUEEZE = {_PG + "pos_embed", _PG + "prompt_tokens", _PG + "box_token"}
# Paper variants by the SSP head's shapes: (prompt generator positions = 1 box + 128 prompts + CLIP
# patches, word projection input = CLIP text width) → sspsam config, and the CLIP tower it was trained on
_VARIANTS = {
    (1 + 128 + 14 * 14, 512): "ssp-sam-b16-h",
    (1 + 128 + 24 * 24, 768): "ssp-sam-l14-336-h",
}
_TOWERS = {"ssp-sam-b16-h": ((768, 3, 16, 16), 197), "ssp-sam-l14-336-h": ((1024, 3, 14, 14), 577)}
_DESCRIBED = {"ssp-sam-b16-h": "ViT-B/16@224 (ssp_sam_224)", "ssp-sam-l14-336-h": "ViT-L/14@336 (ssp_sam_336)"}
# CLIP-Surgery's rebuilt attention (after the first forward) → nn.MultiheadAttention's names
_SURGERY_RENAMES = [
    (re.compile(r"^(encoder\.visual\.transformer\.resblocks\.\d+\.attn)\.qkv\.(weight|bias)$"), r"\1.in_proj_\2"),
    (re.compile(r"^(encoder\.visual\.transformer\.resblocks\.\d+\.attn)\.proj\.(weight|bias)$"), r"\1.out_proj.\2"),
]
_SURGERY_COPY = "encoder.visual.attn."


def is_official(state_dict: Mapping) -> bool:
    return all(k in state_dict for k in _MARKERS)


def normalise_layout(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """Either official layout → the one before the first forward. Returns (state dict, layout name:
    'before-first-forward' or 'trained')."""
    out: dict[str, torch.Tensor] = {}
    trained = False
    for key, value in state_dict.items():
        if key.startswith(_SURGERY_COPY):  # a second reference to a block's attention, not a parameter of its own
            trained = True
            continue
        for pattern, repl in _SURGERY_RENAMES:
            if pattern.match(key):
                key, trained = pattern.sub(repl, key), True
                break
        out[key] = value
    return out, "trained" if trained else "before-first-forward"


def variant(state_dict: Mapping) -> str:
    """The sspsam config of an official checkpoint, from its SSP head's shapes; a CLIP tower in the
    file must be the one that head was trained on."""
    pos = state_dict.get("vl_pos_embed.weight")
    proj = state_dict.get("clip_proj.weight")
    if pos is None or proj is None:
        raise CheckpointError("official SSP-SAM checkpoint missing the keys its variant is read from "
                              "(vl_pos_embed.weight, clip_proj.weight)")
    key = (int(pos.shape[0]), int(proj.shape[-1]))
    if key not in _VARIANTS:
        raise CheckpointError(f"official SSP-SAM checkpoint with an unknown SSP head: {key[0]} prompt-generator positions, "
                              f"word projection from {key[1]}; known are {' and '.join(_DESCRIBED.values())}")
    name = _VARIANTS[key]
    conv = state_dict.get(CLIP_PREFIX + "visual.conv1.weight")
    tpos = state_dict.get(CLIP_PREFIX + "visual.positional_embedding")
    if conv is not None and tpos is not None and (tuple(conv.shape), int(tpos.shape[0])) != _TOWERS[name]:
        raise CheckpointError(f"official SSP-SAM checkpoint whose SSP head is {_DESCRIBED[name]} but whose CLIP tower is "
                              f"unknown: conv1 {tuple(conv.shape)}, {int(tpos.shape[0])} positions")
    return name


def convert(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Official keys → sspsam keys. Returns (state dict, dropped official keys)."""
    out: dict[str, torch.Tensor] = {}
    dropped, unknown = [], []
    for key, value in state_dict.items():
        if key.startswith(UNUSED_PREFIXES):
            dropped.append(key)
            continue
        for pattern, repl in _COMPILED:
            if pattern.match(key):
                new = pattern.sub(repl, key)
                out[new] = value.unsqueeze(0) if new in _UNSQUEEZE else value
                break
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"official SSP-SAM checkpoint with {len(unknown)} keys no rule maps: {first_keys(unknown)}")
    return out, dropped


def first_keys(keys: list[str], n: int = 6) -> str:
    """The first ``n`` keys and how many more, for an error message that names what went wrong."""
    return ", ".join(keys[:n]) + (f" … (+{len(keys) - n} more)" if len(keys) > n else "")


_few = first_keys  # the former name, kept for importers until they move
