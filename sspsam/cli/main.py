"""`sspsam` command line: segment, ovss, evaluate, train, cache-features, serve, batch, weights, models,
export.

Only typer and click load at start-up: torch, numpy and the model code are imported inside the
command that needs them, so `sspsam --help` answers at once. Every error is one `error: …` line
on stderr with exit code 2 (``cli_common.Group``).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Optional

import typer

import sspsam.cli.batch as cli_batch
import sspsam.cli.cache as cli_cache
import sspsam.cli.export as cli_export
import sspsam.cli.ovss as cli_ovss
import sspsam.cli.serve as cli_serve
import sspsam.cli.weights as cli_weights
from sspsam import __version__
from sspsam.cli.common import (
    QUANTIZE_HELP,
    THREADS_HELP,
    Group,
    apply_quantize,
    apply_threads,
    check_input_file,
    check_output_dir,
    check_speed_options,
    _offline,
    fail,
    output_stem,
    say_warning,
)
from sspsam.errors import SSPSamError, TextError

DEVICE_HELP = "torch device: auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:1, mps."
_OPTION_LIKE = re.compile(r"--?[A-Za-z][\w-]*(=.*)?|--?")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"sspsam {__version__}")
        raise typer.Exit()


app = typer.Typer(
    cls=Group,
    rich_markup_mode=None,
    help="Language-guided segmentation with SAM and CLIP (SSP-SAM).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the sspsam version and exit."),
) -> None:
    """Language-guided segmentation with SAM and CLIP (SSP-SAM)."""




def _fail(exc: Exception) -> None:
    raise fail(exc)


def _check_phrases(texts: list[str]) -> None:
    """Catch the two ways a command line silently turns into a wrong phrase."""
    from PIL import Image

    image_suffixes = set(Image.registered_extensions())
    for t in texts:
        if _OPTION_LIKE.fullmatch(t.strip()):
            raise TextError(f"'{t}' looks like an option, not a phrase: put options such as -o DIR before `--` "
                            "or give them their value (`-o out/`)")
        try:
            is_file = len(t) < 4096 and Path(t).suffix.lower() in image_suffixes and Path(t).is_file()
        except (OSError, ValueError):
            is_file = False
        if is_file:
            raise TextError(f"'{t}' is a file, not a phrase: `sspsam segment` takes ONE image and then phrases; "
                            "did you mean `sspsam batch` (many images)?")


@app.command()
def segment(
    image: Path = typer.Argument(..., help="Image file (JPEG, PNG, TIFF, WebP…; EXIF orientation is applied)."),
    text: list[str] = typer.Argument(..., help="One or more phrases, each quoted: \"the man holding the baby\"."),
    output: Path = typer.Option(Path("out"), "-o", "--output", help="Folder for <name>.segment.json, .segment.overlay.png and .segment.mask<i>.png."),
    model: str = typer.Option("shapes-demo", "--model", "-m", help="Bundled model name, variant name, 'zeroshot' or a checkpoint path (see `sspsam models`)."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    offline: bool = typer.Option(False, "--offline", help="Never download missing weights (also: SSPSAM_OFFLINE=1)."),
    threads: Optional[int] = typer.Option(None, "--threads", help=THREADS_HELP),
    quantize: str = typer.Option("none", "--quantize", help=QUANTIZE_HELP),
) -> None:
    """Segment what each phrase refers to.

    Writes, for IMAGE named <name>.<ext>: <name>.segment.json (COCO RLE per phrase, scores, no-target flags,
    COCO bbox [x, y, w, h] and the separate objects ("instances", each with bbox, score and RLE), warnings), <name>.segment.overlay.png and one 0/255 mask per phrase, <name>.segment.mask0.png, mask1, …
    in phrase order — the same names for one phrase or many.
    """
    try:  # cheap checks first: a bad image or phrase should not wait for a model to load
        check_input_file(image)
        _check_phrases(text)
        check_speed_options(threads, quantize)
        from sspsam.predict.device import resolve_device
        from sspsam.io.images import load_image
        from sspsam.predict.segmenter import Segmenter
        from sspsam.predict.results import clean_phrases

        phrases = clean_phrases(text)
        rgb = load_image(image, len(phrases))
        dev = resolve_device(device)
        check_output_dir(output, create=False)
        apply_threads(threads)
        with _offline(offline):
            seg = Segmenter.from_pretrained(model, device=str(dev))
        apply_quantize(seg, quantize)
        res = seg.segment(rgb, phrases)
    except SSPSamError as exc:
        _fail(exc)
    _write_segment(image, output, seg.name, rgb, res)


def _write_segment(image: Path, output: Path, model_name: str, rgb, res) -> None:
    import json

    import numpy as np
    from PIL import Image

    from sspsam.io.checkpoint import atomic_write
    from sspsam.io.masks import segmentation_overlay

    for w in res.warnings:
        say_warning(w)
    stem = output_stem(image)
    masks = [f"{stem}.segment.mask{i}.png" for i in range(len(res))]
    try:
        check_output_dir(output)
        written = []
        for i, name in enumerate(masks):
            mask_png = Image.fromarray(res.masks[i].astype(np.uint8) * 255)
            written.append(atomic_write(output / name, lambda p, im=mask_png: im.save(p, format="PNG")))
        ov = segmentation_overlay(rgb, res.phrases, res.masks, res.scores, res.no_target)
        written.append(atomic_write(output / f"{stem}.segment.overlay.png", lambda p: ov.save(p, format="PNG")))
        payload = {"image": str(image), "model": model_name, **res.to_json()}
        for r, name in zip(payload["results"], masks):
            r["mask_file"] = name
        written.append(atomic_write(output / f"{stem}.segment.json", lambda p: Path(p).write_text(json.dumps(payload, indent=1))))
    except (OSError, SSPSamError) as exc:
        _fail(exc)
    for p, s, n, inst in zip(res.phrases, res.scores, res.no_target, res.instances):
        boxes = "; ".join(",".join(str(int(round(float(v)))) for v in b) for b in inst.boxes)
        print(f"{p!r}: " + ("no matching object" if n else
                            f"mask, score {s:.3f}, {len(inst)} object{'s' * (len(inst) != 1)} (boxes x0,y0,x1,y1: {boxes})"))
    for w in written:
        print(f"wrote {w}")




app.command("ovss")(cli_ovss.ovss)
app.command("batch")(cli_batch.batch)
app.command("serve")(cli_serve.serve)


@app.command()
def train(
    config: str = typer.Argument(..., help="Variant name (e.g. ssp-sam-vitb) or a YAML config path."),
    data: Path = typer.Option(..., "--data", help="Data root in the refer / gRefCOCO layout."),
    out: Path = typer.Option(Path("runs/ssp-sam"), "-o", "--output", "--out", help="Run folder: last.pt (resumable), model.pt, log.jsonl."),
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
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP + " Under torchrun each rank uses its local GPU."),
    grad_accum: int = typer.Option(1, "--grad-accum", help="Micro-batches per optimiser step."),
    total_steps: Optional[int] = typer.Option(None, "--total-steps", help="Length of the LR schedule (default: --steps); keep it fixed across resumes."),
    seed: int = typer.Option(3407, "--seed", help="Seed (the official recipe: 3407)."),
    cached_features: Optional[Path] = typer.Option(None, "--cached-features", help="Read SAM's image embeddings from a folder `sspsam cache-features` wrote (same config, data, dataset, seed, init) instead of running the encoder."),
) -> None:
    """Train SSP-SAM (backbones frozen as in the paper). Multi-GPU: torchrun --nproc_per_node N -m sspsam.cli.main train ..."""
    try:
        from sspsam.config import load_config
        from sspsam.predict.device import resolve_device
        from sspsam.engine.recipe import is_official
        from sspsam.engine.trainer import train as run_training

        dev = str(resolve_device(device))
        cfg = load_config(config)
        if steps is None and not is_official(cfg):
            steps = 1000
        res = run_training(cfg, data, out, dataset=dataset, steps=steps, batch_size=batch_size, lr=lr,
                           decoder_lr=decoder_lr, resume=resume, ckpt_every=ckpt_every, precision=precision, device=dev,
                           grad_accum=grad_accum, total_steps=total_steps, seed=seed, progress=True,
                           stage=stage, epochs=epochs, init=init, cached_features=cached_features)
    except SSPSamError as exc:
        _fail(exc)
    print(f"trained to step {res['step']}; model: {res['model']}")


app.command("cache-features")(cli_cache.cache_features)


@app.command()
def evaluate(
    model: str = typer.Argument(..., help="Checkpoint path (e.g. runs/x/model.pt), bundled model name, or variant with weights in the cache."),
    data: Path = typer.Option(..., "--data", help="Dataset root (refer / gRefCOCO / PhraseCut layout)."),
    dataset: str = typer.Option("refcoco", "--dataset", help="refcoco | refcoco+ | refcocog | grefcoco | phrasecut; OVSS: semseg | ade150 | ade847 | voc20 | voc21 | pc59 | pc459 | cocostuff171."),
    split: str = typer.Option("val", "--split", help="val | testA | testB | test (refer), val/testA/testB (gRefCOCO), val/test (PhraseCut)."),
    split_by: Optional[str] = typer.Option(None, "--split-by", help="refer split scheme: unc (RefCOCO/+), umd or google (RefCOCOg)."),
    output: Path = typer.Option(Path("eval"), "-o", "--output", help="Folder for metrics.json, table.md and pr_curve.png."),
    max_samples: Optional[int] = typer.Option(None, "--max-samples", help="Stop after this many (image, sentence) samples."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    offline: bool = typer.Option(False, "--offline", help="Never download missing weights (also: SSPSAM_OFFLINE=1)."),
    protocol: str = typer.Option("detectron2", "--protocol", help="OVSS only: detectron2 (trained protocol) | mmseg (mmseg's metric) | sclip (SCLIP's whole inference protocol + mmseg's metric)."),
    slide: bool = typer.Option(False, "--slide/--no-slide", help="OVSS only: sliding-window inference (plus a global view)."),
    class_names: Optional[Path] = typer.Option(None, "--class-names", help="--protocol sclip: SCLIP class-name file, one class per line, synonyms split by ', '."),
    prob_thd: float = typer.Option(0.0, "--prob-thd", help="--protocol sclip: pixels whose best class probability is below this become class 0 (SCLIP: 0.1 with a background class)."),
    area_thd: Optional[float] = typer.Option(None, "--area-thd", help="--protocol sclip: drop non-background classes covering less than this fraction of the image."),
) -> None:
    """Evaluate with the reference metrics: RES mIoU/oIoU/Pr@X, GRES gIoU/cIoU/N-acc/T-acc, PhraseCut, OVSS mIoU."""
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import Progress

    import sspsam.engine.evaluate as ev
    from sspsam.predict.device import resolve_device
    from sspsam.predict.segmenter import Segmenter

    try:
        device = str(resolve_device(device))
    except SSPSamError as exc:
        _fail(exc)
    if dataset in ev.SEMSEG_DATASETS:
        sclip = {"class_names": class_names, "prob_thd": prob_thd, "area_thd": area_thd}
        return _evaluate_ovss(model, data, dataset, split, output, max_samples, device, protocol, slide, sclip, offline)
    try:
        task = ev.task_of(dataset)
        with _offline(offline):
            seg = Segmenter.from_pretrained(model, device=device)
        ds = ev.open_dataset(dataset, data, split, seg.model.image_size, split_by)
        with Progress(console=Console(stderr=True), transient=True) as bar:
            job = bar.add_task(escape(f"{dataset} {split}"), total=len(ds) if max_samples is None else min(len(ds), max_samples))
            res = ev.evaluate(seg, ds, task, max_samples=max_samples, progress=lambda d, t: bar.update(job, completed=d))
        files = ev.write_report(output, res, task, dataset, split, seg.name)
    except SSPSamError as exc:
        _fail(exc)
    print(ev.markdown_table(res["metrics"], task, dataset, split, seg.name), end="")
    print(f"{res['n']} samples in {res['seconds']:.1f} s")
    for f in files.values():
        print(f"wrote {f}")


def _evaluate_ovss(model, data, dataset, split, output, max_samples, device, protocol, slide, sclip=None, offline=False) -> None:
    import json

    from sspsam.io.checkpoint import atomic_write
    import sspsam.engine.evaluate as ev
    from sspsam.engine.evaluate_ovss import evaluate_ovss, format_iou_table
    from sspsam.predict.ovss import OVSS

    sclip = dict(sclip or {})
    try:
        if protocol not in ("detectron2", "mmseg", "sclip"):
            raise ValueError(f"unknown --protocol {protocol!r}; choose detectron2, mmseg or sclip")
        classes = None
        if (path := sclip.pop("class_names", None)) is not None:
            if protocol != "sclip":
                raise ValueError("--class-names is for --protocol sclip")
            from sspsam.models.zeroshot.sclip import read_class_names

            names, idx = read_class_names(path)
            classes = [", ".join(n for n, i in zip(names, idx) if i == k) for k in range(max(idx) + 1)]
        with _offline(offline):
            ovss = OVSS.from_pretrained(model, device=device)
        ds = ev.open_semseg(dataset, data, split)
        res = evaluate_ovss(ovss.model, ds, protocol=protocol, slide=slide, limit=max_samples, classes=classes,
                            sclip_options=sclip if protocol == "sclip" else None)
    except (SSPSamError, ValueError) as exc:
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
    """List every model each command accepts, and whether the weights it needs are here.

    bundled: shipped inside sspsam. zeroshot: pretrained CLIP + SAM, nothing trained. variant: an
    architecture whose trained checkpoint you pass by path (`sspsam train` makes one).
    """
    from sspsam.predict.catalog import catalog

    rows = catalog()
    width = max(len(r["name"]) for r in rows)
    for command in ("segment", "ovss"):
        print(f"sspsam {command} --model …")
        for r in rows:
            if command in r["commands"]:
                print(f"  {r['name']:<{width}}  {r['kind']:<8}  {r['weights']}")
    print("Any sspsam checkpoint path works too. Weights: `sspsam weights list`; missing ones are downloaded "
          "on first use unless --offline / SSPSAM_OFFLINE=1.")


app.add_typer(cli_weights.app, name="weights", help="List, fetch, import and verify checkpoint files (offline-friendly).")
app.add_typer(cli_export.app, name="export", help="Export a model to ONNX (`sspsam export onnx MODEL -o DIR`).")


def main() -> None:  # pragma: no cover - console entry
    app(prog_name="sspsam")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
