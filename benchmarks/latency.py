"""Per-stage latency and peak memory of SSP-SAM variants (random weights; fine for timing).

Examples::

    python benchmarks/latency.py                              # CPU, fp32, vitb + mobile
    python benchmarks/latency.py --device cuda --dtype bf16 --repeats 20 --warmup 3
    python benchmarks/latency.py --variants ssp-sam-tiny --phrases 4 --threads 2

Stages (one image, ``--phrases`` phrases referring to it):

* ``sam_encoder``     SAM image encoder on [1,3,S,S]
* ``clip_image``      CLIP image tower (dense patches + global embedding)
* ``clip_text``       CLIP text tower on T phrases (tokenisation excluded)
* ``ssp_encoder``     semantic-spatial prompt encoder (cached CLIP patches + text features)
* ``sam_decoder``     SAM mask decoder on the 128 generated prompts
* ``decode_cached``   ``m.decode(feats, text_feats)``: SSP encoder + SAM decoder, all features cached
* ``e2e_no_sam_enc``  CLIP image + CLIP text + decode, SAM embedding cached
                      (the paper's ~26 ms figure excludes SAM's image encoder)
* ``e2e_full``        ``m.decode(m.encode_image(images), m.encode_text(tokens))``

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` after resetting the peak before each
stage (tensors only, not the caching allocator's reserve). On CPU it is the *process* peak
RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss``), which only ever grows: the value for a
stage is the highest RSS the process has reached so far, including earlier stages and
variants. Run one variant per process for a clean CPU figure.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

try:
    from sspsam.config import build_model, list_configs
except ImportError:  # running from a checkout without an install
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from sspsam.config import build_model, list_configs

PHRASES = [
    "the man on the left",
    "red car behind the tree",
    "small dog next to the bench",
    "woman holding an umbrella",
    "the second bottle from the right",
]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", nargs="+", default=["ssp-sam-vitb", "ssp-sam-mobile"],
                   help=f"model configs to time (bundled: {', '.join(list_configs())})")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                   help="bf16 runs the fp32 weights under torch.autocast")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per stage (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per stage first")
    p.add_argument("--phrases", type=int, default=1, help="phrases decoded against the one image")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU intra-op threads)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or args.phrases < 1:
        p.error("--repeats and --phrases must be >= 1, --warmup >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda requested but CUDA is not available")
    unknown = [v for v in args.variants if v not in list_configs() and not Path(v).suffix]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; bundled: {', '.join(list_configs())}")
    return args


def cpu_peak_rss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux


class Timer:
    def __init__(self, device: torch.device, dtype: str, warmup: int, repeats: int):
        self.device, self.warmup, self.repeats = device, warmup, repeats
        self.cuda = device.type == "cuda"
        self.autocast = (torch.autocast(device_type=device.type, dtype=torch.bfloat16)
                         if dtype == "bf16" else contextlib.nullcontext())

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def __call__(self, fn) -> tuple[float, float, object]:
        """Median ms over ``repeats`` runs of ``fn`` and peak memory (MB); returns fn's last output."""
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        out = None
        times = []
        with torch.inference_mode(), self.autocast:
            for i in range(self.warmup + self.repeats):
                out = None  # free the previous output before running again
                self.sync()
                t0 = time.perf_counter()
                out = fn()
                self.sync()
                if i >= self.warmup:
                    times.append((time.perf_counter() - t0) * 1e3)
        peak = torch.cuda.max_memory_allocated(self.device) / 2**20 if self.cuda else cpu_peak_rss_mb()
        return statistics.median(times), peak, out


def bench_variant(name: str, args, device: torch.device) -> tuple[list[tuple[str, float, float]], dict]:
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    m = build_model(name).eval().to(device)
    build_s = time.perf_counter() - t0
    info = {
        "params_total": sum(p.numel() for p in m.parameters()) / 1e6,
        "params_sam_enc": sum(p.numel() for p in m.sam.image_encoder.parameters()) / 1e6,
        "params_clip": sum(p.numel() for p in m.clip.parameters()) / 1e6,
        "params_ssp": sum(p.numel() for p in m.ssp_encoder.parameters()) / 1e6,
        "image_size": m.image_size,
        "build_s": build_s,
    }
    s = m.image_size
    g = torch.Generator().manual_seed(args.seed)
    images = (torch.rand(1, 3, s, s, generator=g) * 255).to(device)
    texts = [PHRASES[i % len(PHRASES)] for i in range(args.phrases)]
    tokens = m.clip.tokenize(texts).to(device)
    idx = torch.zeros(args.phrases, dtype=torch.long, device=device)  # every phrase refers to image 0

    timer = Timer(device, args.dtype, args.warmup, args.repeats)
    rows = []

    def run(stage: str, fn):
        ms, peak, out = timer(fn)
        rows.append((stage, ms, peak))
        print(f"  {name:<22} {stage:<16} {ms:10.2f} ms  peak {peak:9.1f} MB", file=sys.stderr, flush=True)
        return out

    sam_emb = run("sam_encoder", lambda: m.sam.encode_image(images))
    patches, _ = run("clip_image", lambda: m.clip.encode_image(images))
    text_feats = run("clip_text", lambda: m.clip.encode_text(tokens))

    # Cached features for the downstream stages, computed once under the same precision settings.
    with torch.inference_mode(), timer.autocast:
        feats = m.encode_image(images)
        ssp_out = m.ssp_encoder(feats.clip_patches[idx], text_feats)
    del sam_emb, patches

    run("ssp_encoder", lambda: m.ssp_encoder(feats.clip_patches[idx], text_feats))
    run("sam_decoder", lambda: m.sam.decode(feats.sam[0:1], ssp_out["prompts"]))
    run("decode_cached", lambda: m.decode(feats, text_feats, idx))

    def e2e_no_sam_enc():
        patches, _ = m.clip.encode_image(images)
        f = type(feats)(sam=feats.sam, clip_patches=patches)
        return m.decode(f, m.encode_text(tokens), idx)

    run("e2e_no_sam_enc", e2e_no_sam_enc)
    run("e2e_full", lambda: m.decode(m.encode_image(images), m.encode_text(tokens), idx))

    del m, feats, ssp_out, text_feats
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    info["rss_after_mb"] = cpu_peak_rss_mb()
    return rows, info


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"# torch {torch.__version__} | device {dev_name} | dtype {args.dtype} | "
          f"threads {torch.get_num_threads()} | repeats {args.repeats} | warmup {args.warmup} | "
          f"phrases {args.phrases}", file=sys.stderr, flush=True)

    results = []
    for name in args.variants:
        rows, info = bench_variant(name, args, device)
        results.append((name, rows, info))

    mem_note = ("peak torch.cuda.max_memory_allocated per stage" if device.type == "cuda"
                else "process peak RSS (ru_maxrss) so far, cumulative across stages and variants")
    print()
    print(f"torch {torch.__version__}, device {dev_name}, {args.dtype}, {torch.get_num_threads()} threads, "
          f"1 image, {args.phrases} phrase(s), median of {args.repeats} (warmup {args.warmup})")
    print()
    print("| variant | stage | median ms | peak mem MB |")
    print("|---|---|---:|---:|")
    for name, rows, _ in results:
        for stage, ms, peak in rows:
            print(f"| {name} | {stage} | {ms:.2f} | {peak:.1f} |")
    print()
    print(f"peak mem: {mem_note}")
    print()
    print("| variant | image size | params total (M) | SAM enc (M) | CLIP (M) | SSP enc (M) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, _, info in results:
        print(f"| {name} | {info['image_size']} | {info['params_total']:.1f} | {info['params_sam_enc']:.1f} | "
              f"{info['params_clip']:.1f} | {info['params_ssp']:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
