"""Training throughput (samples/s) and peak memory of SSP-SAM at real size (random weights, random data).

Examples::

    python benchmarks/train_throughput.py --variants ssp-sam-mobile --steps 3   # cached vs uncached, CPU
    python benchmarks/train_throughput.py --device cuda --precision bf16 --batch-size 8 --steps 20
    python benchmarks/train_throughput.py --variants ssp-sam-tiny --batch-size 8 --steps 20

Modes (``--modes``):

* ``full``       one optimiser step as ``sspsam train`` runs it: frozen CLIP and SAM image encoder
                 run forward (no grad), SSP encoder + SAM mask decoder forward/backward, AdamW step.
* ``sam-cache``  the same step as ``sspsam train --cached-features DIR`` runs it: SAM's image
                 embeddings read from an fp16 cache on disk (:mod:`sspsam.engine.feature_cache`, written by
                 the same code as ``sspsam cache-features``, outside the timing) and fed through
                 ``feature_cache.sam_embeddings``; CLIP's image and text towers still run.
* ``cached``     the official recipe's fast path: SAM image embeddings and CLIP features both
                 cached, so a step is SSP encoder + SAM decoder forward/backward + AdamW only (an
                 upper bound; sspsam caches only SAM's embeddings, CLIP's may train).

The modes share one model and take turns step by step (``--steps`` rounds of one step per mode,
after ``--warmup`` rounds), so a load change on a shared machine hits them alike; the table gives
the median step time and each mode's speed-up over ``full`` measured in the same run.

Peak memory: CUDA ``max_memory_allocated`` (tensors) per mode; on CPU only the process peak RSS
(all modes together; it only grows).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

try:
    from sspsam.models.build import build_model
    from sspsam.config import list_configs, load_config
except ImportError:  # running from a checkout without an install
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from sspsam.models.build import build_model
    from sspsam.config import list_configs, load_config
import sspsam.engine.feature_cache as fc
from sspsam.engine.losses import ssp_loss
from sspsam.engine.step import param_groups

WORDS = ["the", "man", "on", "left", "red", "car", "behind", "tree", "small", "dog", "bench", "woman", "holding", "umbrella"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", nargs="+", default=["ssp-sam-vitb"], help=f"model configs ({', '.join(list_configs())})")
    p.add_argument("--modes", nargs="+", default=["full", "sam-cache", "cached"], choices=["full", "sam-cache", "cached"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="timed optimiser steps per mode")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return p.parse_args(argv)


def peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_batch(model, b: int, device: torch.device, g: torch.Generator) -> dict:
    s = model.image_size
    texts = [" ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (6,), generator=g)) for _ in range(b)]
    masks = torch.zeros(b, s, s, dtype=torch.bool)
    for i in range(b):
        y0, x0 = (int(v) for v in torch.randint(0, s // 2, (2,), generator=g))
        masks[i, y0 : y0 + s // 3, x0 : x0 + s // 3] = True
    return {
        "image": (torch.rand(b, 3, s, s, generator=g) * 255).to(device),
        "mask": masks.to(device),
        "box": torch.tensor([[0.4, 0.4, 0.33, 0.33]] * b, device=device),
        "no_target": torch.zeros(b, dtype=torch.bool, device=device),
        "tokens": model.clip.tokenize(texts).to(device),
    }


def run(variant: str, args, device: torch.device, workdir: Path) -> list[dict]:
    torch.manual_seed(0)
    cfg = load_config(variant)
    model = build_model(cfg)
    frozen = list((cfg.get("train") or {}).get("freeze") or [])
    model.freeze(frozen)
    model.to(device)
    opt = torch.optim.AdamW(param_groups(model, 1e-4, 1e-5), lr=1e-4)
    weights = dict(cfg.get("loss") or {})
    g = torch.Generator().manual_seed(0)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    batch = random_batch(model, args.batch_size, device, g)
    # features computed once, outside the timed loop
    with torch.no_grad(), autocast:
        both = (model.encode_image(batch["image"]), model.encode_text(batch["tokens"]))
    embeds = both[0].sam.float().cpu().numpy()
    folder = workdir / variant
    identity = {"model": "benchmark", "config": variant, "sam_config_hash": "-", "encoder_hash": "-",
                "dataset": {"name": "random"}, "views": ["plain"], "dtype": "float16",
                "shape": list(embeds.shape[1:]), "shard_size": len(embeds), "rows": len(embeds)}
    fc.write_cache(folder, identity, lambda rows: embeds[rows], batch_size=len(embeds))
    cache = fc.FeatureCache(folder)

    def forward(mode: str) -> dict:
        if mode == "full":
            return model(batch["image"], batch["tokens"])
        if mode == "cached":
            return model.decode(*both)
        # sam-cache: what the trainer does per batch (CachedSamples + _to_batch + sam_embeddings)
        sam = torch.stack([torch.from_numpy(cache[i]) for i in range(args.batch_size)]).to(device)
        with fc.sam_embeddings(model.sam, sam):
            return model(batch["image"], batch["tokens"])

    def step(mode: str) -> float:
        model.train()
        for name in frozen:
            model.get_submodule(name).eval()
        with autocast:
            out = forward(mode)
        out = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in out.items()}
        losses = ssp_loss(out, batch["mask"], batch["box"], batch["no_target"], weights)
        opt.zero_grad(set_to_none=True)
        losses["total"].backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 0.1)
        opt.step()
        return float(losses["total"].detach())

    times: dict[str, list[float]] = {m: [] for m in args.modes}
    peaks: dict[str, float] = {m: 0.0 for m in args.modes}
    for r in range(args.warmup + args.steps):
        for m in args.modes:
            sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            step(m)
            sync(device)
            if r >= args.warmup:
                times[m].append(time.perf_counter() - t0)
                peaks[m] = max(peaks[m], peak_mb(device))
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    base = statistics.median(times["full"]) if "full" in times else None
    rows = []
    for m in args.modes:
        med = statistics.median(times[m])
        rows.append({"variant": variant, "mode": m, "batch": args.batch_size, "step_s": med,
                     "samples_s": args.batch_size / med, "speedup": base / med if base else float("nan"),
                     "peak_mb": peaks[m], "trainable_m": n_train / 1e6, "all": times[m]})
    return rows


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "uptime unavailable"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}; precision {args.precision}; batch {args.batch_size}; {args.steps} timed rounds after "
          f"{args.warmup} warm-up, modes interleaved step by step")
    print(f"uptime before: {uptime()}\n")
    print("| variant | mode | batch | median s/step | samples/s | speed-up vs full | peak memory (MB) | trainable params (M) |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="sspsam-train-bench-") as tmp:
        for v in args.variants:
            for r in run(v, args, device, Path(tmp)):
                print(f"| {r['variant']} | {r['mode']} | {r['batch']} | {r['step_s']:.3f} | {r['samples_s']:.3f} | "
                      f"{r['speedup']:.2f}x | {r['peak_mb']:.0f} | {r['trainable_m']:.1f} |", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if device.type != "cuda":
        print("\n(CPU peak memory is the process peak RSS over all modes)")
    print(f"uptime after: {uptime()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
