"""Regenerate the random weights and inputs of a golden fixture from its ``manifest.json``.

The golden fixtures (``tests/golden/``, provenance in its README) hold outputs of the official
reference code run on random weights. The weights themselves are not stored: each manifest entry
names a key, shape, dtype and a rule, and the values follow from numpy's legacy ``RandomState``
stream, which numpy's compatibility policy freezes — so they are bit-identical on any machine.
Every entry carries the SHA-256 of its bytes, and :func:`verify` checks a regeneration bitwise.

Rules (as the fixtures' README documents them)::

    n = RandomState(seed).standard_normal(shape)          # float64
    normal:      offset + scale * n
    abs_normal:  offset + scale * |n|
    const:       value everywhere
    stored:      buffers.npz[name], verbatim
    float entries -> float32; round == "float16" -> through float16 and back
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from pathlib import Path

import numpy as np

GOLDEN_DIR = Path(__file__).resolve().parents[2] / "tests" / "golden"

_DTYPES = {
    "float32": np.float32, "float64": np.float64, "float16": np.float16,
    "int64": np.int64, "int32": np.int32, "uint8": np.uint8, "bool": np.bool_,
}


def fixture_dir(name: str) -> Path:
    """``tests/golden/<name>`` of this checkout (the fixtures travel with the repository)."""
    d = GOLDEN_DIR / name
    if not (d / "outputs.npz").exists():
        raise FileNotFoundError(f"golden fixture {name!r} not found under {GOLDEN_DIR}")
    return d


def load_manifest(d: Path) -> dict:
    d = Path(d)
    # sclip and clip_surgery share one weight manifest; only sclip/ keeps the file
    path = d / "manifest.json" if (d / "manifest.json").exists() else d.parent / "sclip" / "manifest.json"
    return json.loads(path.read_text(encoding="utf-8"))


def _sha256(a: np.ndarray) -> str:
    a = np.array(a, order="C", copy=True)  # (ascontiguousarray would make 0-d arrays 1-d)
    if a.dtype.byteorder == ">":
        a = a.byteswap().view(a.dtype.newbyteorder("<"))
    return hashlib.sha256(a.tobytes()).hexdigest()


def make_array(entry: dict, d: Path, cache: dict) -> np.ndarray:
    shape = tuple(int(s) for s in entry["shape"])
    dtype = _DTYPES[entry["dtype"]]
    rule = entry["rule"]
    if rule == "stored":
        f = Path(d) / entry["file"]
        if f not in cache:
            cache[f] = np.load(f)
        v = np.asarray(cache[f][entry.get("name", entry["key"])]).copy()
        if v.shape != shape or v.dtype != dtype:
            raise ValueError(f"stored entry {entry['key']!r}: {v.shape} {v.dtype}, manifest says {shape} {dtype}")
        return v
    if rule == "const":
        v = np.full(shape, float(entry["value"]), dtype=np.float64)
    elif rule in ("normal", "abs_normal"):
        n = np.random.RandomState(int(entry["seed"])).standard_normal(shape)
        v = np.float64(entry.get("offset", 0.0)) + np.float64(entry["scale"]) * (np.abs(n) if rule == "abs_normal" else n)
    else:
        raise ValueError(f"unknown rule {rule!r} for {entry['key']!r}")
    v = np.asarray(v, dtype=np.float64).reshape(shape).astype(np.float32)
    if entry.get("round") == "float16":
        v = v.astype(np.float16).astype(np.float32)
    return v.astype(dtype) if dtype != np.float32 else v


def generate(d: Path | str, section: str = "entries", as_torch: bool = True) -> "OrderedDict[str, object]":
    """Official key → tensor (torch unless ``as_torch=False``), in the reference state-dict order."""
    d = fixture_dir(d) if isinstance(d, str) else Path(d)
    man = load_manifest(d)
    cache: dict = {}
    out: OrderedDict = OrderedDict()
    for e in man.get(section, []):
        a = make_array(e, d, cache)
        if as_torch:
            import torch

            out[e["key"]] = torch.from_numpy(np.array(a, order="C", copy=True))
        else:
            out[e["key"]] = a
    return out


def verify(d: Path | str, tensors: dict, section: str = "entries") -> list[tuple[str, str]]:
    """Keys whose tensor is missing, shaped differently or not bitwise the recipe (``[]`` = all good)."""
    d = fixture_dir(d) if isinstance(d, str) else Path(d)
    bad = []
    for e in load_manifest(d).get(section, []):
        t = tensors.get(e["key"])
        if t is None:
            bad.append((e["key"], "missing"))
            continue
        a = t.detach().cpu().numpy() if hasattr(t, "detach") else np.asarray(t)
        if list(a.shape) != list(e["shape"]) or a.dtype != _DTYPES[e["dtype"]]:
            bad.append((e["key"], f"shape/dtype {a.shape} {a.dtype}"))
        elif _sha256(a) != e["sha256"]:
            bad.append((e["key"], "values differ"))
    return bad


#: CLIP-Surgery rebuilds the attention of this many last visual blocks on the model's first forward
SURGERY_BLOCKS = 6


def trained_layout(state_dict: dict) -> dict:
    """A fixture's official state dict (the layout before any forward) as official training writes it
    (``official_trained_layout/``): the rebuilt blocks' ``attn.in_proj_*`` / ``attn.out_proj.*`` named
    ``attn.qkv.*`` / ``attn.proj.*`` (the same tensors), plus ``encoder.visual.attn.*``, the first
    rebuilt block's attention registered once more."""
    import re

    blocks = {int(m.group(1)) for k in state_dict if (m := re.match(r"^encoder\.visual\.transformer\.resblocks\.(\d+)\.", k))}
    first = max(blocks) + 1 - SURGERY_BLOCKS
    names = {"in_proj_weight": "qkv.weight", "in_proj_bias": "qkv.bias", "out_proj.weight": "proj.weight", "out_proj.bias": "proj.bias"}
    out = {}
    for key, value in state_dict.items():
        m = re.match(r"^(encoder\.visual\.transformer\.resblocks\.(\d+)\.attn)\.(.+)$", key)
        if m and int(m.group(2)) >= first and m.group(3) in names:
            out[f"{m.group(1)}.{names[m.group(3)]}"] = value
        else:
            out[key] = value
    prefix = f"encoder.visual.transformer.resblocks.{first}.attn."
    for name in names.values():
        out["encoder.visual.attn." + name] = out[prefix + name]
    return out


def trained_layout_keys(size: str) -> dict:
    """``official_trained_layout/keys.json`` for ``size`` '224' or '336'."""
    return json.loads((GOLDEN_DIR / "official_trained_layout" / "keys.json").read_text(encoding="utf-8"))[size]


def arrays(name: str, which: str) -> dict[str, np.ndarray]:
    """``inputs.npz`` / ``outputs.npz`` of a fixture as a plain dict."""
    with np.load(fixture_dir(name) / f"{which}.npz") as z:
        return {k: z[k] for k in z.files}


def run_meta(name: str) -> dict:
    return json.loads((fixture_dir(name) / "run_meta.json").read_text(encoding="utf-8"))
