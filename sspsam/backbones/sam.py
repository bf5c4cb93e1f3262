"""SAM's image encoder, prompt encoder and mask decoder, reused from Meta's segment_anything.

The three parts keep the attribute names of ``segment_anything.modeling.Sam`` so the official
checkpoints (``sam_vit_{b,l,h}_*.pth``, MobileSAM's ``mobile_sam.pt``) load with strict key checks.
MobileSAM swaps the ViT image encoder for TinyViT (``tiny_vit.py``) and keeps the rest.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sspsam.io.checkpoint import load_into, read_state_dict
import sspsam.backbones.runtime as runtime
from sspsam.errors import ConfigError
from sspsam.backbones._imports import segment_anything_modeling

# Meta's three ViT encoders (segment_anything/build_sam.py).
VIT_ENCODERS = {
    "vit_b": dict(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11)),
    "vit_l": dict(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23)),
    "vit_h": dict(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31)),
}
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


def _vit_attention_sdpa(self, x: torch.Tensor) -> torch.Tensor:
    """segment_anything's ViT ``Attention.forward`` through ``F.scaled_dot_product_attention``.

    The decomposed relative-position term is the same sum as ``add_decomposed_rel_pos``, passed as
    a 4-D additive mask, so SDPA's fused CPU/GPU kernels run instead of three separate
    [heads, N, N] passes (matmul, bias add, softmax) in Python.
    """
    b, h, w, _ = x.shape
    heads = self.num_heads
    q, k, v = self.qkv(x).reshape(b, h * w, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)  # [B,nH,N,C]
    mask = None
    if self.use_rel_pos:
        get_rel_pos = self._get_rel_pos  # bound once per class: the import helper is slow per call
        rq = q.reshape(b, heads, h, w, -1)
        rel_h = torch.einsum("bnhwc,hkc->bnhwk", rq, get_rel_pos(h, h, self.rel_pos_h))
        rel_w = torch.einsum("bnhwc,wkc->bnhwk", rq, get_rel_pos(w, w, self.rel_pos_w))
        mask = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(b, heads, h * w, h * w)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # scale = head_dim**-0.5, as SAM's
    return self.proj(out.view(b, heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1))


def _decoder_attention_sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """segment_anything's two-way-transformer ``Attention.forward`` through SDPA (same scale 1/sqrt(d))."""
    q = self._separate_heads(self.q_proj(q), self.num_heads)
    k = self._separate_heads(self.k_proj(k), self.num_heads)
    v = self._separate_heads(self.v_proj(v), self.num_heads)
    return self.out_proj(self._recombine_heads(F.scaled_dot_product_attention(q, k, v)))


def _exporting() -> bool:
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


def _predict_masks_broadcast(self, image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings):
    """segment_anything's ``MaskDecoder.predict_masks`` without its per-phrase copies.

    Meta's code copies the one image embedding and its positional table T times
    (``repeat_interleave``) and only then adds the dense prompt: here the add broadcasts, which
    computes the same sum per element. Under bf16 the table comes out of autocast in bf16 while
    the image tokens are fp32 (SAM's neck ends in a norm, an fp32 island): every ``keys + key_pe``
    of the two-way transformer then converted it again; upcasting it once gives the same values
    (bf16 → fp32 is exact, and the mixed add promotes to fp32 anyway). The rest is Meta's code,
    which also answers while gradients are on and while torch.onnx traces the decoder.
    """
    output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
    output_tokens = output_tokens.unsqueeze(0).expand(sparse_prompt_embeddings.size(0), -1, -1)
    tokens = torch.cat((output_tokens, sparse_prompt_embeddings), dim=1)
    n = tokens.shape[0]
    if (image_embeddings.shape[0] == 1 and dense_prompt_embeddings.shape[0] == n and image_pe.shape[0] == 1
            and not torch.is_grad_enabled() and not _exporting()):  # training and ONNX export: Meta's code
        # contiguous, as Meta's copy leaves it: a channels-last embedding (the TinyViT neck's) would
        # otherwise make the sum channels-last, and bf16 linears on that layout round differently
        src = image_embeddings.contiguous() + dense_prompt_embeddings
        # channels-last, so that the transformer's flatten(2).permute(0, 2, 1) of it is the token-major
        # layout of the image tokens it is added to (a transposed operand made each add a strided gather)
        pos_src = image_pe.to(torch.promote_types(src.dtype, image_pe.dtype)).contiguous(memory_format=torch.channels_last)
        pos_src = pos_src.expand(n, -1, -1, -1)
    else:
        src = torch.repeat_interleave(image_embeddings, n, dim=0) + dense_prompt_embeddings
        pos_src = torch.repeat_interleave(image_pe, n, dim=0)
    b, c, h, w = src.shape
    hs, src = self.transformer(src, pos_src, tokens)
    iou_token_out = hs[:, 0, :]
    mask_tokens_out = hs[:, 1 : (1 + self.num_mask_tokens), :]
    src = src.transpose(1, 2).view(b, c, h, w)
    upscaled_embedding = self.output_upscaling(src)
    hyper_in = torch.stack([self.output_hypernetworks_mlps[i](mask_tokens_out[:, i, :]) for i in range(self.num_mask_tokens)], dim=1)
    b, c, h, w = upscaled_embedding.shape
    masks = (hyper_in @ upscaled_embedding.view(b, c, h * w)).view(b, -1, h, w)
    return masks, self.iou_prediction_head(iou_token_out)


_SDPA_CLASSES: dict[type, type] = {}


def _use_sdpa(root: nn.Module) -> None:
    """Give segment_anything's attention modules an SDPA forward (``runtime.FAST["sdpa"]``).

    Each instance's class is swapped for a subclass, so parameter names, checkpoints and the
    package itself are untouched; with the switch off the subclass calls the original forward.
    """
    modeling = segment_anything_modeling()
    fast = {modeling.image_encoder.Attention: ("forward", "sdpa", _vit_attention_sdpa),
            modeling.transformer.Attention: ("forward", "sdpa", _decoder_attention_sdpa),
            modeling.MaskDecoder: ("predict_masks", "decoder_broadcast", _predict_masks_broadcast)}
    for module in root.modules():
        base = type(module)
        if base not in fast:
            continue
        if base not in _SDPA_CLASSES:
            method, flag, impl = fast[base]

            def call(self, *args, _impl=impl, _orig=getattr(base, method), _flag=flag, **kwargs):
                return (_impl if runtime.FAST[_flag] else _orig)(self, *args, **kwargs)

            attrs = {method: call, "__module__": __name__,
                     "_get_rel_pos": staticmethod(modeling.image_encoder.get_rel_pos)}
            _SDPA_CLASSES[base] = type(base.__name__, (base,), attrs)
        module.__class__ = _SDPA_CLASSES[base]


class SAMBackbone(nn.Module):
    """SAM minus its Python-side prompting utilities: encoders and decoder as modules."""

    def __init__(
        self,
        encoder: str = "vit_b",
        img_size: int = 1024,
        prompt_dim: int = 256,
        encoder_overrides: dict | None = None,
        decoder_mlp_dim: int = 2048,
        decoder_heads: int = 8,
        image_encoder: bool = True,
    ):
        super().__init__()
        modeling = segment_anything_modeling()
        patch = 16
        if img_size % patch:
            raise ConfigError(f"sam.img_size must be a multiple of {patch}, got {img_size}")
        overrides = dict(encoder_overrides or {})
        if not image_encoder:
            # Prompt encoder and decoder only, for callers that bring their own (cached) embeddings,
            # as the official SSP-SAM code does; a ViT-H alone is 632M parameters.
            self.image_encoder = None
        elif encoder in VIT_ENCODERS:
            kw = {**VIT_ENCODERS[encoder], **overrides}
            self.image_encoder = modeling.ImageEncoderViT(
                img_size=img_size,
                patch_size=patch,
                mlp_ratio=4,
                norm_layer=partial(nn.LayerNorm, eps=1e-6),
                qkv_bias=True,
                use_rel_pos=True,
                window_size=kw.pop("window_size", 14),
                out_chans=prompt_dim,
                **kw,
            )
        elif encoder == "tiny_vit":
            from sspsam.backbones.tiny_vit import TinyViT

            self.image_encoder = TinyViT(img_size=img_size, out_chans=prompt_dim, **overrides)
        else:
            raise ConfigError(f"unknown SAM encoder '{encoder}'; choose one of {[*VIT_ENCODERS, 'tiny_vit']}")
        grid = img_size // patch
        self.prompt_encoder = modeling.PromptEncoder(
            embed_dim=prompt_dim, image_embedding_size=(grid, grid), input_image_size=(img_size, img_size), mask_in_chans=16
        )
        self.mask_decoder = modeling.MaskDecoder(
            num_multimask_outputs=3,
            transformer=modeling.TwoWayTransformer(
                depth=2, embedding_dim=prompt_dim, mlp_dim=decoder_mlp_dim, num_heads=decoder_heads
            ),
            transformer_dim=prompt_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        )
        _use_sdpa(self)
        self.encoder_name = encoder
        self.img_size = img_size
        self.grid = grid
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_config(cls, cfg: dict) -> "SAMBackbone":
        known = {"encoder", "img_size", "prompt_dim", "encoder_overrides", "decoder_mlp_dim", "decoder_heads", "weights",
                 "image_encoder"}
        if extra := set(cfg) - known:
            raise ConfigError(f"unknown keys in sam config: {sorted(extra)}")
        return cls(**{k: v for k, v in cfg.items() if k != "weights"})

    def load_checkpoint(self, path: str | Path) -> None:
        """An official SAM / MobileSAM checkpoint (keys image_encoder.*, prompt_encoder.*, mask_decoder.*)."""
        sd = read_state_dict(path, what="SAM")
        load_into(self, sd, what=f"SAM {self.encoder_name} ({path})")

    def encode_image(self, images: torch.Tensor, valid_hw: torch.Tensor | None = None) -> torch.Tensor:
        """[B,3,S,S] letterboxed 0..255 → image embedding [B, prompt_dim, S/16, S/16].

        ``valid_hw`` [B,2] is the letterboxed content size; the padding beyond it is set to 0
        after normalisation, exactly as SAM pads. Without it the whole square counts as content.
        """
        if self.image_encoder is None:
            raise ConfigError("this model was built without SAM's image encoder (sam.image_encoder: false); pass the image embeddings")
        if images.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"SAM expects {self.img_size}x{self.img_size} letterboxed input, got {tuple(images.shape[-2:])}")
        x = (images - self.pixel_mean) / self.pixel_std
        if valid_hw is not None:
            idx = torch.arange(self.img_size, device=x.device)
            rows = idx[None, :] < valid_hw[:, :1].to(x.device)
            cols = idx[None, :] < valid_hw[:, 1:].to(x.device)
            x = x * (rows[:, None, :, None] & cols[:, None, None, :])
        return self.image_encoder(x)

    def _dense_pe(self) -> torch.Tensor:
        """SAM's positional table of the embedding grid, computed once per (weights, device, dtype,
        autocast) instead of on every decode: it depends on nothing else. Recomputed while
        gradients are on, so training sees Meta's code path unchanged."""
        pe_layer = self.prompt_encoder.pe_layer
        if not runtime.FAST["decoder_broadcast"] or torch.is_grad_enabled() or _exporting():
            return self.prompt_encoder.get_dense_pe()
        g = pe_layer.positional_encoding_gaussian_matrix
        dev = g.device.type
        key = (g.data_ptr(), g._version, g.device, g.dtype, torch.is_inference_mode_enabled(),
               torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None)
        cached = self.__dict__.get("_pe_cache")
        if cached is None or cached[0] != key:
            cached = (key, self.prompt_encoder.get_dense_pe())
            self.__dict__["_pe_cache"] = cached
        return cached[1]

    def decode(
        self, image_embedding: torch.Tensor, sparse: torch.Tensor, multimask: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """T prompt sets [T,K,C] on one image's embedding [1,C,h,w] or on one embedding each [T,C,h,w]
        → low-res logits [T,1,4h,4w], IoU [T,1].

        SAM's decoder repeats one image embedding for every prompt set and adds the dense prompt to
        it. For T images at once (training: one phrase per image) the embeddings travel as that
        dense term on a zero image, so one decoder call replaces T (0 + x is exactly x, so every
        row is the same sum SAM computes) and Meta's decoder code runs unchanged.
        """
        t = sparse.shape[0]
        dense = self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(t, -1, self.grid, self.grid)
        if image_embedding.shape[0] != 1:
            if image_embedding.shape[0] != t:
                raise ValueError(f"{image_embedding.shape[0]} image embeddings for {t} prompt sets")
            dense = image_embedding + dense
            image_embedding = image_embedding.new_zeros((1, *image_embedding.shape[1:]))
        return self.mask_decoder(
            image_embeddings=image_embedding,
            image_pe=self._dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask,
        )
