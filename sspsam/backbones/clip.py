"""CLIP towers from open_clip, with the dense outputs SSP-SAM needs.

open_clip's ``encode_image``/``encode_text`` return pooled vectors only. SSP-SAM needs every
patch token (as CLIP-Surgery computes them: v-v attention in the last blocks, so patch tokens
keep their own semantics instead of collapsing onto the global token) and every word token,
all projected into the joint embedding space so that cosine similarity between a sentence and
a patch is meaningful. The unprojected ``ln_final`` word tokens are kept too: the official
SSP-SAM head reads those.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sspsam.io.checkpoint import load_into, read_state_dict
from sspsam.errors import ConfigError
from sspsam.backbones._imports import open_clip_modules

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class TextFeatures:
    words: torch.Tensor  # [T, L, E] every token, projected into the joint space
    sentence: torch.Tensor  # [T, E] the EOT token (CLIP's sentence embedding)
    pad_mask: torch.Tensor  # [T, L] True where there is no token (after EOT)
    raw_words: torch.Tensor | None = None  # [T, L, W] ln_final output, not projected (what the official SSP-SAM reads)
    tokens: torch.Tensor | None = None  # [T, L] the token ids (the official head masks ``tokens == 0``)


def open_clip_config(arch: str) -> dict:
    """Read an architecture JSON shipped inside open_clip (e.g. 'ViT-B-16', 'ViT-L-14-336')."""
    open_clip_modules()  # registers the package without its torchvision-importing __init__
    cfg_dir = Path(resources.files("open_clip")) / "model_configs"
    path = cfg_dir / f"{arch}.json"
    if not path.is_file():
        known = sorted(p.stem for p in cfg_dir.glob("ViT-*.json"))[:20]
        raise ConfigError(f"unknown open_clip architecture '{arch}'; known ones include {known}")
    return json.loads(path.read_text())


class CLIPBackbone(nn.Module):
    """open_clip's CLIP with dense image and per-word text outputs.

    ``surgery_layers`` last vision blocks get CLIP-Surgery's dual path: the original path is
    unchanged (it still gives the global embedding); a second path adds v-v self-attention
    outputs without the FFN, and its patch tokens become the dense features.
    """

    def __init__(
        self,
        embed_dim: int,
        vision_cfg: dict,
        text_cfg: dict,
        quick_gelu: bool = True,
        surgery_layers: int = 6,
    ):
        super().__init__()
        oc_model, oc_tok = open_clip_modules()
        self.model = oc_model.CLIP(embed_dim, vision_cfg, text_cfg, quick_gelu=quick_gelu)
        self.context_length = self.model.context_length
        self.tokenizer = oc_tok.SimpleTokenizer(context_length=self.context_length)
        self.image_size = self.model.visual.image_size[0]
        self.patch_size = self.model.visual.patch_size[0]
        n_blocks = len(self.model.visual.transformer.resblocks)
        if not 0 <= surgery_layers <= n_blocks:
            raise ConfigError(f"surgery_layers={surgery_layers} but the vision tower has {n_blocks} blocks")
        self.surgery_layers = surgery_layers
        self.embed_dim = embed_dim
        self.register_buffer("mean", torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(OPENAI_STD).view(1, 3, 1, 1) * 255, persistent=False)

    @classmethod
    def from_config(cls, cfg: dict) -> "CLIPBackbone":
        base = open_clip_config(cfg["arch"]) if "arch" in cfg else {}
        vision = {**base.get("vision_cfg", {}), **cfg.get("vision", {})}
        text = {**base.get("text_cfg", {}), **cfg.get("text", {})}
        embed_dim = cfg.get("embed_dim", base.get("embed_dim"))
        if embed_dim is None or not vision or not text:
            raise ConfigError("clip config needs 'arch' or explicit 'embed_dim', 'vision' and 'text'")
        return cls(embed_dim, vision, text, cfg.get("quick_gelu", True), cfg.get("surgery_layers", 6))

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    # ---- weights -------------------------------------------------------------------------
    def load_checkpoint(self, path: str | Path) -> None:
        """OpenAI CLIP .pt (TorchScript) or an open_clip state dict for the same architecture."""
        sd = read_state_dict(path, what="CLIP")
        sd = {k: v for k, v in sd.items() if k not in ("input_resolution", "context_length", "vocab_size")}
        load_into(self.model, sd, what=f"CLIP ({path})")
        self.model.float()

    # ---- text ----------------------------------------------------------------------------
    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(texts)

    def encode_text(self, tokens: torch.Tensor) -> TextFeatures:
        m = self.model
        x = m.token_embedding(tokens) + m.positional_embedding
        x = m.transformer(x, attn_mask=m.attn_mask)
        x = raw = m.ln_final(x)
        x = x @ m.text_projection if not isinstance(m.text_projection, nn.Linear) else m.text_projection(x)
        eot = tokens.argmax(dim=-1)  # the EOT id is the largest in CLIP's vocabulary
        sentence = x[torch.arange(x.shape[0], device=x.device), eot]
        pad = torch.arange(tokens.shape[1], device=tokens.device)[None] > eot[:, None]
        return TextFeatures(words=x, sentence=sentence, pad_mask=pad, raw_words=raw, tokens=tokens)

    def encode_sentences(self, tokens: torch.Tensor) -> torch.Tensor:
        """Sentence (EOT) embeddings [T, E] alone, as CLIP's ``encode_text`` returns them.

        Under the causal mask no token after a text's EOT can reach it, so the context is cut
        after the longest EOT of the batch: prompt templates are ~15 of 77 tokens, and class
        embeddings over 80 templates cost a fraction of the full length with the same result.
        """
        m = self.model
        n = int(tokens.argmax(dim=-1).max()) + 1
        x = m.token_embedding(tokens[:, :n]) + m.positional_embedding[:n]
        x = m.transformer(x, attn_mask=m.attn_mask[:n, :n])
        x = m.ln_final(x[torch.arange(x.shape[0], device=x.device), tokens[:, :n].argmax(dim=-1)])
        return x @ m.text_projection if not isinstance(m.text_projection, nn.Linear) else m.text_projection(x)

    # ---- image ---------------------------------------------------------------------------
    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] float 0..255 (SAM's letterboxed square) → CLIP's normalised input."""
        if images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
            images = F.interpolate(images, size=(self.image_size,) * 2, mode="bilinear", antialias=True, align_corners=False)
        return (images - self.mean) / self.std

    def _positional(self, gh: int, gw: int, interp: str = "bicubic") -> torch.Tensor:
        """Positional embeddings for a gh×gw patch grid; the class token's is never resized.

        ``interp`` picks how a grid other than the pretrained one is reached, since each
        training-free method's numbers were produced with its own rule: 'bicubic' (to the target
        size), 'bilinear' (CLIP-Surgery) or 'sclip' (SCLIP's ``interpolate_pos_encoding``: bicubic
        with ``scale_factor = (g + 0.1) / side``, so the sampling positions follow that factor
        rather than the exact size ratio).
        """
        pos = self.model.visual.positional_embedding
        cls_pos, grid_pos = pos[:1], pos[1:]
        side = int(math.isqrt(grid_pos.shape[0]))
        if (gh, gw) != (side, side):
            grid_pos = grid_pos.reshape(1, side, side, -1).permute(0, 3, 1, 2)
            if interp == "sclip":
                factor = ((gh + 0.1) / side, (gw + 0.1) / side)
                grid_pos = F.interpolate(grid_pos, scale_factor=factor, mode="bicubic", align_corners=False)
            elif interp in ("bicubic", "bilinear"):
                grid_pos = F.interpolate(grid_pos, size=(gh, gw), mode=interp, align_corners=False)
            else:
                raise ConfigError(f"unknown positional interpolation '{interp}'")
            if tuple(grid_pos.shape[-2:]) != (gh, gw):
                raise ValueError(f"positional grid {tuple(grid_pos.shape[-2:])} does not fit the {gh}x{gw} patch grid")
            grid_pos = grid_pos.permute(0, 2, 3, 1).reshape(gh * gw, -1)
        return torch.cat([cls_pos, grid_pos], dim=0)

    def embed_patches(self, x: torch.Tensor, interp: str = "bicubic") -> torch.Tensor:
        """Normalised CLIP input [B,3,H,W] → tokens [B, 1+g*g, C] after ``ln_pre`` (class token first)."""
        vis = self.model.visual
        x = vis.conv1(x)
        b, c, gh, gw = x.shape
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([vis.class_embedding.expand(b, 1, c).to(x.dtype), x], dim=1)
        return vis.ln_pre(x + self._positional(gh, gw, interp).to(x.dtype))

    @staticmethod
    def _attention(block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (v-v attention output, original q-k attention output) of one block."""
        attn: nn.MultiheadAttention = block.attn
        b, n, c = x.shape
        h = attn.num_heads
        qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).reshape(b, n, 3, h, c // h).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        ori = F.scaled_dot_product_attention(q, k, v)
        vv = F.scaled_dot_product_attention(v, v, v)
        merge = lambda t: attn.out_proj(t.transpose(1, 2).reshape(b, n, c))  # noqa: E731
        return merge(vv), merge(ori)

    @property
    def text_width(self) -> int:
        return self.model.ln_final.normalized_shape[0]

    def encode_image(self, images: torch.Tensor, normalized: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """[B,3,S,S] 0..255 (or already CLIP-normalised with ``normalized``) →
        (patch tokens [B, g*g, E], global embedding [B, E])."""
        return self.encode_normalised(images if normalized else self.preprocess(images))

    def encode_normalised(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """CLIP-Surgery on an already normalised input of any size (a grid other than CLIP's own
        takes bilinearly interpolated positions, as CLIP-Surgery does): (patch tokens, global)."""
        vis = self.model.visual
        x = self.embed_patches(x, "bilinear")
        blocks = vis.transformer.resblocks
        first_dual = len(blocks) - self.surgery_layers
        dense = None
        for i, blk in enumerate(blocks):
            if i < first_dual:
                x = blk(x)
                continue
            vv, ori = self._attention(blk, blk.ln_1(x))
            dense = (x if dense is None else dense) + vv  # new path: no FFN
            x = x + blk.ls_1(ori)
            x = x + blk.ls_2(blk.mlp(blk.ln_2(x)))
        if dense is None:  # surgery off: plain last-layer tokens
            dense = x
        glob = vis.ln_post(x[:, 0]) @ vis.proj
        patches = vis.ln_post(dense[:, 1:]) @ vis.proj
        return patches, glob
