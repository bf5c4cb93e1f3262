"""`sspsam train CONFIG --data ROOT --out DIR`: train a model (torchrun for DDP), resumable with --resume.

SSP-SAM configs train on a referring data set (:func:`sspsam.engine.trainer.train`); ESC-Net and
SAM-MI configs on a semseg folder (:func:`sspsam.engine.train_ovss.train_ovss`). Both run the same
loop, so DDP, --resume, --precision, --grad-accum and --ckpt-every mean the same for every model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from sspsam.cli.common import (abort, apply_threads, check_speed_options, device_option, go_offline, offline_option,
                               threads_option)
from sspsam.errors import SSPSamError

SET_HELP = "Override a config value: section.key=value (repeatable; the value read as YAML, e.g. --set train.lr=1e-4)."


def _check_options(out: Path, steps, batch_size, grad_accum, total_steps, epochs, stage, lr, decoder_lr, precision,
                   resume: bool, overwrite: bool) -> None:
    """What can be refused from the command line alone, before a config, data set or model is read."""
    import math

    from sspsam.errors import OptionError

    for name, value in (("--steps", steps), ("--batch-size", batch_size), ("--grad-accum", grad_accum),
                        ("--total-steps", total_steps), ("--epochs", epochs)):
        if value is not None and value < 1:
            raise OptionError(f"{name} must be >= 1, got {value}")
    if stage is not None and stage not in (1, 2):
        raise OptionError(f"--stage must be 1 or 2, got {stage}")
    for name, value in (("--lr", lr), ("--decoder-lr", decoder_lr)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise OptionError(f"{name} must be a positive finite number, got {value}")
    if precision not in ("fp32", "bf16"):
        extra = " (fp16 needs loss scaling, which sspsam's loop does not do; bf16 has fp32's range)" if precision == "fp16" else ""
        raise OptionError(f"--precision must be fp32 or bf16, got {precision!r}{extra}")
    if resume and overwrite:
        raise OptionError("--resume continues the run in the output folder and --overwrite replaces it: give one")
    if out.exists() and not out.is_dir():
        raise OptionError(f"output {out} exists and is not a folder; give --out a folder")
    if not resume and not overwrite:
        from sspsam.engine.trainer import existing_run

        found = existing_run(out)
        if found:
            raise OptionError(f"{out} already holds a run ({', '.join(found)}): add --resume to continue it "
                              "or --overwrite to replace it, or give another --out")


def train(
    config: str = typer.Argument(..., help="Variant name (e.g. ssp-sam-vitb, escnet-tiny, sam-mi-vitb) or a YAML config path."),
    data: Path = typer.Option(..., "--data", help="Data root: the refer / gRefCOCO layout (SSP-SAM) or a semseg folder (ESC-Net, SAM-MI)."),
    out: Path = typer.Option(Path("runs/ssp-sam"), "-o", "--output", "--out", help="Run folder: last.pt (resumable), model.pt, log.jsonl."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="SSP-SAM: refcoco | refcoco+ | refcocog | grefcoco | phrasecut | refcoco-merged (default: refcoco; official stage 1: refcoco-merged)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Optimiser steps to reach, counting steps done before --resume (default 1000; official recipe: the whole stage)."),
    stage: Optional[int] = typer.Option(None, "--stage", help="Official recipe: 1 = box-only pretraining on merged RefCOCO/+/g, 2 = full training (default)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Official recipe: epochs of the stage (default 20 / 80, as the official configs)."),
    init: Optional[Path] = typer.Option(None, "--init", help="SSP-SAM: initialise from a model.pt (official stage 2: stage 1's)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Samples per step per process (the paper: 8 per GPU)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Learning rate of the new modules (SSP-SAM's SSP encoder: default 1e-4 as the paper; ESC-Net / SAM-MI: default the config's train.lr)."),
    decoder_lr: Optional[float] = typer.Option(None, "--decoder-lr", help="SSP-SAM: learning rate of SAM's mask decoder (default 1e-5 as the paper)."),
    resume: bool = typer.Option(False, "--resume", help="Continue bit-exactly from OUT/last.pt."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier run in OUT (its last.pt, model.pt, log.jsonl, tb/) once the data and model are accepted."),
    ckpt_every: int = typer.Option(500, "--ckpt-every", help="Steps between atomic checkpoints."),
    precision: str = typer.Option("fp32", "--precision", help="fp32 | bf16 (autocast)."),
    device: str = device_option(" Under torchrun each rank uses its local GPU."),
    offline: bool = offline_option(),
    threads: Optional[int] = threads_option(" Default for training: torch's own."),
    grad_accum: int = typer.Option(1, "--grad-accum", help="Micro-batches per optimiser step."),
    total_steps: Optional[int] = typer.Option(None, "--total-steps", help="Length of the LR schedule (default: --steps); keep it fixed across resumes."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed (default 3407 for SSP-SAM, as the official recipe; 0 for ESC-Net / SAM-MI)."),
    cached_features: Optional[Path] = typer.Option(None, "--cached-features", help="Read SAM's image embeddings from a folder `sspsam cache-features` wrote (same config, data, dataset, seed, init) instead of running the encoder (SSP-SAM, SAM-MI)."),
    overrides: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
) -> None:
    """Train SSP-SAM (backbones frozen as in the paper), ESC-Net or SAM-MI. Multi-GPU: torchrun --nproc_per_node N -m sspsam.cli.main train ..."""
    try:
        _check_options(out, steps, batch_size, grad_accum, total_steps, epochs, stage, lr, decoder_lr, precision,
                       resume, overwrite)
        from sspsam.config import apply_overrides, load_config
        from sspsam.models import registry
        from sspsam.predict.device import resolve_device

        cfg = apply_overrides(load_config(config), overrides or [])
        method = registry.get(registry.validate(cfg).model)
        kind = method.name
        if not method.trains:
            raise SSPSamError(f"config '{cfg.get('name')}' is a {kind} model, which is not trained (training-free)")
        if ckpt_every < 1:
            raise SSPSamError(f"--ckpt-every must be >= 1, got {ckpt_every}")
        dev = str(resolve_device(device))
        go_offline(offline)
        if threads is not None:
            check_speed_options(threads, "none")
            apply_threads(threads)
        common = dict(resume=resume, overwrite=overwrite, precision=precision, device=dev, grad_accum=grad_accum, total_steps=total_steps,
                      progress=True, cached_features=cached_features)
        if method.task == registry.OVSS:
            given = [name for name, v in (("--dataset", dataset), ("--stage", stage), ("--epochs", epochs),
                                          ("--init", init), ("--decoder-lr", decoder_lr)) if v is not None]
            if given:
                raise SSPSamError(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} for SSP-SAM; a {kind} model "
                                  "trains on the semseg folder --data")
            from sspsam.engine.train_ovss import train_ovss

            res = train_ovss(cfg, data, out, steps=1000 if steps is None else steps, batch_size=batch_size,
                             lr=method.lr if lr is None else lr, seed=method.seed if seed is None else seed,
                             save_every=ckpt_every, log_every=0, **common)
            step, model = res["steps"], res["checkpoint"]
        else:
            from sspsam.engine.recipe import is_official
            from sspsam.engine.trainer import train as run_training

            if steps is None and not is_official(cfg):
                steps = 1000
            res = run_training(cfg, data, out, dataset=dataset, steps=steps, batch_size=batch_size,
                               lr=method.lr if lr is None else lr, decoder_lr=method.decoder_lr if decoder_lr is None else decoder_lr,
                               ckpt_every=ckpt_every, seed=method.seed if seed is None else seed, stage=stage, epochs=epochs,
                               init=init, **common)
            step, model = res["step"], res["model"]
    except SSPSamError as exc:
        abort(exc)
    print(f"trained to step {step}; model: {model}")
