"""Train ESC-Net / SAM-MI on a generic semseg folder without the `sspsam` command line (the same
loop as `sspsam train <config> --data SEMSEG_ROOT`).

    python scripts/train_ovss.py escnet-tiny SEMSEG_ROOT runs/escnet --steps 300
"""

from __future__ import annotations

import argparse
import json

from sspsam.engine.train_ovss import train_ovss
from sspsam.errors import SSPSamError, one_line


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python scripts/train_ovss.py", description="Train ESC-Net / SAM-MI on a generic semseg folder.")
    p.add_argument("config")
    p.add_argument("data_root")
    p.add_argument("out_dir")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--cached-features", help="SAM-MI: a folder from `sspsam cache-features` (same config, data, seed)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--total-steps", type=int, help="length of the LR schedule (default --steps); keep it across resumes")
    a = p.parse_args(argv)
    try:
        res = train_ovss(a.config, a.data_root, a.out_dir, a.steps, a.batch_size, a.lr, a.seed, resume=a.resume,
                         save_every=a.save_every, cached_features=a.cached_features, device=a.device,
                         precision=a.precision, grad_accum=a.grad_accum, total_steps=a.total_steps)
    except SSPSamError as exc:
        p.exit(2, f"error: {one_line(exc)}\n")
    print(json.dumps({k: v for k, v in res.items() if k not in ("model", "losses")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
