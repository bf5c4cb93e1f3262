"""Per-image OVSS latency vs number of classes: ESC-Net, SAM-MI and the training-free path.

Random weights (fine for timing; the training-free path's point count depends on its cost map, so
the table reports the number of SAM prompts each run used). Text encoding is excluded: predictors
cache class embeddings per class list; class embeddings here are random unit vectors.

Examples::

    python benchmarks/ovss_latency.py --config-size tiny --repeats 3
    python benchmarks/ovss_latency.py --config-size vitb --device cuda --repeats 10
    python benchmarks/ovss_latency.py --classes 10 150 --point-threshold 0   # force top-k points per class

Rows:

* ``forward``          ``model(images, class_emb)``: everything for one image and K classes
* ``classes_only``     (training-free) ``decode_classes`` on cached image features: the cost of a new
                       class list on an image already encoded (what ``OVSS`` re-runs)
* ``tspp`` / ``grid``  (training-free) sparse text-guided points vs SAM's 32×32 grid, each a full
                       forward; SAM-MI reports 1.6× for sparse over grid prompting
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

try:
    from sspsam.models.build import build_model
    from sspsam.config import load_config
except ImportError:  # running from a checkout without an install
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from sspsam.models.build import build_model
    from sspsam.config import load_config

MODELS = {  # name -> config per size
    "escnet": {"tiny": "escnet-tiny", "vitb": "escnet-vitb"},
    "sam-mi": {"tiny": "sam-mi-tiny", "vitb": "sam-mi-vitb"},
    "zeroshot": {"tiny": "zeroshot-tiny", "mobile": "zeroshot-mobile", "vitb": "zeroshot"},
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config-size", choices=["tiny", "mobile", "vitb"], default="tiny",
                   help="mobile: the training-free path with MobileSAM's TinyViT (real size; other models skip it)")
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    p.add_argument("--classes", nargs="+", type=int, default=[1, 10, 150], help="numbers of classes K")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1")
    p.add_argument("--repeats", type=int, default=3, help="timed runs (median reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--point-threshold", type=float, default=None,
                   help="training-free TSPP threshold override (0 = always top-k points per class)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or min(args.classes) < 1:
        p.error("--repeats and --classes must be >= 1, --warmup >= 0")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda requested but CUDA is not available")
    return args


def timed(fn, device: torch.device, warmup: int, repeats: int):
    times, out = [], None
    with torch.inference_mode():
        for i in range(warmup + repeats):
            out = None
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            out = fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), out


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    rows = []
    up0 = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    for name in args.models:
        if args.config_size not in MODELS[name]:
            continue
        cfg_name = MODELS[name][args.config_size]
        torch.manual_seed(args.seed)
        cfg = load_config(cfg_name)
        if name == "zeroshot" and args.point_threshold is not None:
            cfg.setdefault("zeroshot", {})["point_threshold"] = args.point_threshold
        model = build_model(cfg).eval().to(device)
        s = model.image_size
        g = torch.Generator().manual_seed(args.seed)
        images = (torch.rand(1, 3, s, s, generator=g) * 255).to(device)
        e = model.clip.embed_dim
        for k in args.classes:
            emb = F.normalize(torch.randn(k, e, generator=g), dim=-1).to(device)
            modes = ["tspp", "grid"] if name == "zeroshot" else ["forward"]
            for mode in modes:
                if name == "zeroshot":
                    model.cfg["prompt"] = mode
                ms, out = timed(lambda: model(images, emb), device, args.warmup, args.repeats)
                prompts = int(out["num_prompts"].sum()) if "num_prompts" in out else None
                rows.append((name, cfg_name, "forward" if name != "zeroshot" else f"forward/{mode}", k, prompts, ms))
                print(f"  {name:<9} {rows[-1][2]:<22} K={k:<4} {ms:10.1f} ms  prompts {prompts}", file=sys.stderr, flush=True)
                if name == "zeroshot":
                    feats = model.encode_image(images)
                    ms_c, out = timed(lambda: model.decode_classes(feats, emb), device, args.warmup, args.repeats)
                    rows.append((name, cfg_name, f"classes_only/{mode}", k, int(out["num_prompts"].sum()), ms_c))
            if name == "zeroshot":
                model.cfg["prompt"] = "tspp"
        del model
    print(f"uptime before: {up0}")
    print(f"uptime after:  {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    print()
    print(f"torch {torch.__version__}, device {dev_name}, {torch.get_num_threads()} threads, config size "
          f"{args.config_size}, 1 image, random weights, median of {args.repeats} (warmup {args.warmup})")
    print()
    print("| model | config | what | classes | SAM prompts | median ms |")
    print("|---|---|---|---:|---:|---:|")
    for name, cfg_name, what, k, prompts, ms in rows:
        print(f"| {name} | {cfg_name} | {what} | {k} | {'' if prompts is None else prompts} | {ms:.1f} |")
    zs = {(r[2], r[3]): (r[4], r[5]) for r in rows if r[0] == "zeroshot"}
    if any(w.startswith("forward/") for w, _ in zs):
        print()
        print("Training-free: TSPP sparse points vs SAM's 32x32 grid (SAM-MI reports 1.6x for the whole pipeline)")
        print()
        print("| classes | encoder | TSPP prompts | TSPP ms | grid prompts | grid ms | grid / TSPP |")
        print("|---:|---|---:|---:|---:|---:|---:|")
        for k in args.classes:
            for enc, what in (("included", "forward"), ("excluded", "classes_only")):
                t, g = zs.get((f"{what}/tspp", k)), zs.get((f"{what}/grid", k))
                if t and g:
                    print(f"| {k} | {enc} | {t[0]} | {t[1]:.1f} | {g[0]} | {g[1]:.1f} | {g[1] / t[1]:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
