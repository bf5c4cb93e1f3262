"""`sspsam train CONFIG --data ROOT --out DIR`: train a model (torchrun for DDP), resumable with --resume."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from sspsam.cli.common import DEVICE_HELP, _fail
from sspsam.errors import SSPSamError

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
