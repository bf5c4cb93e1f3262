"""Print the held-out, per-family table of a referring model on generated shape scenes
(:mod:`sspsam.engine.shapes_eval`).

    python scripts/shapes_eval.py --model shapes-demo --scenes 200
"""

from __future__ import annotations

import argparse
import sys

from sspsam.engine.shapes_eval import HELDOUT_SEED0, report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="shapes-demo", help="bundled model name or checkpoint path")
    ap.add_argument("--scenes", type=int, default=200)
    ap.add_argument("--seed0", type=int, default=HELDOUT_SEED0)
    args = ap.parse_args(argv)
    try:
        print(report(args.model, args.scenes, args.seed0))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
