"""Seeded generators of hostile inputs for the fuzz suite (tests/test_fuzz.py).

Everything is made at test time from a seed, small in bytes: the large cases are large only in
what they *declare* (a PNG header saying 20000x20000 over 60 KB of zeros, a config asking for a
million-wide layer), which is the point — the library must refuse them before allocating.

Each generator returns ``Case(kind, name, value)``; the value's meaning depends on the kind:

* ``image``      bytes, a PIL image, a numpy array or another object, for ``load_image`` & co.
* ``phrases``    anything, given as the phrases of a referring request
* ``classes``    anything, given as the class names of an OVSS request
* ``checkpoint`` bytes of a file to load as a model checkpoint
* ``config``     text of a YAML model config
* ``refs``       bytes of a ``refs(unc).p`` pickle
* ``http``       (content_type, body bytes) for ``POST /v1/segment`` or ``/v1/ovss``
"""

from __future__ import annotations

import base64
import copy
import io
import json
import os
import pickle
import random
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image


@dataclass
class Case:
    kind: str
    name: str
    value: Any


# ---- images ---------------------------------------------------------------------------------------


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def declared_png(width: int, height: int, rows: int = 16, colour_type: int = 0) -> bytes:
    """A valid-looking PNG whose header declares width×height but whose data holds a few rows:
    small on disk, huge if decoded (the decompression-bomb shape)."""
    channels = {0: 1, 2: 3, 6: 4}[colour_type]
    raw = zlib.compress(b"\x00" * (1 + width * channels) * rows, 9)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", raw) + _png_chunk(b"IEND", b"")


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def scene(rng: random.Random, w: int = 96, h: int = 72) -> Image.Image:
    """A small picture with a coloured shape, so a valid case has something to find."""
    arr = np.full((h, w, 3), rng.randrange(256), np.uint8)
    y0, x0 = rng.randrange(h // 2), rng.randrange(w // 2)
    arr[y0 : y0 + h // 3, x0 : x0 + w // 3] = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
    return Image.fromarray(arr)


def corrupt_exif_jpeg(seed: int) -> bytes:
    """A JPEG whose EXIF block has a few random bytes changed (some make PIL's exif_transpose raise)."""
    rng = random.Random(seed)
    ex = Image.Exif()
    ex[0x0112], ex[0x010F], ex[0x0131] = 6, "Cam", "sw"
    ex.get_ifd(0x8769)[0x9003] = "2020:01:01 00:00:00"
    data = bytearray(encode(Image.new("RGB", (64, 48), (200, 10, 10)), "JPEG", exif=ex.tobytes()))
    i = data.find(b"Exif\x00\x00")
    for _ in range(rng.randint(1, 4)):
        data[rng.randrange(i + 6, i + 86)] = rng.randrange(256)
    return bytes(data)


EXIF_SEEDS = (113, 578, 1050)  # these corrupt EXIF blocks made exif_transpose raise (struct.error, TypeError)
MODES = ("1", "L", "P", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "I", "F", "I;16", "I;16B", "I;16L", "LA", "La",
         "PA", "RGBa", "RGBX")


def image_cases(seed: int = 0) -> list[Case]:
    rng = random.Random(seed)
    cases: list[Case] = []
    add = lambda name, value: cases.append(Case("image", name, value))  # noqa: E731
    base = scene(rng)
    for mode in MODES:  # every PIL mode, as an object and (where PIL can) as a file
        try:
            img = base.convert(mode) if mode not in ("La", "RGBa", "PA", "I;16B", "I;16L") else Image.new(mode, (40, 30))
        except ValueError:
            img = Image.new(mode, (40, 30))
        add(f"pil-mode-{mode}", img)
    p = base.convert("P")
    p.info["transparency"] = 0
    add("pil-P-transparency", p)
    for fmt in ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM", "ICO", "TGA"):
        add(f"file-{fmt}", encode(base if fmt != "JPEG" else base.convert("RGB"), fmt))
    add("file-png-16bit", encode(Image.fromarray(np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 20), "PNG"))
    add("file-tiff-float", encode(Image.fromarray(np.random.default_rng(seed).random((30, 40), dtype=np.float32)), "TIFF"))
    add("file-ico-multisize", encode(base, "ICO", sizes=[(16, 16), (48, 48), (64, 64)]))
    frames = [scene(rng) for _ in range(3)]
    add("file-gif-animated", encode(frames[0], "GIF", save_all=True, append_images=frames[1:]))
    for s in EXIF_SEEDS + tuple(rng.randrange(10_000) for _ in range(6)):
        add(f"jpeg-corrupt-exif-{s}", corrupt_exif_jpeg(s))
    # lazily opened, truncated PIL images (not yet decoded when handed over)
    png = encode(scene(rng, 200, 150), "PNG")
    for cut in (40, 120, 400):
        add(f"pil-lazy-truncated-{cut}", Image.open(io.BytesIO(png[:cut])) if cut > 60 else png[:cut])
    # truncated and bit-flipped files of each format
    for fmt in ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP"):
        data = encode(scene(rng, 80, 60).convert("RGB"), fmt)
        for _ in range(3):
            add(f"{fmt.lower()}-truncated", data[: rng.randrange(1, len(data))])
        for _ in range(4):
            b = bytearray(data)
            for _ in range(rng.randint(1, 12)):
                b[rng.randrange(len(b))] = rng.randrange(256)
            add(f"{fmt.lower()}-bitflip", bytes(b))
    # declared-huge images (bombs): over the pixel cap, or within it but over the pixel × outputs budget
    add("png-bomb-400MP", declared_png(20_000, 20_000))
    add("png-bomb-rgba-150MP", declared_png(12_250, 12_250, colour_type=6))
    add("png-bomb-1x200M", declared_png(200_000_000, 1, rows=1))
    add("png-zero-width", declared_png(0, 10, rows=0))
    add("gif-bomb-header", b"GIF89a" + struct.pack("<HH", 65535, 65535) + b"\x00\x00\x00" + b"," + b"\x00" * 20)
    add("bmp-bomb-header", b"BM" + struct.pack("<IHHI", 0, 0, 0, 54) + struct.pack("<IiiHHIIiiII", 40, 60000, 60000, 1, 24, 0, 0, 0, 0, 0, 0))
    add("tiff-bomb-header", b"II*\x00\x08\x00\x00\x00" + struct.pack("<H", 2) + struct.pack("<HHII", 256, 4, 1, 100000)
        + struct.pack("<HHII", 257, 4, 1, 100000) + b"\x00\x00\x00\x00")
    # not images at all
    for name, value in [("empty-bytes", b""), ("text", b"hello, this is not an image"), ("html", b"<html></html>"),
                        ("random-1k", bytes(rng.randrange(256) for _ in range(1024))), ("png-magic-only", b"\x89PNG\r\n\x1a\n"),
                        ("svg", b"<svg xmlns='http://www.w3.org/2000/svg' width='10' height='10'/>"),
                        ("pdf", b"%PDF-1.4\n%%EOF"), ("zip", b"PK\x03\x04" + b"\x00" * 40)]:
        add(name, value)
    # numpy arrays and other objects
    gen = np.random.default_rng(seed)
    for name, value in [
        ("array-uint8", gen.integers(0, 255, (50, 70, 3), dtype=np.uint8)),
        ("array-gray", gen.integers(0, 255, (50, 70), dtype=np.uint8)),
        ("array-rgba", gen.integers(0, 255, (50, 70, 4), dtype=np.uint8)),
        ("array-float01", gen.random((40, 40, 3))),
        ("array-float-nan", np.full((40, 40, 3), np.nan)),
        ("array-float-inf", np.full((40, 40, 3), np.inf)),
        ("array-negative", -gen.integers(1, 1000, (40, 40, 3))),
        ("array-uint16", gen.integers(0, 65535, (40, 40, 3), dtype=np.uint16)),
        ("array-bool", gen.random((40, 40)) > 0.5),
        ("array-int64-huge", np.full((20, 20, 3), 2**62, np.int64)),
        ("array-complex", np.zeros((20, 20, 3), np.complex64)),
        ("array-object", np.empty((20, 20, 3), object)),
        ("array-str", np.full((4, 4, 3), "a")),
        ("array-5ch", np.zeros((20, 20, 5), np.uint8)),
        ("array-1d", np.zeros(100, np.uint8)),
        ("array-4d", np.zeros((1, 20, 20, 3), np.uint8)),
        ("array-empty", np.zeros((0, 10, 3), np.uint8)),
        ("array-1x1", np.zeros((1, 1, 3), np.uint8)),
        ("array-thin", np.zeros((1, 3000, 3), np.uint8)),
        ("array-noncontiguous", gen.integers(0, 255, (60, 80, 3), dtype=np.uint8)[::2, ::-1]),
        ("none", None), ("int", 42), ("list", [[1, 2], [3, 4]]), ("dict", {"image": "x"}),
        ("path-missing", "/nonexistent/dir/img.png"), ("path-dir", "/"), ("path-nul", "a\x00b.png"),
        ("path-long", "x" * 5000 + ".png"), ("path-markup", "/tmp/[/red][bold]x.png"),
    ]:
        add(name, value)
    return cases


# ---- phrases and classes ---------------------------------------------------------------------------


def _text_values(rng: random.Random) -> list[tuple[str, Any]]:
    return [
        ("int", 5), ("bool", True), ("float", 1.5), ("nan", float("nan")), ("none", None), ("dict", {"a": 1}),
        ("bytes", b"circle"), ("nested-list", [["a red circle"]]), ("list-of-int", [1, 2]), ("mixed-list", ["ok", 3]),
        ("tuple", ("a red circle", "a blue square")), ("set", {"a"}), ("empty-list", []), ("empty-str", ""),
        ("spaces", "   \t\n "), ("control-chars", "\x00\x01\x1b[31m red \x7f"), ("nul-only", "\x00\x00"),
        ("long-5000", "circle " * 715), ("one-word-10k", "x" * 10_000), ("unicode", "der rote Kreis · 赤い円 · دائرة"),
        ("emoji", "🔴 the red one 🔴"), ("rtl-override", "\u202ethe red circle"), ("zero-width", "\u200b\u200b"),
        ("markup", "[bold red]x[/] [/red] [link=file:///etc/passwd]y[/link]"), ("html", "<script>alert(1)</script>"),
        ("format-string", "{0} %s %n {__class__}"), ("many-1000", [f"shape {i}" for i in range(1000)]),
        ("many-300", ["a red circle"] * 300), ("duplicates", ["a red circle", "a red circle", "A RED CIRCLE"]),
        ("surrogate", "bad \udc80 text"), ("newlines", "red\ncircle\r\n"), ("commas", "red, blue,, ,green"),
        ("valid", "the red circle"), ("valid-many", ["the red circle", "the blue square", "the green triangle"]),
        ("random-printable", "".join(chr(rng.randrange(32, 0x3000)) for _ in range(200))),
    ]


def phrase_cases(seed: int = 0) -> list[Case]:
    return [Case("phrases", n, v) for n, v in _text_values(random.Random(seed))]


def class_cases(seed: int = 1) -> list[Case]:
    extra = [("classes-1001", [f"class {i}" for i in range(1001)]), ("classes-comma-only", ",,,"),
             ("classes-long-name", ["sky", "x" * 300]), ("classes-valid", ["red", "green", "blue", "background"])]
    return [Case("classes", n, v) for n, v in _text_values(random.Random(seed)) + extra]


# ---- checkpoints ---------------------------------------------------------------------------------------


def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


class _Evil:
    """Unpickling this calls os.system: a checkpoint must never be loaded with the full unpickler."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def checkpoint_cases(valid: dict, other_task: dict, marker: str, seed: int = 0) -> list[Case]:
    """``valid``: a loaded sspsam checkpoint (the bundled RES model); ``other_task``: the OVSS one."""
    rng = random.Random(seed)
    cases: list[Case] = []

    def var(name: str, mutate) -> None:
        c = copy.deepcopy(valid)
        out = mutate(c)
        cases.append(Case("checkpoint", name, _torch_bytes(c if out is None else out)))

    sd_keys = list(valid["state_dict"])
    var("valid", lambda c: None)
    cases.append(Case("checkpoint", "other-task", _torch_bytes(other_task)))
    var("no-state-dict", lambda c: c.pop("state_dict"))
    var("no-config", lambda c: c.pop("config"))
    var("no-version", lambda c: c.pop("sspsam"))
    for name, value in [("list", lambda c: list(c["state_dict"].values())), ("floats", lambda c: {k: 1.0 for k in c["state_dict"]}),
                        ("none", lambda c: None), ("str", lambda c: "weights"), ("int-keys", lambda c: {i: v for i, v in enumerate(c["state_dict"].values())}),
                        ("empty", lambda c: {}), ("nested", lambda c: {"model": c["state_dict"]})]:
        var(f"state-dict-{name}", lambda c, f=value: c.__setitem__("state_dict", f(c)))
    for name, value in [("str", "1"), ("none", None), ("float", 1.0), ("bool", True), ("negative", -1), ("future", 99), ("huge", 2**80)]:
        var(f"version-{name}", lambda c, v=value: c.__setitem__("sspsam", v))
    for name, value in [("list", [1, 2]), ("str", "ssp-sam"), ("none", None), ("empty", {})]:
        var(f"config-{name}", lambda c, v=value: c.__setitem__("config", v))
    for path, value in [(("model",), "resnet"), (("model",), 7), (("clip",), "x"), (("sam",), None),
                        (("clip", "embed_dim"), 10**7), (("clip", "vision", "width"), 1_000_000), (("clip", "vision", "layers"), 10**9),
                        (("clip", "text", "vocab_size"), 10**12), (("sam", "img_size"), 10**6), (("sam", "img_size"), -5),
                        (("ssp", "d_model"), "wide"), (("ssp", "num_prompts"), 1.5e300), (("ssp", "pg_layers"), float("nan")),
                        (("ssp", "vaa_heads"), 3), (("sam", "encoder"), "vit_zz"), (("sam", "encoder"), 5),
                        (("inference", "mask_threshold"), "high"), (("ssp",), [1, 2, 3])]:
        def set_path(c, path=path, value=value):
            node = c["config"]
            for k in path[:-1]:
                node = node[k]
            node[path[-1]] = value
        var("config-" + ".".join(path) + f"={str(value)[:12]}", set_path)
    var("external-bad", lambda c: c.__setitem__("external_backbones", "clip"))
    var("external-unknown", lambda c: c.__setitem__("external_backbones", ["gpu"]))
    var("nan-weights", lambda c: [v.fill_(float("nan")) for v in c["state_dict"].values() if v.is_floating_point()] and None)
    var("inf-weights", lambda c: [v.fill_(float("inf")) for k, v in c["state_dict"].items() if "mask_decoder" in k and v.is_floating_point()] and None)
    var("wrong-shape", lambda c: c["state_dict"].__setitem__(sd_keys[3], torch.zeros(7, 3)))
    var("missing-key", lambda c: c["state_dict"].pop(sd_keys[-1]))
    var("extra-key", lambda c: c["state_dict"].__setitem__("extra.weight", torch.zeros(2)))
    var("int-tensor", lambda c: c["state_dict"].__setitem__(sd_keys[5], c["state_dict"][sd_keys[5]].long()))
    good = _torch_bytes(valid)
    for cut in sorted(rng.sample(range(1, len(good)), 5)):
        cases.append(Case("checkpoint", f"truncated-{cut}", good[:cut]))
    for i in range(3):
        b = bytearray(good)
        for _ in range(20):
            b[rng.randrange(len(b))] = rng.randrange(256)
        cases.append(Case("checkpoint", f"bitflip-{i}", bytes(b)))
    cases += [Case("checkpoint", "empty-file", b""), Case("checkpoint", "text-file", b"not a checkpoint\n"),
              Case("checkpoint", "png-file", encode(Image.new("RGB", (8, 8)), "PNG")),
              Case("checkpoint", "evil-pickle", pickle.dumps({"sspsam": 1, "config": _Evil(marker), "state_dict": {}})),
              Case("checkpoint", "evil-torch", _torch_bytes({"sspsam": 1, "config": _Evil(marker), "state_dict": {}}))]
    return cases


# ---- configs -----------------------------------------------------------------------------------------


def config_cases(valid_yaml: str) -> list[Case]:
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
        for i in range(8))
    texts = {
        "valid": valid_yaml, "empty": "", "list": "- 1\n- 2\n", "scalar": "42\n", "invalid-yaml": "model: [unclosed\n",
        "tabs": "model:\t- x\n", "binary": "\x00\x01\x02", "billion-laughs": bomb + "model: ssp-sam\nclip: {}\nsam: {}\n",
        "base-self": "base: ./self.yaml\nmodel: ssp-sam\n", "base-int": "base: 5\n", "base-missing": "base: no-such-variant\n",
        "python-tag": "model: !!python/object/apply:os.system ['true']\n", "unknown-model": "model: resnet\nclip: {}\nsam: {}\n",
        "no-clip": "model: ssp-sam\nsam: {}\n", "clip-list": "model: ssp-sam\nclip: [1]\nsam: {}\n",
        "deep": "model: ssp-sam\nclip: " + "{a: " * 60 + "1" + "}" * 60 + "\nsam: {}\n",
    }
    import yaml

    for key, value in [("width", 10**6), ("layers", 10**5), ("width", -3), ("width", "wide"), ("layers", float("inf")),
                       ("width", 2.5), ("patch_size", 0), ("image_size", 4095)]:
        cfg = yaml.safe_load(valid_yaml)
        cfg["clip"]["vision"][key] = value
        texts[f"clip.vision.{key}={value}"] = yaml.safe_dump(cfg)
    texts["huge-embed"] = "model: ssp-sam\nclip: {embed_dim: 100000000, vision: {width: 100000, layers: 1000}}\nsam: {encoder: vit_b}\n"
    texts["huge-vocab"] = "model: ssp-sam\nclip: {text: {vocab_size: 100000000000, width: 64}}\nsam: {encoder: vit_b}\n"
    return [Case("config", n, v) for n, v in texts.items()]


# ---- refer pickles --------------------------------------------------------------------------------------


def refs_cases(marker: str) -> list[Case]:
    ok = [{"ref_id": 1, "ann_id": 1, "image_id": 1, "split": "val", "category_id": 1,
           "sentences": [{"sent": "the red circle", "raw": "the red circle", "tokens": ["the", "red", "circle"], "sent_id": 1}]}]
    evil_class = pickle.dumps(_Evil(marker))
    # protocol-0 hand-made pickle calling os.system via GLOBAL + REDUCE, as an attacker would write it
    evil_p0 = f"cos\nsystem\n(S'touch {marker}'\ntR.".encode()
    evil_builtins = f"cbuiltins\neval\n(S'__import__(\"os\").system(\"touch {marker}\")'\ntR.".encode()
    evil_nested = pickle.dumps([{"ref_id": 1, "sentences": _Evil(marker)}])
    return [Case("refs", n, v) for n, v in [
        ("valid", pickle.dumps(ok)), ("valid-py2", pickle.dumps(ok, protocol=2)), ("evil-reduce", evil_class),
        ("evil-protocol0", evil_p0), ("evil-builtins-eval", evil_builtins), ("evil-nested", evil_nested),
        ("evil-subprocess", f"csubprocess\ncall\n((S'touch'\nS'{marker}'\nltR.".encode()),
        ("not-a-list", pickle.dumps({"x": 1})), ("list-of-int", pickle.dumps([1, 2, 3])), ("empty", b""),
        ("truncated", pickle.dumps(ok)[:30]), ("garbage", b"\x80\x05garbage"), ("json-instead", json.dumps(ok).encode()),
        ("persistent-id", b"\x80\x02P1\n."), ("missing-keys", pickle.dumps([{"ref_id": 1}])),
    ]]


# ---- HTTP bodies -------------------------------------------------------------------------------------


def http_cases(valid_png: bytes, seed: int = 0) -> list[Case]:
    rng = random.Random(seed)
    b64 = base64.b64encode(valid_png).decode()
    J = "application/json"
    cases: list[Case] = []

    def js(name, obj):
        cases.append(Case("http", name, (J, json.dumps(obj).encode())))

    def raw(name, ctype, body):
        cases.append(Case("http", name, (ctype, body)))

    js("valid", {"image": b64, "phrases": ["the red circle"]})
    js("valid-single", {"image": b64, "phrase": "the red circle"})
    js("valid-data-url", {"image": "data:image/png;base64," + b64, "phrases": ["x"]})
    for name, value in _text_values(rng):
        if isinstance(value, (bytes, set, tuple)) or (isinstance(value, float) and value != value):
            continue  # not JSON-encodable as such
        js(f"phrases-{name}", {"image": b64, "phrases": value})
    js("phrase-and-phrases", {"image": b64, "phrase": 1, "phrases": None})
    js("overlay-str", {"image": b64, "phrases": ["x"], "overlay": "yes"})
    js("overlay-true", {"image": b64, "phrases": ["x"], "overlay": True})
    js("image-int", {"image": 5, "phrases": ["x"]})
    js("image-list", {"image": [b64], "phrases": ["x"]})
    js("image-path", {"image": "/etc/passwd", "phrases": ["x"]})
    js("image-path-file-url", {"image": "file:///etc/passwd", "phrases": ["x"]})
    js("image-bad-b64", {"image": "!!!notbase64!!!", "phrases": ["x"]})
    js("image-b64-text", {"image": base64.b64encode(b"hello").decode(), "phrases": ["x"]})
    js("image-b64-bomb", {"image": base64.b64encode(declared_png(20_000, 20_000)).decode(), "phrases": ["x"]})
    js("image-b64-over-server-cap", {"image": base64.b64encode(declared_png(6_000, 6_000)).decode(), "phrases": ["x"]})
    js("image-b64-corrupt-exif", {"image": base64.b64encode(corrupt_exif_jpeg(113)).decode(), "phrases": ["x"]})
    js("no-image", {"phrases": ["x"]})
    js("empty-object", {})
    for name, body in [("array", []), ("string", "x"), ("number", 5), ("null", None)]:
        js(f"body-{name}", body)
    raw("deep-array", J, b"[" * 100_000 + b"]" * 100_000)
    raw("deep-object", J, b'{"a":' * 50_000 + b"1" + b"}" * 50_000)
    raw("deep-phrases-40", J, ('{"image": "%s", "phrases": ' % b64 + "[" * 40 + '"x"' + "]" * 40 + "}").encode())
    raw("number-5000-digits", J, ('{"image": "%s", "phrases": ["x"], "overlay": %s}' % (b64, "9" * 5000)).encode())
    raw("number-in-phrases", J, ('{"image": "%s", "phrases": %s}' % (b64, "1" * 5000)).encode())
    raw("float-huge-exponent", J, ('{"image": "%s", "phrases": 1e999999}' % b64).encode())
    raw("nan-literal", J, ('{"image": "%s", "phrases": NaN}' % b64).encode())
    raw("infinity-literal", J, ('{"image": "%s", "phrases": [Infinity]}' % b64).encode())
    raw("invalid-json", J, b'{"image": ')
    raw("invalid-utf8", J, b'{"image": "\xff\xfe", "phrases": ["x"]}')
    raw("utf16-bom", J, '{"image": "x", "phrases": ["x"]}'.encode("utf-16"))
    raw("lone-surrogate-escape", J, ('{"image": "%s", "phrases": ["\\udc80"]}' % b64).encode())
    raw("nul-in-json", J, b'{"image": "\x00", "phrases": ["x"]}')
    raw("empty-body", J, b"")
    raw("duplicate-keys", J, ('{"image": "%s", "phrases": ["x"], "phrases": 5}' % b64).encode())
    raw("wrong-ctype-text", "text/plain", b"hello")
    raw("wrong-ctype-none", "", b"hello")
    raw("wrong-ctype-xml", "application/xml", b"<a/>")
    raw("multipart-no-boundary", "multipart/form-data", b"--x\r\n")
    raw("multipart-garbage", "multipart/form-data; boundary=zz", bytes(rng.randrange(256) for _ in range(500)))

    def multipart(name, fields: list[tuple[str, str | None, bytes]]):
        boundary = "fuzzboundary%d" % rng.randrange(10**6)
        parts = []
        for field, filename, content in fields:
            disp = f'form-data; name="{field}"' + (f'; filename="{filename}"' if filename is not None else "")
            parts.append(f"--{boundary}\r\nContent-Disposition: {disp}\r\n\r\n".encode() + content + b"\r\n")
        raw(name, f"multipart/form-data; boundary={boundary}", b"".join(parts) + f"--{boundary}--\r\n".encode())

    multipart("mp-valid", [("image", "a.png", valid_png), ("phrases", None, b"the red circle")])
    multipart("mp-image-as-text", [("image", None, b"not a file"), ("phrases", None, b"x")])
    multipart("mp-no-image", [("phrases", None, b"x")])
    multipart("mp-no-phrases", [("image", "a.png", valid_png)])
    multipart("mp-two-images", [("image", "a.png", valid_png), ("image", "b.png", valid_png), ("phrases", None, b"x")])
    multipart("mp-empty-phrase", [("image", "a.png", valid_png), ("phrases", None, b"")])
    multipart("mp-markup-filename", [("image", "[/red]../../etc/passwd", valid_png), ("phrases", None, b"x")])
    multipart("mp-1000-phrases", [("image", "a.png", valid_png)] + [("phrases", None, b"x%d" % i) for i in range(1000)])
    multipart("mp-bomb", [("image", "b.png", declared_png(20_000, 20_000)), ("phrases", None, b"x")])
    multipart("mp-truncated-image", [("image", "t.png", valid_png[: len(valid_png) // 2]), ("phrases", None, b"x")])
    multipart("mp-invalid-utf8-phrase", [("image", "a.png", valid_png), ("phrases", None, b"\xff\xfe\xfd")])
    return cases
