"""Train the bundled `ovss-shapes-demo` model: tiny ESC-Net on generated colour-class scenes.

It exists so that the OVSS path runs on a fresh machine with no downloads. Its vocabulary is
the generated one ("background", "red", "green", "blue", "yellow" on flat shapes) — nothing
about real photos. Usage:
python scripts/train_ovss_demo.py --steps 400 --out sspsam/assets/ovss-shapes-demo.pt

The checkpoint's ``meta`` says what the CLI/web page may suggest: ``domain`` and
``example_classes`` (the class list it was trained on, which is what it knows) and
``vocabulary`` (the words of those classes: a class with none of them gets a warning).
``--annotate`` only (re)writes that meta on an existing checkpoint, weights untouched — how the
shipped one got it (benchmarks/demo_models.md has its scores). Training is
:func:`sspsam.engine.train_ovss.train_ovss`, the shared loop every method trains with.
"""

from __future__ import annotations

import argparse
import tempfile

import torch

from sspsam.models.build import read_sspsam_checkpoint
from sspsam.io.checkpoint import save_checkpoint
from sspsam.config import load_config
from sspsam.data.semseg import SemSegDataset, generate_semseg
from sspsam.engine.evaluate_ovss import evaluate_ovss
from sspsam.engine.train_ovss import train_ovss


def demo_meta(classes: list[str]) -> dict:
    from sspsam.predict.vocabulary import classes_vocabulary

    return {"domain": "generated-shapes", "example_classes": list(classes),
            "vocabulary": {"kind": "classes", "words": classes_vocabulary(classes)}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default="escnet-tiny")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="sspsam/assets/ovss-shapes-demo.pt")
    ap.add_argument("--annotate", action="store_true", help="only add the domain/example meta to --out")
    args = ap.parse_args()
    if args.annotate:
        ck = read_sspsam_checkpoint(args.out)
        meta = {**ck.get("meta", {}), **demo_meta(ck["classes"])}
        before = {k: v.clone() for k, v in ck["state_dict"].items()}
        save_checkpoint(args.out, ck["config"], ck["state_dict"], classes=ck["classes"], meta=meta)
        after = read_sspsam_checkpoint(args.out)["state_dict"]
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype
                                                     for k in before), "annotating changed a weight"
        print(f"annotated {args.out}: {meta}")
        return
    with tempfile.TemporaryDirectory() as tmp:
        generate_semseg(tmp, n=256, size=128, seed=args.seed, splits=("train",))
        generate_semseg(tmp, n=32, size=128, seed=args.seed, splits=("val",))
        cfg = load_config(args.config)
        cfg["name"] = "ovss-shapes-demo"
        res = train_ovss(cfg, tmp, f"{tmp}/run", steps=args.steps, batch_size=args.batch, seed=args.seed)
        val = evaluate_ovss(res["model"], SemSegDataset(tmp, "val"))
        print(f"held-out mIoU {val['mIoU']:.3f}", {k: round(v, 3) for k, v in val["per_class"].items()})
        ck = read_sspsam_checkpoint(res["checkpoint"])
    sd = {k: v.half() if v.is_floating_point() else v for k, v in ck["state_dict"].items()}
    meta = {"steps": res["steps"], "seed": args.seed, "trained_on": "generated colour-class shape scenes",
            "val_mIoU": val["mIoU"], **demo_meta(res["classes"])}
    save_checkpoint(args.out, cfg, sd, classes=res["classes"], meta=meta)
    print(f"saved {args.out} after {res['steps']} steps")


if __name__ == "__main__":
    main()
