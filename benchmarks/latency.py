"""Per-stage latency, FLOPs and hardware utilisation of SSP-SAM and the training-free path, with
before/after ratios of each speed setting measured in the same run (random weights; fine for timing).

Examples::

    python benchmarks/latency.py --quick                      # ssp-sam-mobile + zeroshot-mobile, few repeats
    python benchmarks/latency.py                              # + ssp-sam-vitb, 3 repeats
    python benchmarks/latency.py --variants ssp-sam-tiny --zeroshot zeroshot-tiny --phrases 4 --threads 2
    python benchmarks/latency.py --device cuda --dtype bf16   # GPU: stage table only
    python benchmarks/latency.py --quick --no-ab --zeroshot   # fp32 and auto rows of ssp-sam-mobile only

What it prints, all from one process:

1. ``uptime`` (the load the figures were taken under) and the machine's matmul peaks: a plain
   [1024x1024]@[1024x1024] matmul in fp32 at 1 thread and at ``--threads``, and in bf16 at
   ``--threads`` (on AMX/AVX512-BF16 CPUs and GPUs the bf16 units), timed like the stages.
2. Per stage and per ``--dtype`` (default: fp32 and auto, the predictors' default, in one run;
   non-fp32 rows cast the weights as the predictors do, norms and score heads kept fp32, and run
   under autocast): median ms, peak memory, FLOPs (``torch.utils.flop_counter.FlopCounterMode``,
   counted once on the reference path so attention is counted as its matmuls), achieved GFLOP/s,
   its ratio to the fp32 and bf16 matmul peaks, the bf16 floor (FLOPs / bf16 peak), and where one
   call's time goes by ``torch.profiler``'s operator table: matmul/conv/attention kernels, dtype
   casts, all other operators, and time outside any operator (Python, module calls).
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
    p.add_argument("--dtype", nargs="+", choices=["fp32", "bf16", "auto"], default=["fp32", "auto"],
                   help="stage-table rows per dtype (default fp32 and auto: what the predictors pick on this machine)")
    p.add_argument("--no-profile", action="store_true", help="skip the per-stage torch.profiler split")
    p.add_argument("--further", action="store_true",
                   help="only the further-phrase path (CLIP text + SSP encoder + SAM decoder) of each --variants, "
                        "per --dtype, with the decoder and sequence rewrites off vs on, interleaved")
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


def matmul_peak(bench: Bench, counts: list[int], n: int = 1024, dtype: torch.dtype = torch.float32) -> dict[int, float]:
    """GFLOP/s of a plain n×n matmul in ``dtype`` per thread count (interleaved)."""
    a, b = (torch.randn(n, n, device=bench.device).to(dtype) for _ in range(2))

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


# Operators that are the method's arithmetic: matmuls, convolutions, fused attention. Self time
# only, so a wrapper (aten::linear, aten::matmul) is not counted twice with the kernel it calls.
_MATMUL_OPS = ("mm", "addmm", "bmm", "baddbmm", "_addmm_activation", "mkldnn_linear", "mkldnn_convolution", "linear",
               "convolution", "_convolution", "conv2d", "_scaled_dot_product_flash_attention_for_cpu",
               "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
               "_scaled_dot_product_cudnn_attention", "_flash_attention_forward", "_efficient_attention_forward")
_CAST_OPS = ("_to_copy", "copy_", "to")


def op_split(fn, device) -> dict[str, float]:
    """ms of one call of ``fn`` by kind (torch.profiler's operator table, self time): matmul-like
    kernels, dtype casts, other operators, and wall time outside every operator (Python,
    module calls, the profiler's own cost). CUDA: device self time for the operator kinds."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.inference_mode():
        fn()  # warm: first-call allocations and oneDNN primitive creation are not the steady state
        with profile(activities=acts) as prof:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            wall = (time.perf_counter() - t0) * 1e3
    out = {"matmul": 0.0, "cast": 0.0, "other": 0.0}
    for ev in prof.key_averages():
        name = ev.key.removeprefix("aten::")
        if not ev.key.startswith("aten::"):
            continue
        us = getattr(ev, "self_device_time_total", 0.0) if device.type == "cuda" else ev.self_cpu_time_total
        kind = "matmul" if name in _MATMUL_OPS else "cast" if name in _CAST_OPS else "other"
        out[kind] += us / 1e3
    out["outside"] = max(0.0, wall - sum(out.values())) if device.type == "cpu" else float("nan")
    out["wall"] = wall
    return out


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


def dtype_model(m, dtype_name: str, device):
    """``(model, dtype, autocast)`` for a stage-table row: the predictors' placement (precision.apply_dtype
    on a copy, norms and score heads fp32) and their autocast; 'auto' resolves as the predictors do."""
    from sspsam.predict.precision import apply_dtype, autocast, resolve_auto

    dtype = resolve_auto(dtype_name if dtype_name != "auto" else "auto", device)[0]
    if dtype == torch.float32:
        return m, dtype, contextlib.nullcontext()
    return apply_dtype(copy.deepcopy(m), dtype), dtype, autocast(device, dtype)


def bench_model(name: str, kind: str, args, bench: Bench, peak: dict[int, float], peak16: float) -> tuple[list, list]:
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
    nthreads = torch.get_num_threads()
    flops = {stage: count_flops(lambda fn=fn: fn(m)) for stage, fn in stages.items()}

    rows = []
    for dname in args.dtype:
        md, dtype, autocast = dtype_model(m, dname, device)
        label = dname if dname != "auto" else f"auto={str(dtype).replace('torch.', '')}"
        for stage, fn in stages.items():
            def run(fn=fn, md=md, autocast=autocast):
                with autocast:
                    return fn(md)

            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            ms = bench.interleaved({"x": run})["x"]
            split = {} if args.no_profile else op_split(run, device)
            gf = flops[stage] / 1e9
            gflops = gf / (ms / 1e3)
            p32 = peak.get(nthreads, float("nan"))
            rows.append(dict(model=name, stage=stage, dtype=label, ms=ms, gflop=gf, gflops=gflops, of32=gflops / p32,
                             of16=gflops / peak16, floor16=gf / peak16 * 1e3, mem=peak_mb(device), **split))
            log(f"  {name:<18} {stage:<14} {label:<14} {ms:10.1f} ms  {gf:8.2f} GFLOP  {gflops:6.1f} GFLOP/s"
                + (f"  matmul {split['matmul']:.1f} cast {split['cast']:.1f} other {split['other']:.1f} "
                   f"outside {split['outside']:.1f} ms" if split else ""))
        if md is not m:
            del md

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


FURTHER_FLAGS = ("decoder_broadcast", "seq_contiguous")


def further_phrase(args, bench: Bench) -> list[tuple]:
    """Rows (model, dtype, T, off ms, on ms, max|diff|) of the further-phrase path, T = 1 and
    --phrases, with :data:`FURTHER_FLAGS` off (the code before the rewrites) vs on."""
    device = bench.device
    rows = []
    for name in args.variants:
        torch.manual_seed(args.seed)
        m = build_model(load_config(name)).eval().requires_grad_(False).to(device)
        g = torch.Generator().manual_seed(args.seed)
        images = (torch.rand(1, 3, m.image_size, m.image_size, generator=g) * 255).to(device)
        for dname in args.dtype:
            md, dtype, autocast = dtype_model(m, dname, device)
            label = dname if dname != "auto" else f"auto={str(dtype).replace('torch.', '')}"
            with torch.inference_mode(), autocast:
                feats = md.encode_image(images)
            for t in sorted({1, args.phrases}):
                tokens = md.clip.tokenize([PHRASES[i % len(PHRASES)] for i in range(t)]).to(device)
                idx = torch.zeros(t, dtype=torch.long, device=device)

                def run(on, md=md, autocast=autocast, tokens=tokens, idx=idx, feats=feats):
                    with autocast, runtime.fast_paths(**{f: on for f in FURTHER_FLAGS}):
                        return md.decode(feats, md.encode_text(tokens), idx)

                with torch.inference_mode():
                    diff = max_abs_diff(run(False), run(True))
                ms = bench.interleaved({"off": lambda: run(False), "on": lambda: run(True)})
                rows.append((name, label, t, ms["off"], ms["on"], diff))
                log(f"  {name:<18} {label:<14} T={t}  off {ms['off']:8.1f} ms  on {ms['on']:8.1f} ms  max|diff| {diff:.1e}")
            del md
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    runtime.set_threads(runtime.default_threads() if args.threads is None else args.threads)
    if args.further:
        bench = Bench(torch.device(args.device), args.warmup, args.repeats)
        up0 = uptime()
        rows = further_phrase(args, bench)
        print(f"uptime before: {up0}")
        print(f"uptime after:  {uptime()}")
        print(f"torch {torch.__version__}, device {cpu_name() if args.device == 'cpu' else args.device}, "
              f"{torch.get_num_threads()} threads, median of {args.repeats} interleaved (warmup {args.warmup}), random weights")
        print()
        print("Further phrase (CLIP text + SSP encoder + SAM decoder on cached image features), rewrites "
              f"{' + '.join(FURTHER_FLAGS)} off vs on")
        print()
        print("| model | dtype | phrases T | off ms | on ms | off/on | max abs diff of mask logits |")
        print("|---|---|---:|---:|---:|---:|---:|")
        for name, label, t, off, on, diff in rows:
            print(f"| {name} | {label} | {t} | {off:.1f} | {on:.1f} | {off / on:.2f} | {diff:.1e} |")
        return 0
    device = torch.device(args.device)
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    up0 = uptime()
    log(f"# {up0}")
    bench = Bench(device, args.warmup, args.repeats)
    nthreads = torch.get_num_threads()
    counts = sorted({1, nthreads, min(2, runtime.available_cores())}) if device.type == "cpu" else [nthreads]
    n = 1024 if device.type == "cpu" else 8192
    peak = matmul_peak(Bench(device, 1, max(3, args.repeats)), counts, n)
    peak16 = matmul_peak(Bench(device, 1, max(3, args.repeats)), [nthreads], n, torch.bfloat16)[nthreads]
    log(f"# fp32 matmul peak GFLOP/s: {peak}; bf16 at {nthreads} threads: {peak16:.1f}")
    rows, ab = run_models(args, bench, peak, peak16)
    print(f"uptime before: {up0}")
    print(f"uptime after:  {uptime()}")
    print(f"torch {torch.__version__}, device {dev_name}, {nthreads} threads "
          f"({runtime.available_cores()} cores), 1 image, T={args.phrases} phrases, K={args.classes} classes, "
          f"median of {args.repeats} (warmup {args.warmup}), random weights")
    if device.type == "cpu":
        from sspsam.predict.precision import BF16_CPU_FLAGS, choose_dtype, host_cpu_flags

        have = [f for f in (*BF16_CPU_FLAGS, "amx_int8", "avx512_vnni", "avx_vnni") if f in host_cpu_flags()]
        print(f"CPU flags: {', '.join(have) or 'no bf16/int8 matrix units'}; torch dispatches "
              f"{torch.backends.cpu.get_cpu_capability()}; auto picks {choose_dtype(device)[0]} ({choose_dtype(device)[1]})")
    print(f"matmul peak ({n}x{n} @ {n}x{n}): fp32 "
          + ", ".join(f"{t} thread{'s' * (t > 1)} {g:.1f} GFLOP/s" for t, g in peak.items())
          + f"; bf16 {nthreads} thread{'s' * (nthreads > 1)} {peak16:.1f} GFLOP/s")
    print()
    print_stage_table(rows, device)
    if ab:
        print()
        print("Before/after, interleaved in this run (ratio > 1: the second is faster; max|diff| of the stage output)")
        print()
        print("| model | stage | before | after | before ms | after ms | before/after | max abs diff |")
        print("|---|---|---|---|---:|---:|---:|---:|")
        for name, stage, lb, la, mb, ma, diff in ab:
            print(f"| {name} | {stage} | {lb} | {la} | {mb:.1f} | {ma:.1f} | {mb / ma:.2f} | {diff:.1e} |")
    if device.type == "cpu":
        print()
        print_goal2(rows, args, peak, peak16)
    return 0


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return "cpu " + line.partition(":")[2].strip()
    except OSError:
        pass
    return "cpu"


def run_models(args, bench: Bench, peak: dict[int, float], peak16: float) -> tuple[list, list]:
    rows, ab = [], []
    for name in args.variants:
        r, a = bench_model(name, "ssp", args, bench, peak, peak16)
        rows += r
        ab += a
    for name in args.zeroshot:
        r, a = bench_model(name, "zeroshot", args, bench, peak, peak16)
        rows += r
        ab += a
    return rows, ab


def print_stage_table(rows: list[dict], device) -> None:
    print("| model | stage | dtype | median ms | GFLOP | GFLOP/s | of fp32 peak | of bf16 peak | bf16 floor ms "
          "| matmul ms | casts ms | other ops ms | outside ops ms | peak mem MB |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        split = " | ".join(f"{r[k]:.1f}" if k in r else "-" for k in ("matmul", "cast", "other", "outside"))
        print(f"| {r['model']} | {r['stage']} | {r['dtype']} | {r['ms']:.1f} | {r['gflop']:.2f} | {r['gflops']:.1f} "
              f"| {r['of32']:.0%} | {r['of16']:.0%} | {r['floor16']:.2f} | {split} | {r['mem']:.0f} |")
    print()
    print("peak mem: " + ("torch.cuda.max_memory_allocated per stage" if device.type == "cuda"
                          else "process peak RSS so far (ru_maxrss), cumulative across stages and models"))
    print("split: one profiled call (self time per operator): matmul = mm/addmm/bmm/linear/conv/fused attention, "
          "casts = _to_copy/copy_, outside ops = wall time no operator accounts for (Python, module calls, profiler)"
          + ("; CUDA: device time per kind" if device.type == "cuda" else ""))


def print_goal2(rows: list[dict], args, peak: dict[int, float], peak16: float) -> None:
    two = 2 * peak[1]  # both cores at the measured 1-thread rate: a quiet 2-core machine's matmul rate
    print(f"Goal 2 (first phrase <= 1500 ms, each further <= 150 ms on 2 cores): floor = FLOPs / matmul rate; "
          f"fp32 1 core {peak[1]:.1f} GFLOP/s measured, 2 cores taken as 2 x that = {two:.1f} GFLOP/s; "
          f"bf16 {peak16:.1f} GFLOP/s measured at {torch.get_num_threads()} threads")
    print()
    print("| model | dtype | path | stages | measured ms | GFLOP | fp32 floor ms, 1 core | fp32 floor ms, 2 cores "
          "| bf16 floor ms | measured / fp32 1-core floor |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|")
    by = {(r["model"], r["dtype"], r["stage"]): r for r in rows}
    t = args.phrases
    for name in args.variants:
        for label in dict.fromkeys(r["dtype"] for r in rows if r["model"] == name):
            for path, parts, per in (("first phrase", ["sam_encoder", "clip_image", "clip_text_1", "decode_1"], 1),
                                     ("further phrase", ["clip_text_1", "decode_1"], 1),
                                     (f"further phrase, {t} batched, per phrase", [f"clip_text_{t}", f"decode_{t}"], t)):
                ms = sum(by[(name, label, p)]["ms"] for p in parts) / per
                gf = sum(by[(name, label, p)]["gflop"] for p in parts) / per
                f1, f2, f16 = gf / peak[1] * 1e3, gf / two * 1e3, gf / peak16 * 1e3
                print(f"| {name} | {label} | {path} | {' + '.join(parts)} | {ms:.0f} | {gf:.1f} | {f1:.0f} | {f2:.0f} "
                      f"| {f16:.0f} | {ms / f1:.1f} |")


if __name__ == "__main__":
    raise SystemExit(main())
