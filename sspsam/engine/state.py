"""What makes a killed run continue bit-exactly: every RNG state, the sampler's position, the
trainable weights in ``last.pt``, and the run folder's files (so a fresh run knows what it replaces).

Everything random is drawn from the global torch/numpy/random generators (model init, dropout,
augmentation; ``num_workers=0``) or from the sampler's own ``torch.Generator``; all of them are
saved, and the data position is saved as (epoch-start sampler state, micro-batches consumed), so
the loss sequence after a resume equals that of the uninterrupted run on the same machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler

from sspsam.errors import CheckpointError
from sspsam.io.checkpoint import atomic_write, torch_load

STATE_VERSION = 1
LAST = "last.pt"
LOG = "log.jsonl"
MODEL = "model.pt"
RUN_FILES = (LAST, LOG, MODEL, "tb")


# ----------------------------------------------------------------------------------------------
# seeding and RNG state


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def rng_state(sampler_gen: torch.Generator) -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    out = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "random": _to_lists(random.getstate()),
        "sampler": sampler_gen.get_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def _to_lists(x):
    return [_to_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _to_tuples(x):
    return tuple(_to_tuples(v) for v in x) if isinstance(x, (tuple, list)) else x


def set_rng_state(state: dict, sampler_gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    random.setstate(_to_tuples(state["random"]))
    sampler_gen.set_state(state["sampler"])
    if "cuda" in state and torch.cuda.is_available():
        with contextlib.suppress(Exception):
            torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------
# data position


class ResumableSampler(Sampler[int]):
    """A random permutation per epoch from its own generator, sharded by rank (as
    DistributedSampler with drop_last), that can skip the samples already consumed.

    ``epoch_state`` is the generator state the current epoch's permutation was drawn from; with it
    and the number of samples consumed the exact position in the data stream is restored."""

    def __init__(self, n: int, generator: torch.Generator, rank: int = 0, world_size: int = 1) -> None:
        self.n, self.generator, self.rank, self.world_size = n, generator, rank, world_size
        self.per_rank = n // world_size
        self.skip = 0
        self.epoch_state: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.per_rank - self.skip

    def __iter__(self) -> Iterator[int]:
        self.epoch_state = self.generator.get_state()
        perm = torch.randperm(self.n, generator=self.generator).tolist()
        mine = perm[: self.per_rank * self.world_size][self.rank :: self.world_size]
        skip, self.skip = self.skip, 0
        return iter(mine[skip:])


# ----------------------------------------------------------------------------------------------
# last.pt


def trainable_state(model, frozen: list[str]) -> dict[str, torch.Tensor]:
    """The weights ``last.pt`` holds: frozen towers are rebuilt from their own weights on resume."""
    prefixes = tuple(f"{p}." for p in frozen)
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith(prefixes)}


def read_train_state(path: str | os.PathLike) -> dict:
    """Load ``last.pt``; a missing, truncated, corrupt or foreign file raises CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no training checkpoint to resume from: {path} does not exist")
    obj = torch_load(path, "training checkpoint", "delete it to start over")
    need = ("sspsam_train", "step", "model", "optimizer", "scheduler", "rng", "data")
    if not isinstance(obj, dict) or any(k not in obj for k in need):
        raise CheckpointError(f"{path} is not an sspsam training checkpoint (missing {', '.join(k for k in need if k not in (obj if isinstance(obj, dict) else {}))})")
    if obj["sspsam_train"] > STATE_VERSION:
        raise CheckpointError(f"{path} was written by a newer sspsam (training state {obj['sspsam_train']})")
    return obj


def truncate_log(path: Path, last_step: int) -> None:
    """Drop the log lines a killed run wrote past its checkpoint (and a half-written last line)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if int(rec.get("step", 0)) <= last_step:
            keep.append(line)
    text = "".join(f"{x}\n" for x in keep)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


# ----------------------------------------------------------------------------------------------
# the run folder


def existing_run(out_dir: Path) -> list[str]:
    """The files of an earlier run in ``out_dir`` (what a fresh run would replace)."""
    out_dir = Path(out_dir)
    return [n for n in RUN_FILES if (out_dir / n).exists()] if out_dir.is_dir() else []


def remove_run(out_dir: Path, keep: set = frozenset(), remove_dir: bool = False) -> None:
    for name in set(existing_run(out_dir)) - set(keep):
        p = out_dir / name
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    if remove_dir:
        with contextlib.suppress(OSError):
            out_dir.rmdir()  # only when empty
