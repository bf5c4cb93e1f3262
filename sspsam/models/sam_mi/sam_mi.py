"""SAM-MI (Chen et al., arXiv 2511.20027): SAM masks injected as soft guidance into a CAT-Seg-style
CLIP cost map, instead of being glued to labels.

Pipeline (one class or function per paper element):

CLIP image/text → cost map S [B,K,g,g] → cost embedding → aggregation blocks (spatial with CLIP
appearance guidance + class, CAT-Seg) each followed by :class:`LowFrequencyInjection`; in parallel
:class:`TextGuidedSparsePointPrompter` picks a few points on SAM's image embedding → SAM prompt
encoder + mask decoder → masks M^sam → :func:`shallow_mask_aggregation` merges partial masks;
the merged masks drive the low-frequency injection and, with SAM's upsampled features,
:class:`HighFrequencyInjection` into the U-Net decoder → per-class logits.

There is no official code; the notes fix the structure. Points are chosen on SAM's embedding
grid (one per grid cell at most, with 3×3 non-maximum suppression) and each point yields one
mask (``multimask_output=False``). The scaled cost map itself is an auxiliary output
(``aux_logits``), so CLIP's fine-tuning gets a direct per-class signal.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sspsam.backbones.clip import CLIPBackbone
from sspsam.backbones.sam import SAMBackbone
from sspsam.errors import ConfigError
from sspsam.models.cost import class_embeddings, correlation
from sspsam.models.common.cost_aggregation import ClassLinearAttention, GuidanceProjection, SpatialBlock, UpsampleDecoder, clip_features
from sspsam.models.common.masks import mask_pool
from sspsam.models.common.ovss import ImageInput
from sspsam.models.sam_mi.smagg import shallow_mask_aggregation


class TextGuidedSparsePointPrompter(nn.Module):
    """TSPP: two linear projection heads, one on SAM's image embedding and one on the class text
    embeddings; their scaled dot product scores every grid cell for every class. A cell's score
    is its best class's; the top ``num_points`` local maxima become SAM's point prompts, so points
    land on text-relevant regions (assumption 1) and spread over different ones (assumption 2)."""

    def __init__(self, image_dim: int, text_dim: int, proj_dim: int, num_points: int):
        super().__init__()
        self.image_head = nn.Linear(image_dim, proj_dim)
        self.text_head = nn.Linear(text_dim, proj_dim)
        self.num_points = num_points

    def forward(self, feats: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """feats [B,C,h,w], text [K,E] → (scores [B,K,h,w], points [B,N,2] grid (x, y), valid [B,N])."""
        b, _, h, w = feats.shape
        v = self.image_head(feats.permute(0, 2, 3, 1))
        t = self.text_head(F.normalize(text, dim=-1))
        scores = torch.einsum("bhwd,kd->bkhw", v, t) / v.shape[-1] ** 0.5
        best = scores.detach().max(1).values
        peak = best == F.max_pool2d(best[:, None], 3, 1, 1)[:, 0]
        ranked = torch.where(peak, best, torch.full_like(best, float("-inf"))).flatten(1)
        n = min(self.num_points, h * w)
        top, idx = ranked.topk(n, dim=1)
        points = torch.stack([idx % w, idx // w], -1)
        return scores, points, torch.isfinite(top)


class LowFrequencyInjection(nn.Module):
    """DMI, low frequency, on the low-resolution cost embedding: intra-mask context by mask
    pooling (each pixel receives the mean of the masks covering it) and inter-mask context by
    cross-attention from pixels to the mask tokens; both enter through a zero-initialised
    projection, so bad masks cannot hurt the cost map before training learns to use them."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm_q, self.norm_kv = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.cross = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.proj = nn.Linear(2 * dim, dim)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor, masks: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """x [B,K,D,h,w], masks [B,M,h,w] in [0,1], valid [B,M] → x with mask context."""
        b, k, d, h, w = x.shape
        m = masks * valid[..., None, None]
        tokens = mask_pool(m[:, None], x)  # [B,K,M,D]
        share = m.flatten(2) / m.flatten(2).sum(1, keepdim=True).clamp(min=1e-6)  # per pixel, over masks
        intra = torch.einsum("bmp,bkmd->bkpd", share, tokens)
        q = self.norm_q(x.flatten(3).transpose(2, 3)).flatten(0, 1)  # [BK,hw,D]
        kv = self.norm_kv(tokens).flatten(0, 1)
        pad = ~valid.clone()
        pad[:, 0] &= valid.any(1)  # a fully masked row would give NaN: keep one (zero) token
        inter = self.cross(q, kv, kv, key_padding_mask=pad.repeat_interleave(k, 0), need_weights=False)[0]
        y = self.proj(torch.cat([intra.flatten(0, 1), inter], -1))
        return x + y.view(b, k, h * w, d).transpose(2, 3).reshape(b, k, d, h, w)


class HighFrequencyInjection(nn.Module):
    """DMI, high frequency: SAM's embedding brought to each decoder scale (F_h1, F_h2 by
    transposed convs), high-pass filtered (minus its 3×3 local mean) and joined by the high-pass
    of the merged masks (their edges); the result is extra guidance for the decoder stage."""

    def __init__(self, sam_dim: int, out_dims: list[int]):
        super().__init__()
        self.up = GuidanceProjection([sam_dim] * len(out_dims), out_dims)

    @staticmethod
    def high_pass(x: torch.Tensor) -> torch.Tensor:
        return x - F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)

    def forward(self, sam_feats: torch.Tensor, masks: torch.Tensor, sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
        out = []
        for f, size in zip(self.up([sam_feats] * len(sizes)), sizes):
            f = F.interpolate(f, size=size, mode="bilinear", align_corners=False)
            m = F.interpolate(masks, size=size, mode="bilinear", align_corners=False)
            edges = self.high_pass(m).abs().amax(1, keepdim=True) if m.shape[1] else m.new_zeros(m.shape[0], 1, *size)
            out.append(torch.cat([self.high_pass(f), edges], 1))
        return out


class SAMMI(nn.Module):
    """SAM-MI for open-vocabulary semantic segmentation (the shared OVSS model contract:
    ``forward(images [B,3,S,S] 0..255, class_emb [K,E]) -> {"logits": [B,K,h,w], ...}``)."""

    def __init__(self, clip: CLIPBackbone, sam: SAMBackbone, cfg: dict, config: dict):
        super().__init__()
        cfg = dict(cfg)
        known = {"dim", "text_dim", "blocks", "heads", "window", "guidance_layers", "guidance_dims", "decoder_dims",
                 "num_points", "point_dim", "hf_dims", "smagg"}
        if extra := set(cfg) - known:
            raise ConfigError(f"unknown keys in sam_mi config: {sorted(extra)}")
        self.clip, self.sam, self.config = clip, sam, config
        dim, text_dim, heads = cfg.get("dim", 128), cfg.get("text_dim", 128), cfg.get("heads", 4)
        sam_dim = sam.prompt_encoder.embed_dim
        self.guidance_layers = list(cfg.get("guidance_layers", [3, 5]))
        guidance_dims = list(cfg.get("guidance_dims", [256, 128]))
        hf_dims = list(cfg.get("hf_dims", [32, 16]))
        decoder_dims = list(cfg.get("decoder_dims", [64, 32]))
        if not len(self.guidance_layers) == len(guidance_dims) == len(hf_dims) == len(decoder_dims):
            raise ConfigError("sam_mi guidance_layers, guidance_dims, hf_dims and decoder_dims need the same length")
        self.smagg = dict(cfg.get("smagg", {}))
        self.cost_embed = nn.Conv2d(1, dim, 7, padding=3)  # CAT-Seg's cost embedding
        self.appearance = nn.Conv2d(clip.embed_dim, dim, 1)  # CAT-Seg's visual guidance of the spatial aggregation
        self.cost_scale = nn.Parameter(torch.tensor([10.0, 0.0]))  # cost → logits for the auxiliary cost loss
        self.text_proj = nn.Linear(clip.embed_dim, text_dim)
        self.tspp = TextGuidedSparsePointPrompter(sam_dim, clip.embed_dim, cfg.get("point_dim", 64), cfg.get("num_points", 16))
        n_blocks = cfg.get("blocks", 2)
        self.spatial = nn.ModuleList(SpatialBlock(dim, heads, cfg.get("window", 4)) for _ in range(n_blocks))
        self.class_agg = nn.ModuleList(ClassLinearAttention(dim, text_dim, heads) for _ in range(n_blocks))
        self.low_freq = nn.ModuleList(LowFrequencyInjection(dim, heads) for _ in range(n_blocks))
        self.guidance = GuidanceProjection([clip.model.visual.transformer.width] * len(guidance_dims), guidance_dims)
        self.high_freq = HighFrequencyInjection(sam_dim, hf_dims)
        self.decoder = UpsampleDecoder(dim, [g + h + 1 for g, h in zip(guidance_dims, hf_dims)], decoder_dims)

    @property
    def image_size(self) -> int:
        return self.sam.img_size

    def sam_masks(self, sam_feats: torch.Tensor, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """SAM prompt encoder + mask decoder, one positive point per mask: points [B,N,2] grid (x, y)
        → mask probabilities [B,N,4h,4w] and predicted IoU [B,N]."""
        b, n = points.shape[:2]
        cell = self.sam.img_size / sam_feats.shape[-1]
        coords = (points.float() + 0.5) * cell - 0.5
        labels = torch.ones(b, n, 1, dtype=torch.long, device=points.device)
        masks, ious = [], []
        for i in range(b):  # SAM's decoder takes one image and many prompt sets
            sparse, dense = self.sam.prompt_encoder(points=(coords[i][:, None], labels[i]), boxes=None, masks=None)
            lo, iou = self.sam.mask_decoder(
                image_embeddings=sam_feats[i : i + 1], image_pe=self.sam.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=False,
            )
            masks.append(lo[:, 0].sigmoid())
            ious.append(iou[:, 0])
        return torch.stack(masks), torch.stack(ious)

    def aggregate(self, masks: torch.Tensor, valid: torch.Tensor, dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """SMAgg per image, features = mask-pooled CLIP features; padded back to N masks."""
        b, n, h, w = masks.shape
        feats = mask_pool(F.interpolate(masks, size=dense.shape[-2:], mode="bilinear", align_corners=False), dense)
        out = masks.new_zeros(b, n, h, w)
        out_valid = torch.zeros(b, n, dtype=torch.bool, device=masks.device)
        for i in range(b):
            merged, _ = shallow_mask_aggregation(masks[i], feats[i], valid[i], **self.smagg)
            out[i, : len(merged)] = merged
            out_valid[i, : len(merged)] = True
        return out, out_valid

    def class_embeddings(self, classes: list[str]) -> torch.Tensor:
        """[K,E] text embeddings of the class names (:data:`sspsam.models.cost.DEFAULT_TEMPLATES`)."""
        return class_embeddings(self.clip, classes)

    def encode_image(self, images: torch.Tensor, valid_hw: torch.Tensor | None = None) -> ImageInput:
        """The image side is not cached (SAM's points come from the class scores): the input is
        kept and :meth:`decode_classes` runs the whole model."""
        return ImageInput(images, valid_hw)

    def decode_classes(self, features: ImageInput, class_emb: torch.Tensor) -> dict[str, torch.Tensor]:
        return self(features.images, class_emb, features.valid_hw)

    def forward(self, images: torch.Tensor, class_emb: torch.Tensor, valid_hw: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``valid_hw`` [B,2] (optional): the letterboxed content size, so SAM zeroes the padding as it does."""
        dense, guides = clip_features(self.clip, images, self.guidance_layers)
        cost = correlation(dense, class_emb.to(dense.dtype))
        b, k, h, w = cost.shape
        text = self.text_proj(F.normalize(class_emb, dim=-1))
        sam_feats = self.sam.encode_image(images, valid_hw)
        point_scores, points, valid = self.tspp(sam_feats, class_emb)
        masks, ious = self.sam_masks(sam_feats, points)
        merged, merged_valid = self.aggregate(masks, valid, dense)
        low = F.interpolate(merged, size=(h, w), mode="area")
        x = self.cost_embed(cost.flatten(0, 1)[:, None]).view(b, k, -1, h, w)
        appearance = self.appearance(dense)[:, None]
        for spatial, classes, inject in zip(self.spatial, self.class_agg, self.low_freq):
            x = spatial((x + appearance).flatten(0, 1)).view_as(x)
            x = classes(x, text)
            x = inject(x, low, merged_valid)
        sizes = [(h * 2 ** (i + 1), w * 2 ** (i + 1)) for i in range(len(self.guidance_layers))]
        guidance = [torch.cat(pair, 1) for pair in zip(self.guidance(guides), self.high_freq(sam_feats, merged, sizes))]
        logits = self.decoder(x, guidance)
        cost_logits = cost * self.cost_scale[0] + self.cost_scale[1]
        return {"logits": logits, "cost": cost, "aux_logits": [point_scores, cost_logits], "points": points, "point_valid": valid,
                "sam_masks": masks, "sam_iou": ious, "masks": merged, "mask_valid": merged_valid}

    def freeze(self, parts: list[str]) -> None:
        """Freeze named sub-modules, e.g. ['sam'] (SAM as a fixed mask generator)."""
        for name in parts:
            module = self.get_submodule(name)
            module.requires_grad_(False)
            module.eval()
