"""The config sections of the built-in methods, typed (see :mod:`sspsam.config` for the common
sections and :mod:`sspsam.models.registry` for which method reads which).

A field's default is the value the method's constructor uses when the key is absent (``None``:
the constructor works it out, e.g. from the backbones). The constructors still take the section as
a dict (the dict a checkpoint stores); this dataclass is what a config may say.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class SSPSection:
    """SSP-SAM's Semantic-Spatial Prompt encoder (``models/ssp_sam``)."""

    d_model: int = 512
    prompt_dim: int | None = None  # SAM's prompt width
    num_prompts: int = 128
    vaa_heads: int = 8
    vaa_mlp_layers: int = 3
    sigma_init: float = 0.5
    scale_init: float = 1.0
    pg_layers: int = 6
    pg_heads: int = 8
    pg_ffn: int = 2048
    dropout: float = 0.0
    vaa_dropout: float | None = None  # 0.1 with head: official, else 0.0
    word_dim: int | None = None
    no_target_head: bool | str = False  # false | true | mask
    head: str = "legacy"  # official | legacy
    clip_input: str | None = None  # centered | letterbox (default follows head)
    phrase_format: str | None = None  # official | plain (default follows head)


@dataclass(frozen=True)
class ESCNetSection:
    dim: int = 128
    text_dim: int = 128
    heads: int = 4
    dense: str = "surgery"
    clip_size: int | None = None
    finetune: str = "all"
    templates: Any = "default"
    spatial: str = "window"
    decoder: str = "upsample"
    guidance_layers: list = field(default_factory=lambda: [3, 5])
    guidance_dims: list = field(default_factory=lambda: [256, 128])
    guidance_proj_dims: list = field(default_factory=lambda: [32, 16])
    decoder_dims: list = field(default_factory=lambda: [64, 32])
    text_act: str = "none"
    appearance_guidance_dim: int = 0
    class_pool: int = 0
    window: int = 4
    prompts: dict = field(default_factory=dict)
    blocks: int = 4


@dataclass(frozen=True)
class SAMMISection:
    dim: int = 128
    text_dim: int = 128
    heads: int = 4
    guidance_layers: list = field(default_factory=lambda: [3, 5])
    guidance_dims: list = field(default_factory=lambda: [256, 128])
    hf_dims: list = field(default_factory=lambda: [32, 16])
    decoder_dims: list = field(default_factory=lambda: [64, 32])
    smagg: dict = field(default_factory=dict)
    point_dim: int = 64
    num_points: int = 16
    blocks: int = 2
    window: int = 4


@dataclass(frozen=True)
class ZeroShotSection:
    """The training-free pipeline; ``None``: ``sspsam.models.zeroshot.pipeline.DEFAULTS``."""

    dense_mode: str | None = None
    clip_size: int | None = None
    templates: Any = None
    logit_scale: float | None = None
    prompt: str | None = None
    points_per_class: int | None = None
    point_threshold: float | None = None
    nms_distance: float | None = None
    grid_points: int | None = None
    point_batch: int | None = None
    multimask: bool | None = None
    pred_iou_thresh: float | None = None
    smagg_iou: float | None = None
    smagg_contain: float | None = None
    mask_weight: float | None = None


@dataclass(frozen=True)
class ZeroShotRESSection:
    """The training-free referring path (``predict/zeroshot_res.py``)."""

    points: int | None = None
    crop_margin: float | None = None
    no_target_threshold: float | None = None
    score_temperature: float | None = None
    templates: Any = None
    nms_distance: float | None = None
