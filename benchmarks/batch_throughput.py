"""Images per second through ``Segmenter.segment(images, phrases)`` at several batch sizes, for
fp32, bf16, ``compile=True`` and ONNX Runtime (the model exported, then loaded as an export
folder; not timed) in the same run (the modes are interleaved per repeat, so a
machine whose load changes hurts them alike: compare the columns, not runs).

Examples::

    python benchmarks/batch_throughput.py                          # shapes-demo, batches 1/4/16
    python benchmarks/batch_throughput.py --models shapes-demo ssp-sam-mobile --mobile-batches 1 4 16
    python benchmarks/batch_throughput.py --device cuda --repeats 5

``ssp-sam-mobile`` is built at its real size with random weights (timing only). On a CPU it is
slow (tens of seconds per image), so by default it runs batch 1 only (``--mobile-batches``).
bf16 on a CPU without native bf16 matmuls (no AMX/AVX512-BF16) is slower than fp32: it is
there for GPUs.
"""

from __future__ import annotations

import argparse
import atexit
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sspsam.models.build import build_model  # noqa: E402
from sspsam.predict.segmenter import Segmenter  # noqa: E402

PHRASES = ["the red circle", "the blue square on the left"]
MODES = {"fp32": {}, "bf16": {"dtype": torch.bfloat16}, "compile": {"compile": True}, "onnx": {"onnx": True}}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["shapes-demo", "ssp-sam-mobile"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 4, 16])
    p.add_argument("--mobile-batches", nargs="+", type=int, default=[1], help="batch sizes for non-demo (real-size) models")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--repeats", type=int, default=2, help="timed repeats per cell (the median is shown)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--size", type=int, nargs=2, default=[240, 320], metavar=("H", "W"))
    return p.parse_args(argv)


def make_segmenter(name: str, device: str, opts: dict) -> Segmenter:
    if opts.get("onnx"):  # the same weights exported, run as an export folder (ONNX Runtime)
        from sspsam.predict.onnx import export_onnx

        tmp = tempfile.mkdtemp(prefix="sspsam-bench-onnx-")
        atexit.register(shutil.rmtree, tmp, ignore_errors=True)  # graphs of a real-size model are ~100 MB
        folder = Path(tmp) / name
        export_onnx(make_segmenter(name, "cpu", {}).model, folder, name=name)
        return Segmenter.from_pretrained(folder, device=device)
    if name == "shapes-demo":
        return Segmenter.from_pretrained(name, device=device, **opts)
    torch.manual_seed(0)
    return Segmenter(build_model(name), device, name, **opts)


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (*a.size, 3), dtype=np.uint8) for _ in range(max(a.batches + a.mobile_batches))]
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, image {a.size[0]}x{a.size[1]}, "
          f"{len(PHRASES)} phrases/image", flush=True)
    for name in a.models:
        batches = a.batches if name == "shapes-demo" else a.mobile_batches
        segs = {}
        for mode in a.modes:
            t0 = time.perf_counter()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                segs[mode] = make_segmenter(name, a.device, MODES[mode])
            took = time.perf_counter() - t0
            if mode == "compile":
                state = "compiled " + ", ".join(segs[mode].compiled) if segs[mode].compiled else \
                    "fell back to eager: " + "; ".join(str(w.message)[:120] for w in caught)
                print(f"  {name}: load + compile warm-up {took:.0f} s ({state})", flush=True)
        dev = next(iter(segs.values())).device
        print(f"\n{name} on {dev}: images/s (median of {a.repeats})")
        print("| batch | " + " | ".join(a.modes) + " |")
        print("|---:|" + "---:|" * len(a.modes), flush=True)
        for b in batches:
            times: dict[str, list[float]] = {m: [] for m in segs}
            for seg in segs.values():  # warm-up (compile traces a new batch size here)
                seg.segment(images[:b], PHRASES, image_batch_size=b)
            for _ in range(a.repeats):
                for mode, seg in segs.items():
                    if dev.type == "cuda":
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    seg.segment(images[:b], PHRASES, image_batch_size=b)
                    if dev.type == "cuda":
                        torch.cuda.synchronize()
                    times[mode].append(time.perf_counter() - t0)
            print(f"| {b} | " + " | ".join(f"{b / statistics.median(times[m]):.2f}" for m in a.modes) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
