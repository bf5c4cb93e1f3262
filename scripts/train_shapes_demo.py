"""Train the bundled `shapes-demo` model: the tiny SSP-SAM config on generated shape scenes.

It exists so that `sspsam segment` works on a fresh machine with no downloads. It knows
colours, shapes, sizes and left/right/top/bottom of flat shapes — nothing about real photos.
Usage: python scripts/train_shapes_demo.py --minutes 8 --out sspsam/assets/shapes-demo.pt
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from sspsam.checkpoint import read_sspsam_checkpoint, save_checkpoint
from sspsam.config import build_model, load_config
from sspsam.data.shapes import make_scene, no_target_expressions, single_target_expressions
from sspsam.train import collate, make_sample, param_groups, train_step


def sample(rng: random.Random, size: int) -> dict:
    while True:  # a few scenes have no unambiguous single-target phrase
        scene = make_scene(rng.randrange(10**9), width=rng.choice([96, 128, 160]), height=rng.choice([96, 128]))
        exprs = {k: v for k, v in single_target_expressions(scene).items() if v}
        if exprs:
            break
    if rng.random() < 0.15:
        negs = no_target_expressions(scene)
        if negs:
            e = rng.choice(negs)
            return make_sample(scene.render(), scene.mask(0) & False, e.text, size)
    i = rng.choice(list(exprs))
    return make_sample(scene.render(), scene.mask(i), rng.choice(exprs[i]).text, size)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--minutes", type=float, default=8.0)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seed", type=int, default=3407)
    ap.add_argument("--out", default="sspsam/assets/shapes-demo.pt")
    ap.add_argument("--init", help="start from this sspsam checkpoint (e.g. a frozen-tower warm-up)")
    ap.add_argument("--unfreeze", action="store_true", help="train the CLIP and SAM towers too")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    cfg = load_config("ssp-sam-tiny")
    cfg["name"] = "shapes-demo"
    model = build_model(cfg)
    if args.init:
        model.load_state_dict({k: v.float() for k, v in read_sspsam_checkpoint(args.init)["state_dict"].items()})
    if not args.unfreeze:
        model.freeze(["clip", "sam.image_encoder"])  # the paper's recipe, and 3x cheaper steps on a CPU
    opt = torch.optim.AdamW(param_groups(model, 5e-4, 5e-4), lr=5e-4)
    t0, step = time.time(), 0
    while time.time() - t0 < args.minutes * 60:
        batch = collate([sample(rng, model.image_size) for _ in range(args.batch)])
        losses = train_step(model, batch, opt, cfg["loss"], clip_grad=1.0)
        step += 1
        if step % 25 == 0:
            print(f"step {step} {time.time() - t0:.0f}s " + " ".join(f"{k}={v:.3f}" for k, v in losses.items()), flush=True)
    sd = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    save_checkpoint(args.out, cfg, sd, meta={"steps": step, "seed": args.seed, "trained_on": "generated shape scenes"})
    print(f"saved {args.out} after {step} steps")


if __name__ == "__main__":
    main()
