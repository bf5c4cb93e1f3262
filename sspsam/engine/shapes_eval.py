"""Held-out evaluation of a referring model on generated shape scenes, phrase family by family.

The bundled ``shapes-demo`` model is only worth shipping if it is right on scenes it never saw,
for every kind of phrase the generator makes. Training draws scene seeds below
:data:`TRAIN_SEED_LIMIT`; this harness draws from :data:`HELDOUT_SEED0` upwards, so the two
never meet. Target phrases are scored with :class:`sspsam.engine.metrics.RESMeter` (mean IoU of the
union mask of the referents), absent-object phrases by whether the model said "no target".

    sspsam tools shapes-eval --model shapes-demo --scenes 200
"""

from __future__ import annotations

import random

import numpy as np

from sspsam.engine.metrics import RESMeter
from sspsam.data.shapes import FAMILIES, SIDES, Expression, Scene, demo_scene, expressions_by_family, make_scene  # noqa: F401 (demo_scene, SIDES: re-exported)

TRAIN_SEED_LIMIT = 10**9
HELDOUT_SEED0 = 2_000_000_000
def pick_phrases(scene: Scene, rng: random.Random, families: tuple[str, ...] = FAMILIES) -> list[Expression]:
    """One phrase per family the scene allows (a scene with one circle has no 'all circles')."""
    by_family = expressions_by_family(scene)
    return [rng.choice(by_family[f]) for f in families if by_family.get(f)]


def target_mask(scene: Scene, expr: Expression) -> np.ndarray:
    out = np.zeros((scene.height, scene.width), dtype=bool)
    for i in expr.targets:
        out |= scene.mask(i)
    return out


def answers(segmenter, n_scenes: int, seed0: int, families: tuple[str, ...] = FAMILIES):
    """Yield (scene, phrase, mask, said "no target", no-target prob or None) for one phrase per
    family on each of ``n_scenes`` scenes from ``seed0``: the loop the held-out table and the
    demo's threshold calibration (scripts/train_shapes_demo.py) share."""
    rng = random.Random(seed0)
    for k in range(n_scenes):
        scene = demo_scene(seed0 + k)
        phrases = pick_phrases(scene, rng, families)
        res = segmenter.segment(scene.render(), [e.text for e in phrases])
        probs = getattr(res, "no_target_prob", None)  # only a no-target head has one
        probs = [None] * len(phrases) if probs is None else probs
        for e, mask, said_none, prob in zip(phrases, res.masks, res.no_target, probs):
            yield scene, e, mask, bool(said_none), prob


def evaluate(segmenter, n_scenes: int = 200, seed0: int = HELDOUT_SEED0, families: tuple[str, ...] = FAMILIES) -> dict:
    """Per-family and overall scores of ``segmenter`` (a :class:`sspsam.Segmenter`) on
    ``n_scenes`` held-out scenes. A family's ``score`` is its mIoU, or for ``absent`` its
    no-target accuracy."""
    if seed0 < TRAIN_SEED_LIMIT:
        raise ValueError(f"held-out seeds must start at {TRAIN_SEED_LIMIT} or above (training uses the ones below)")
    meters = {f: RESMeter() for f in families}
    overall = RESMeter()
    nt_right = {f: 0 for f in families}
    nt_n = {f: 0 for f in families}
    for scene, e, mask, said_none, _ in answers(segmenter, n_scenes, seed0, families):
        if e.no_target:
            nt_n[e.family] += 1
            nt_right[e.family] += said_none
        else:
            gt = target_mask(scene, e)
            meters[e.family].update(mask, gt)
            overall.update(mask, gt)
    rows = {}
    for f in families:
        n_t, n_nt = len(meters[f]), nt_n[f]
        miou = meters[f].compute()["mIoU"] if n_t else None
        acc = nt_right[f] / n_nt if n_nt else None
        rows[f] = {"n": n_t + n_nt, "mIoU": miou, "no_target_acc": acc, "score": miou if n_t else acc}
    total_nt = sum(nt_n.values())
    return {
        "scenes": n_scenes,
        "families": rows,
        "mIoU": overall.compute()["mIoU"] if len(overall) else None,
        "no_target_acc": sum(nt_right.values()) / total_nt if total_nt else None,
        "phrases": len(overall) + total_nt,
    }


def format_table(result: dict) -> str:
    fmt = lambda v: "  -  " if v is None else f"{v:.3f}"  # noqa: E731
    lines = [f"{'family':<14}{'n':>6}{'mIoU':>8}{'no-target acc':>15}"]
    for f, r in result["families"].items():
        lines.append(f"{f:<14}{r['n']:>6}{fmt(r['mIoU']):>8}{fmt(r['no_target_acc']):>15}")
    lines.append(f"{'overall':<14}{result['phrases']:>6}{fmt(result['mIoU']):>8}{fmt(result['no_target_acc']):>15}")
    return "\n".join(lines)


def report(model: str = "shapes-demo", n_scenes: int = 200, seed0: int = HELDOUT_SEED0) -> str:
    """The per-family table of a bundled model name or checkpoint path, for a command to print."""
    from sspsam.predict.segmenter import Segmenter

    result = evaluate(Segmenter.from_pretrained(model), n_scenes, seed0)
    return f"{model} on {n_scenes} held-out generated scenes\n{format_table(result)}"
