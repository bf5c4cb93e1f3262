"""The Python API practitioners expect (issue 11): instances and boxes, batches, tensor inputs,
devices, half precision. Known answers come from the shapes generator, whose masks are exact."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sspsam.data.shapes import make_scene
from sspsam.io.masks import boxes_xyxy, decode_rle, split_instances
from sspsam.predict.results import Instances, Segmentation, coco_results
from sspsam.predict.segmenter import Segmenter

ROOT = Path(__file__).resolve().parents[1]


def _same_colour_scene():
    """The first generated scene with exactly two objects of one colour: (scene, their indices)."""
    for seed in range(100):
        scene = make_scene(np.random.default_rng(seed), width=160, height=120, n_objects=(3, 4), radius=(0.12, 0.2))
        for colour in {o.colour for o in scene.objects}:
            idx = scene.select(colour=colour)
            if len(idx) == 2:
                return scene, idx
    raise AssertionError("no scene with two same-colour objects")


# The 2-px bar is for splitting and boxing a mask (checked on the generator's own masks
# above); a learned mask adds its own edge error on top, so boxes from the demo model's masks get
# 3 px (measured: 2.13 px at the blue circle's top edge with the step-15000 demo model).
MODEL_BOX_TOL = 3


def _generator_box(obj) -> np.ndarray:
    return np.array(obj.extent, np.float32)  # polygon extents = pixel edges


@pytest.fixture(scope="module")
def demo():
    return Segmenter.from_pretrained("shapes-demo", device="cpu")


@pytest.fixture(scope="module")
def example():
    """The README's example scene and its blue circle (the demo model answers it right)."""
    from sspsam.data.shapes import make_scene as ms

    scene = ms(np.random.default_rng(12), width=256, height=192, n_objects=(4, 4), radius=(0.12, 0.2),
               background="plain", palette=("red", "green", "blue", "yellow"))
    (blue,) = [o for o in scene.objects if (o.colour, o.shape) == ("blue", "circle")]
    return scene, blue


# ---- 1. instances and boxes --------------------------------------------------------------------


def test_two_same_colour_objects_are_two_instances_with_the_generators_boxes():
    scene, idx = _same_colour_scene()
    union = scene.mask(idx[0]) | scene.mask(idx[1])
    parts = split_instances(union)
    assert parts.shape == (2, scene.height, scene.width)
    assert np.array_equal(parts[0] | parts[1], union) and not (parts[0] & parts[1]).any()
    boxes = boxes_xyxy(parts)
    want = sorted((_generator_box(scene.objects[i]) for i in idx), key=lambda b: tuple(b))
    got = sorted(boxes, key=lambda b: tuple(b))
    for g, w in zip(got, want):
        assert np.abs(g - w).max() <= 2, (g, w)
    # each instance is exactly one generator mask (the shapes do not touch)
    assert {frozenset(np.flatnonzero(p)) for p in parts} == {frozenset(np.flatnonzero(scene.mask(i))) for i in idx}


def test_segmentation_json_has_coco_boxes_per_instance():
    scene, idx = _same_colour_scene()
    union = scene.mask(idx[0]) | scene.mask(idx[1])
    res = Segmentation(["the two shapes", "nothing"], np.stack([union, np.zeros_like(union)]),
                       np.array([0.9, 0.1], np.float32), np.array([False, True]))
    assert [len(i) for i in res.instances] == [2, 0]
    out = json.loads(json.dumps(res.to_json()))
    first, none = out["results"]
    assert none["bbox"] is None and none["instances"] == []
    assert len(first["instances"]) == 2
    for inst in first["instances"]:
        x, y, w, h = inst["bbox"]
        assert [x, y, x + w, y + h] == inst["bbox_xyxy"]
        m = decode_rle(inst["rle"])
        ys, xs = np.nonzero(m)
        assert [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] == inst["bbox_xyxy"] and inst["area"] == m.sum()
    x, y, w, h = first["bbox"]  # the union's box encloses both
    ys, xs = np.nonzero(union)
    assert [x, y, x + w, y + h] == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    coco = coco_results([res, res], image_ids=[7, 8])
    assert [c["image_id"] for c in coco] == [7, 7, 8, 8] and all(c["category_id"] == 0 for c in coco)


def test_specks_below_the_minimum_area_are_not_instances():
    m = np.zeros((50, 50), bool)
    m[5:25, 5:25] = True
    m[40, 40] = True  # one stray pixel
    m[30:33, 30:32] = True  # 6 px
    assert len(split_instances(m, min_area=1)) == 3
    assert len(split_instances(m, min_area=5)) == 2
    assert len(split_instances(m, min_area=10_000)) == 1  # a found mask always keeps its largest part
    # diagonal neighbours are one object (8-connectivity)
    d = np.eye(6, dtype=bool)
    assert len(split_instances(d)) == 1
    assert split_instances(np.zeros((4, 4), bool)).shape == (0, 4, 4)


def test_demo_model_box_matches_the_generator(demo, example):
    scene, blue = example
    res = demo.segment(scene.render(), ["the blue circle", "the purple triangle"])
    inst = res.instances[0]
    assert isinstance(inst, Instances) and len(inst) == 1
    assert np.abs(inst.boxes[0] - _generator_box(blue)).max() <= MODEL_BOX_TOL, (inst.boxes[0], blue.extent)
    assert inst.masks.dtype == bool and inst.masks.shape == (1, scene.height, scene.width)
    assert inst.boxes.dtype == np.float32 and 0 < inst.scores[0] <= 1
    assert res.no_target[1] and len(res.instances[1]) == 0


def test_cli_json_and_printout_have_boxes(tmp_path, example):
    from typer.testing import CliRunner

    from sspsam.cli.main import app

    scene, blue = example
    img = tmp_path / "scene.png"
    Image.fromarray(scene.render()).save(img)
    r = CliRunner().invoke(app, ["segment", str(img), "the blue circle", "-o", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    assert "1 object (boxes x0,y0,x1,y1:" in r.stdout
    (res,) = json.loads((tmp_path / "out" / "scene.segment.json").read_text())["results"]
    (inst,) = res["instances"]
    x, y, w, h = inst["bbox"]
    assert np.abs(np.array([x, y, x + w, y + h]) - _generator_box(blue)).max() <= MODEL_BOX_TOL


def test_http_api_returns_instances(example, demo):
    from starlette.testclient import TestClient

    from sspsam.serve import create_app

    scene, blue = example
    import io

    buf = io.BytesIO()
    Image.fromarray(scene.render()).save(buf, format="PNG")
    app = create_app(segmenter=demo, ovss_model=None)
    with TestClient(app) as client:
        r = client.post("/v1/segment", files={"image": ("s.png", buf.getvalue(), "image/png")},
                        data={"phrases": ["the blue circle", "the purple triangle"]})
    assert r.status_code == 200, r.text
    found, absent = r.json()["results"]
    (inst,) = found["instances"]
    assert np.abs(np.array(inst["bbox_xyxy"]) - _generator_box(blue)).max() <= MODEL_BOX_TOL
    assert absent["instances"] == [] and absent["bbox"] is None
    schema = app.openapi()["components"]["schemas"]
    assert "instances" in schema["SegmentResult"]["properties"]


# ---- 2. batches ----------------------------------------------------------------------------------


def _scenes(n: int = 4) -> list[np.ndarray]:
    return [make_scene(seed).render() for seed in range(20, 20 + n)]  # mixed sizes and orientations


def test_a_batch_of_four_gives_the_masks_of_four_single_calls(demo):
    from sspsam.errors import TextError

    images = _scenes()
    phrases = ["the red circle", "the blue square", "the green triangle"]
    singles = [demo.segment(im, phrases) for im in images]
    for batch in (demo.segment(images, phrases, image_batch_size=4), demo.segment(images, phrases, image_batch_size=3)):
        assert len(batch) == 4
        for one, many in zip(singles, batch):
            assert many.phrases == phrases and np.array_equal(one.masks, many.masks)
            assert np.array_equal(one.no_target, many.no_target)
            np.testing.assert_allclose(one.scores, many.scores, atol=1e-4)
            for a, b in zip(one.instances, many.instances):
                assert np.array_equal(a.boxes, b.boxes) and np.array_equal(a.masks, b.masks)
    per_image = [["the red circle"], ["the blue square", "the red circle"], ["the triangle"], ["the yellow shape"]]
    mixed = demo.segment(images, per_image)
    for im, p, res in zip(images, per_image, mixed):
        assert res.phrases == p and np.array_equal(res.masks, demo.segment(im, p).masks)
    with pytest.raises(TextError, match="4 images but 2 phrase lists"):
        demo.segment(images, [["a"], ["b"]])
    assert demo.segment([], phrases) == []


def test_a_4d_tensor_is_a_batch(demo):
    images = [make_scene(seed, width=96, height=80).render() for seed in (1, 2)]
    t = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)  # [B, C, H, W] uint8
    batch = demo.segment(t, "the red circle")
    assert len(batch) == 2
    for im, res in zip(images, batch):
        assert np.array_equal(res.masks, demo.segment(im, "the red circle").masks)


@pytest.fixture(scope="module")
def ovss():
    from sspsam.predict.ovss import OVSS

    return OVSS.from_pretrained("ovss-shapes-demo", device="cpu")


def test_ovss_batch_of_four_gives_the_labels_of_four_single_calls(ovss):
    images = _scenes()
    images[1] = make_scene(5, width=400, height=150).render()  # long side > 1.5 × input: sliding windows
    classes = ["red", "green", "blue", "background"]
    singles = [ovss.segment(im, classes) for im in images]
    batch = ovss.segment(images, classes, image_batch_size=3)
    assert len(batch) == 4
    for one, many in zip(singles, batch):
        assert many.classes == classes and np.array_equal(one.labels, many.labels)
        np.testing.assert_allclose(one.scores, many.scores, atol=1e-4)
        assert one.shares == many.shares
    per_image = [["red", "background"], classes, ["blue", "background"], ["red", "background"]]
    for im, c, res in zip(images, per_image, ovss.segment(images, per_image)):
        assert res.classes == c and np.array_equal(res.labels, ovss.segment(im, c).labels)


# ---- 3. tensors, URLs and devices ---------------------------------------------------------------


def test_every_input_layout_and_dtype_gives_the_pil_mask(demo, tmp_path):
    import io

    rgb = make_scene(7, width=120, height=90).render()
    phrases = ["the red circle", "the blue square"]
    want = demo.segment(Image.fromarray(rgb), phrases).masks
    chw = torch.from_numpy(rgb).permute(2, 0, 1).contiguous()
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    path = tmp_path / "scene.png"
    path.write_bytes(buf.getvalue())
    inputs = {
        "numpy HWC uint8": rgb,
        "numpy HWC float [0,1]": rgb.astype(np.float32) / 255,
        "torch CHW uint8": chw,
        "torch HWC uint8": torch.from_numpy(rgb),
        "torch CHW float [0,1]": chw.float() / 255,
        "torch HWC float64 [0,1]": torch.from_numpy(rgb).double() / 255,
        "torch 1xCxHxW": chw[None],
        "bytes": buf.getvalue(),
        "path": path,
        "str path": str(path),
    }
    for what, image in inputs.items():
        res = demo.segment(image, phrases)
        res = res[0] if isinstance(res, list) else res
        assert np.array_equal(res.masks, want), what


def test_bad_tensors_are_one_line_errors(demo):
    from sspsam.errors import ImageLoadError

    with pytest.raises(ImageLoadError, match="shape"):
        demo.segment(torch.zeros(5, 10, 10), "x")  # 5 channels either way
    with pytest.raises(ImageLoadError, match="shape"):
        demo.segment(torch.zeros(2, 2, 2, 10, 10), "x")


def test_urls_only_when_allowed(demo):
    import http.server
    import io
    import threading

    from sspsam.errors import ImageLoadError

    rgb = make_scene(8, width=100, height=80).render()
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    body = buf.getvalue()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200 if self.path == "/scene.png" else 404)
            self.end_headers()
            if self.path == "/scene.png":
                self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/scene.png"
    try:
        with pytest.raises(ImageLoadError, match="allow_urls=True"):
            demo.segment(url, "the red circle")
        got = demo.segment(url, "the red circle", allow_urls=True)
        assert np.array_equal(got.masks, demo.segment(rgb, "the red circle").masks)
        with pytest.raises(ImageLoadError, match="cannot fetch"):
            demo.segment(url.replace("scene", "missing"), "the red circle", allow_urls=True)
    finally:
        server.shutdown()


def test_return_tensors_pt_stays_on_the_models_device(demo, ovss):
    rgb = make_scene(9, width=96, height=72).render()
    ref = demo.segment(rgb, ["the red circle", "the green shape"])
    pt = demo.segment(rgb, ["the red circle", "the green shape"], return_tensors="pt")
    for x in (pt.masks, pt.scores, pt.no_target, *[t for i in pt.instances for t in (i.masks, i.boxes, i.scores)]):
        assert isinstance(x, torch.Tensor) and x.device == demo.device
    assert pt.masks.dtype == torch.bool and torch.equal(pt.masks.cpu(), torch.from_numpy(ref.masks))
    assert json.dumps(pt.to_json()) == json.dumps(ref.to_json())  # JSON from tensors too
    lab = ovss.segment(rgb, ["red", "background"], return_tensors="pt")
    assert isinstance(lab.labels, torch.Tensor) and lab.labels.device == ovss.device
    with pytest.raises(ValueError, match="return_tensors"):
        demo.segment(rgb, "x", return_tensors="tf")


def test_device_auto_is_the_default_and_to_moves_the_model():
    from sspsam.predict.device import resolve_device

    seg = Segmenter.from_pretrained("shapes-demo")
    assert seg.device == resolve_device("auto")
    rgb = make_scene(10, width=96, height=72).render()
    before = seg.segment(rgb, "the red circle").masks
    assert seg.to("cpu") is seg and seg.device == torch.device("cpu") and seg._cache is None
    assert all(p.device.type == "cpu" for p in seg.model.parameters())
    assert np.array_equal(seg.segment(rgb, "the red circle").masks, before)


# ---- 5. half precision and compile ----------------------------------------------------------------


def _mask_logits(seg, rgb, phrases) -> torch.Tensor:
    from sspsam.predict.precision import autocast

    with torch.inference_mode():
        enc = seg._encode([rgb], ["-"])[0]
        with autocast(seg.device, seg._run_dtype()):
            text = seg.model.encode_text(seg.model.tokenize(phrases).to(seg.device))
            out = seg.model.decode(enc.features, text, torch.zeros(len(phrases), dtype=torch.long, device=seg.device))
    return out["mask_logits"].float()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_agrees_with_fp32(demo, dtype):
    half = Segmenter.from_pretrained("shapes-demo", device="cpu", dtype=dtype)
    assert half.model.sam.image_encoder.patch_embed.proj.weight.dtype == dtype  # the towers run in half
    norms = [m for m in half.model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and all(p.dtype == torch.float32 for m in norms for p in m.parameters())  # norms stay fp32
    phrases = ["the red circle", "the blue square", "the green triangle", "the yellow shape"]
    agree = total = 0
    diff = 0.0
    for seed in range(3):
        rgb = make_scene(seed, width=128, height=96).render()
        a, b = demo.segment(rgb, phrases), half.segment(rgb, phrases)
        agree += int((a.masks == b.masks).sum())
        total += a.masks.size
        diff = max(diff, float((_mask_logits(demo, rgb, phrases) - _mask_logits(half, rgb, phrases)).abs().max()))
    print(f"{dtype}: mask agreement {agree / total:.5f}, max |Δ mask logit| {diff:.4f}")
    assert agree / total >= 0.99


def test_a_model_halved_by_hand_still_runs(demo):
    import copy

    seg = Segmenter(copy.deepcopy(demo.model).half(), "cpu", "shapes-demo")
    rgb = make_scene(3, width=96, height=72).render()
    res = seg.segment(rgb, "the red circle")
    assert res.masks.shape == (1, 72, 96) and 0 <= float(res.scores[0]) <= 1


OVSS_CLASSES = ["background", "red", "green", "blue", "yellow"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ovss_half_precision_agrees_with_fp32(ovss, dtype):
    """The OVSS demo in half precision labels >= 99 % of pixels as fp32 does (measured: bf16
    99.86 %, fp16 99.94 % on these scenes), single images, a batch and SCLIP's protocol alike."""
    from sspsam.predict.ovss import OVSS

    half = OVSS.from_pretrained("ovss-shapes-demo", device="cpu", dtype=dtype)
    assert half.model.clip.model.visual.conv1.weight.dtype == dtype  # the towers run in half
    norms = [m for m in half.model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and all(p.dtype == torch.float32 for m in norms for p in m.parameters())  # norms stay fp32
    scenes = [make_scene(seed, width=128, height=96).render() for seed in range(3)]
    agree = total = 0
    for rgb, batched in zip(scenes, half.segment(scenes, OVSS_CLASSES)):
        a, b = ovss.segment(rgb, OVSS_CLASSES), half.segment(rgb, OVSS_CLASSES)
        assert b.labels.dtype == np.int32 and b.scores.dtype == np.float32
        assert np.array_equal(batched.labels, b.labels)
        agree += int((a.labels == b.labels).sum())
        total += a.labels.size
    print(f"OVSS {dtype}: label agreement {agree / total:.5f}")
    assert agree / total >= 0.99
    sclip = OVSS(half.model, "cpu", "ovss-shapes-demo", protocol="sclip", dtype=dtype)
    ref = OVSS(ovss.model, "cpu", "ovss-shapes-demo", protocol="sclip")
    assert (sclip.segment(scenes[0], OVSS_CLASSES).labels == ref.segment(scenes[0], OVSS_CLASSES).labels).mean() >= 0.99


def test_an_ovss_model_halved_by_hand_still_runs(ovss):
    import copy

    from sspsam.predict.ovss import OVSS

    rgb = make_scene(3, width=96, height=72).render()
    res = OVSS(copy.deepcopy(ovss.model).half(), "cpu", "ovss-shapes-demo").segment(rgb, OVSS_CLASSES)
    assert res.labels.shape == (72, 96) and (res.labels == ovss.segment(rgb, OVSS_CLASSES).labels).mean() >= 0.99


class _FakeCompiled(torch.nn.Module):
    """What torch.compile returns, as far as sspsam relies on it: ``_orig_mod``, attribute access
    passed through, and a lazy compiler that fails on the calls ``fails(call_number)`` picks."""

    def __init__(self, inner, fails):
        super().__init__()
        self._orig_mod = inner
        self.fails, self.calls = fails, 0

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["_orig_mod"], name)

    def forward(self, *a, **k):
        self.calls += 1
        if self.fails(self.calls):
            raise RuntimeError("inductor says no")
        return self._orig_mod(*a, **k)


def _fake_compile(fails):
    def compile(target, **kw):
        if isinstance(target, torch.nn.Module):
            return _FakeCompiled(target, fails)
        calls = [0]

        def method(*a, **k):  # a compiled bound method (CLIP's encode_image)
            calls[0] += 1
            if fails(calls[0]):
                raise RuntimeError("inductor says no")
            return target(*a, **k)
        return method
    return compile


@pytest.mark.parametrize("task", ["segment", "ovss"])
def test_compile_that_fails_falls_back_with_one_warning(demo, ovss, monkeypatch, task):
    import warnings

    from sspsam.predict.ovss import OVSS

    monkeypatch.setattr(torch, "compile", _fake_compile(lambda n: True))
    cls, name, eager = (Segmenter, "shapes-demo", demo) if task == "segment" else (OVSS, "ovss-shapes-demo", ovss)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = cls.from_pretrained(name, device="cpu", compile=True)
    msgs = [str(w.message) for w in caught if "compile" in str(w.message)]
    assert len(msgs) == 1 and "running eagerly" in msgs[0] and model.compiled == []
    assert "encode_image" not in vars(model.model.clip) and not hasattr(model.model.sam.image_encoder, "_orig_mod")
    rgb = make_scene(3, width=96, height=72).render()
    if task == "segment":
        assert np.array_equal(model.segment(rgb, "the red circle").masks, eager.segment(rgb, "the red circle").masks)
    else:
        assert np.array_equal(model.segment(rgb, OVSS_CLASSES).labels, eager.segment(rgb, OVSS_CLASSES).labels)


def test_compile_that_fails_later_answers_that_call_eagerly(demo, monkeypatch):
    """A compiled model whose compiler gives up at a later call (a new batch size compiles again:
    TinyViT failed so at batch 4) answers that call eagerly, warns once, and stays eager."""
    import warnings

    monkeypatch.setattr(torch, "compile", _fake_compile(lambda n: n >= 2))  # the warm-up works, the next call not
    model = Segmenter.from_pretrained("shapes-demo", device="cpu", compile=True)
    assert model.compiled == ["clip.encode_image", "sam.image_encoder"]
    scenes = [make_scene(s, width=96, height=72).render() for s in range(4)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = model.segment(scenes, "the red circle")
    msgs = [str(w.message) for w in caught if "compile" in str(w.message)]
    assert len(msgs) == 1 and "running eagerly" in msgs[0] and model.compiled == []
    for g, w in zip(got, demo.segment(scenes, "the red circle")):
        assert np.array_equal(g.masks, w.masks)


def test_compile_skips_modules_the_model_lacks(monkeypatch):
    """HOT_MODULES name the image towers; a model without one (no `sam` at all, or SAM built without
    its image encoder) has it skipped rather than failing."""
    from sspsam.predict.precision import compile_hot_modules

    monkeypatch.setattr(torch, "compile", lambda module, **kw: module)
    owner = torch.nn.Module()
    owner.clip = torch.nn.Linear(2, 2)
    assert compile_hot_modules(owner, ["clip", "sam.image_encoder"]) == ["clip"]
    owner.sam = torch.nn.Module()
    owner.sam.image_encoder = None
    assert compile_hot_modules(owner, ["clip", "sam.image_encoder"]) == ["clip"]
