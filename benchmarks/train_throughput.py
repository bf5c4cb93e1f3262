"""Training throughput (samples/s) and peak memory of SSP-SAM at real size (random weights, random data).

Examples::

    python benchmarks/train_throughput.py                                  # ssp-sam-vitb, CPU, fp32
    python benchmarks/train_throughput.py --device cuda --precision bf16 --batch-size 8 --steps 20
    python benchmarks/train_throughput.py --variants ssp-sam-tiny --batch-size 8 --steps 20

Modes (``--modes``):

* ``full``    one optimiser step as ``sspsam train`` runs it: frozen CLIP and SAM image encoder
              run forward (no grad), SSP encoder + SAM mask decoder forward/backward, AdamW step.
* ``cached``  the official recipe's fast path: SAM image embeddings and CLIP features cached, so a
              step is SSP encoder + SAM decoder forward/backward + AdamW only.

Peak memory: CUDA ``max_memory_allocated`` (tensors) per mode; on CPU the process peak RSS,
which only grows (run one variant per process for a clean figure).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

try:
    from sspsam.config import build_model, list_configs, load_config
except ImportError:  # running from a checkout without an install
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from sspsam.config import build_model, list_configs, load_config
from sspsam.losses import ssp_loss
from sspsam.train import param_groups

WORDS = ["the", "man", "on", "left", "red", "car", "behind", "tree", "small", "dog", "bench", "woman", "holding", "umbrella"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", nargs="+", default=["ssp-sam-vitb"], help=f"model configs ({', '.join(list_configs())})")
    p.add_argument("--modes", nargs="+", default=["full", "cached"], choices=["full", "cached"])
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


def run(variant: str, mode: str, args, device: torch.device) -> dict:
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
    cache = None
    if mode == "cached":  # features computed once, outside the timed loop
        with torch.no_grad(), autocast:
            cache = (model.encode_image(batch["image"]), model.encode_text(batch["tokens"]))

    def step() -> float:
        model.train()
        for name in frozen:
            model.get_submodule(name).eval()
        with autocast:
            if cache is None:
                out = model(batch["image"], batch["tokens"])
            else:
                out = model.decode(*cache)
        out = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in out.items()}
        losses = ssp_loss(out, batch["mask"], batch["box"], batch["no_target"], weights)
        opt.zero_grad(set_to_none=True)
        losses["total"].backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 0.1)
        opt.step()
        return float(losses["total"].detach())

    for _ in range(args.warmup):
        step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(device)
    dt = time.perf_counter() - t0
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "variant": variant,
        "mode": mode,
        "batch": args.batch_size,
        "step_s": dt / args.steps,
        "samples_s": args.batch_size * args.steps / dt,
        "peak_mb": peak_mb(device),
        "trainable_m": n_train / 1e6,
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}; precision {args.precision}; batch {args.batch_size}; {args.steps} timed steps after {args.warmup} warm-up\n")
    print("| variant | mode | batch | s/step | samples/s | peak memory (MB) | trainable params (M) |")
    print("|---|---|---|---|---|---|---|")
    for v in args.variants:
        for m in args.modes:
            r = run(v, m, args, device)
            print(f"| {r['variant']} | {r['mode']} | {r['batch']} | {r['step_s']:.3f} | {r['samples_s']:.2f} | "
                  f"{r['peak_mb']:.0f} | {r['trainable_m']:.1f} |", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
