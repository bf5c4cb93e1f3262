"""The training loop of every method: seeded, resumable bit-exactly from ``last.pt``, optionally distributed.

One loop (:func:`fit`) trains every method; a method family is a :class:`TrainTask` that supplies
its model, data set and collate, optimizer groups, schedule and loss dict, and how its final model
is saved: :class:`ReferringTask` (SSP-SAM, :func:`train`) here, ``OVSSTask`` (ESC-Net, SAM-MI,
:func:`sspsam.engine.train_ovss.train_ovss`) in :mod:`sspsam.engine.train_ovss`. The loop owns
seeding, the sampler's position and epoch, the RNG states, the optimizer and scheduler state, DDP,
AMP, gradient accumulation, TensorBoard, the progress bar, atomic ``last.pt``/``model.pt`` and resume.

Own loop, not Lightning Fabric: Fabric checkpoints only what it is handed, so bit-exact resume (mid-epoch sampler position, every RNG state) would stay ours anyway, for a heavy new dependency.

    from sspsam.config import load_config
    from sspsam.engine.trainer import train
    train(load_config("ssp-sam-tiny"), data_root, Path("runs/x"), steps=1000, batch_size=8,
          lr=1e-4, decoder_lr=1e-5, ckpt_every=100)

Files in ``out_dir``:

* ``last.pt``    — training state (trainable weights, optimizer, scheduler, step, data position and
  the RNG states of torch/numpy/random and the sampler generator), written atomically every
  ``ckpt_every`` steps and at the end; ``resume=True`` continues from it.
* ``log.jsonl``  — one JSON line per logged optimizer step: ``{"step", "lr", <the task's other lrs>, <losses>}``
  (SSP-SAM: ``decoder_lr``; ESC-Net: ``lr_<group>``; SAM-MI: ``backbone_lr``).
* ``tb/``        — TensorBoard scalars (the same numbers as log.jsonl).
* ``model.pt``   — the final model (:func:`sspsam.io.checkpoint.save_checkpoint`), loadable with
  :meth:`sspsam.predict.segmenter.Segmenter.from_pretrained`.

Determinism: everything random is drawn from the global torch/numpy/random generators (model init,
dropout, augmentation; ``num_workers=0``) or from the sampler's own ``torch.Generator``; all of them
are saved, and the data position is saved as (epoch-start sampler state, micro-batches consumed),
so the loss sequence after a resume equals that of the uninterrupted run on the same machine.
The learning-rate schedule spans ``total_steps`` (default ``steps``): to stop early and resume
later with the same schedule, pass the same ``total_steps`` to both calls.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import time
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Sampler

import sspsam.engine.feature_cache as fc
import sspsam.engine.recipe as official_recipe
from sspsam.io.checkpoint import atomic_write, load_into, save_checkpoint, torch_load
from sspsam.models.build import build_model, read_sspsam_checkpoint
from sspsam.errors import CheckpointError, ConfigError, OptionError
from sspsam.engine.losses import box_losses, ssp_loss
from sspsam.engine.step import param_groups

log = logging.getLogger(__name__)

STATE_VERSION = 1
LAST = "last.pt"
LOG = "log.jsonl"
MODEL = "model.pt"


# ----------------------------------------------------------------------------------------------
# seeding and RNG state


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def _rng_state(sampler_gen: torch.Generator) -> dict:
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


def _set_rng_state(state: dict, sampler_gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    random.setstate(_to_tuples(state["random"]))
    sampler_gen.set_state(state["sampler"])
    if "cuda" in state and torch.cuda.is_available():
        with contextlib.suppress(Exception):
            torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------
# data


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


def _to_batch(samples: list[dict]) -> dict:
    """Dataset samples → the tensors ssp_loss needs (valid_hw only when every sample has one;
    ``sam_embed`` when the samples come from a feature cache)."""
    out = {
        "image": torch.stack([s["image"] for s in samples]),
        "mask": torch.stack([torch.as_tensor(s["mask"]).bool() for s in samples]),
        "box": torch.stack([torch.as_tensor(s["box"], dtype=torch.float32) for s in samples]),
        "no_target": torch.tensor([bool(s["no_target"]) for s in samples], dtype=torch.bool),
        "text": [s["text"] for s in samples],
    }
    if all("valid_hw" in s for s in samples):
        out["valid_hw"] = torch.stack([torch.as_tensor(s["valid_hw"]) for s in samples])
    if "sam_embed" in samples[0]:
        out["sam_embed"] = torch.stack([s["sam_embed"] for s in samples])
    return out


class CachedSamples(torch.utils.data.Dataset):
    """The training reader plus each sample's cached SAM image embedding (``sam_embed``)."""

    def __init__(self, dataset, cache, sample_rows) -> None:
        self.dataset, self.cache, self.sample_rows = dataset, cache, sample_rows

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        sample = self.dataset[i]
        sample["sam_embed"] = torch.from_numpy(self.cache[int(self.sample_rows[i])])
        return sample


def _dataset(name: str, data_root, image_size: int, tcfg: dict, official: bool = False):
    """The training reader. sspsam's own augmentations (scale jitter 0.7–1, colour jitter 0.2) are
    on by default for non-official recipes; under ``recipe: official`` they are off unless the
    config names them (``scale_range``, ``colour_jitter``, ``flip``): the official pipeline has no
    scale, colour or flip augmentation (see the recipe config)."""
    from sspsam.data import open_referring

    if official:
        train = any(k in tcfg for k in ("scale_range", "colour_jitter")) or bool(tcfg.get("flip", False))
        kwargs = dict(train=train, flip=bool(tcfg.get("flip", False)),
                      scale_range=tuple(tcfg.get("scale_range", (1.0, 1.0))),
                      colour_jitter=float(tcfg.get("colour_jitter", 0.0)))
    else:
        kwargs = dict(train=bool(tcfg.get("augment", True)), flip=bool(tcfg.get("flip", False)),
                      scale_range=tuple(tcfg.get("scale_range", (0.7, 1.0))),
                      colour_jitter=float(tcfg.get("colour_jitter", 0.2)))
    if name == "refcoco-merged":
        from sspsam.data.merged import MergedRefCOCODataset

        return MergedRefCOCODataset(data_root, tcfg.get("split", "train"), image_size, **kwargs)
    return open_referring(name, data_root, tcfg.get("split", "train"), image_size, **kwargs)


class BoxPretraining(torch.nn.Module):
    """Stage 1 of the official recipe: CLIP + the SSP encoder up to the auxiliary box, no SAM (the
    official model returns before SAM when ``is_pretrain``). A module so DDP can wrap it."""

    def __init__(self, core) -> None:
        super().__init__()
        self.core = core

    def forward(self, images: torch.Tensor, tokens: torch.Tensor, valid_hw=None) -> dict:
        patches, _ = self.core.clip.encode_image(images)
        return self.core.ssp_encoder(patches, self.core.encode_text(tokens))


def build_training_model(cfg: dict, seed: int, load_backbones: bool = True, init=None):
    """The model as :func:`train` builds it before training (seeded init, backbone weights, ``init``,
    frozen parts): :func:`build_feature_cache` must see the same SAM image-encoder weights."""
    seed_everything(seed)
    model = build_model(cfg)
    if load_backbones:
        for part in ("clip", "sam"):
            name = (cfg.get(part) or {}).get("weights")
            if name:
                from sspsam.io.weights import require

                getattr(model, part).load_checkpoint(require(name))
    if init is not None:
        load_into(model, read_sspsam_checkpoint(init)["state_dict"], what=f"--init checkpoint {init}", strict=False)
    frozen = list((cfg.get("train") or {}).get("freeze") or [])
    if frozen:
        model.freeze(frozen)
    return model


def _check_cacheable(cfg: dict, model, ds, stage) -> None:
    """``--cached-features`` is exact only when the cached tower is frozen and every epoch feeds it
    the same image; otherwise refuse, in one line."""
    if stage is not None and stage.box_only:
        raise ConfigError("--cached-features: official stage 1 never runs SAM's image encoder, so there is nothing to cache")
    encoder = model.sam.image_encoder
    if encoder is not None and any(p.requires_grad for p in encoder.parameters()):
        raise ConfigError(f"--cached-features needs SAM's image encoder frozen, but config '{cfg.get('name')}' trains it "
                          "(add sam.image_encoder to train.freeze)")
    if getattr(ds, "train", False):
        raise ConfigError("--cached-features needs training without image augmentation (scale/colour jitter, flips change "
                          "the image each epoch): set train.augment: false, or use the official recipe without "
                          "scale_range/colour_jitter/flip")


def _cache_identity(cfg: dict, model, index, dataset: str, split: str, image_size: int) -> dict:
    ds_id = {"name": dataset, "split": split, "image_size": int(image_size), "images": len(index.keys)}
    ds_id["fingerprint"] = index.fingerprint(ds_id)
    return {"model": cfg.get("model", "ssp-sam"), "config": cfg.get("name", "?"), "sam_config_hash": fc.sam_config_hash(cfg),
            "encoder_hash": fc.encoder_hash(model.sam.image_encoder) if model.sam.image_encoder is not None else None, "dataset": ds_id, "views": ["plain"]}


def build_feature_cache(
    cfg: dict,
    data_root: str | Path,
    out_dir: str | Path,
    *,
    dataset: str | None = None,
    seed: int = 3407,
    init: str | Path | None = None,
    load_backbones: bool = True,
    batch_size: int = 8,
    shard_size: int = 64,
    dtype: str = "float16",
    device: str = "cpu",
    progress=None,
) -> dict:
    """SAM image embeddings of every distinct image of the training split, for
    ``train(..., cached_features=out_dir)`` with the same config, data, dataset, seed and init."""
    official = official_recipe.is_official(cfg)
    dataset = dataset or (official_recipe.stage(cfg, 2).dataset if official else None) or "refcoco"
    tcfg = dict(cfg.get("train") or {})
    model = build_training_model(cfg, seed, load_backbones, init)
    ds = _dataset(dataset, data_root, model.image_size, tcfg, official)
    _check_cacheable(cfg, model, ds, None)
    index = fc.image_index(ds, data_root)
    identity = _cache_identity(cfg, model, index, dataset, tcfg.get("split", "train"), model.image_size)
    dev = torch.device(device)
    sam = model.sam.to(dev).eval()
    with torch.no_grad():
        probe = ds[index.first_sample[0]]
        shape = tuple(sam.encode_image(probe["image"][None].to(dev), probe["valid_hw"][None].to(dev)).shape[1:])

    def encode(rows: list[int]):
        samples = [ds[index.first_sample[r]] for r in rows]
        images = torch.stack([s["image"] for s in samples]).to(dev)
        valid = torch.stack([torch.as_tensor(s["valid_hw"]) for s in samples]).to(dev)
        with torch.no_grad():
            return sam.encode_image(images, valid).float().cpu().numpy()

    identity.update(dtype=dtype, shape=list(shape), shard_size=int(shard_size), rows=len(index.keys))
    return fc.write_cache(out_dir, identity, encode, batch_size=batch_size, progress=progress)


# ----------------------------------------------------------------------------------------------
# schedule


def cosine_with_warmup(total_steps: int, warmup_steps: int, min_ratio: float = 0.0):
    """LambdaLR factor for optimizer step s (0-based): linear warm-up, then cosine to min_ratio."""
    total_steps, warmup_steps = max(1, int(total_steps)), max(0, int(warmup_steps))

    def factor(s: int) -> float:
        if s < warmup_steps:
            return (s + 1) / warmup_steps
        span = max(1, total_steps - warmup_steps)
        t = min(1.0, (s - warmup_steps) / span)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    return factor


def official_schedule(st, base_lrs: list[float], steps_per_epoch: int) -> list:
    """LambdaLR factors, one per parameter group, for the official per-epoch schedule: optimizer
    step s runs in epoch s // steps_per_epoch at that epoch's lr (:func:`sspsam.engine.recipe.official_lr`)."""

    def make(base: float):
        return lambda s: st.lr(s // steps_per_epoch, base) / base if base else 0.0

    return [make(b) for b in base_lrs]


# ----------------------------------------------------------------------------------------------
# checkpoint of the training state


def _trainable_state(model, frozen: list[str]) -> dict[str, torch.Tensor]:
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


def _truncate_log(path: Path, last_step: int) -> None:
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a half-written last line from a crash
        if int(rec.get("step", 0)) <= last_step:
            keep.append(line)
    text = "".join(f"{x}\n" for x in keep)

    def write(tmp):
        Path(tmp).write_text(text)

    atomic_write(path, write)


def check_precision(precision: str) -> None:
    if precision not in ("fp32", "bf16"):
        extra = " (fp16 needs loss scaling, which this loop does not do; bf16 has fp32's range)" if precision == "fp16" else ""
        raise OptionError(f"precision must be fp32 or bf16, got {precision!r}{extra}")


def _too_small(n: int, batch_size: int, world: int) -> OptionError:
    per = f"batch_size {batch_size}" + (f" x {world} processes" if world > 1 else "")
    return OptionError(f"the training split has {n} sample{'s' * (n != 1)}: too few for {per} "
                       f"(give --batch-size {max(1, n // world)} or less)")


RUN_FILES = (LAST, LOG, MODEL, "tb")


def existing_run(out_dir: Path) -> list[str]:
    """The files of an earlier run in ``out_dir`` (what a fresh run would replace)."""
    out_dir = Path(out_dir)
    return [n for n in RUN_FILES if (out_dir / n).exists()] if out_dir.is_dir() else []


def _remove_run(out_dir: Path, keep: set = frozenset(), remove_dir: bool = False) -> None:
    import shutil

    for name in set(existing_run(out_dir)) - set(keep):
        p = out_dir / name
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    if remove_dir:
        with contextlib.suppress(OSError):
            out_dir.rmdir()  # only when empty


# ----------------------------------------------------------------------------------------------
# distributed


def _setup_distributed(device: str) -> tuple[int, int, bool]:
    """(rank, world_size, we_initialised_it). Initialises from torchrun's env when present."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    if dist.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ:
        backend = "nccl" if str(device).startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend)
        return dist.get_rank(), dist.get_world_size(), True
    return 0, 1, False


# ----------------------------------------------------------------------------------------------
# logs a person watches


def _tensorboard(path: Path, step: int):
    """TensorBoard scalars; ``purge_step`` drops events a crashed run wrote past the checkpoint."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a dependency, but the loop must not die for a log
        warnings.warn("tensorboard is not installed: no TensorBoard logs (log.jsonl is still written)")
        return None
    return SummaryWriter(str(path), purge_step=step if step else None)


def _progress_bar(steps: int, step: int):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]:.4f}"),
                   TimeRemainingColumn(), console=Console(stderr=True), transient=False)
    task = bar.add_task("train", total=steps, completed=step, loss=float("nan"))
    bar.start()
    return bar, task


# ----------------------------------------------------------------------------------------------
# the loop, shared by every method: a method is a TrainTask


class TrainTask:
    """What a method family supplies to :func:`fit`: its model, data, optimizer groups, schedule and
    loss, and how its final model is saved. The loop owns everything else (seeding, sampler
    position, RNG state, DDP, AMP, accumulation, logs, checkpoints, resume).

    ``frozen``: sub-module names kept out of ``last.pt`` and held in eval mode; ``clip_grad``: the
    gradient-norm clip (``None``/0: none)."""

    cfg: dict
    frozen: list[str] = []
    clip_grad: float | None = None

    def build(self, seed: int) -> torch.nn.Module:
        """The seeded model with its frozen parts frozen (same seed on every rank: identical init)."""
        raise NotImplementedError

    def open_data(self):
        """The reader, opened before the model is built so that a malformed data set or a batch
        larger than the split is refused before minutes of model loading (``None``: opened in
        :meth:`dataset` only). :meth:`dataset` then reuses it."""
        return None

    def dataset(self, core) -> torch.utils.data.Dataset:
        raise NotImplementedError

    def collate(self, samples: list[dict]) -> dict:
        raise NotImplementedError

    def param_groups(self, core) -> list[dict]:
        raise NotImplementedError

    def plan(self, batches_per_epoch: int, grad_accum: int, steps: int | None, total_steps: int) -> tuple[int, int, int]:
        """(steps, total_steps, steps_per_epoch); ``steps_per_epoch`` 0 when the schedule counts steps."""
        return int(steps), int(total_steps), 0

    def scheduler(self, optimizer, total_steps: int, steps_per_epoch: int):
        raise NotImplementedError

    def prepare(self, step: int, core) -> bool:
        """Called before every optimizer step; True when the trainable set changed (DDP is rebuilt)."""
        return False

    def forward_module(self, core) -> torch.nn.Module:
        """The module DDP wraps: its forward must run every trainable parameter the loss uses."""
        return core

    def loss(self, module, core, batch: dict, autocast) -> dict[str, torch.Tensor]:
        """The loss dict (``total`` is minimised) of one micro-batch, already on the device."""
        raise NotImplementedError

    def log_fields(self, optimizer, step: int) -> dict:
        return {"lr": optimizer.param_groups[0]["lr"]}

    def save_model(self, path: Path, core, step: int) -> None:
        save_checkpoint(path, self.cfg, {k: v.detach().cpu() for k, v in core.state_dict().items()})


class ReferringTask(TrainTask):
    """SSP-SAM on a referring data set: :func:`ssp_loss` (or stage 1's box losses), two learning
    rates (SAM's mask decoder 10x slower), the official per-epoch recipe when the config names it."""

    def __init__(self, cfg: dict, data_root, *, dataset: str, st, lr: float, decoder_lr: float, weight_decay: float,
                 warmup_steps: int, clip_grad: float | None, load_backbones: bool, init, cached_features) -> None:
        self.cfg, self.data_root, self.dataset_name, self.st = cfg, data_root, dataset, st
        self.lr, self.decoder_lr, self.weight_decay, self.warmup_steps = lr, decoder_lr, weight_decay, warmup_steps
        self.clip_grad, self.load_backbones, self.init, self.cached_features = clip_grad, load_backbones, init, cached_features
        self.tcfg = dict(cfg.get("train") or {})
        self.frozen = list(self.tcfg.get("freeze") or [])
        self.loss_weights = dict(cfg.get("loss") or {})
        self.official = st is not None
        self.box_only = self.official and st.box_only
        self.decoder_always_frozen = any(f in ("sam", "sam.mask_decoder") for f in self.frozen)
        self.decoder_frozen = None
        self.steps_per_epoch = 0

    def build(self, seed: int):
        return build_training_model(self.cfg, seed, self.load_backbones, self.init)

    def open_data(self):
        self._reader = _dataset(self.dataset_name, self.data_root, 1024, self.tcfg, self.official)
        return self._reader

    def dataset(self, core):
        ds = getattr(self, "_reader", None)
        if ds is None:
            ds = _dataset(self.dataset_name, self.data_root, core.image_size, self.tcfg, self.official)
        ds.image_size = int(core.image_size)  # records do not depend on it; samples are cut at the model's size
        if self.cached_features is not None:
            _check_cacheable(self.cfg, core, ds, self.st if self.box_only else None)
            cache = fc.FeatureCache(self.cached_features)
            index = fc.image_index(ds, self.data_root)
            want = _cache_identity(self.cfg, core, index, self.dataset_name, self.tcfg.get("split", "train"), core.image_size)
            # a model built without SAM's image encoder (sam.image_encoder: false) cannot be checked against its weights
            keys = ("model", "sam_config_hash", "dataset", "views") + (("encoder_hash",) if want["encoder_hash"] else ())
            cache.check(**{k: want[k] for k in keys})
            ds = CachedSamples(ds, cache, index.sample_rows)
        return ds

    def collate(self, samples):
        return _to_batch(samples)

    def param_groups(self, core):
        return param_groups(core, self.lr, self.decoder_lr, self.weight_decay)

    def plan(self, batches_per_epoch, grad_accum, steps, total_steps):
        if self.st is None:
            return int(steps), int(total_steps), 0
        # one optimizer step = grad_accum micro-batches; the lr of a step is its epoch's lr
        self.steps_per_epoch = max(1, batches_per_epoch // grad_accum)
        total_steps = self.st.epochs * self.steps_per_epoch
        return (total_steps if steps is None else int(steps)), total_steps, self.steps_per_epoch

    def scheduler(self, optimizer, total_steps, steps_per_epoch):
        if self.st is None:
            return torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(total_steps, self.warmup_steps))
        bases = [g["lr"] for g in optimizer.param_groups]
        return torch.optim.lr_scheduler.LambdaLR(optimizer, official_schedule(self.st, bases, steps_per_epoch))

    def prepare(self, step, core):
        # the official recipe freezes SAM's decoder for its first epochs (DDP must then be rebuilt)
        if self.st is None or self.st.decoder_frozen(step // self.steps_per_epoch) == self.decoder_frozen:
            return False
        self.decoder_frozen = self.st.decoder_frozen(step // self.steps_per_epoch)
        core.sam.mask_decoder.requires_grad_(not self.decoder_frozen and not self.decoder_always_frozen)
        return True

    def forward_module(self, core):
        return BoxPretraining(core) if self.box_only else core

    def loss(self, module, core, batch, autocast):
        tokens = core.tokenize(batch["text"]).to(batch["image"].device)
        feed = fc.sam_embeddings(core.sam, batch["sam_embed"]) if "sam_embed" in batch else contextlib.nullcontext()
        with autocast(), feed:
            out = module(batch["image"], tokens, batch.get("valid_hw"))
        out = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in out.items()}
        box = core.box_target(batch["box"], batch.get("valid_hw"))  # the box head's frame
        if self.box_only:
            has = ~batch["no_target"]
            return box_losses(out["box"][has], box[has], self.loss_weights) if has.any() else {"total": out["box"].sum() * 0}
        return ssp_loss(out, batch["mask"], box, batch["no_target"], self.loss_weights)

    def log_fields(self, optimizer, step):
        lrs = [g["lr"] for g in optimizer.param_groups]
        rec = {"lr": lrs[0], "decoder_lr": lrs[1]}
        if self.st is not None:
            rec["epoch"] = step // self.steps_per_epoch
        return rec


def train(
    cfg: dict,
    data_root: str | Path,
    out_dir: str | Path,
    *,
    dataset: str | None = None,
    steps: int | None = None,
    batch_size: int,
    lr: float,
    decoder_lr: float,
    seed: int = 3407,
    resume: bool = False,
    ckpt_every: int = 1000,
    log_every: int = 1,
    device: str = "cpu",
    precision: str = "fp32",
    grad_accum: int = 1,
    total_steps: int | None = None,
    warmup_steps: int | None = None,
    clip_grad: float | None = None,
    weight_decay: float | None = None,
    load_backbones: bool = True,
    tensorboard: bool = True,
    progress: bool = False,
    stage: int | None = None,
    epochs: int | None = None,
    init: str | Path | None = None,
    cached_features: str | Path | None = None,
    overwrite: bool = False,
) -> dict:
    """Train SSP-SAM for ``steps`` optimizer steps (each of ``grad_accum`` micro-batches of
    ``batch_size`` per process). Returns ``{"step", "module" (the trained nn.Module of this rank),
    "losses" (this call's per-step dicts), "last", "model", "log", "seconds"}``.

    With ``train.recipe: official`` the run is by epochs (``epochs``, default the stage's) of
    ``stage`` 1 (box-only pretraining on the merged set) or 2 (full; default), the schedule is the
    official per-epoch cosine (:mod:`sspsam.engine.recipe`) and ``steps`` defaults to the whole stage;
    ``init`` (a stage-1 ``model.pt``) initialises the weights, as the official
    ``--resume_from_pretrain`` does (non-strict: keys that match).

    ``cached_features``: a folder written by :func:`build_feature_cache` (``sspsam cache-features``)
    with the same config, data, seed and init; SAM's image encoder is then not run, its embeddings
    are read from the cache (CLIP still runs). Refused unless the encoder is frozen and the images
    are not augmented (see :mod:`sspsam.engine.feature_cache`)."""
    official = official_recipe.is_official(cfg)
    if stage is not None and not official:
        raise ConfigError("--stage needs a config with train.recipe: official")
    if epochs is not None and not official:
        raise ConfigError("--epochs needs a config with train.recipe: official (other recipes count --steps)")
    st = official_recipe.stage(cfg, int(stage or 2)) if official else None
    if st is not None and epochs is not None:
        import dataclasses

        st = dataclasses.replace(st, epochs=int(epochs))
    if steps is None and not official:
        raise OptionError("steps is required (the number of optimizer steps to reach)")
    dataset = dataset or (st.dataset if st is not None else None) or "refcoco"
    if (steps is not None and steps < 1) or ckpt_every < 1:
        raise OptionError(f"steps and ckpt_every must be >= 1, got {steps} and {ckpt_every}")
    check_learning_rate("lr", lr)
    check_learning_rate("decoder_lr", decoder_lr)
    tcfg = dict(cfg.get("train") or {})
    total_steps = int(total_steps or tcfg.get("total_steps") or steps or 1)
    if warmup_steps is None:
        warmup_steps = int(tcfg.get("warmup_steps", max(1, round(0.05 * total_steps))))
    clip_grad = float(tcfg.get("clip_grad", 0.1)) if clip_grad is None else clip_grad
    weight_decay = float(tcfg.get("weight_decay", 1e-4)) if weight_decay is None else weight_decay
    task = ReferringTask(cfg, data_root, dataset=dataset, st=st, lr=lr, decoder_lr=decoder_lr, weight_decay=weight_decay,
                         warmup_steps=warmup_steps, clip_grad=clip_grad, load_backbones=load_backbones, init=init,
                         cached_features=cached_features)
    return fit(task, out_dir, steps=steps, batch_size=batch_size, seed=seed, total_steps=total_steps, resume=resume,
               ckpt_every=ckpt_every, log_every=log_every, device=device, precision=precision, grad_accum=grad_accum,
               tensorboard=tensorboard, progress=progress, overwrite=overwrite)


def check_learning_rate(name: str, value) -> None:
    """A NaN or negative learning rate trains without an error and yields a NaN model hours later."""
    if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise OptionError(f"{name} must be a positive finite number, got {value}")


def fit(
    task: TrainTask,
    out_dir: str | Path,
    *,
    steps: int | None,
    batch_size: int,
    seed: int,
    total_steps: int,
    resume: bool = False,
    ckpt_every: int = 1000,
    log_every: int = 1,
    device: str = "cpu",
    precision: str = "fp32",
    grad_accum: int = 1,
    tensorboard: bool = True,
    progress: bool = False,
    time_limit: float | None = None,
    echo=None,
    on_step=None,
    overwrite: bool = False,
) -> dict:
    """Run ``task`` to optimizer step ``steps`` (``None``: the task's plan decides). ``ckpt_every``
    0 writes no ``last.pt``; ``time_limit`` (seconds) stops early, after a checkpoint; ``echo`` gets
    one-line messages (resume, time limit); ``on_step(rec)`` every step's record, on rank 0;
    ``overwrite``: a fresh run first removes an earlier run's files from ``out_dir`` (only once the
    data and model are accepted, so a refused run leaves the old one intact).

    A run that stops on an error (a corrupt or missing image, Ctrl-C) after some steps saves
    ``last.pt`` at the last completed step, so ``resume=True`` continues once the cause is fixed;
    one that stops before its first step removes what it wrote."""
    check_precision(precision)
    if (steps is not None and steps < 1) or batch_size < 1 or grad_accum < 1 or ckpt_every < 0 or log_every < 1:
        raise OptionError("steps, batch_size, grad_accum and log_every must be >= 1, ckpt_every >= 0; got "
                          f"{steps}, {batch_size}, {grad_accum}, {log_every} and {ckpt_every}")
    out_dir = Path(out_dir)
    rank, world, own_pg = _setup_distributed(device)
    if world > 1 and str(device).startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", rank))
        device = f"cuda:{local}"
        torch.cuda.set_device(local)
    dev = torch.device(device)
    is_main = rank == 0
    last_path, log_path, model_path = out_dir / LAST, out_dir / LOG, out_dir / MODEL

    state = read_train_state(last_path) if resume else None  # fail before any work
    created_dir, earlier = False, set()
    reader = task.open_data()
    if reader is not None and len(reader) // world < batch_size:
        raise _too_small(len(reader), batch_size, world)

    # ---- model (same seed on every rank: identical init) -------------------------------------
    core = task.build(seed)
    core.to(dev)
    groups = task.param_groups(core)
    # foreach: the multi-tensor update torch already picks on CUDA, here on CPU too (one kernel per
    # op over all parameters instead of one per parameter: 1.4x faster on the tiny demo's small tensors)
    optimizer = torch.optim.AdamW(groups, lr=groups[0]["lr"], foreach=True)

    # ---- data --------------------------------------------------------------------------------
    ds = task.dataset(core)
    if len(ds) // world < batch_size:
        raise _too_small(len(ds), batch_size, world)
    seed_everything(seed + rank)  # per-rank augmentation / dropout streams
    sampler_gen = torch.Generator().manual_seed(seed)  # same permutation on every rank
    sampler = ResumableSampler(len(ds), sampler_gen, rank, world)
    loader = DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=0, drop_last=True,
                        collate_fn=task.collate, generator=torch.Generator().manual_seed(seed))
    steps, total_steps, steps_per_epoch = task.plan(len(loader), grad_accum, steps, total_steps)
    scheduler = task.scheduler(optimizer, total_steps, steps_per_epoch)

    step, epoch, consumed = 0, 0, 0
    if state is not None:
        try:
            load_into(core, state["model"], what=f"training checkpoint {last_path}", strict=False)
            missing = [k for k in _trainable_state(core, task.frozen) if k not in state["model"]]
            if missing:
                raise CheckpointError(f"training checkpoint {last_path} lacks {len(missing)} trainable entries (e.g. {missing[0]})")
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            step, epoch, consumed = int(state["step"]), int(state["data"]["epoch"]), int(state["data"]["consumed"])
            _set_rng_state(state["rng"], sampler_gen)
            sampler_gen.set_state(state["data"]["epoch_state"])
            sampler.skip = consumed * batch_size
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f"training checkpoint {last_path} does not fit this run ({type(exc).__name__}: {exc})") from exc
        if int(state.get("total_steps", total_steps)) != total_steps:
            warnings.warn(f"resuming with total_steps={total_steps}, the checkpoint used {state['total_steps']}: the LR schedule changes")
        if is_main:
            _truncate_log(log_path, step)
            if echo is not None:
                echo(f"resumed from {last_path} at step {step}")
    elif is_main:
        created_dir = not out_dir.exists()
        if overwrite:
            _remove_run(out_dir)
        earlier = set(existing_run(out_dir)) - {LOG}
        out_dir.mkdir(parents=True, exist_ok=True)
        log_path.unlink(missing_ok=True)  # a fresh run starts a fresh log

    def wrap():
        # DDP fixes its parameter set when built: rebuilt whenever the trainable set changes (as the official train.py)
        forward = task.forward_module(core)
        if world == 1:
            return forward
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(forward, device_ids=[dev.index] if dev.type == "cuda" else None, find_unused_parameters=True)

    task.prepare(step, core)
    model = wrap()

    autocast = (lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if precision == "bf16" else contextlib.nullcontext
    trainable = [p for p in core.parameters() if p.requires_grad]
    saved_at = step if state is not None else -1

    def position() -> dict:
        """Where the run stands between optimizer steps: enough to continue from here bit-exactly."""
        state_now = sampler.epoch_state.clone() if sampler.epoch_state is not None else None
        return {"step": step, "rng": _rng_state(sampler_gen),
                "data": {"epoch": epoch, "consumed": consumed, "epoch_state": state_now}}

    def save_state(at: dict | None = None) -> None:
        at = at or position()
        payload = {
            "sspsam_train": STATE_VERSION,
            "step": at["step"],
            "total_steps": total_steps,
            "seed": seed,
            "model": _trainable_state(core, task.frozen),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": at["rng"],
            "data": at["data"],
        }
        atomic_write(last_path, lambda tmp: torch.save(payload, tmp))

    def checkpoint() -> None:
        nonlocal saved_at
        if is_main:
            save_state()
        saved_at = step
        if world > 1:
            dist.barrier()

    def out_of_time() -> bool:
        late = time_limit is not None and time.time() - start > time_limit
        if time_limit is not None and world > 1:  # every rank stops at the same step
            flag = torch.tensor([float(late)], device=dev)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            late = bool(flag.item())
        return late

    it = None
    history: list[dict] = []
    start = time.time()
    log_fh = open(log_path, "a") if is_main else None
    tb = _tensorboard(out_dir / "tb", step) if (tensorboard and is_main) else None
    bar = _progress_bar(steps, step) if (progress and is_main) else None
    fresh_steps = 0
    between = position()  # the state after the last completed step; a stopped run is saved from it
    try:
        while step < steps:
            if out_of_time():
                if echo is not None and is_main:
                    echo(f"time limit reached at step {step}")
                break
            if task.prepare(step, core):
                trainable = [p for p in core.parameters() if p.requires_grad]
                model = wrap()
            model.train()
            for name in task.frozen:
                core.get_submodule(name).eval()
            optimizer.zero_grad(set_to_none=True)
            sums: dict[str, float] = {}
            for micro in range(grad_accum):
                while True:
                    if it is None:
                        it = iter(loader)
                    try:
                        batch = next(it)
                        break
                    except StopIteration:
                        it, epoch, consumed = None, epoch + 1, 0
                consumed += 1
                batch = {k: v.to(dev) if torch.is_tensor(v) else v for k, v in batch.items()}
                sync = micro == grad_accum - 1 or world == 1
                with contextlib.nullcontext() if sync else model.no_sync():
                    losses = task.loss(model, core, batch, autocast)
                    (losses["total"] / grad_accum).backward()
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach()) / grad_accum
            if task.clip_grad:
                torch.nn.utils.clip_grad_norm_(trainable, task.clip_grad)
            fields = task.log_fields(optimizer, step)
            optimizer.step()
            scheduler.step()
            step += 1
            fresh_steps += 1
            between = position()
            rec = {"step": step, **fields, **sums}
            history.append(rec)
            if log_fh is not None and (step % log_every == 0 or step == steps):
                log_fh.write(json.dumps(rec) + "\n")
                log_fh.flush()
                log.info("step %d/%d loss %.4f lr %.3g", step, steps, sums.get("total", float("nan")), fields.get("lr", float("nan")))
            if tb is not None:
                for k, v in rec.items():
                    if k != "step":
                        tb.add_scalar(f"train/{k}", v, step)
            if bar is not None:
                bar[0].update(bar[1], completed=step, loss=sums.get("total", float("nan")))
            if on_step is not None and is_main:
                on_step(rec)
            if ckpt_every and (step % ckpt_every == 0 or step == steps):
                checkpoint()
        if ckpt_every and saved_at != step:  # stopped early (time limit): the state it stopped in
            checkpoint()
        if is_main:
            task.save_model(model_path, core, step)
        if world > 1:
            dist.barrier()
    except BaseException as exc:
        if not is_main or world > 1:
            raise
        if log_fh is not None:
            log_fh.close()
            log_fh = None
        if tb is not None:
            tb.close()
            tb = None
        if state is None and fresh_steps == 0:  # nothing done: leave nothing behind
            _remove_run(out_dir, keep=earlier, remove_dir=created_dir)
            raise
        if ckpt_every and between["step"] != saved_at:
            save_state(between)
        if isinstance(exc, Exception) and exc.args and isinstance(exc.args[0], str):
            exc.args = (f"{exc.args[0]} (training stopped; the run is saved at step {between['step']}: "
                        f"fix the cause and continue with --resume)",) + exc.args[1:]
        raise
    finally:
        if log_fh is not None:
            log_fh.close()
        if tb is not None:
            tb.close()
        if bar is not None:
            bar[0].stop()
        if own_pg and dist.is_initialized():
            dist.destroy_process_group()
    return {
        "step": step,
        "module": core,
        "losses": history,
        "last": last_path,
        "model": model_path,
        "log": log_path,
        "seconds": time.time() - start,
    }
