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
* ``dataset``    damaged refer-layout files, for the readers, ``sspsam evaluate`` and ``sspsam train``
* ``train``      ``sspsam train`` options and run-folder states that must be refused
* ``evaluate``   ``sspsam evaluate`` options that must be refused
* ``manifest``   manifest and phrases files for ``sspsam batch``
* ``serve-start`` ``sspsam serve`` arguments that must be refused before it listens
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


# ---- dataset files, training and evaluation options, batch manifests, server start-up -------------------


def _rand_bytes(rng: random.Random, n: int) -> bytes:
    return bytes(rng.randrange(256) for _ in range(n))


def dataset_cases(instances: dict, refs: list, seed: int = 0) -> list[Case]:
    """Damaged copies of a valid refer-layout data set. The value is ``{"instances": bytes or None,
    "refs": bytes or None}``: the file to put in place of the valid one (None keeps the valid one).
    Every image, annotation and ref is damaged alike, so whichever split is read meets the damage."""
    rng = random.Random(seed)
    text = json.dumps(instances)
    cases: list[Case] = []

    def inst(name, data: bytes):
        cases.append(Case("dataset", name, {"instances": data, "refs": None}))

    def inst_edit(name, edit):
        d = copy.deepcopy(instances)
        edit(d)
        inst(name, json.dumps(d).encode())

    def each(key, fn):
        return lambda d: [fn(x) for x in d[key]]

    def ref_edit(name, edit):
        r = copy.deepcopy(refs)
        edit(r)
        cases.append(Case("dataset", name, {"instances": None, "refs": pickle.dumps(r, protocol=2)}))

    cases.append(Case("dataset", "valid", {"instances": None, "refs": None}))
    inst_edit("valid-short-polygon-beside", each("annotations", lambda a: a["segmentation"].append([1, 1, 2, 2])))
    inst("instances-binary", b"\x00\x01PK" + _rand_bytes(rng, 300))
    inst("instances-random-high-bytes", bytes(rng.randrange(128, 256) for _ in range(200)))
    inst("instances-latin1", text.replace('"categories"', '"note": "caf\u00e9 na\u00efve", "categories"', 1).encode("latin-1"))
    inst("instances-utf16", text.encode("utf-16"))
    inst("instances-empty", b"")
    inst("instances-truncated", text.encode()[: len(text) // 2])
    inst("instances-deep", b"[" * 100_000)
    inst("instances-top-level-list", b"[]")
    inst("instances-top-level-null", b"null")
    for key in ("images", "annotations", "categories"):
        inst_edit(f"{key}-null", lambda d, k=key: d.__setitem__(k, None))
        inst_edit(f"{key}-missing", lambda d, k=key: d.pop(k))
        inst_edit(f"{key}-dict", lambda d, k=key: d.__setitem__(k, {"1": d[k][0]}))
        inst_edit(f"{key}-of-ints", lambda d, k=key: d.__setitem__(k, list(range(len(d[k])))))
    inst_edit("image-no-id", each("images", lambda i: i.pop("id")))
    inst_edit("image-no-file-name", each("images", lambda i: i.pop("file_name")))
    inst_edit("image-file-name-null", each("images", lambda i: i.__setitem__("file_name", None)))
    inst_edit("image-height-str", each("images", lambda i: i.__setitem__("height", "tall")))
    inst_edit("image-width-negative", each("images", lambda i: i.__setitem__("width", -5)))
    inst_edit("image-height-zero", each("images", lambda i: i.__setitem__("height", 0)))
    inst_edit("image-height-nan", each("images", lambda i: i.__setitem__("height", float("nan"))))
    inst_edit("image-width-fraction", each("images", lambda i: i.__setitem__("width", 10.5)))
    inst_edit("ann-no-segmentation", each("annotations", lambda a: a.pop("segmentation")))
    inst_edit("ann-segmentation-null", each("annotations", lambda a: a.__setitem__("segmentation", None)))
    inst_edit("ann-segmentation-empty", each("annotations", lambda a: a.__setitem__("segmentation", [])))
    inst_edit("ann-segmentation-str", each("annotations", lambda a: a.__setitem__("segmentation", "polygon")))
    inst_edit("ann-polygon-4-coords", each("annotations", lambda a: a.__setitem__("segmentation", [[1, 1, 5, 5]])))
    inst_edit("ann-polygon-2-coords", each("annotations", lambda a: a.__setitem__("segmentation", [[1, 1]])))
    inst_edit("ann-polygon-odd", each("annotations", lambda a: a.__setitem__("segmentation", [[1, 1, 5, 5, 9, 1, 3]])))
    inst_edit("ann-polygon-strings", each("annotations", lambda a: a.__setitem__("segmentation", [["1", "1", "5", "5", "9", "1"]])))
    inst_edit("ann-polygon-nan", each("annotations", lambda a: a.__setitem__("segmentation", [[1, float("nan"), 5, 5, 9, 1]])))
    inst_edit("ann-polygon-bools", each("annotations", lambda a: a.__setitem__("segmentation", [[True] * 6])))
    inst_edit("ann-polygon-nested", each("annotations", lambda a: a.__setitem__("segmentation", [[[1, 1], [5, 5], [9, 1]]])))
    inst_edit("ann-rle-no-size", each("annotations", lambda a: a.__setitem__("segmentation", {"counts": "abc"})))
    inst_edit("ann-rle-size-str", each("annotations", lambda a: a.__setitem__("segmentation", {"size": "64x64", "counts": "abc"})))
    inst_edit("ann-rle-counts-int", each("annotations", lambda a: a.__setitem__("segmentation", {"size": [64, 64], "counts": 5})))
    inst_edit("ann-rle-counts-negative", each("annotations", lambda a: a.__setitem__("segmentation", {"size": [64, 64], "counts": [-1, 5]})))

    def sents(fn):
        return lambda r: [fn(s) for ref in r for s in ref["sentences"]]

    ref_edit("sentence-no-text", sents(lambda s: [s.pop(k, None) for k in ("sent", "raw")]))
    ref_edit("sentence-text-int", sents(lambda s: (s.__setitem__("sent", 5), s.__setitem__("raw", 5))))
    ref_edit("sentence-text-null", sents(lambda s: (s.__setitem__("sent", None), s.__setitem__("raw", None))))
    ref_edit("sentences-null", lambda r: [ref.__setitem__("sentences", None) for ref in r])
    ref_edit("sentences-str", lambda r: [ref.__setitem__("sentences", "the red one") for ref in r])
    ref_edit("sentence-is-str", lambda r: [ref.__setitem__("sentences", ["the red one"]) for ref in r])
    ref_edit("ref-no-split", lambda r: [ref.pop("split") for ref in r])
    ref_edit("ref-split-int", lambda r: [ref.__setitem__("split", 3) for ref in r])
    ref_edit("ref-unknown-image", lambda r: [ref.__setitem__("image_id", -7) for ref in r])
    ref_edit("ref-unknown-annotation", lambda r: [ref.__setitem__("ann_id", -7) for ref in r])
    ref_edit("refs-all-other-split", lambda r: [ref.__setitem__("split", "holdout") for ref in r])
    cases.append(Case("dataset", "refs-binary", {"instances": None, "refs": _rand_bytes(rng, 200)}))
    return cases


def train_option_cases() -> list[Case]:
    """``sspsam train`` command lines that must be refused before a model loads. The value is
    ``(extra args, what to put in the run folder first)``: ``None``, ``"run"`` (an earlier run's
    files) or ``"file"`` (a file where the run folder goes)."""
    rows = [
        ("lr-nan", ["--lr", "nan"], None), ("lr-negative", ["--lr", "-1"], None), ("lr-zero", ["--lr", "0"], None),
        ("lr-inf", ["--lr", "inf"], None), ("decoder-lr-nan", ["--decoder-lr", "nan"], None),
        ("precision-fp16", ["--precision", "fp16"], None), ("precision-empty", ["--precision", ""], None),
        ("precision-fp64", ["--precision", "fp64"], None), ("steps-0", ["--steps", "0"], None),
        ("steps-negative", ["--steps", "-3"], None), ("batch-size-0", ["--batch-size", "0"], None),
        ("batch-size-over-split", ["--batch-size", "100000"], None), ("grad-accum-0", ["--grad-accum", "0"], None),
        ("total-steps-0", ["--total-steps", "0"], None), ("ckpt-every-0", ["--ckpt-every", "0"], None),
        ("epochs-0", ["--epochs", "0"], None), ("stage-3", ["--stage", "3"], None),
        ("existing-run", [], "run"), ("resume-without-run", ["--resume"], None),
        ("resume-and-overwrite", ["--resume", "--overwrite"], "run"), ("out-is-a-file", [], "file"),
        ("dataset-unknown", ["--dataset", "refcocoo"], None),
    ]
    return [Case("train", n, (args, prep)) for n, args, prep in rows]


def evaluate_option_cases() -> list[Case]:
    """``sspsam evaluate`` argument lists (after MODEL) that must end in one error line."""
    rows = [
        ("split-nope", ["--split", "nope"]), ("split-typo-tset", ["--split", "tset"]), ("split-empty", ["--split", ""]),
        ("split-typo-testa", ["--split", "testa"]), ("dataset-unknown", ["--dataset", "refcocoo"]),
        ("dataset-grefcoco-absent", ["--dataset", "grefcoco"]), ("split-by-unknown", ["--split-by", "nope"]),
        ("semseg-absent", ["--dataset", "semseg"]), ("semseg-protocol-unknown", ["--dataset", "semseg", "--protocol", "x"]),
        ("data-missing", ["--data", "/nonexistent/sspsam-data"]), ("max-samples-text", ["--max-samples", "many"]),
    ]
    return [Case("evaluate", n, args) for n, args in rows]


def manifest_cases(valid_image: str, seed: int = 0) -> list[Case]:
    """``sspsam batch`` inputs: ``(manifest bytes or None (a folder of images instead), phrases file
    bytes or None)``. Files in another encoding, binary files and empty ones."""
    rng = random.Random(seed)
    line = json.dumps({"image": valid_image, "phrase": "the red circle"})
    rows = [
        ("valid-manifest", (line + "\n").encode(), None),
        ("valid-folder", None, b"the red circle\n"),
        ("manifest-binary", b"\x00\x01\x02" + _rand_bytes(rng, 200), None),
        ("manifest-utf16", (line + "\n").encode("utf-16"), None),
        ("manifest-latin1", json.dumps({"image": valid_image, "phrase": "caf\u00e9"}, ensure_ascii=False).encode("latin-1"), None),
        ("manifest-high-bytes", bytes(rng.randrange(128, 256) for _ in range(100)), None),
        ("manifest-nul-in-line", line.replace("red", "r\x00ed").encode(), None),
        ("manifest-empty", b"", None),
        ("manifest-blank-lines", b"\n\n  \n", None),
        ("manifest-array", b"[1, 2]\n", None),
        ("manifest-image-null", b'{"image": null, "phrase": "x"}\n', None),
        ("manifest-phrases-int", json.dumps({"image": valid_image, "phrases": 5}).encode(), None),
        ("manifest-deep", b"[" * 100_000 + b"\n", None),
        ("phrases-binary", None, b"\x00\x01" + _rand_bytes(rng, 100)),
        ("phrases-utf16", None, "the red circle\n".encode("utf-16")),
        ("phrases-latin1", None, "caf\u00e9\n".encode("latin-1")),
        ("phrases-empty", None, b""),
        ("phrases-blank", None, b"\n \n\t\n"),
        ("manifest-and-binary-phrases", b'{"image": "%s"}\n' % valid_image.encode(), b"\xff\xfe\x00\x00"),
    ]
    return [Case("manifest", n, (m, p)) for n, m, p in rows]


def serve_start_cases(corrupt_model: str, truncated_model: str) -> list[Case]:
    """``sspsam serve`` argument lists that must end in one error line before the server listens;
    ``{busy}`` stands for a port the test holds."""
    rows = [
        ("model-empty", ["--model", ""]), ("model-blank", ["--model", "  "]), ("ovss-model-empty", ["--ovss-model", ""]),
        ("model-unknown", ["--model", "no-such-model"]), ("model-corrupt", ["--model", corrupt_model]),
        ("model-truncated", ["--model", truncated_model]), ("ovss-model-corrupt", ["--ovss-model", corrupt_model]),
        ("model-a-folder", ["--model", "/"]), ("port-busy", ["--port", "{busy}"]), ("port-70000", ["--port", "70000"]),
        ("port-negative", ["--port", "-1"]), ("host-unknown", ["--host", "no-such-host.invalid"]),
        ("host-not-here", ["--host", "192.0.2.1"]), ("device-unknown", ["--device", "tpu"]),
    ]
    return [Case("serve-start", n, args) for n, args in rows]
