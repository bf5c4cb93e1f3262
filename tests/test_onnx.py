"""ONNX export: ONNX Runtime against PyTorch on the tiny config (random weights) and the bundled
shapes-demo, with 1 and 3 phrases (the dynamic phrase axis), plus the command line and the manifest."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from sspsam.cli.main import app
from sspsam.models.build import build_model
from sspsam.config import load_config
from sspsam.errors import CheckpointError
from sspsam.predict.onnx import MANIFEST, OnnxSegmenter, PackFreeLinguisticAdapter, export_onnx
from sspsam.predict.segmenter import Segmenter
from sspsam.models.ssp_sam.legacy_head import LegacyLinguisticAttentionAdapter as LinguisticAttentionAdapter

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-3  # max abs diff of mask logits the issue allows
PHRASES = {1: ["the blue circle"], 3: ["the blue circle", "the red square on the left", "a green triangle"]}
runner = CliRunner()


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """model name → (torch Segmenter, OnnxSegmenter): the tiny config via the API, the demo via the CLI."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("onnx")
    torch.manual_seed(0)
    tiny = build_model("ssp-sam-tiny").eval()
    export_onnx(tiny, root / "tiny", name="ssp-sam-tiny")
    cfg = load_config("ssp-sam-tiny")  # the official head: unpacked bi-GRU, centred CLIP input, phrase format
    cfg["ssp"] = {**cfg["ssp"], "head": "official"}
    official = build_model(cfg).eval()
    export_onnx(official, root / "official", name="ssp-sam-tiny-official")
    result = runner.invoke(app, ["export", "onnx", "shapes-demo", "-o", str(root / "demo")])
    assert result.exit_code == 0, result.output
    yield {
        "ssp-sam-tiny": (Segmenter(tiny, device="cpu"), OnnxSegmenter.from_dir(root / "tiny"), root / "tiny"),
        "tiny-official": (Segmenter(official, device="cpu"), OnnxSegmenter.from_dir(root / "official"), root / "official"),
        "shapes-demo": (Segmenter.from_pretrained("shapes-demo", device="cpu"), OnnxSegmenter.from_dir(root / "demo"),
                        root / "demo"),
    }
    torch.set_num_threads(n)


def _scene() -> np.ndarray:
    return np.asarray(Image.open(ROOT / "examples/shapes.png").convert("RGB"))


@pytest.mark.parametrize("name", ["ssp-sam-tiny", "tiny-official", "shapes-demo"])
@pytest.mark.parametrize("n_phrases", [1, 3])
def test_onnx_runtime_matches_pytorch(exports, name, n_phrases):
    torch_seg, onnx_seg, _ = exports[name]
    model, graphs = torch_seg.model, onnx_seg.graphs
    phrases = PHRASES[n_phrases]
    # the graphs themselves: image features, then the decoder's outputs for these phrases
    s = model.image_size
    images = torch.rand(1, 3, s, s, generator=torch.Generator().manual_seed(1)) * 255
    valid = torch.tensor([[s, s * 5 // 8]])
    with torch.inference_mode():
        clip_x = model.clip_input([_scene()])  # None for the letterbox geometry
        ref_feats = model.encode_image(images, valid, clip_images=clip_x)
        got_feats = graphs.encode_image(images, valid, clip_images=clip_x)
        for key in ("sam", "clip_patches", "clip_global"):
            assert (getattr(ref_feats, key) - getattr(got_feats, key)).abs().max() <= TOL, key
        tokens = model.tokenize(phrases)
        ref = model.decode(ref_feats, model.encode_text(tokens), torch.zeros(n_phrases, dtype=torch.long))
        got = graphs.decode(ref_feats, graphs.encode_text(graphs.tokenize(phrases)))
    assert got["mask_logits"].shape == ref["mask_logits"].shape == (n_phrases, 1, s // 4, s // 4)
    assert (got["mask_logits"] - ref["mask_logits"]).abs().max() <= TOL
    assert torch.equal(got["mask_logits"] > 0, ref["mask_logits"] > 0)
    assert (got["no_target_logit"] - ref["no_target_logit"]).abs().max() <= TOL
    # the whole call, through the predictor's own pre/post-processing
    a, b = torch_seg.segment(_scene(), phrases), onnx_seg.segment(_scene(), phrases)
    assert type(a) is type(b) and b.phrases == a.phrases
    assert np.array_equal(a.masks, b.masks) and np.array_equal(a.no_target, b.no_target)
    assert np.allclose(a.scores, b.scores, atol=TOL)
    if name == "shapes-demo":  # the demo finds the blue circle: the equality above is of a real mask
        assert b.masks[0].sum() > 500 and not b.no_target[0]


def test_phrase_axis_is_dynamic_and_manifest_names_each_file(exports):
    _, _, folder = exports["ssp-sam-tiny"]
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["opset"] == 18 and manifest["context_length"] == 77 and manifest["image_size"] == 128
    assert set(manifest["files"]) == {"sam_image_encoder.onnx", "clip_image_encoder.onnx", "text_prompt_decoder.onnx"}
    decoder = onnx.load(str(folder / "text_prompt_decoder.onnx"), load_external_data=False)
    tokens = next(i for i in decoder.graph.input if i.name == "tokens")
    dims = tokens.type.tensor_type.shape.dim
    assert dims[0].dim_param == "T" and dims[1].dim_value == 77
    assert [o.name for o in decoder.graph.output] == ["mask_logits", "iou", "no_target_logit"]


def test_tampered_graph_is_refused(exports, tmp_path):
    _, _, folder = exports["ssp-sam-tiny"]
    copy = tmp_path / "copy"
    copy.mkdir()
    for p in folder.iterdir():
        data = p.read_bytes()
        if p.name == "sam_image_encoder.onnx":
            data = data[:-1] + bytes([data[-1] ^ 1])  # same size, one bit flipped
        (copy / p.name).write_bytes(data)
    with pytest.raises(CheckpointError, match="sha256"):
        OnnxSegmenter.from_dir(copy)
    with pytest.raises(CheckpointError, match="not an sspsam ONNX export"):
        OnnxSegmenter.from_dir(tmp_path)


def test_pack_free_adapter_equals_the_packed_gru():
    """The export-friendly bi-GRU gives the packed one's numbers for phrases of every length."""
    torch.manual_seed(0)
    packed = LinguisticAttentionAdapter(16, 24).eval()
    free = PackFreeLinguisticAdapter(packed).eval()
    words = torch.randn(4, 9, 16)
    lengths = torch.tensor([9, 1, 4, 6])
    pad = torch.arange(9)[None] >= lengths[:, None]
    with torch.no_grad():
        for a, b in zip(packed(words, pad), free(words, pad)):
            assert (a - b).abs().max() < 1e-6


def test_cli_writes_the_files(exports):
    _, onnx_seg, folder = exports["shapes-demo"]
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["clip_image_encoder.onnx", "sam_image_encoder.onnx", "text_prompt_decoder.onnx", MANIFEST])
    assert onnx_seg.name == "shapes-demo" and onnx_seg.providers[-1] == "CPUExecutionProvider"
    assert not list(folder.parent.glob(".*.tmp"))  # the temporary folder went away


@pytest.mark.parametrize("model, needle", [
    ("no-such-model", "unknown model 'no-such-model'"),
    ("ovss-shapes-demo", "open-vocabulary"),
    ("ssp-sam-mobile", "--random-init"),
])
def test_cli_bad_model_is_one_line_exit_2(tmp_path, model, needle):
    result = runner.invoke(app, ["export", "onnx", model, "-o", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.stderr
    assert not (tmp_path / "out").exists()


def test_export_over_an_older_export_replaces_every_file(exports, tmp_path):
    """Exporting into a folder that already holds graphs (a stale, damaged one here) leaves a
    loadable export whose manifest matches every file; nothing else in the folder is touched."""
    torch_seg, _, _ = exports["ssp-sam-tiny"]
    folder = tmp_path / "again"
    folder.mkdir()
    (folder / "text_prompt_decoder.onnx").write_bytes(b"stale")
    (folder / "notes.txt").write_text("mine")
    export_onnx(torch_seg.model, folder, name="ssp-sam-tiny")
    import sspsam

    assert sspsam.onnx.OnnxSegmenter is OnnxSegmenter and sspsam.onnx.export_onnx is export_onnx  # the public name
    again = sspsam.onnx.OnnxSegmenter.from_dir(folder)  # verify=True: every sha256 checked
    res = again.segment(_scene(), PHRASES[3])
    assert np.array_equal(res.masks, torch_seg.segment(_scene(), PHRASES[3]).masks)
    assert (folder / "notes.txt").read_text() == "mine"
    assert not list(tmp_path.glob(".*.tmp"))


def test_an_export_folder_is_a_model_name_for_the_api_and_the_cli(exports, tmp_path, monkeypatch):
    """`Segmenter.from_pretrained(DIR)` and `sspsam segment -m DIR` run the export on ONNX Runtime
    (the fast CPU path): the same masks and JSON as the bundled PyTorch model, the threads torch
    has, and one-line refusals where an export cannot serve."""
    from sspsam.errors import ConfigError, SSPSamError
    from sspsam.predict.onnx import OnnxGraphs
    from sspsam.predict.ovss import OVSS

    torch_seg, _, folder = exports["shapes-demo"]
    seg = Segmenter.from_pretrained(folder, device="cpu")
    assert isinstance(seg, Segmenter) and isinstance(seg.model, OnnxGraphs) and seg.name == "shapes-demo"
    assert seg.model.providers == ["CPUExecutionProvider"]
    sess = seg.model.sessions["sam_image"]
    assert sess.get_session_options().intra_op_num_threads == torch.get_num_threads()
    a, b = torch_seg.segment(_scene(), PHRASES[3]), seg.segment(_scene(), PHRASES[3])
    assert np.array_equal(a.masks, b.masks) and np.array_equal(a.no_target, b.no_target)
    with pytest.raises(ConfigError, match="fp32"):
        Segmenter.from_pretrained(folder, dtype=torch.bfloat16)
    with pytest.raises(SSPSamError, match="referring"):
        OVSS.from_pretrained(folder)
    with pytest.raises(SSPSamError, match="no sspsam-onnx.json"):  # any other folder: named, not "not found"
        Segmenter.from_pretrained(tmp_path)
    (tmp_path / "shapes-demo").mkdir()  # a folder that happens to carry a bundled name does not shadow it
    monkeypatch.chdir(tmp_path)
    assert Segmenter.from_pretrained("shapes-demo", device="cpu").model.__class__ is torch_seg.model.__class__

    out = {}
    for label, model in (("torch", "shapes-demo"), ("onnx", str(folder))):
        r = runner.invoke(app, ["segment", str(ROOT / "examples/shapes.png"), "the blue circle", "the purple triangle",
                                "-m", model, "--device", "cpu", "-o", str(tmp_path / label)])
        assert r.exit_code == 0, r.output
        out[label] = json.loads((tmp_path / label / "shapes.segment.json").read_text())
        out[label]["mask"] = np.asarray(Image.open(tmp_path / label / "shapes.segment.mask0.png"))
    assert out["onnx"]["model"] == "shapes-demo" and np.array_equal(out["onnx"]["mask"], out["torch"]["mask"])
    assert [r["no_target"] for r in out["onnx"]["results"]] == [False, True]
    for args, needle in ((["--quantize", "int8"], "ONNX export"), ([], "ONNX export of a referring model")):
        cmd = "segment" if args else "ovss"
        tail = ["the blue circle"] if args else ["-c", "red,blue"]
        r = runner.invoke(app, [cmd, str(ROOT / "examples/shapes.png"), *tail, "-m", str(folder), *args,
                                "-o", str(tmp_path / "x")])
        assert r.exit_code == 2 and len(r.stderr.splitlines()) == 1 and needle in r.stderr, r.stderr
