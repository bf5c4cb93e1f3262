"""dtype="auto": bf16 only where the hardware has bf16 units, fp32 elsewhere, and every output says
which ran. The hardware facts are passed in or monkeypatched, so these pass on any host."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import sspsam.predict.precision as precision
from sspsam.data.shapes import make_scene
from sspsam.errors import ConfigError
from sspsam.predict.precision import auto_dtype, choose_dtype
from sspsam.predict.segmenter import Segmenter

AMX_HOST = {"fpu", "sse4_2", "avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"}
AVX512_BF16_HOST = {"avx2", "avx512f", "avx512_bf16"}
AVX2_HOST = {"fpu", "sse4_2", "avx2", "fma", "avx_vnni"}


def test_the_decision_follows_the_units():
    assert auto_dtype("cpu", AMX_HOST, "AVX512") == torch.bfloat16
    assert auto_dtype("cpu", AVX512_BF16_HOST, "AVX512") == torch.bfloat16
    assert auto_dtype("cpu", AVX2_HOST, "AVX2") == torch.float32
    assert auto_dtype("cpu", set(), "DEFAULT") == torch.float32
    # bf16 units that torch does not dispatch to (ATEN_CPU_CAPABILITY capped) are no reason for bf16
    dtype, why = choose_dtype("cpu", AMX_HOST, "AVX2")
    assert dtype == torch.float32 and "amx_bf16" in why and "AVX2" in why
    assert auto_dtype("cuda", cuda_bf16=True) == torch.bfloat16
    assert auto_dtype("cuda:1", cuda_bf16=False) == torch.float32
    assert auto_dtype("mps") == torch.float32


@pytest.fixture
def amx(monkeypatch):
    """This process as an AMX host with auto unpinned (the suite pins fp32 in conftest)."""
    monkeypatch.delenv(precision.ENV_DTYPE, raising=False)
    monkeypatch.setattr(precision, "host_cpu_flags", lambda: frozenset(AMX_HOST))
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: True)


def test_from_pretrained_defaults_to_the_auto_choice(amx, monkeypatch):
    seg = Segmenter.from_pretrained("shapes-demo", device="cpu")
    assert seg.dtype == torch.bfloat16 and seg.dtype_name == "bfloat16" and seg.dtype_reason.startswith("auto")
    assert seg.model.sam.image_encoder.patch_embed.proj.weight.dtype == torch.bfloat16
    norms = [m for m in seg.model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and all(p.dtype == torch.float32 for m in norms for p in m.parameters())  # the fp32 islands stay
    assert all(p.dtype == torch.float32 for p in seg.model.no_target_head.parameters())
    fp32 = Segmenter.from_pretrained("shapes-demo", device="cpu", dtype="fp32")
    assert fp32.dtype_name == "float32" and all(p.dtype == torch.float32 for p in fp32.model.parameters())

    monkeypatch.setattr(precision, "host_cpu_flags", lambda: frozenset(AVX2_HOST))
    plain = Segmenter.from_pretrained("shapes-demo", device="cpu")
    assert plain.dtype_name == "float32" and all(p.dtype == torch.float32 for p in plain.model.parameters())

    monkeypatch.setenv(precision.ENV_DTYPE, "bf16")  # the variable replaces the automatic choice
    assert Segmenter.from_pretrained("shapes-demo", device="cpu").dtype == torch.bfloat16
    monkeypatch.setenv(precision.ENV_DTYPE, "int4")
    with pytest.raises(ConfigError, match="SSPSAM_DTYPE"):
        Segmenter.from_pretrained("shapes-demo", device="cpu")


def test_bf16_masks_agree_with_fp32_on_the_demo(amx):
    auto = Segmenter.from_pretrained("shapes-demo", device="cpu")
    fp32 = Segmenter.from_pretrained("shapes-demo", device="cpu", dtype="fp32")
    phrases = ["the red circle", "the blue square", "the green triangle"]
    agree = total = 0
    for seed in range(2):
        rgb = make_scene(seed, width=128, height=96).render()
        a, b = fp32.segment(rgb, phrases), auto.segment(rgb, phrases)
        assert np.isfinite(b.scores).all()
        agree += int((a.masks == b.masks).sum())
        total += a.masks.size
    assert agree / total >= 0.99


def test_cli_says_and_records_the_choice(amx, tmp_path):
    from sspsam.cli.main import app

    rgb = make_scene(0, width=96, height=72).render()
    from PIL import Image

    img = tmp_path / "scene.png"
    Image.fromarray(rgb).save(img)
    runner = CliRunner()
    res = runner.invoke(app, ["segment", str(img), "the red circle", "-o", str(tmp_path / "a"), "--device", "cpu", "--threads", "1"])
    assert res.exit_code == 0, res.output
    assert "info: running in bfloat16 (auto: CPU has amx_bf16" in res.stderr
    assert json.loads((tmp_path / "a" / "scene.segment.json").read_text())["dtype"] == "bfloat16"

    res = runner.invoke(app, ["segment", str(img), "the red circle", "-o", str(tmp_path / "b"), "--device", "cpu",
                              "--threads", "1", "--dtype", "fp32"])
    assert res.exit_code == 0, res.output
    assert "info:" not in res.stderr
    assert json.loads((tmp_path / "b" / "scene.segment.json").read_text())["dtype"] == "float32"

    res = runner.invoke(app, ["segment", str(img), "x", "--dtype", "int4"])
    assert res.exit_code == 2 and res.stderr.strip() == "error: --dtype must be auto, fp32, bf16 or fp16, got 'int4'"
