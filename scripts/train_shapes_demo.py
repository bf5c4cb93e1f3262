"""Train the bundled `shapes-demo` model: a tiny SSP-SAM on generated shape scenes.

It exists so that `sspsam segment` works on a fresh machine with no downloads. It knows the
generator's world — six colours, circles/squares/triangles, left/right/top/bottom, relations
between shapes, several objects at once, and "nothing matches" — and nothing about photos.

Why this recipe (the first demo froze CLIP and SAM at random init and never learnt colour words):
every tower trains, from scratch; CLIP and SAM both read 256 px (a 16×16 patch grid, 64×64 mask
logits: at 128 px an 8×8 grid left a shape one or two patches to be told apart by, and the 32×32
masks capped a right answer's IoU); the text context is 16 tokens (the longest generated phrase
is 11); phrases are drawn family by family (absent objects a little more often), so relations and
multi-target phrases are not drowned by the easy ones; a dense phrase–patch alignment loss
stands in for the image–text alignment a pretrained CLIP would bring (:func:`alignment_loss`);
AdamW with warm-up and cosine decay.

Rerun (CPU, 2 threads; resumable: the run folder's ``last.pt`` is rewritten atomically every 200
steps, and a killed run continues where it left off when started again with the same --run):
    OMP_NUM_THREADS=2 python scripts/train_shapes_demo.py --steps 6500 --batch 6 --phrases 6 \
        --align 5 --run runs/shapes-demo --out sspsam/assets/shapes-demo.pt --eval 200
The shipped checkpoint was trained in several legs, each changing the recipe (family weights,
alignment weight, a 128-px model widened to 256 px by :func:`widen` and trained on with
``--init``): benchmarks/demo_models.md records them and the held-out scores. Its ``meta`` holds
the step count, minutes and held-out scores.

`examples/shapes.png` is ``make_scene(np.random.default_rng(12), width=256, height=192,
n_objects=(4, 4), radius=(0.12, 0.2), background="plain", palette=(red, green, blue, yellow))``
— a blue circle, a red square, a red triangle and a yellow circle; the colours are the bundled
OVSS demo's classes, so the README's `sspsam ovss` line works on it too — and
`examples/shapes_blue_circle.png` is its blue circle's mask (255 inside); both are rewritten,
bit for bit, by ``python scripts/train_shapes_demo.py --example``.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import random
import re
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from sspsam.config import load_config, merge
from sspsam.data.shapes import expressions_by_family, make_scene, shapes_vocabulary
from sspsam.engine.loop import LoopOptions, fit
from sspsam.engine.losses import ssp_loss
from sspsam.engine.metrics import RESMeter
from sspsam.engine.shapes_eval import TRAIN_SEED_LIMIT, answers, demo_scene, evaluate, format_table, target_mask
from sspsam.engine.step import collate, make_sample
from sspsam.engine.state import seed_everything
from sspsam.engine.tasks.referring import ReferringTask
from sspsam.models.build import build_model
from sspsam.io.checkpoint import atomic_write, save_checkpoint

# What the demo changes in the tiny config (the checkpoint stores the merged config).
OVERRIDES = {
    "name": "shapes-demo",
    "sam": {"img_size": 256},
    "clip": {"vision": {"image_size": 256}, "text": {"context_length": 16}},
    "loss": {"no_target": 2.0},
}
# Colour and shape words are what every other family builds on, and the model starts knowing
# none: they are drawn more often. Absent objects too, so that "the C S" is not a no-target cue.
FAMILY_WEIGHTS = {"colour": 2.0, "shape": 1.5, "colour-shape": 2.0, "position": 1.0, "relation": 1.0,
                  "size": 0.5, "multi": 1.0, "absent": 1.5}
EXAMPLE_PHRASES = ["the blue circle", "the yellow shape", "the triangle", "the yellow circle on the right",
                   "the blue circle left of the red square", "the purple triangle"]
EXAMPLE_SEED = 12
EXAMPLE_SIZE = (256, 192)


def example_scene():
    """The README's example: a fixed scene with a blue circle among shapes of other colours."""
    return make_scene(np.random.default_rng(EXAMPLE_SEED), width=EXAMPLE_SIZE[0], height=EXAMPLE_SIZE[1],
                      n_objects=(4, 4), radius=(0.12, 0.2), background="plain",
                      palette=("red", "green", "blue", "yellow"))


def sample_scene(rng: random.Random, size: int, phrases: int, pair_rate: float = 0.0) -> list[dict]:
    """``phrases`` phrases of different families on one training scene: the model must read the
    phrase to tell their masks apart, and the image towers run once for all of them.

    ``pair_rate``: how often a drawn colour–shape phrase comes with an absent twin in the same
    scene ("the red circle" beside "the red square"): only the conjunction tells the two apart.
    At 0 the draws are the ones the recipe made before the option existed."""
    scene = demo_scene(rng.randrange(TRAIN_SEED_LIMIT))
    by_family = {f: es for f, es in expressions_by_family(scene).items() if es}
    fams = list(by_family)
    out, image = [], scene.render()
    while len(out) < phrases:
        fam = rng.choices(fams, weights=[FAMILY_WEIGHTS.get(f, 1.0) for f in fams])[0]
        e = rng.choice(by_family[fam])
        out.append(make_sample(image, target_mask(scene, e), e.text, size))
        if not (pair_rate and fam == "colour-shape" and len(out) < phrases):
            continue
        twins = [a for a in by_family.get("absent", ()) if _shares_a_word(a.text, e.text)]
        if twins and rng.random() < pair_rate:
            a = rng.choice(twins)
            out.append(make_sample(image, target_mask(scene, a), a.text, size))
    return out


def _shares_a_word(absent: str, present: str) -> bool:
    """"the red square" (absent) beside "the red circle" or "the blue square" (present)."""
    a, p = absent.split()[1:], present.split()[1:]
    return len(a) == len(p) == 2 and (a[0] == p[0]) != (a[1] == p[1])


def alignment_loss(model, patches: torch.Tensor, sentence: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Dense phrase–patch alignment: the cosine of the sentence embedding with each CLIP patch,
    as a logit, against the share of that patch the referent covers.

    SSP-SAM relies on CLIP's pretrained image–text alignment (its Visual Attention Adapter starts
    from the sentence–patch similarity map). The demo's CLIP is random, and without that
    alignment the tiny model learnt positions but not one colour word in 1000 steps: the phrase
    never told the visual side what to look for. This loss supplies the alignment directly.
    Training only; the model and its inference are unchanged."""
    g = model.clip.grid_size
    share = F.adaptive_avg_pool2d(mask.float()[:, None], g).flatten(1)  # [T, g*g], row-major like the patches
    cos = torch.einsum("tnc,tc->tn", F.normalize(patches, dim=-1), F.normalize(sentence, dim=-1))
    return F.binary_cross_entropy_with_logits(10.0 * cos, share)


class SceneStream(torch.utils.data.Dataset):
    """Training scenes drawn on the fly from the global ``random`` generator (which the loop
    seeds and saves in ``last.pt``, so a resumed run draws what the uninterrupted one would);
    the index only feeds the sampler."""

    def __init__(self, size: int, phrases: int, pair_rate: float, length: int = 100_000) -> None:
        self.size, self.phrases, self.pair_rate, self.length = size, phrases, pair_rate, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> list[dict]:
        return sample_scene(random, self.size, self.phrases, self.pair_rate)


class ShapesDemoTask(ReferringTask):
    """The referring task on generated scenes: several phrases share one scene, so the image
    towers run once per scene (``decode`` with an image index), plus :func:`alignment_loss`;
    every tower trains; the lr follows :func:`lr_at`."""

    def __init__(self, cfg: dict, *, lr: float, phrases: int, pair_rate: float, align: float, align_from: int,
                 init: str | None = None) -> None:
        super().__init__(cfg, None, lr=lr, decoder_lr=lr, weight_decay=0.01, clip_grad=1.0, load_backbones=False)
        self.phrases, self.pair_rate, self.align, self.align_from, self.init_path = phrases, pair_rate, align, align_from, init
        self.step = 0
        self.frozen = []

    def build(self, seed):
        seed_everything(seed)
        model = build_model(self.cfg)  # nothing frozen, whatever the tiny config freezes
        if self.init_path:  # a resumed run's last.pt then overwrites every weight
            ck = torch.load(self.init_path, map_location="cpu", weights_only=False)
            old = {k: v.float() if v.is_floating_point() else v for k, v in ck["state_dict"].items()}
            model.load_state_dict(widen(old, model.state_dict(), self.cfg["ssp"]["num_prompts"]))
        return model

    def open_data(self):
        return None

    def dataset(self, core):
        return SceneStream(core.image_size, self.phrases, self.pair_rate)

    def collate(self, scenes: list[list[dict]]) -> dict:
        batch = collate([s for group in scenes for s in group])
        first = [group[0] for group in scenes]
        batch["scene_image"] = torch.stack([s["image"] for s in first])
        batch["scene_valid_hw"] = torch.stack([s["valid_hw"] for s in first])
        batch["index"] = torch.tensor([i for i, group in enumerate(scenes) for _ in group])
        return batch

    def scheduler(self, optimizer, total_steps, steps_per_epoch):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, total_steps, 1.0))

    def prepare(self, step, core):
        self.step = step
        return False

    def loss(self, module, core, batch, autocast):
        index = batch["index"]
        with autocast():
            feats = core.encode_image(batch["scene_image"], batch["scene_valid_hw"])
            text = core.encode_text(core.clip.tokenize(batch["text"]).to(index.device))
            out = core.decode(feats, text, index)
        losses = ssp_loss(out, batch["mask"], batch["box"], batch["no_target"], self.loss_weights)
        if self.align and self.step >= self.align_from:
            losses["align"] = self.align * alignment_loss(core, feats.clip_patches[index], text.sentence, batch["mask"])
            losses["total"] = losses["total"] + losses["align"]
        return losses


def _grid(t: torch.Tensor, size: int) -> torch.Tensor:
    """[g*g, C] row-major grid tokens → [size*size, C], bicubic (as ViTs are fine-tuned at a new size)."""
    g = math.isqrt(t.shape[0])
    x = t.reshape(1, g, g, -1).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
    return x.permute(0, 2, 3, 1).reshape(size * size, -1).to(t.dtype)


def widen(old: dict, new: dict, num_prompts: int) -> dict:
    """Warm-start a model whose image towers read a finer grid from one trained on a coarser one:
    every weight is kept, and each position table is resized the way a ViT is moved to a new
    resolution — grid tables bicubically, SAM's relative-position tables linearly (as its
    ``get_rel_pos`` itself does), the class / box / prompt rows untouched."""
    out = {}
    for k, ref in new.items():
        v = old[k]
        if v.shape == ref.shape:
            out[k] = v
        elif k.endswith("visual.positional_embedding"):  # [1 + g², C]: class token, then the grid
            out[k] = torch.cat([v[:1], _grid(v[1:], math.isqrt(ref.shape[0] - 1))])
        elif k.endswith("image_encoder.pos_embed"):  # [1, g, g, C]
            g = ref.shape[1]
            out[k] = _grid(v[0].flatten(0, 1), g).reshape(1, g, g, -1)
        elif re.search(r"rel_pos_[hw]$", k):  # [2g - 1, C]
            x = F.interpolate(v.T[None].float(), size=ref.shape[0], mode="linear", align_corners=False)
            out[k] = x[0].T.to(v.dtype)
        elif k.endswith("prompt_generator.pos_embed"):  # [1, 1 + K + g², C]: box, prompts, then the grid
            lead = 1 + num_prompts
            grid = _grid(v[0, lead:], math.isqrt(ref.shape[1] - lead))
            out[k] = torch.cat([v[0, :lead], grid])[None]
        else:
            raise ValueError(f"cannot carry {k} from {tuple(v.shape)} to {tuple(ref.shape)}")
    return out


def calibrate_no_target(segmenter, n_scenes: int = 200, seed0: int = TRAIN_SEED_LIMIT - 10_000_000) -> float:
    """The no-target probability above which the demo says "nothing matches", chosen on
    training-distribution scenes (seeds below :data:`TRAIN_SEED_LIMIT`, never the held-out ones).

    The no-target head is trained with a plain BCE whose 0.5 point need not be where a wrong "no
    target" (losing a whole mask) and a wrong mask (on an absent object) balance. The threshold
    is the one whose weakest family is strongest — family by family, as the held-out table scores
    them: pooled over phrases, "the blue circle" (present) would be sacrificed to "the purple
    circle" (absent), since the two read alike and colour–shape is one family among seven.

    "No target" is scored as the Segmenter decides it: the probability above the threshold *or* an
    empty mask (a phrase is never "found" with nothing drawn); benchmarks/demo_models.md says why."""
    saved, segmenter.no_target_prob = segmenter.no_target_prob, 2.0  # masks for every phrase
    scorer = RESMeter()  # the held-out table's IoU
    rows = []  # (family, no-target prob, mask empty, IoU if answered)
    try:
        for scene, e, mask, empty, p in answers(segmenter, n_scenes, seed0):  # with the prob disabled, said-none = empty
            rows.append((e.family, float(p), empty, 0.0 if e.no_target else scorer.update(mask, target_mask(scene, e))))
    finally:
        segmenter.no_target_prob = saved

    def per_family(t: float) -> dict[str, float]:
        out = {}
        for fam in {r[0] for r in rows}:
            said_none = np.array([p > t or empty for f, p, empty, _ in rows if f == fam])
            iou = np.array([i for f, _, _, i in rows if f == fam])
            out[fam] = float(said_none.mean() if fam == "absent" else np.where(said_none, 0.0, iou).mean())
        return out

    def key(t: float) -> tuple:
        scores = per_family(t)
        return (round(min(scores.values()), 3), round(float(np.mean(list(scores.values()))), 3), -abs(t - 0.5))

    best = float(max(np.round(np.arange(0.05, 0.96, 0.05), 2), key=key))
    fmt = lambda t: " ".join(f"{f}={v:.3f}" for f, v in sorted(per_family(t).items()))  # noqa: E731
    print(f"no-target threshold {best:.2f}: {fmt(best)}\n                 0.50: {fmt(0.5)}", flush=True)
    return best


def recalibrate(path: str, n_calibrate: int, n_eval: int, threads: int) -> None:
    """Rewrite a trained demo checkpoint with a newly chosen no-target threshold and its held-out scores."""
    from sspsam.models.build import read_sspsam_checkpoint
    from sspsam.predict.segmenter import Segmenter

    torch.set_num_threads(threads)
    ck = read_sspsam_checkpoint(path)
    segmenter = Segmenter.from_pretrained(path)
    threshold = calibrate_no_target(segmenter, n_calibrate)
    ck["config"]["inference"]["no_target_prob"] = segmenter.no_target_prob = threshold
    result = evaluate(segmenter, n_eval)
    print(format_table(result), flush=True)
    meta = dict(ck.get("meta") or {})
    meta["heldout"] = _heldout(result, n_eval)
    save_checkpoint(path, ck["config"], ck["state_dict"], meta=meta)
    print(f"rewrote {path}: no-target threshold {threshold:.2f}")


def _heldout(result: dict, n_eval: int) -> dict:
    return {"scenes": n_eval, "mIoU": result["mIoU"], "no_target_acc": result["no_target_acc"],
            "families": {f: r["score"] for f, r in result["families"].items()}}


def lr_at(step: int, total: int, peak: float, warmup: int = 200) -> float:
    """Linear warm-up, then a cosine to 2% of ``peak``: the demo trains every tower from scratch."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def demo_vocabulary() -> dict:
    """The words the demo was trained on, and the phrases that name one object each (what a
    click falling outside a phrase's mask is matched against)."""
    from sspsam.data.shapes import COLOURS, SHAPES

    return {"kind": "phrases", "words": shapes_vocabulary(),
            "objects": [f"the {c} {s}" for c in COLOURS for s in SHAPES]}


def annotate(path: str) -> None:
    """Record the words the demo was trained on in its meta, so every surface can warn about (or
    refuse) a phrase outside them; how the shipped checkpoint got its vocabulary without retraining."""
    from sspsam.models.build import read_sspsam_checkpoint

    ck = read_sspsam_checkpoint(path)
    meta = {**(ck.get("meta") or {}), "vocabulary": demo_vocabulary(), "prompt_clicks": False}
    before = {k: v.clone() for k, v in ck["state_dict"].items()}
    save_checkpoint(path, ck["config"], ck["state_dict"], meta=meta)
    after = read_sspsam_checkpoint(path)["state_dict"]
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype
                                                 for k in before), "annotating changed a weight"
    print(f"annotated {path}: {len(meta['vocabulary']['words'])} words, weights bit for bit the same")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--batch", type=int, default=6, help="scenes per step")
    ap.add_argument("--phrases", type=int, default=6, help="phrases per scene")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=3407)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--run", default="runs/shapes-demo", help="run folder (last.pt, log.jsonl, model.pt): continued when it holds a last.pt")
    ap.add_argument("--out", default="sspsam/assets/shapes-demo.pt")
    ap.add_argument("--align", type=float, default=5.0, help="weight of the phrase–patch alignment loss")
    ap.add_argument("--align-from", type=int, default=0, help="first step with the alignment loss")
    ap.add_argument("--deadline", help="UTC HH:MM: stop there even if --steps is not reached (then save and evaluate)")
    ap.add_argument("--eval", type=int, default=200, help="held-out scenes to evaluate at the end (0: none)")
    ap.add_argument("--family-weights", default="", help="how often each phrase family is drawn, e.g. 'shape=2.5,size=1.5' "
                    "(the rest as in FAMILY_WEIGHTS)")
    ap.add_argument("--calibrate", type=int, default=200, help="training-distribution scenes to choose the no-target "
                    "threshold on before the held-out evaluation (0: keep 0.5)")
    ap.add_argument("--pair-rate", type=float, default=0.0, help="share of colour-shape phrases drawn with an absent twin "
                    "sharing its colour or its shape, in the same scene")
    ap.add_argument("--init", help="warm-start from this checkpoint (position tables resized by widen()); give it again to resume")
    ap.add_argument("--example", action="store_true", help="only (re)write examples/shapes.png and its mask")
    ap.add_argument("--annotate", action="store_true", help="only (re)write the vocabulary in --out's meta; "
                    "the weights stay bit for bit")
    ap.add_argument("--recalibrate", action="store_true", help="only choose the no-target threshold of --out again "
                    "(--calibrate scenes) and rescore it on --eval held-out scenes; the weights stay bit for bit")
    args = ap.parse_args()
    if args.annotate:
        annotate(args.out)
        return
    if args.recalibrate:
        recalibrate(args.out, args.calibrate, args.eval, args.threads)
        return
    if args.example:
        scene = example_scene()
        blue = [o.index for o in scene.objects if o.colour == "blue" and o.shape == "circle"]
        assert len(blue) == 1, "the example scene must hold exactly one blue circle"
        atomic_write("examples/shapes.png", lambda t: Image.fromarray(scene.render()).save(t, format="PNG"))
        mask = Image.fromarray(scene.mask(blue[0]).astype(np.uint8) * 255)
        atomic_write("examples/shapes_blue_circle.png", lambda t: mask.save(t, format="PNG"))
        print([(o.colour, o.shape) for o in scene.objects])
        return
    for item in filter(None, args.family_weights.split(",")):
        fam, _, w = item.partition("=")
        if fam not in FAMILY_WEIGHTS:
            ap.error(f"--family-weights: unknown family {fam!r} (one of {', '.join(FAMILY_WEIGHTS)})")
        FAMILY_WEIGHTS[fam] = float(w)
    torch.set_num_threads(args.threads)
    cfg = merge(load_config("ssp-sam-tiny"), OVERRIDES)
    run = Path(args.run)
    resume = (run / "last.pt").is_file()
    init = None
    if args.init:
        meta0 = torch.load(args.init, map_location="cpu", weights_only=False).get("meta", {})
        init = {"from": os.path.basename(args.init), "steps": meta0.get("steps"), "train_minutes": meta0.get("train_minutes")}
        print(f"warm start from {args.init} ({init['steps']} steps)", flush=True)
    time_limit = None
    if args.deadline:
        now = datetime.datetime.now(datetime.timezone.utc)
        hh, mm = map(int, args.deadline.split(":"))
        stop = now.replace(hour=hh, minute=mm, second=0, microsecond=0)
        time_limit = ((stop if stop > now else stop + datetime.timedelta(days=1)) - now).total_seconds()  # 00:10 at 22:50 is tomorrow's
    task = ShapesDemoTask(cfg, lr=args.lr, phrases=args.phrases, pair_rate=args.pair_rate, align=args.align,
                          align_from=args.align_from, init=args.init)
    t0 = time.time()

    def report(rec: dict) -> None:
        if rec["step"] % 25 == 0:
            print(f"step {rec['step']} {time.time() - t0:.0f}s lr={rec['lr']:.2e} "
                  + " ".join(f"{k}={v:.3f}" for k, v in rec.items() if k not in ("step", "lr", "decoder_lr")), flush=True)

    options = LoopOptions(steps=args.steps, batch_size=args.batch, seed=args.seed, resume=resume, ckpt_every=200,
                          log_every=25, time_limit=time_limit, tensorboard=False)
    res = fit(task, run, options, echo=lambda m: print(m, flush=True), on_step=report)
    model, step = res["module"], res["step"]
    minutes = res["seconds"] / 60  # this call's; earlier legs are in benchmarks/demo_models.md
    meta = {"steps": step, "batch": args.batch, "phrases_per_scene": args.phrases, "seed": args.seed, "train_minutes": round(minutes, 1),
            "trained_on": "generated shape scenes", "domain": "generated-shapes", "example_phrases": EXAMPLE_PHRASES,
            "vocabulary": demo_vocabulary(), "prompt_clicks": False}
    if init:
        meta["warm_start"] = init
    if args.eval:
        from sspsam.predict.segmenter import Segmenter

        half = {k: v.half().float() if v.is_floating_point() else v for k, v in model.state_dict().items()}
        model.load_state_dict(half)  # score what ships (fp16 weights)
        segmenter = Segmenter(model.eval())
        if args.calibrate:
            cfg["inference"]["no_target_prob"] = segmenter.no_target_prob = calibrate_no_target(segmenter, args.calibrate)
        result = evaluate(segmenter, args.eval)
        print(format_table(result), flush=True)
        meta["heldout"] = _heldout(result, args.eval)
    sd = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    save_checkpoint(args.out, cfg, sd, meta=meta)
    print(f"saved {args.out} after {step} steps ({minutes:.1f} min, {os.path.getsize(args.out) / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
