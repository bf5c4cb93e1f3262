"""Per-stage latency, PyTorch fp32 against ONNX Runtime, for the same model in the same process.

Examples::

    python benchmarks/onnx_latency.py                       # shapes-demo + ssp-sam-mobile (random weights, real size)
    python benchmarks/onnx_latency.py --models shapes-demo --repeats 20 --threads 2
    python benchmarks/onnx_latency.py --models ssp-sam-mobile --threads 2 --phrases 1   # issue 12 goal 2

Stages (one image of --size pixels, --phrases phrases):

* ``sam_image``   SAM image encoder (the ``sam_image_encoder.onnx`` graph)
* ``clip_image``  CLIP image tower (``clip_image_encoder.onnx``)
* ``decode``      CLIP text tower + SSP prompt encoder + SAM mask decoder (``text_prompt_decoder.onnx``)
* ``segment``     the whole ``segment(image, phrases)`` call, pre/post-processing included
* ``first_phrase`` / ``further_phrase``  ``segment`` with one phrase on a new image / on the image
  already encoded (issue 12's goal 2: ≤ 1.5 s / ≤ 0.15 s for ``ssp-sam-mobile`` on 2 cores)

The two runtimes alternate repeat by repeat (torch, ORT, torch, ORT, …), so both see the same
load on a shared machine; read the ratios, which hold better than the absolute figures there.
Each model is exported to a temporary folder first (not timed). Also printed: the max abs diff
of the mask logits and the share of equal mask pixels (ORT against torch) on the timed input.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

try:
    import sspsam  # noqa: F401
except ImportError:  # running from a checkout without an install
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PHRASES = ["the man on the left", "red car behind the tree", "small dog next to the bench",
           "woman holding an umbrella", "the second bottle from the right"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["shapes-demo", "ssp-sam-mobile"],
                   help="bundled model or config name (configs get random weights)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per runtime and stage")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--phrases", type=int, default=3)
    p.add_argument("--size", type=int, default=480, help="square test image side (pixels)")
    p.add_argument("--threads", type=int, default=1, help="torch threads = onnxruntime intra-op threads")
    return p.parse_args(argv)


def _load(name: str):
    from sspsam.models.build import build_model
    from sspsam.config import list_configs
    from sspsam.predict.segmenter import Segmenter

    if name in list_configs():
        torch.manual_seed(0)
        return Segmenter(build_model(name).eval(), device="cpu", name=name)
    return Segmenter.from_pretrained(name, device="cpu")


def _interleaved(fns: dict, repeats: int, warmup: int) -> dict[str, float]:
    """Median ms of each function, calls alternating between them."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def bench(name: str, args) -> list[tuple]:

    from sspsam.predict.onnx import OnnxSegmenter, default_session_options, export_onnx
    from sspsam.io.transforms import model_input

    seg = _load(name)
    m = seg.model
    folder = Path(tempfile.mkdtemp(prefix="sspsam-onnx-bench-"))
    t0 = time.perf_counter()
    export_onnx(m, folder / "export", name=name)
    export_s = time.perf_counter() - t0
    opts = default_session_options()  # what sspsam runs with: threads = torch's (--threads), no spinning
    onnx_seg = OnnxSegmenter.from_dir(folder / "export", providers=["CPUExecutionProvider"], session_options=opts)
    g = onnx_seg.graphs
    rng = np.random.default_rng(0)
    rgb = (rng.random((args.size, args.size, 3)) * 255).astype(np.uint8)
    phrases = (PHRASES * 10)[: args.phrases]
    x, valid, _ = model_input(rgb, m.image_size)
    clip_x = m.clip_input([rgb]) if m.clip_geometry == "centered" else x
    normalized = m.clip_geometry == "centered"
    tokens = m.tokenize(phrases)
    with torch.inference_mode():
        feats = m.encode_image(x, valid, clip_images=clip_x if normalized else None)
        index = torch.zeros(len(phrases), dtype=torch.long)
        ref = m.decode(feats, m.encode_text(tokens), index)["mask_logits"]
        got = g.decode(feats, tokens)["mask_logits"]
        diff = float((ref - got).abs().max())
        agree = float(((ref > 0) == (got > 0)).float().mean())
        a, b = seg.segment(rgb, phrases), onnx_seg.segment(rgb, phrases)
        mask_agree = float((a.masks == b.masks).mean())
        stages = {
            "sam_image": (lambda: m.sam.encode_image(x, valid), lambda: g._run("sam_image", images=x, valid_hw=valid)),
            "clip_image": (lambda: m.encode_clip(clip_x, normalized), lambda: g._run("clip_image", clip_images=clip_x)),
            "decode": (lambda: m.decode(feats, m.encode_text(tokens), index), lambda: g.decode(feats, tokens)),
        }

        def fresh(s):  # a new image every call, so set_image's cache never answers
            def run():
                s._cache = None
                s.segment(rgb, phrases)
            return run

        stages["segment"] = (fresh(seg), fresh(onnx_seg.segmenter))

        def first(s):  # issue 12's goal 2: one phrase on an image the predictor has not seen
            def run():
                s._cache = None
                s.segment(rgb, PHRASES[0])
            return run

        def further(s):  # … and each further phrase on the same image (features cached)
            s.segment(rgb, PHRASES[0])
            turn = itertools.count()

            def run():
                s.segment(rgb, PHRASES[1 + next(turn) % (len(PHRASES) - 1)])
            return run

        stages["first_phrase"] = (first(seg), first(onnx_seg.segmenter))
        stages["further_phrase"] = (further(seg), further(onnx_seg.segmenter))
        rows = []
        for stage, (pt, ox) in stages.items():
            med = _interleaved({"torch": pt, "ort": ox}, args.repeats, args.warmup)
            rows.append((name, stage, med["torch"], med["ort"], med["torch"] / med["ort"]))
    print(f"{name}: exported in {export_s:.1f} s; mask logits max abs diff {diff:.2e}, low-res binary agreement "
          f"{100 * agree:.4f} %, segment() mask pixels equal {100 * mask_agree:.4f} %", flush=True)
    import shutil

    shutil.rmtree(folder, ignore_errors=True)
    return rows


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    print(f"uptime: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    print(f"torch {torch.__version__}, threads {args.threads}, repeats {args.repeats} (interleaved), "
          f"{args.phrases} phrases, {args.size}x{args.size} image, CPU")
    rows = []
    for name in args.models:
        rows += bench(name, args)
    print("\n| model | stage | PyTorch fp32 ms | ONNX Runtime ms | torch / ORT |")
    print("|---|---|---:|---:|---:|")
    for name, stage, pt, ox, ratio in rows:
        print(f"| {name} | {stage} | {pt:.1f} | {ox:.1f} | {ratio:.2f}x |")
    goal = {r[1]: r for r in rows if r[0] == "ssp-sam-mobile"}
    if "first_phrase" in goal:
        f, n = goal["first_phrase"], goal["further_phrase"]
        print(f"\nGoal 2 (ssp-sam-mobile, {args.threads} threads; first phrase <= 1500 ms, each further <= 150 ms): "
              f"PyTorch {f[2]:.0f} / {n[2]:.0f} ms, ONNX Runtime {f[3]:.0f} / {n[3]:.0f} ms "
              "(the FLOP floor of a further phrase: benchmarks/latency.py)")
    print(f"uptime: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")


if __name__ == "__main__":
    main()
