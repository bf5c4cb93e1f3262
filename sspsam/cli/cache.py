"""`sspsam cache-features`: run SAM's frozen image encoder once over a training set, for
`sspsam train --cached-features DIR` (the official SSP-SAM code trains on cached embeddings too)
(SSP-SAM and SAM-MI configs alike; for SAM-MI also `python -m sspsam.engine.train_ovss ... --cached-features DIR`).

Registered by ``sspsam/cli/main.py`` as ``app.command("cache-features")(cli_cache.cache_features)``.
torch and the model code load inside the command, so `sspsam --help` stays instant. The cache
format, its identity checks and why the default is fp16 live in :mod:`sspsam.engine.feature_cache`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from sspsam.cli.common import (apply_threads, check_speed_options, device_option, fail, go_offline, offline_option,
                               threads_option)
from sspsam.errors import SSPSamError

DTYPES = {"fp16": "float16", "float16": "float16", "fp32": "float32", "float32": "float32"}


def cache_features(
    config: str = typer.Argument(..., help="Variant name (e.g. ssp-sam-vitb) or a YAML config path: the one you will train."),
    data: Path = typer.Option(..., "--data", help="Data root in the refer / gRefCOCO layout (as for `sspsam train`); SAM-MI: the semseg folder."),
    out: Path = typer.Option(..., "-o", "--output", "--out", help="Cache folder (new, empty, or a cache this same command started: it is finished)."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="As `sspsam train --dataset` (default: refcoco; official recipe: stage 2's)."),
    init: Optional[Path] = typer.Option(None, "--init", help="The --init model.pt training will use (its SAM weights are the ones cached)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="The --seed training will use (random-init weights depend on it; default: the trainer's, 3407 for SSP-SAM, 0 for SAM-MI)."),
    dtype: str = typer.Option("fp16", "--dtype", help="fp16 (half the disk; losses differ from uncached training by the rounding) | fp32 (exactly the uncached losses)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Images per encoder forward."),
    shard_size: int = typer.Option(64, "--shard-size", help="Images per shard file (a killed run redoes at most one shard)."),
    device: str = device_option(),
    offline: bool = offline_option(),
    threads: Optional[int] = threads_option(" Default here: torch's own."),
) -> None:
    """Write SAM image embeddings of every training image once (memory-mapped .npy shards, resumable).

    Run it again with the same arguments after an interruption: finished shards are kept, the rest
    are written, and the result is the same files. Then train with the same config, --data,
    --dataset, --seed and --init plus `--cached-features OUT`.
    """
    try:  # cheap checks first: a typo should not wait for a model to build
        if dtype.lower() not in DTYPES:
            raise SSPSamError(f"--dtype must be fp16 or fp32, got {dtype!r}")
        if batch_size < 1 or shard_size < 1:
            raise SSPSamError(f"--batch-size and --shard-size must be >= 1, got {batch_size} and {shard_size}")
        if not data.is_dir():
            raise SSPSamError(f"data root {data} is not a folder")
        if out.exists() and not out.is_dir():
            raise SSPSamError(f"output {out} exists and is not a folder; give -o a folder for the cache")
        if init is not None and not init.is_file():
            raise SSPSamError(f"--init checkpoint not found: {init}")
        from sspsam.config import load_config
        from sspsam.models import registry

        cfg = load_config(config)
        method = registry.for_config(cfg)
        kind = method.name
        ovss = method.task == registry.OVSS
        if not method.trains:
            raise SSPSamError(f"config '{cfg.get('name')}' is a {kind} model, which is not trained: nothing to cache")
        if ovss and (dataset is not None or init is not None):
            raise SSPSamError(f"--dataset and --init are for SSP-SAM; a {kind} model trains on the semseg folder --data")
        from sspsam.predict.device import resolve_device

        dev = str(resolve_device(device))
        go_offline(offline)
        if threads is not None:
            check_speed_options(threads, "none")
            apply_threads(threads)

        def progress(done: int, total: int) -> None:
            print(f"{done}/{total} rows", flush=True)

        common = dict(batch_size=batch_size, shard_size=shard_size, dtype=DTYPES[dtype.lower()], device=dev, progress=progress)
        if ovss:  # trained by `sspsam train sam-mi-… --cached-features OUT` (its --seed default: 0)
            from sspsam.engine.train_ovss import build_ovss_feature_cache

            info = build_ovss_feature_cache(cfg, data, out, seed=method.seed if seed is None else seed, **common)
        else:
            from sspsam.engine.trainer import build_feature_cache

            info = build_feature_cache(cfg, data, out, dataset=dataset, seed=method.seed if seed is None else seed, init=init, **common)
    except SSPSamError as exc:
        raise fail(exc)
    except OSError as exc:  # disk full, permission denied on the cache folder
        raise fail(exc)
    shape = "x".join(str(s) for s in info["shape"])
    views = len(info["views"])
    what = f"{info['rows']} images" if views == 1 else f"{info['rows'] // views} images x {views} views ({', '.join(info['views'])})"
    print(f"cache {out}: {what}, {info['shards']} shards of {shape} {info['dtype']} "
          f"({info['written']} written, {info['kept']} kept from an earlier run)")
