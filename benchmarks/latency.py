"""Per-stage latency, FLOPs and hardware utilisation of SSP-SAM and the training-free path, with
before/after ratios of each speed setting measured in the same run (random weights; fine for timing).

Examples::

    python benchmarks/latency.py --quick                      # ssp-sam-mobile + zeroshot-mobile, few repeats
    python benchmarks/latency.py                              # + ssp-sam-vitb, 3 repeats
    python benchmarks/latency.py --variants ssp-sam-tiny --zeroshot zeroshot-tiny --phrases 4 --threads 2
    python benchmarks/latency.py --device cuda --dtype bf16   # GPU: stage table only

What it prints, all from one process:

1. ``uptime`` (the load the figures were taken under) and the machine's matmul peak: a plain fp32
   [1024x1024]@[1024x1024] matmul at 1 thread and at ``--threads``, timed like the stages.
2. Per stage: median ms, peak memory, FLOPs (``torch.utils.flop_counter.FlopCounterMode``, counted once on
   the reference path so attention is counted as its matmuls), achieved GFLOP/s and its ratio
   to the matmul peak at the same thread count.
3. Before/after for every speed setting, interleaved (A B B A ...) so load changes hit both
   sides alike: SDPA attention, BatchNorm folding and channels-last (``sspsam.backbones.runtime.FAST``;
   ``exact`` = all three at once),
   1 vs 2 threads, bf16 autocast and dynamic int8 Linear layers (with the max abs change of the
   stage output: the speed of int8/bf16 is not free).
4. Goal-2 arithmetic for the ``ssp-sam-*`` variants: first phrase on a new image
   (SAM + CLIP image encoders + 1 phrase) and each further phrase (CLIP text + SSP encoder + SAM
   decoder), measured, and the floor = FLOPs / matmul peak at ``--threads``.

SSP-SAM stages (one image, ``--phrases`` T phrases): ``sam_encoder``, ``clip_image``,
``clip_text_1`` / ``clip_text_T``, ``ssp_encoder_1``, ``sam_decoder_1``, ``decode_1`` / ``decode_T``
(SSP encoder + SAM decoder on cached image features). Training-free (``--zeroshot``, ``--classes``
K random class embeddings; the 80-template class text is cached per class list and not timed):
``sam_encoder``, ``clip_dense`` (SCLIP dense features), ``classes_tspp`` (everything after the encoders, TSPP points; ``--grid`` adds ``classes_grid``,
SAM's 32x32 grid, minutes per run on a CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

try:
    import sspsam.backbones.runtime as runtime
    from sspsam.models.build import build_model
    from sspsam.config import list_configs, load_config
except ImportError:  # running from a checkout without an install
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import sspsam.backbones.runtime as runtime
    from sspsam.models.build import build_model
    from sspsam.config import list_configs, load_config

PHRASES = [
    "the man on the left",
    "red car behind the tree",
    "small dog next to the bench",
    "woman holding an umbrella",
    "the second bottle from the right",
]
OFF = {k: False for k in runtime.FAST}
AB_SETTINGS = ["exact", *runtime.FAST, "threads", "bf16", "int8"]  # exact: every exact rewrite at once


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", nargs="*", default=None,
                   help=f"SSP-SAM configs (default ssp-sam-mobile ssp-sam-vitb; --quick: ssp-sam-mobile); "
                        f"bundled: {', '.join(list_configs())}")
    p.add_argument("--zeroshot", nargs="*", default=["zeroshot-mobile"],
                   help="training-free configs (zeroshot-mobile; 'zeroshot' is SAM ViT-B, minutes per run)")
    p.add_argument("--quick", action="store_true", help="ssp-sam-mobile + zeroshot-mobile, 2 repeats, 2 phrases")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                   help="bf16 runs the fp32 weights under torch.autocast (the stage table)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (default 3; --quick 2)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first")
    p.add_argument("--phrases", type=int, default=None, help="T for the batched stages (default 4; --quick 2)")
    p.add_argument("--classes", type=int, default=10, help="K classes for the training-free path")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads for the stage table (default: sspsam.backbones.runtime.default_threads(), as the CLI)")
    p.add_argument("--grid", action="store_true", help="also time the training-free path on SAM's 32x32 grid (slow)")
    p.add_argument("--no-ab", action="store_true", help="stage table only, no before/after comparisons")
    p.add_argument("--ab", nargs="+", default=AB_SETTINGS, choices=AB_SETTINGS,
                   help="which before/after comparisons to run (default: all)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.variants is None:
        args.variants = ["ssp-sam-mobile"] if args.quick else ["ssp-sam-mobile", "ssp-sam-vitb"]
    args.repeats = args.repeats or (2 if args.quick else 3)
    args.phrases = args.phrases or (2 if args.quick else 4)
    if args.repeats < 1 or args.warmup < 0 or args.phrases < 2 or args.classes < 1:
        p.error("--repeats and --classes must be >= 1, --phrases >= 2, --warmup >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda requested but CUDA is not available (no GPU on this machine)")
    unknown = [v for v in [*args.variants, *args.zeroshot] if v not in list_configs() and not Path(v).suffix]
    if unknown:
        p.error(f"unknown config(s) {unknown}; bundled: {', '.join(list_configs())}")
    return args


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "uptime unavailable"


@contextlib.contextmanager
def threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


class Bench:
    def __init__(self, device: torch.device, warmup: int, repeats: int):
        self.device, self.warmup, self.repeats = device, warmup, repeats

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def interleaved(self, fns: dict[str, object]) -> dict[str, float]:
        """Median ms of each zero-argument fn, run in alternating order (A B, B A, ...) per repeat."""
        times: dict[str, list[float]] = {k: [] for k in fns}
        keys = list(fns)
        with torch.inference_mode():
            for _ in range(self.warmup):
                for k in keys:
                    fns[k]()
            for r in range(self.repeats):
                for k in keys if r % 2 == 0 else keys[::-1]:
                    self.sync()
                    t0 = time.perf_counter()
                    fns[k]()
                    self.sync()
                    times[k].append((time.perf_counter() - t0) * 1e3)
        return {k: statistics.median(v) for k, v in times.items()}


def peak_mb(device: torch.device) -> float:
    """CUDA: torch.cuda.max_memory_allocated since the stage's reset. CPU: the process peak RSS so
    far (ru_maxrss only grows, so a stage's figure includes earlier stages; one model per run for a clean one)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


def count_flops(fn) -> int:
    """FLOPs of one call on the reference path (fast paths off: attention counted as its matmuls)."""
    with torch.no_grad(), runtime.fast_paths(**OFF), FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def matmul_peak(bench: Bench, counts: list[int], n: int = 1024) -> dict[int, float]:
    """GFLOP/s of a plain fp32 n×n matmul per thread count (interleaved)."""
    a, b = torch.randn(n, n, device=bench.device), torch.randn(n, n, device=bench.device)

    def mm():
        for _ in range(4):
            a @ b

    def at(t):
        def run():
            with threads(t):
                mm()
        return run

    ms = bench.interleaved({t: at(t) for t in counts})
    return {t: 4 * 2 * n**3 / (ms[t] / 1e3) / 1e9 for t in counts}


def _out_tensor(out) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):  # decoders give mask logits, OVSS heads logits, the SSP encoder prompts
        for key in ("mask_logits", "logits", "prompts"):
            if key in out:
                return _out_tensor(out[key])
        return None
    if isinstance(out, (tuple, list)) and out:
        return _out_tensor(out[0])
    if hasattr(out, "sentence"):  # TextFeatures
        return out.sentence
    return None


def max_abs_diff(a, b) -> float:
    ta, tb = _out_tensor(a), _out_tensor(b)
    if ta is None or tb is None or ta.shape != tb.shape:
        return float("nan")
    return float((ta.float() - tb.float()).abs().max())


# ---- stage builders: stage name -> fn(model) --------------------------------------------------
def ssp_stages(m, images: torch.Tensor, t: int, device) -> tuple[dict, dict]:
    tokens = m.clip.tokenize([PHRASES[i % len(PHRASES)] for i in range(t)]).to(device)
    idx = torch.zeros(t, dtype=torch.long, device=device)
    with torch.inference_mode():
        feats = m.encode_image(images)
        text = m.encode_text(tokens)
        text1 = m.encode_text(tokens[:1])
        cls1 = feats.clip_global[:1] if feats.clip_global is not None else None
        prompts1 = m.ssp_encoder(feats.clip_patches[idx[:1]], text1, cls=cls1)["prompts"]

    stages = {
        "sam_encoder": lambda mm: mm.sam.encode_image(images),
        "clip_image": lambda mm: mm.clip.encode_image(images),
        "clip_text_1": lambda mm: mm.encode_text(tokens[:1]),
        f"clip_text_{t}": lambda mm: mm.encode_text(tokens),
        "ssp_encoder_1": lambda mm: mm.ssp_encoder(feats.clip_patches[idx[:1]], text1, cls=cls1),
        "sam_decoder_1": lambda mm: mm.sam.decode(feats.sam[0:1], prompts1),
        "decode_1": lambda mm: mm.decode(feats, text1, idx[:1]),
        f"decode_{t}": lambda mm: mm.decode(feats, text, idx),
    }
    touches = {  # which settings change which stage (the others would measure noise)
        "exact": ["sam_encoder", "sam_decoder_1", "decode_1"],
        "sdpa": ["sam_encoder", "sam_decoder_1", "decode_1"],
        "fold_bn": ["sam_encoder"] if m.sam.encoder_name == "tiny_vit" else [],
        "channels_last": ["sam_encoder"] if m.sam.encoder_name == "tiny_vit" else [],
        "threads": list(stages),
        "bf16": ["sam_encoder", "clip_image", "clip_text_1", "decode_1"],
        "int8": ["sam_encoder", "clip_image", "clip_text_1", "decode_1"],
    }
    return stages, touches


def zeroshot_stages(m, images: torch.Tensor, k: int, device, grid: bool = False) -> tuple[dict, dict]:
    import sspsam.models.cost as cost_ops

    g = torch.Generator().manual_seed(0)
    emb = F.normalize(torch.randn(k, m.clip.embed_dim, generator=g), dim=-1).to(device)
    with torch.inference_mode():
        feats = m.encode_image(images)

    def classes(mode):
        def run(mm):
            mm.cfg["prompt"] = mode
            try:
                return mm.decode_classes(feats, emb)
            finally:
                mm.cfg["prompt"] = "tspp"
        return run

    stages = {
        "sam_encoder": lambda mm: mm.sam.encode_image(images),
        "clip_dense": lambda mm: cost_ops.dense_features(mm.clip, images, mm.cfg["dense_mode"], mm.cfg["clip_size"]),
        "classes_tspp": classes("tspp"),
    }
    if grid:  # 1024 prompts: minutes per run on a CPU; benchmarks/ovss_latency.py compares it with TSPP
        stages["classes_grid"] = classes("grid")
    touches = {
        "exact": ["sam_encoder", "classes_tspp"],
        "sdpa": ["sam_encoder", "classes_tspp"],
        "fold_bn": ["sam_encoder"] if m.sam.encoder_name == "tiny_vit" else [],
        "channels_last": ["sam_encoder"] if m.sam.encoder_name == "tiny_vit" else [],
        "threads": ["sam_encoder", "clip_dense", "classes_tspp"],  # grid: benchmarks/ovss_latency.py
        "bf16": ["sam_encoder", "clip_dense"],
        "int8": ["sam_encoder", "clip_dense"],
    }
    return stages, touches


def bench_model(name: str, kind: str, args, bench: Bench, peak: dict[int, float]) -> tuple[list, list]:
    device = bench.device
    torch.manual_seed(args.seed)
    m = build_model(load_config(name)).eval().requires_grad_(False).to(device)
    s = m.image_size
    g = torch.Generator().manual_seed(args.seed)
    images = (torch.rand(1, 3, s, s, generator=g) * 255).to(device)
    if kind == "ssp":
        stages, touches = ssp_stages(m, images, args.phrases, device)
    else:
        stages, touches = zeroshot_stages(m, images, args.classes, device, args.grid)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bf16" else contextlib.nullcontext())
    nthreads = torch.get_num_threads()

    rows = []
    for stage, fn in stages.items():
        flops = count_flops(lambda: fn(m))

        def run(fn=fn):
            with autocast:
                fn(m)

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        ms = bench.interleaved({"x": run})["x"]
        gflops = flops / (ms / 1e3) / 1e9
        rows.append((name, stage, ms, flops / 1e9, gflops, gflops / peak[nthreads] if device.type == "cpu" else float("nan"),
                     peak_mb(device)))
        log(f"  {name:<18} {stage:<14} {ms:10.1f} ms  {flops / 1e9:8.2f} GFLOP  {gflops:6.1f} GFLOP/s")

    ab = []
    if args.no_ab or device.type != "cpu":
        return rows, ab
    q8 = None
    ab_bench = Bench(device, 0, bench.repeats)  # the max|diff| run below warms both sides up
    for opt, names in touches.items():
        if opt not in args.ab:
            continue
        for stage in names:
            fn = stages[stage]
            if opt in runtime.FAST or opt == "exact":
                def before(fn=fn, opt=opt):
                    with runtime.fast_paths(**(OFF if opt == "exact" else {opt: False})):
                        return fn(m)
                after = lambda fn=fn: fn(m)  # noqa: E731
                labels = (f"{opt} off", f"{opt} on")
            elif opt == "threads":
                if runtime.available_cores() < 2:
                    continue

                def before(fn=fn):
                    with threads(1):
                        return fn(m)

                def after(fn=fn):
                    with threads(2):
                        return fn(m)
                labels = ("1 thread", "2 threads")
            elif opt == "bf16":
                before = lambda fn=fn: fn(m)  # noqa: E731

                def after(fn=fn):
                    with torch.autocast("cpu", dtype=torch.bfloat16):
                        return fn(m)
                labels = ("fp32", "bf16 autocast")
            else:  # int8
                if q8 is None:
                    q8 = runtime.quantize(copy.deepcopy(m), "int8")
                before = lambda fn=fn: fn(m)  # noqa: E731
                after = lambda fn=fn: fn(q8)  # noqa: E731
                labels = ("fp32", "int8 dynamic")
            with torch.inference_mode():
                diff = max_abs_diff(before(), after())
            ms = ab_bench.interleaved({"before": before, "after": after})
            ab.append((name, stage, labels[0], labels[1], ms["before"], ms["after"], diff))
            log(f"  {name:<18} {stage:<14} {labels[0]:>10} {ms['before']:9.1f} ms  {labels[1]:>14} {ms['after']:9.1f} ms"
                f"  x{ms['before'] / ms['after']:.2f}  max|diff| {diff:.2e}")
    del q8, m
    return rows, ab


def main(argv=None) -> int:
    args = parse_args(argv)
    runtime.set_threads(runtime.default_threads() if args.threads is None else args.threads)
    device = torch.device(args.device)
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    up0 = uptime()
    log(f"# {up0}")
    bench = Bench(device, args.warmup, args.repeats)
    nthreads = torch.get_num_threads()
    counts = sorted({1, nthreads, min(2, runtime.available_cores())})
    peak = matmul_peak(Bench(device, 1, max(3, args.repeats)), counts) if device.type == "cpu" else {}
    log(f"# matmul peak GFLOP/s: {peak}")

    rows, ab = [], []
    for name in args.variants:
        r, a = bench_model(name, "ssp", args, bench, peak)
        rows += r
        ab += a
    for name in args.zeroshot:
        r, a = bench_model(name, "zeroshot", args, bench, peak)
        rows += r
        ab += a

    print(f"uptime before: {up0}")
    print(f"uptime after:  {uptime()}")
    print(f"torch {torch.__version__}, device {dev_name}, {args.dtype}, {nthreads} threads "
          f"({runtime.available_cores()} cores), 1 image, T={args.phrases} phrases, K={args.classes} classes, "
          f"median of {args.repeats} (warmup {args.warmup}), random weights")
    if peak:
        print("fp32 matmul peak (1024x1024 @ 1024x1024): "
              + ", ".join(f"{t} thread{'s' * (t > 1)} {g:.1f} GFLOP/s" for t, g in peak.items()))
    print()
    print("| model | stage | median ms | GFLOP | GFLOP/s | of matmul peak | peak mem MB |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, stage, ms, gf, gfs, frac, mem in rows:
        print(f"| {name} | {stage} | {ms:.1f} | {gf:.2f} | {gfs:.1f} | {frac:.0%} | {mem:.0f} |")
    print()
    print("peak mem: " + ("torch.cuda.max_memory_allocated per stage" if device.type == "cuda"
                          else "process peak RSS so far (ru_maxrss), cumulative across stages and models"))
    if ab:
        print()
        print("Before/after, interleaved in this run (ratio > 1: the second is faster; max|diff| of the stage output)")
        print()
        print("| model | stage | before | after | before ms | after ms | before/after | max abs diff |")
        print("|---|---|---|---|---:|---:|---:|---:|")
        for name, stage, lb, la, mb, ma, diff in ab:
            print(f"| {name} | {stage} | {lb} | {la} | {mb:.1f} | {ma:.1f} | {mb / ma:.2f} | {diff:.1e} |")
    if peak:
        print()
        two = 2 * peak[1]  # both cores at the measured 1-thread rate: a quiet 2-core machine's matmul rate
        print(f"Goal 2 (first phrase <= 1500 ms, each further <= 150 ms on 2 cores): floor = FLOPs / matmul rate; "
              f"1 core {peak[1]:.1f} GFLOP/s measured, 2 cores taken as 2 x that = {two:.1f} GFLOP/s")
        print()
        print("| model | path | stages | measured ms | GFLOP | floor ms, 1 core | floor ms, 2 cores | measured / 1-core floor |")
        print("|---|---|---|---:|---:|---:|---:|---:|")
        by = {(r[0], r[1]): r for r in rows}
        t = args.phrases
        for name in args.variants:
            for path, parts, per in (("first phrase", ["sam_encoder", "clip_image", "clip_text_1", "decode_1"], 1),
                                     ("further phrase", ["clip_text_1", "decode_1"], 1),
                                     (f"further phrase, {t} batched, per phrase", [f"clip_text_{t}", f"decode_{t}"], t)):
                ms = sum(by[(name, p)][2] for p in parts) / per
                gf = sum(by[(name, p)][3] for p in parts) / per
                f1, f2 = gf / peak[1] * 1e3, gf / two * 1e3
                print(f"| {name} | {path} | {' + '.join(parts)} | {ms:.0f} | {gf:.1f} | {f1:.0f} | {f2:.0f} | {ms / f1:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
