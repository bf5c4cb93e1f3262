"""`sspsam` command line: segment, ovss, evaluate, train, serve, batch, weights, models."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import typer
from PIL import Image
from rich.console import Console

from . import cli_batch, cli_ovss, cli_serve, cli_weights
from .checkpoint import atomic_write
from .errors import SSPSamError

app = typer.Typer(
    help="Language-guided segmentation with SAM and CLIP (SSP-SAM).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(cli_weights.app, name="weights", help="List, fetch, import and verify checkpoint files (offline-friendly).")
app.command("ovss")(cli_ovss.ovss)
app.command("serve")(cli_serve.serve)
app.command("batch")(cli_batch.batch)
err = Console(stderr=True)


def _fail(exc: Exception) -> None:
    err.print(f"[bold red]error:[/] {exc}", markup=True, highlight=False, soft_wrap=True)
    raise typer.Exit(code=1)


def _slug(text: str, n: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:n] or "phrase"


@app.command()
def segment(
    image: Path = typer.Argument(..., help="Image file (JPEG, PNG, TIFF, WebP…; EXIF orientation is applied)."),
    text: list[str] = typer.Argument(..., help="One or more phrases, each quoted: \"the man holding the baby\"."),
    output: Path = typer.Option(Path("out"), "-o", "--output", help="Folder for the mask PNG, overlay PNG and JSON."),
    model: str = typer.Option("shapes-demo", "--model", "-m", help="Bundled model name, variant name with weights in the cache, or a checkpoint path."),
    device: str = typer.Option("cpu", "--device", help="torch device: cpu, cuda, cuda:1, mps."),
) -> None:
    """Segment what each phrase refers to. Writes <name>_mask.png, <name>_overlay.png and <name>.json (COCO RLE)."""
    from .imageio import load_image
    from .masks import overlay
    from .predictor import Segmenter, clean_phrases

    try:  # cheap checks first: a bad image or phrase should not wait for a model to load
        rgb = load_image(image)
        phrases = clean_phrases(text)
        seg = Segmenter.from_pretrained(model, device=device)
        res = seg.segment(rgb, phrases)
    except SSPSamError as exc:
        _fail(exc)
    except RuntimeError as exc:  # e.g. an unavailable CUDA device
        _fail(exc)
    output.mkdir(parents=True, exist_ok=True)
    stem = image.stem
    many = len(res) > 1
    written = []
    for i, phrase in enumerate(res.phrases):
        tag = f"{stem}_{i}_{_slug(phrase)}" if many else stem
        mask_png = Image.fromarray(res.masks[i].astype(np.uint8) * 255)
        written.append(atomic_write(output / f"{tag}_mask.png", lambda p, im=mask_png: im.save(p, format="PNG")))
    label = [f"{p} ({s:.2f})" if not n else f"{p}: no match" for p, s, n in zip(res.phrases, res.scores, res.no_target)]
    ov = overlay(rgb, list(res.masks), label)
    written.append(atomic_write(output / f"{stem}_overlay.png", lambda p: ov.save(p, format="PNG")))
    payload = {"image": str(image), "model": seg.name, **res.to_json()}
    written.append(atomic_write(output / f"{stem}.json", lambda p: Path(p).write_text(json.dumps(payload, indent=1))))
    for p, s, n in zip(res.phrases, res.scores, res.no_target):
        print(f"{p!r}: " + ("no matching object" if n else f"mask, score {s:.3f}"))
    for w in written:
        print(f"wrote {w}")


@app.command()
def train(
    config: str = typer.Argument(..., help="Variant name (e.g. ssp-sam-vitb) or a YAML config path."),
    data: Path = typer.Option(..., "--data", help="Data root in the refer / gRefCOCO layout."),
    out: Path = typer.Option(Path("runs/ssp-sam"), "--out", help="Run folder: last.pt (resumable), model.pt, log.jsonl."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="refcoco | refcoco+ | refcocog | grefcoco | phrasecut | refcoco-merged (default: refcoco; official stage 1: refcoco-merged)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Optimiser steps to reach, counting steps done before --resume (default 1000; official recipe: the whole stage)."),
    stage: Optional[int] = typer.Option(None, "--stage", help="Official recipe: 1 = box-only pretraining on merged RefCOCO/+/g, 2 = full training (default)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Official recipe: epochs of the stage (default 20 / 80, as the official configs)."),
    init: Optional[Path] = typer.Option(None, "--init", help="Initialise from a model.pt (official stage 2: stage 1's)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Samples per step per process (the paper: 8 per GPU)."),
    lr: float = typer.Option(1e-4, "--lr", help="Learning rate of the SSP encoder (paper 1e-4)."),
    decoder_lr: float = typer.Option(1e-5, "--decoder-lr", help="Learning rate of SAM's mask decoder (paper 1e-5)."),
    resume: bool = typer.Option(False, "--resume", help="Continue bit-exactly from OUT/last.pt."),
    ckpt_every: int = typer.Option(500, "--ckpt-every", help="Steps between atomic checkpoints."),
    precision: str = typer.Option("fp32", "--precision", help="fp32 | bf16 (autocast)."),
    device: str = typer.Option("cpu", "--device", help="torch device; under torchrun each rank uses its local GPU."),
    grad_accum: int = typer.Option(1, "--grad-accum", help="Micro-batches per optimiser step."),
    total_steps: Optional[int] = typer.Option(None, "--total-steps", help="Length of the LR schedule (default: --steps); keep it fixed across resumes."),
    seed: int = typer.Option(3407, "--seed", help="Seed (the official recipe: 3407)."),
) -> None:
    """Train SSP-SAM (backbones frozen as in the paper). Multi-GPU: torchrun --nproc_per_node N -m sspsam.cli train ..."""
    from .config import load_config
    from .recipe import is_official
    from .trainer import train as run_training

    try:
        cfg = load_config(config)
        if steps is None and not is_official(cfg):
            steps = 1000
        res = run_training(cfg, data, out, dataset=dataset, steps=steps, batch_size=batch_size, lr=lr,
                           decoder_lr=decoder_lr, resume=resume, ckpt_every=ckpt_every, precision=precision, device=device,
                           grad_accum=grad_accum, total_steps=total_steps, seed=seed, progress=True,
                           stage=stage, epochs=epochs, init=init)
    except SSPSamError as exc:
        _fail(exc)
    print(f"trained to step {res['step']}; model: {res['model']}")


@app.command()
def evaluate(
    model: str = typer.Argument(..., help="Checkpoint path (e.g. runs/x/model.pt), bundled model name, or variant with weights in the cache."),
    data: Path = typer.Option(..., "--data", help="Dataset root (refer / gRefCOCO / PhraseCut layout)."),
    dataset: str = typer.Option("refcoco", "--dataset", help="refcoco | refcoco+ | refcocog | grefcoco | phrasecut; OVSS: semseg | ade150 | ade847 | voc20 | voc21 | pc59 | pc459 | cocostuff171."),
    split: str = typer.Option("val", "--split", help="val | testA | testB | test (refer), val/testA/testB (gRefCOCO), val/test (PhraseCut)."),
    split_by: Optional[str] = typer.Option(None, "--split-by", help="refer split scheme: unc (RefCOCO/+), umd or google (RefCOCOg)."),
    output: Path = typer.Option(Path("eval"), "-o", "--output", help="Folder for metrics.json, table.md and pr_curve.png."),
    max_samples: Optional[int] = typer.Option(None, "--max-samples", help="Stop after this many (image, sentence) samples."),
    device: str = typer.Option("cpu", "--device", help="torch device."),
    protocol: str = typer.Option("detectron2", "--protocol", help="OVSS only: detectron2 (trained protocol) | mmseg (training-free protocol)."),
    slide: bool = typer.Option(False, "--slide/--no-slide", help="OVSS only: sliding-window inference (plus a global view)."),
) -> None:
    """Evaluate with the reference metrics: RES mIoU/oIoU/Pr@X, GRES gIoU/cIoU/N-acc/T-acc, PhraseCut, OVSS mIoU."""
    from rich.progress import Progress

    from . import evaluate as ev
    from .predictor import Segmenter

    if dataset in ev.SEMSEG_DATASETS:
        return _evaluate_ovss(model, data, dataset, split, output, max_samples, device, protocol, slide)
    try:
        task = ev.task_of(dataset)
        seg = Segmenter.from_pretrained(model, device=device)
        ds = ev.open_dataset(dataset, data, split, seg.model.image_size, split_by)
        with Progress(console=err, transient=True) as bar:
            job = bar.add_task(f"{dataset} {split}", total=len(ds) if max_samples is None else min(len(ds), max_samples))
            res = ev.evaluate(seg, ds, task, max_samples=max_samples, progress=lambda d, t: bar.update(job, completed=d))
        files = ev.write_report(output, res, task, dataset, split, seg.name)
    except (SSPSamError, RuntimeError) as exc:
        _fail(exc)
    print(ev.markdown_table(res["metrics"], task, dataset, split, seg.name), end="")
    print(f"{res['n']} samples in {res['seconds']:.1f} s")
    for f in files.values():
        print(f"wrote {f}")


def _evaluate_ovss(model, data, dataset, split, output, max_samples, device, protocol, slide) -> None:
    from . import evaluate as ev
    from .ovss.evaluate import evaluate_ovss, format_iou_table
    from .ovss.predictor import OVSS

    try:
        ovss = OVSS.from_pretrained(model, device=device)
        ds = ev.open_semseg(dataset, data, split)
        res = evaluate_ovss(ovss.model, ds, protocol=protocol, slide=slide, limit=max_samples)
    except (SSPSamError, RuntimeError, ValueError) as exc:
        _fail(exc)
    output.mkdir(parents=True, exist_ok=True)
    table = format_iou_table(res)
    payload = {"model": ovss.name, "dataset": dataset, "split": split, "protocol": protocol, "slide": slide,
               "metrics": {k: v for k, v in res.items() if k != "per_class_iou"}}
    written = [
        atomic_write(output / "metrics.json", lambda p: Path(p).write_text(json.dumps(ev.json_safe(payload), indent=1, default=float))),
        atomic_write(output / "table.md", lambda p: Path(p).write_text(table + "\n")),
    ]
    print(f"{ovss.name} · {dataset} {split}: mIoU {100 * res['mIoU']:.2f}, pixel acc {100 * res['pACC']:.2f}")
    for w in written:
        print(f"wrote {w}")


@app.command()
def models() -> None:
    """List bundled models and model variants (configs)."""
    from .config import list_configs
    from .predictor import BUNDLED

    for name in BUNDLED:
        print(f"{name}\tbundled (trained on synthetic shapes; a demo, not for real photos)")
    for name in list_configs():
        print(f"{name}\tvariant (needs weights: `sspsam weights list`)")


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
