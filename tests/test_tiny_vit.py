"""TinyViT (MobileSAM image encoder): shapes, checkpoint key layout, round-trip, gradients.

The expected state-dict layout below is derived from MobileSAM's reference
``mobile_sam/modeling/tiny_vit_sam.py`` (ChaoningZhang/MobileSAM) as built by its
``build_sam_vit_t``: module names, the stride-1 last PatchMerging, the kept classifier head
(num_classes=1000) and the non-persistent ``attention_bias_idxs``. If this layout drifts,
``mobile_sam.pt`` no longer loads with strict=True.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from sspsam.backbones.tiny_vit import TinyViT, _relative_offset_index
from sspsam.errors import ConfigError

TINY = dict(img_size=128, embed_dims=(16, 32, 40, 48), depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4), out_chans=32)


def _conv_bn(prefix: str, cin: int, cout: int, k: int, groups: int = 1) -> dict[str, tuple]:
    return {
        f"{prefix}.c.weight": (cout, cin // groups, k, k),
        f"{prefix}.bn.weight": (cout,),
        f"{prefix}.bn.bias": (cout,),
        f"{prefix}.bn.running_mean": (cout,),
        f"{prefix}.bn.running_var": (cout,),
        f"{prefix}.bn.num_batches_tracked": (),
    }


def _expected_state_shapes(
    dims=(64, 128, 160, 320), depths=(2, 2, 6, 2), heads=(2, 4, 5, 10), windows=(7, 7, 14, 7),
    num_classes=1000, out_chans=256, mbconv_expand=4, mlp_ratio=4,
) -> dict[str, tuple]:  # fmt: skip
    """The reference TinyViT's state dict, name -> shape, written out from its module tree."""
    e: dict[str, tuple] = {}
    e |= _conv_bn("patch_embed.seq.0", 3, dims[0] // 2, 3)
    e |= _conv_bn("patch_embed.seq.2", dims[0] // 2, dims[0], 3)
    for i, (d, n) in enumerate(zip(dims, depths)):
        for j in range(n):
            p = f"layers.{i}.blocks.{j}"
            if i == 0:  # MBConv
                h = d * mbconv_expand
                e |= _conv_bn(f"{p}.conv1", d, h, 1) | _conv_bn(f"{p}.conv2", h, h, 3, groups=h)
                e |= _conv_bn(f"{p}.conv3", h, d, 1)
                continue
            w = windows[i]
            e |= {
                f"{p}.attn.attention_biases": (heads[i], w * w),
                f"{p}.attn.norm.weight": (d,),
                f"{p}.attn.norm.bias": (d,),
                f"{p}.attn.qkv.weight": (3 * d, d),
                f"{p}.attn.qkv.bias": (3 * d,),
                f"{p}.attn.proj.weight": (d, d),
                f"{p}.attn.proj.bias": (d,),
                f"{p}.mlp.norm.weight": (d,),
                f"{p}.mlp.norm.bias": (d,),
                f"{p}.mlp.fc1.weight": (d * mlp_ratio, d),
                f"{p}.mlp.fc1.bias": (d * mlp_ratio,),
                f"{p}.mlp.fc2.weight": (d, d * mlp_ratio),
                f"{p}.mlp.fc2.bias": (d,),
            }
            e |= _conv_bn(f"{p}.local_conv", d, d, 3, groups=d)
        if i < len(dims) - 1:
            p, o = f"layers.{i}.downsample", dims[i + 1]
            e |= _conv_bn(f"{p}.conv1", d, o, 1) | _conv_bn(f"{p}.conv2", o, o, 3, groups=o)
            e |= _conv_bn(f"{p}.conv3", o, o, 1)
    e |= {
        "norm_head.weight": (dims[-1],),
        "norm_head.bias": (dims[-1],),
        "head.weight": (num_classes, dims[-1]),
        "head.bias": (num_classes,),
        "neck.0.weight": (out_chans, dims[-1], 1, 1),
        "neck.1.weight": (out_chans,),
        "neck.1.bias": (out_chans,),
        "neck.2.weight": (out_chans, out_chans, 3, 3),
        "neck.3.weight": (out_chans,),
        "neck.3.bias": (out_chans,),
    }
    return e


@pytest.fixture(scope="module")
def full_model() -> TinyViT:
    torch.manual_seed(0)
    return TinyViT().eval()


def test_state_dict_matches_mobile_sam_layout(full_model):
    sd = full_model.state_dict()
    got = {k: tuple(v.shape) for k, v in sd.items()}
    expected = _expected_state_shapes()
    assert set(got) == set(expected), (sorted(set(got) - set(expected)), sorted(set(expected) - set(got)))
    assert got == expected
    assert len(sd) == 302
    # Literal spot checks of keys in mobile_sam.pt (minus the "image_encoder." prefix).
    assert got["patch_embed.seq.0.c.weight"] == (32, 3, 3, 3)
    assert got["layers.0.blocks.1.conv2.c.weight"] == (256, 1, 3, 3)
    assert got["layers.1.blocks.0.attn.attention_biases"] == (4, 49)
    assert got["layers.2.blocks.5.attn.attention_biases"] == (5, 196)
    assert got["layers.3.blocks.1.attn.qkv.weight"] == (960, 320)
    assert got["layers.2.downsample.conv2.c.weight"] == (320, 1, 3, 3)
    assert got["head.weight"] == (1000, 320)
    assert got["neck.0.weight"] == (256, 320, 1, 1)
    # The index table is a buffer of the module but not saved (persistent=False in the reference).
    assert not any("attention_bias_idxs" in k for k in sd)
    assert "layers.1.blocks.0.attn.attention_bias_idxs" in dict(full_model.named_buffers())
    assert "layers.3.downsample" not in {n for n, _ in full_model.named_modules()}


def test_parameter_count(full_model):
    total = sum(p.numel() for p in full_model.parameters())
    head = sum(p.numel() for n, p in full_model.named_parameters() if n.startswith(("head.", "norm_head.")))
    assert total == 6_065_532  # everything in mobile_sam.pt's image_encoder.* (Ultralytics: 10.1M whole model)
    assert head == 320 * 1000 + 1000 + 2 * 320
    # MobileSAM reports 5.78M for its image encoder; the used path (no classifier) is 5.744M.
    assert abs((total - head) - 5.78e6) / 5.78e6 < 0.01


def test_full_config_output_shape(full_model):
    with torch.no_grad():
        y = full_model(torch.randn(1, 3, 1024, 1024))
    assert y.shape == (1, 256, 64, 64)
    assert torch.isfinite(y).all()


def test_tiny_config_output_shape():
    m = TinyViT(img_size=128, embed_dims=(16, 32, 40, 48), depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4)).eval()
    with torch.no_grad():
        y = m(torch.randn(2, 3, 128, 128))
    assert y.shape == (2, 256, 8, 8)
    m256 = TinyViT(**{**TINY, "img_size": 256}).eval()
    with torch.no_grad():
        assert m256(torch.randn(1, 3, 256, 256)).shape == (1, 32, 16, 16)


def test_state_dict_round_trip_gives_identical_outputs():
    torch.manual_seed(0)
    a = TinyViT(**TINY)
    # Non-trivial BN statistics and attention biases, so every saved tensor matters.
    with torch.no_grad():
        for name, t in a.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand_like(t) + 0.5 if "running_var" in name else torch.randn_like(t) * 0.2)
    torch.manual_seed(1)
    b = TinyViT(**TINY)
    b.load_state_dict(a.state_dict(), strict=True)
    a.eval(), b.eval()
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        ya, yb = a(x), b(x)
    assert torch.equal(ya, yb)
    # Loading after eval() must take effect (the reference caches biases in eval(); we don't).
    c = TinyViT(**TINY).eval()
    c.load_state_dict(a.state_dict())
    with torch.no_grad():
        assert torch.equal(c(x), ya)


def test_gradients_reach_patch_embedding():
    torch.manual_seed(0)
    m = TinyViT(**TINY).train()
    m(torch.randn(2, 3, 128, 128)).square().mean().backward()
    names = ("patch_embed.seq.0.c.weight", "patch_embed.seq.2.bn.weight", "layers.1.blocks.0.attn.attention_biases")
    for name in names:
        g = m.get_parameter(name).grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, name
    assert m.head.weight.grad is None  # the classifier is carried, not used


def test_relative_offset_index_matches_levit_numbering():
    """Offsets numbered by first appearance over row-major point pairs, as TinyViT builds it."""
    for w in (1, 3, 7):
        points = list(itertools.product(range(w), range(w)))
        seen: dict[tuple[int, int], int] = {}
        idx = [seen.setdefault((abs(p[0] - q[0]), abs(p[1] - q[1])), len(seen)) for p in points for q in points]
        assert torch.equal(_relative_offset_index(w), torch.tensor(idx).view(w * w, w * w))
        assert len(seen) == w * w


def test_bad_configs_raise_config_error():
    with pytest.raises(ConfigError):
        TinyViT(embed_dims=(64, 128, 160), depths=(2, 2, 6), num_heads=(2, 4, 5), window_sizes=(7, 7, 14))
    with pytest.raises(ConfigError):
        TinyViT(**{**TINY, "num_heads": (1, 3, 2, 4)})  # 32 % 3
    with pytest.raises(ConfigError):
        TinyViT(**{**TINY, "img_size": 120})


def test_sam_backbone_uses_tiny_vit_as_image_encoder():
    from sspsam.backbones.sam import SAMBackbone

    overrides = {k: TINY[k] for k in ("embed_dims", "depths", "num_heads")}
    sam = SAMBackbone(encoder="tiny_vit", img_size=128, prompt_dim=32, encoder_overrides=overrides,
                      decoder_mlp_dim=64, decoder_heads=2).eval()  # fmt: skip
    assert isinstance(sam.image_encoder, TinyViT)
    with torch.no_grad():
        assert sam.encode_image(torch.rand(1, 3, 128, 128) * 255).shape == (1, 32, 8, 8)
