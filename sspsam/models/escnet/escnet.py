"""ESC-Net (Lee et al., CVPR 2025, arXiv 2411.14723): SAM decoder blocks inside a one-stage
CLIP cost-aggregation network, steered by pseudo prompts derived from the image–text correlation.

Pipeline (one class module per paper element):

CLIP image/text → cosine correlation C [B,K,g,g] → N × :class:`ESCBlock`
(:class:`PseudoPromptGenerator` → :class:`SAMBlock` → 1×1-conv fusion → :class:`VLFModule`)
→ decoder → per-class logits [B,K,4g,4g].

The SAM image encoder is not used: SAM's pretrained two-way transformer runs on CLIP's dense
features. There is no official code; ``papers/notes.md`` fixes the structure and, where the paper
builds on CAT-Seg, CAT-Seg's public code (KU-CVLAB/CAT-Seg, ViT-B ``vitb_384`` / ViT-L ``vitl_336``
settings) fixes the conventions. ``escnet-vitb.yaml`` / ``escnet-l14.yaml`` select the paper
behaviour through config keys (see :class:`ESCNet`): CAT-Seg's dense CLIP tokens at 384 px (ViT-B/16)
or 336 px (ViT-L/14) with interpolated positions → a 24×24 cost map; q/v attention fine-tuning of
both CLIP towers, CLIP attention and the SAM block at 2e-6 and the rest at 2e-4
(:meth:`ESCNet.param_groups`); one point and one mask prompt per k-means region (N_o = 5), embedded by
SAM's prompt encoder; the Swin block (window + shifted-window attention with Swin's mask) and the
linear-attention transformer against text in the VLF module; CAT-Seg's guided upsampling decoder
(CLIP blocks 3/7 resp. 7/15); CAT-Seg's per-pixel BCE (``train.loss: catseg``). The tiny configs
(and the bundled ``ovss-shapes-demo``) keep the lighter defaults: CLIP-Surgery features at CLIP's
own size, a windowed block without shifts, the plain decoder, one union mask per class.

Remaining departures from the paper (and from CAT-Seg where the paper defers to it):

* Choices the paper leaves open, as config keys: α = 0.5 (``alpha``), the softmax temperature over
  classes (0.05 on cosine correlations for block 1, 1 on the learned score maps of later blocks),
  k-means with a deterministic init (valid pixels at evenly spaced ranks, ≤ 10 Lloyd steps), the
  point at the arg-max pixel's cell centre, the mask prompt as P_k's logit inside the region and -10
  outside (clamped to ±10), at 4× the cost grid as SAM's mask input expects.
* One mask prompt per region gives N_o dense embeddings per class; they are averaged over the
  class's non-empty regions (SAM's "no mask" embedding when there are none) so that the SAM block
  runs once per class, with the N_o point tokens side by side. The paper does not say how the N_o
  prompts are combined.
* Later ESC blocks take their prompts from a 1×1-conv score head on the previous block's output
  (``aux_logits``); the SAM block's input is CLIP's dense features through a learned 1×1 conv to
  SAM's width, with SAM's own IoU/mask tokens prepended to the prompt tokens; the fusion is a 1×1
  conv on [cost embedding, SAM features] added to the cost embedding; the one pretrained two-way
  transformer is shared by all ESC blocks; the paper configs train on the final logits only
  (``aux_weight: 0``; the score heads learn through the mask prompts). All of these are our reading.
* The correlation is embedded by a 1×1 conv (the notes) where CAT-Seg uses a 7×7 conv; the class
  aggregation projects q and k with one fused linear layer (CAT-Seg: two, the same function).
* CAT-Seg pads / truncates the class axis to 256 classes (learnable padding tokens, top-256 by
  correlation) in the class aggregation; not done here (every class is kept).
* Input geometry: images arrive as SAM's letterboxed square (1024 px) and are resized, antialiased,
  to 384 / 336 px for CLIP; CAT-Seg trains on 384 px crops fed to CLIP as they are and evaluates on
  640 px with its own sliding window; sspsam's evaluator uses its own slide.
* Text: one template ("A photo of a {} in the scene", CAT-Seg's ``single``); CAT-Seg's splitting of
  "a, b" class names into averaged synonyms is not done.
* Optimisation: the fused q/k/v in-projection of open_clip keeps k frozen by zeroing its gradient
  rows, so the q/v rows train without weight decay (CAT-Seg decays q_proj / v_proj by 1e-4 at
  lr 2e-6); the trainer's augmentation is a horizontal flip of the letterboxed image (CAT-Seg: random
  384 crops with SSD colour jitter), and COCO-Stuff training data is not bundled.
* The SAM image encoder is still built (for strict loading of SAM checkpoints) but never run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sspsam.backbones.clip import CLIPBackbone
from sspsam.backbones.sam import SAMBackbone
from sspsam.errors import ConfigError
from sspsam.models.cost import class_embeddings, correlation, resolve_templates
from sspsam.models.common.ovss import ImageInput
from sspsam.models.common.cost_aggregation import (
    ClassLinearAttention,
    GuidanceProjection,
    GuidedUpsampleDecoder,
    SpatialBlock,
    SwinBlock,
    UpsampleDecoder,
    clip_features,
)


def kmeans(points: torch.Tensor, valid: torch.Tensor, k: int, iters: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched Lloyd k-means with a deterministic init.

    points [N,P,d], valid [N,P] bool → (centroids [N,k,d], assignment [N,P] in [0,k), -1 where
    invalid). Init: the valid points at evenly spaced ranks (in input order), so equal inputs give
    equal clusters. A cluster left without points keeps its centroid and gets no assignment.
    """
    n, p, d = points.shape
    cnt = valid.sum(1)  # [N]
    rank = torch.cumsum(valid.long(), 1) - 1  # rank of each valid point among the valid ones
    want = ((torch.arange(k, device=points.device) + 0.5)[None] * cnt[:, None] / k).long()  # [N,k]
    # index of the valid point whose rank == want
    hit = (rank[:, None, :] == want[:, :, None]) & valid[:, None, :]  # [N,k,P]
    idx = hit.float().argmax(-1)
    cent = torch.gather(points, 1, idx[..., None].expand(n, k, d)).clone()
    assign = torch.full((n, p), -1, dtype=torch.long, device=points.device)
    for _ in range(iters):
        dist = torch.cdist(points, cent)  # [N,P,k]
        assign = torch.where(valid, dist.argmin(-1), torch.full_like(assign, -1))
        onehot = F.one_hot(assign.clamp(min=0), k).float() * valid[..., None]
        num = onehot.sum(1)  # [N,k]
        new = onehot.transpose(1, 2) @ points / num.clamp(min=1)[..., None]
        new = torch.where(num[..., None] > 0, new, cent)
        if torch.equal(new, cent):
            break
        cent = new
    return cent, assign


class PseudoPromptGenerator(nn.Module):
    """ESC-Net's Pseudo Prompt Generator: class-wise point + mask prompts from a score map.

    Per class k: P = softmax over classes of score/τ; pixels with P_k > α form the class region;
    k-means on their coordinates splits it into N_o regions; the arg-max-P pixel of each region is
    a positive point. ``mask="region"`` (the paper): each region is also a mask prompt (P_k's logit
    inside it); SAM's prompt encoder embeds the N_o masks and their dense embeddings are averaged
    over the class's non-empty regions (SAM's "no mask" embedding for a class without any), so the
    SAM block stays batched over classes. ``mask="union"`` (tiny configs): one mask prompt per class,
    the union of its regions. Empty regions become SAM's "not a point".
    """

    def __init__(self, num_regions: int = 5, alpha: float = 0.5, temperature: float = 0.05, iters: int = 10, mask: str = "union"):
        super().__init__()
        if mask not in ("union", "region"):
            raise ConfigError(f"escnet prompts.mask must be 'union' or 'region', not '{mask}'")
        self.num_regions, self.alpha, self.temperature, self.iters, self.mask = num_regions, alpha, temperature, iters, mask

    def regions(self, score: torch.Tensor, temperature: float | None = None):
        """score [B,K,h,w] → (prob [B,K,h,w], points [B,K,N_o,2] as (x, y) grid indices,
        labels [B,K,N_o] 1 / -1, region masks [B,K,N_o,h,w] bool)."""
        b, k, h, w = score.shape
        prob = (score / (temperature or self.temperature)).softmax(1)
        region = prob > self.alpha
        ys, xs = torch.meshgrid(torch.arange(h, device=score.device), torch.arange(w, device=score.device), indexing="ij")
        coords = torch.stack([xs, ys], -1).reshape(1, h * w, 2).float().expand(b * k, -1, -1)
        valid = region.reshape(b * k, h * w)
        _, assign = kmeans(coords, valid, self.num_regions, self.iters)
        p = prob.detach().reshape(b * k, 1, h * w)
        member = assign[:, None, :] == torch.arange(self.num_regions, device=score.device)[None, :, None]  # [BK,N_o,hw]
        masked = torch.where(member, p.expand_as(member).float(), torch.full_like(member, -1.0, dtype=torch.float))
        best = masked.argmax(-1)  # [BK,N_o]
        pts = coords[0][best]  # [BK,N_o,2]
        labels = torch.where(member.any(-1), 1, -1)
        return prob, pts.view(b, k, -1, 2), labels.view(b, k, -1), member.view(b, k, -1, h, w)

    def points(self, score: torch.Tensor, temperature: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """score [B,K,h,w] → (prob [B,K,h,w], points [B,K,N_o,2] as (x, y) grid indices, labels [B,K,N_o] 1 / -1).

        ``temperature`` defaults to the configured one (for cosine correlations); learned logits use 1."""
        return self.regions(score, temperature)[:3]

    def forward(self, score: torch.Tensor, sam: SAMBackbone, temperature: float | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """score [B,K,h,w] → (sparse [B·K,N_o+1,C], dense [B·K,C,h,w], prompts for inspection)."""
        b, k, h, w = score.shape
        prob, pts, labels, member = self.regions(score, temperature)
        scale = torch.tensor([sam.img_size / w, sam.img_size / h], device=score.device)
        coords = (pts + 0.5) * scale - 0.5  # grid cell centre in SAM's input pixels (the encoder adds 0.5)
        logit = torch.logit(prob.clamp(1e-4, 1 - 1e-4)).clamp(-10, 10)
        prompts = {"prob": prob, "points": pts, "labels": labels}
        if self.mask == "union":
            mask_in = torch.where(prob > self.alpha, logit, torch.full_like(logit, -10.0)).flatten(0, 1)[:, None]
            mask_in = F.interpolate(mask_in, size=(4 * h, 4 * w), mode="bilinear", align_corners=False)
            sparse, dense = sam.prompt_encoder(points=(coords.flatten(0, 1), labels.flatten(0, 1)), boxes=None, masks=mask_in)
            return sparse, dense, prompts
        sparse, _ = sam.prompt_encoder(points=(coords.flatten(0, 1), labels.flatten(0, 1)), boxes=None, masks=None)
        mask_in = torch.where(member, logit[:, :, None], torch.full_like(logit[:, :, None], -10.0))  # [B,K,N_o,h,w]
        mask_in = F.interpolate(mask_in.flatten(0, 2)[:, None], size=(4 * h, 4 * w), mode="bilinear", align_corners=False)
        # SAM's mask embedding ends in a 1×1 conv, so the mean over regions is taken before it (the
        # same value, without B·K·N_o maps of SAM's full width in memory)
        down = sam.prompt_encoder.mask_downscaling
        per_region = down[:-1](mask_in).view(b * k, self.num_regions, -1, h, w)
        filled = member.flatten(0, 1).flatten(2).any(-1).to(per_region.dtype)  # [BK,N_o]
        n = filled.sum(1)
        dense = down[-1]((per_region * filled[..., None, None, None]).sum(1) / n.clamp(min=1)[:, None, None, None])
        none = sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).to(dense.dtype)
        dense = torch.where(n[:, None, None, None] > 0, dense, none.expand_as(dense))
        prompts["regions"] = member
        return sparse, dense, prompts


class SAMBlock(nn.Module):
    """SAM's pretrained two-way transformer on CLIP features, batched over classes: SAM's own
    output tokens plus the class's pseudo-prompt tokens attend to the prompted image features."""

    def __init__(self, sam: SAMBackbone):
        super().__init__()
        self.sam = [sam]  # a reference, not a submodule: the weights belong to ``ESCNet.sam``

    def forward(self, feats: torch.Tensor, k: int, sparse: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """feats [B,C,h,w] (SAM width), sparse [B·K,T,C], dense [B·K,C,h,w] → per-class features [B,K,C,h,w]."""
        sam = self.sam[0]
        dec = sam.mask_decoder
        b, c, h, w = feats.shape
        out_tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], 0)
        tokens = torch.cat([out_tokens[None].expand(sparse.shape[0], -1, -1), sparse], 1)
        src = feats.repeat_interleave(k, 0) + dense
        pe = sam.prompt_encoder.pe_layer((h, w))[None]
        _, keys = dec.transformer(src, pe, tokens)
        return keys.transpose(1, 2).reshape(b, k, c, h, w)


class VLFModule(nn.Module):
    """Vision-Language Fusion: 1×1-conv embedding of the correlation map added to the features,
    a spatial block per class (the Swin block, or the tiny configs' windowed block), then the
    linear-attention transformer across classes guided by the text."""

    def __init__(self, dim: int, text_dim: int, heads: int, window: int, spatial: str = "window", guidance_dim: int = 0, class_pool: int = 0):
        super().__init__()
        self.corr_embed = nn.Conv2d(1, dim, 1)
        self.spatial = SwinBlock(dim, heads, window, guidance_dim) if spatial == "swin" else SpatialBlock(dim, heads, window)
        self.classes = ClassLinearAttention(dim, text_dim, heads, pool=class_pool)

    def forward(self, x: torch.Tensor, corr: torch.Tensor, text: torch.Tensor, guidance: torch.Tensor | None = None) -> torch.Tensor:
        b, k, d, h, w = x.shape
        y = x.flatten(0, 1) + self.corr_embed(corr.flatten(0, 1)[:, None])
        if isinstance(self.spatial, SwinBlock):
            y = self.spatial(y, None if guidance is None else guidance.repeat_interleave(k, 0))
        else:
            y = self.spatial(y)
        return self.classes(y.view(b, k, d, h, w), text)


class ESCBlock(nn.Module):
    """One ESC block: pseudo prompts from the current score → SAM block → 1×1-conv fusion of the
    SAM features with the cost embedding → VLF. Also returns its own score map for the next block."""

    def __init__(self, dim: int, sam_dim: int, text_dim: int, heads: int, window: int, ppg: dict, **vlf):
        super().__init__()
        self.ppg = PseudoPromptGenerator(**ppg)
        self.fuse = nn.Conv2d(dim + sam_dim, dim, 1)
        self.vlf = VLFModule(dim, text_dim, heads, window, **vlf)
        self.score = nn.Conv2d(dim, 1, 1)

    def forward(self, x, feats, score, corr, text, sam_block: SAMBlock, temperature: float | None, guidance=None):
        b, k, d, h, w = x.shape
        sparse, dense, prompts = self.ppg(score, sam_block.sam[0], temperature)
        sam_feats = sam_block(feats, k, sparse, dense)
        y = self.fuse(torch.cat([x, sam_feats], 2).flatten(0, 1)).view(b, k, d, h, w)
        y = self.vlf(x + y, corr, text, guidance)
        return y, self.score(y.flatten(0, 1)).view(b, k, h, w), prompts


SAM_BLOCK_PARTS = ("sam.mask_decoder.transformer.", "sam.mask_decoder.iou_token.", "sam.mask_decoder.mask_tokens.", "sam.prompt_encoder.")


def _only_q_and_v(grad: torch.Tensor) -> torch.Tensor:
    """open_clip fuses q, k, v into one ``in_proj``; CAT-Seg fine-tunes q and v only, so the k rows get no gradient."""
    n = grad.shape[0] // 3
    grad = grad.clone()
    grad[n : 2 * n] = 0
    return grad


class ESCNet(nn.Module):
    """ESC-Net for open-vocabulary semantic segmentation (the shared OVSS model contract:
    ``forward(images [B,3,S,S] 0..255, class_emb [K,E]) -> {"logits": [B,K,h,w], ...}``).

    Config keys whose code default keeps the tiny configs' (and the bundled demo's) modules, and
    the paper / CAT-Seg setting that ``escnet-vitb.yaml`` and ``escnet-l14.yaml`` select:
    ``dense`` surgery | clip, ``clip_size`` (CLIP input side), ``spatial`` window | swin,
    ``decoder`` upsample | catseg (with ``guidance_proj_dims``), ``appearance_guidance_dim``
    (0 | 128), ``class_pool`` (0 | 2), ``finetune`` all | attention, ``prompts.mask`` union | region,
    ``templates`` (default | CAT-Seg's single template), ``text_act`` (none | relu).
    """

    KNOWN = {
        "dim", "text_dim", "blocks", "heads", "window", "guidance_layers", "guidance_dims", "decoder_dims", "prompts",
        "dense", "clip_size", "spatial", "decoder", "guidance_proj_dims", "appearance_guidance_dim", "class_pool", "finetune",
        "templates", "text_act",
    }

    def __init__(self, clip: CLIPBackbone, sam: SAMBackbone, cfg: dict, config: dict):
        super().__init__()
        cfg = dict(cfg)
        if extra := set(cfg) - self.KNOWN:
            raise ConfigError(f"unknown keys in escnet config: {sorted(extra)}")
        self.clip, self.sam, self.config = clip, sam, config
        dim = cfg.get("dim", 128)
        text_dim = cfg.get("text_dim", 128)
        heads = cfg.get("heads", 4)
        width = clip.model.visual.transformer.width
        sam_dim = sam.prompt_encoder.embed_dim
        self.dense_mode = cfg.get("dense", "surgery")
        self.clip_size = cfg.get("clip_size")
        self.finetune = cfg.get("finetune", "all")
        self.templates = resolve_templates(cfg.get("templates", "default"))
        spatial, decoder = cfg.get("spatial", "window"), cfg.get("decoder", "upsample")
        for key, value, allowed in (("dense", self.dense_mode, ("surgery", "clip")), ("spatial", spatial, ("window", "swin")),
                                    ("decoder", decoder, ("upsample", "catseg")), ("finetune", self.finetune, ("all", "attention"))):
            if value not in allowed:
                raise ConfigError(f"escnet {key} must be one of {', '.join(allowed)}, not '{value}'")
        self.guidance_layers = list(cfg.get("guidance_layers", [3, 5]))
        guidance_dims = list(cfg.get("guidance_dims", [256, 128]))
        decoder_dims = list(cfg.get("decoder_dims", [64, 32]))
        if not len(self.guidance_layers) == len(guidance_dims) == len(decoder_dims):
            raise ConfigError("escnet guidance_layers, guidance_dims and decoder_dims need the same length")
        self.visual_proj = nn.Conv2d(clip.embed_dim, sam_dim, 1)  # CLIP features into the SAM block's width
        self.text_proj = nn.Linear(clip.embed_dim, text_dim)
        if cfg.get("text_act", "none") not in ("none", "relu"):
            raise ConfigError(f"escnet text_act must be none or relu, not '{cfg.get('text_act')}'")
        self.text_act = cfg.get("text_act", "none")  # CAT-Seg's text guidance: linear + ReLU
        self.corr_embed = nn.Conv2d(1, dim, 1)
        appearance = int(cfg.get("appearance_guidance_dim", 0))
        if appearance:  # CAT-Seg's appearance guidance: the dense CLIP features, 3×3 conv + ReLU, on the Swin q/k
            self.appearance = nn.Sequential(nn.Conv2d(clip.embed_dim, appearance, 3, padding=1), nn.ReLU())
        self.sam_block = SAMBlock(sam)
        vlf = {}
        if spatial == "swin" or appearance or cfg.get("class_pool"):
            vlf = {"spatial": spatial, "guidance_dim": appearance, "class_pool": int(cfg.get("class_pool", 0))}
        self.blocks = nn.ModuleList(
            ESCBlock(dim, sam_dim, text_dim, heads, cfg.get("window", 4), cfg.get("prompts", {}), **vlf) for _ in range(cfg.get("blocks", 4))
        )
        self.guidance = GuidanceProjection([width] * len(guidance_dims), guidance_dims)
        if decoder == "catseg":
            proj = list(cfg.get("guidance_proj_dims", [32, 16]))
            self.decoder = GuidedUpsampleDecoder(dim, guidance_dims, proj, decoder_dims)
        else:
            self.decoder = UpsampleDecoder(dim, guidance_dims, decoder_dims)
        if self.finetune == "attention":
            self._attention_finetuning()

    def _attention_finetuning(self) -> None:
        """CAT-Seg's ``clip_finetune: attention`` and ESC-Net's split: of CLIP only the attention q and
        v projections of both towers train; of SAM only the SAM block (two-way transformer, its output
        tokens, the prompt encoder); the unused SAM image encoder and mask head are frozen."""
        for name, p in self.clip.model.named_parameters():
            train = "transformer.resblocks." in name and ".attn.in_proj_" in name
            p.requires_grad_(train)
            if train:
                p.register_hook(_only_q_and_v)
        for name, p in self.sam.named_parameters():
            p.requires_grad_(f"sam.{name}".startswith(SAM_BLOCK_PARTS))

    def param_groups(self, lr: float, backbone_lr: float, weight_decay: float) -> list[dict]:
        """Optimizer groups. ``finetune: attention`` (the paper): ``clip_attention`` (q/v of both CLIP
        towers) and ``sam_block`` at ``backbone_lr`` (ESC-Net: 2e-6), the ``new`` modules at ``lr``
        (2e-4). As CAT-Seg's optimizer, norm layers and embeddings (SAM's tokens) get no weight
        decay (``*_no_decay`` groups); the fused q/k/v rows get none either, so the frozen k rows stay
        exactly as loaded (AdamW would decay them). ``finetune: all``: everything under
        ``clip.``/``sam.`` that trains at ``backbone_lr``, the rest at ``lr``, all with decay."""
        if self.finetune != "attention":
            back, rest = [], []
            for name, p in self.named_parameters():
                if p.requires_grad:
                    (back if name.startswith(("clip.", "sam.")) else rest).append(p)
            return [{"name": "new", "params": rest, "lr": lr, "weight_decay": weight_decay},
                    {"name": "backbone", "params": back, "lr": backbone_lr, "weight_decay": weight_decay}]
        spec = {"new": (lr, weight_decay), "new_no_decay": (lr, 0.0), "clip_attention": (backbone_lr, 0.0),
                "sam_block": (backbone_lr, weight_decay), "sam_block_no_decay": (backbone_lr, 0.0)}
        groups: dict[str, list] = {k: [] for k in spec}
        seen: set[int] = set()
        for mod_name, module in self.named_modules():
            no_decay = isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm2d, nn.Embedding))
            for p in module.parameters(recurse=False):
                if not p.requires_grad or id(p) in seen:
                    continue
                seen.add(id(p))
                if mod_name.startswith("clip."):
                    groups["clip_attention"].append(p)
                else:
                    base = "sam_block" if mod_name.startswith("sam.") else "new"
                    groups[base + ("_no_decay" if no_decay else "")].append(p)
        return [{"name": k, "params": v, "lr": spec[k][0], "weight_decay": spec[k][1]} for k, v in groups.items() if v]

    @property
    def image_size(self) -> int:
        return self.sam.img_size

    def class_embeddings(self, classes: list[str]) -> torch.Tensor:
        """[K,E] text embeddings with the configured prompt templates (CAT-Seg's ViT-B setting: the
        single "A photo of a {} in the scene"); differentiable, since the text tower may train."""
        return class_embeddings(self.clip, classes, self.templates)

    def encode_image(self, images: torch.Tensor, valid_hw: torch.Tensor | None = None) -> ImageInput:
        """The image side is not cached: CLIP's dense features feed the class-wise blocks in one
        pass, so the input is kept and :meth:`decode_classes` runs the whole model."""
        return ImageInput(images, valid_hw)

    def decode_classes(self, features: ImageInput, class_emb: torch.Tensor) -> dict[str, torch.Tensor]:
        return self(features.images, class_emb, features.valid_hw)

    def forward(self, images: torch.Tensor, class_emb: torch.Tensor, valid_hw: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """images [B,3,S,S] 0..255, class_emb [K,E] → {"logits": [B,K,4g,4g], ...}. ``valid_hw`` is
        accepted for the shared OVSS contract and not read: CLIP sees the whole square, padding
        included, as CAT-Seg feeds it (SAM's image encoder, which would mask it, is not run)."""
        dense, guides = clip_features(self.clip, images, self.guidance_layers, self.dense_mode, self.clip_size)
        corr = correlation(dense, class_emb.to(dense.dtype))  # [B,K,g,g]
        b, k, h, w = corr.shape
        text = self.text_proj(F.normalize(class_emb, dim=-1))
        if self.text_act == "relu":
            text = F.relu(text)
        x = self.corr_embed(corr.flatten(0, 1)[:, None]).view(b, k, -1, h, w)
        feats = self.visual_proj(dense)
        appearance = self.appearance(dense) if hasattr(self, "appearance") else None
        score, scores, prompts = corr, [], None
        for i, blk in enumerate(self.blocks):  # block 1 prompts from the correlation, later ones from the previous block's score
            x, score, prompts = blk(x, feats, score, corr, text, self.sam_block, None if i == 0 else 1.0, appearance)
            scores.append(score)
        logits = self.decoder(x, self.guidance(guides))
        return {"logits": logits, "corr": corr, "aux_logits": scores, "prompts": prompts}

    def freeze(self, parts: list[str]) -> None:
        """Freeze named sub-modules, e.g. ['clip', 'sam.image_encoder']."""
        for name in parts:
            module = self.get_submodule(name)
            module.requires_grad_(False)
            module.eval()
