"""The one training loop: every method is a :class:`TrainTask` run by :func:`fit`.

The loop owns what must be identical for every method so that a run can be killed and resumed
bit-exactly (seeding, the sampler's position and epoch, RNG states, optimizer and scheduler state
in an atomic ``last.pt``), and what a person expects to mean the same everywhere (DDP under
torchrun, bf16 autocast, gradient accumulation, ``log.jsonl``, TensorBoard, the progress bar, the
run folder's refusal and ``--overwrite``). A task owns its model, data, loss, parameter groups,
schedule, feature-cache identity and how its ``model.pt`` is written
(:mod:`sspsam.engine.tasks`).

Own loop, not Lightning Fabric: Fabric checkpoints only what it is handed, so bit-exact resume
(mid-epoch sampler position, every RNG state) would stay ours anyway, for a heavy new dependency.

Files in ``out_dir``:

* ``last.pt``    — training state (trainable weights, optimizer, scheduler, step, data position and
  the RNG states of torch/numpy/random and the sampler generator), written atomically every
  ``ckpt_every`` steps and at the end; ``resume=True`` continues from it.
* ``log.jsonl``  — one JSON line per logged optimizer step: ``{"step", "lr", <the task's other
  lrs>, <losses>}``.
* ``tb/``        — TensorBoard scalars (the same numbers as log.jsonl).
* ``model.pt``   — the final model (:func:`sspsam.io.checkpoint.save_checkpoint`).

The learning-rate schedule spans ``total_steps`` (default ``steps``): to stop early and resume
later with the same schedule, pass the same ``total_steps`` to both calls.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from sspsam.engine import state as st
from sspsam.errors import CheckpointError, OptionError, OutputError
from sspsam.io.checkpoint import atomic_write, load_into, save_checkpoint

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoopOptions:
    """How long and how to run, the same for every task.

    ``steps``: optimizer steps to reach, counting those done before a resume (``None``: the task's
    plan decides, e.g. the official recipe's whole stage); ``total_steps``: the schedule's length
    (``None``: the task's default); ``ckpt_every`` 0 writes no ``last.pt``; ``time_limit``
    (seconds) stops early after a checkpoint; ``overwrite``: a fresh run first removes an earlier
    run's files, once the data and model are accepted."""

    steps: int | None = None
    batch_size: int = 8
    seed: int = 0
    total_steps: int | None = None
    grad_accum: int = 1
    precision: str = "fp32"
    device: str = "cpu"
    resume: bool = False
    overwrite: bool = False
    ckpt_every: int = 1000
    log_every: int = 1
    tensorboard: bool = True
    progress: bool = False
    time_limit: float | None = None

    def check(self) -> None:
        check_precision(self.precision)
        if ((self.steps is not None and self.steps < 1) or self.batch_size < 1 or self.grad_accum < 1
                or self.ckpt_every < 0 or self.log_every < 1):
            raise OptionError("steps, batch_size, grad_accum and log_every must be >= 1, ckpt_every >= 0; got "
                              f"{self.steps}, {self.batch_size}, {self.grad_accum}, {self.log_every} and {self.ckpt_every}")

    @classmethod
    def split(cls, kwargs: dict) -> tuple["LoopOptions", dict]:
        """(the loop's options, the rest): one ``**kwargs`` serves a task and the loop."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in kwargs.items() if k in names}), {k: v for k, v in kwargs.items() if k not in names}


def check_precision(precision: str) -> None:
    if precision not in ("fp32", "bf16"):
        extra = " (fp16 needs loss scaling, which this loop does not do; bf16 has fp32's range)" if precision == "fp16" else ""
        raise OptionError(f"precision must be fp32 or bf16, got {precision!r}{extra}")


def check_learning_rate(name: str, value) -> None:
    """A NaN or negative learning rate trains without an error and yields a NaN model hours later."""
    if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise OptionError(f"{name} must be a positive finite number, got {value}")


class TrainTask:
    """What a method family supplies to :func:`fit`. ``frozen``: sub-module names kept out of
    ``last.pt`` and held in eval mode; ``clip_grad``: the gradient-norm clip (``None``/0: none)."""

    cfg: dict
    frozen: list[str] = []
    clip_grad: float | None = None

    def build(self, seed: int) -> torch.nn.Module:
        """The seeded model with its frozen parts frozen (same seed on every rank: identical init)."""
        raise NotImplementedError

    def open_data(self):
        """The reader, opened before the model is built so that a malformed data set or a batch
        larger than the split is refused before minutes of model loading (``None``: opened in
        :meth:`dataset` only)."""
        return None

    def dataset(self, core) -> torch.utils.data.Dataset:
        raise NotImplementedError

    def collate(self, samples: list[dict]) -> dict:
        raise NotImplementedError

    def param_groups(self, core) -> list[dict]:
        raise NotImplementedError

    def plan(self, batches_per_epoch: int, grad_accum: int, steps: int | None, total_steps: int | None) -> tuple[int, int, int]:
        """(steps, total_steps, steps_per_epoch); ``steps_per_epoch`` 0 when the schedule counts steps."""
        if steps is None:
            raise OptionError("steps is required (the number of optimizer steps to reach)")
        return int(steps), int(total_steps or steps), 0

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


def fit(task: TrainTask, out_dir: str | Path, options: LoopOptions | None = None, *,
        echo: Callable[[str], None] | None = None, on_step: Callable[[dict], object] | None = None, **kwargs) -> dict:
    """Run ``task`` to ``options.steps`` (or ``LoopOptions(**kwargs)``). ``echo`` gets one-line
    messages (resume, time limit); ``on_step(rec)`` every step's record on rank 0, and a true
    answer stops the run there (saved as a time limit would). Returns ``{"step", "module" (this
    rank's trained model), "losses" (this call's per-step records), "last", "model", "log", "seconds"}``.

    A run that stops on an error (a corrupt or missing image, Ctrl-C) after some steps saves
    ``last.pt`` at the last completed step, so ``resume=True`` continues once the cause is fixed;
    one that stops before its first step removes what it wrote."""
    options = options if options is not None else LoopOptions(**kwargs)
    options.check()
    return _Run(task, Path(out_dir), options, echo, on_step).run()


class _Run:
    """One call of :func:`fit`: the set-up, the resume, the steps and the saves, in that order."""

    def __init__(self, task: TrainTask, out_dir: Path, o: LoopOptions, echo, on_step) -> None:
        self.task, self.out_dir, self.o, self.echo, self.on_step = task, out_dir, o, echo, on_step
        self.rank, self.world, self.own_pg = _setup_distributed(o.device)
        device = o.device
        if self.world > 1 and str(device).startswith("cuda"):
            local = int(os.environ.get("LOCAL_RANK", self.rank))
            device = f"cuda:{local}"
            torch.cuda.set_device(local)
        self.dev = torch.device(device)
        self.is_main = self.rank == 0
        self.last_path, self.log_path, self.model_path = out_dir / st.LAST, out_dir / st.LOG, out_dir / st.MODEL
        self.step, self.epoch, self.consumed = 0, 0, 0
        self.it = None
        self.history: list[dict] = []
        self.fresh_steps = 0
        self.log_fh = self.tb = self.bar = None

    # ---- set-up ---------------------------------------------------------------------------------

    def setup(self) -> None:
        o, task = self.o, self.task
        self.state = st.read_train_state(self.last_path) if o.resume else None  # fail before any work
        reader = task.open_data()
        if reader is not None and len(reader) // self.world < o.batch_size:
            raise _too_small(len(reader), o.batch_size, self.world)
        self.core = core = task.build(o.seed)  # same seed on every rank: identical init
        core.to(self.dev)
        groups = task.param_groups(core)
        # foreach: the multi-tensor update torch already picks on CUDA, here on CPU too (one kernel
        # per op over all parameters instead of one per parameter)
        self.optimizer = torch.optim.AdamW(groups, lr=groups[0]["lr"], foreach=True)
        ds = task.dataset(core)
        if len(ds) // self.world < o.batch_size:
            raise _too_small(len(ds), o.batch_size, self.world)
        st.seed_everything(o.seed + self.rank)  # per-rank augmentation / dropout streams
        self.sampler_gen = torch.Generator().manual_seed(o.seed)  # same permutation on every rank
        self.sampler = st.ResumableSampler(len(ds), self.sampler_gen, self.rank, self.world)
        self.loader = DataLoader(ds, batch_size=o.batch_size, sampler=self.sampler, num_workers=0, drop_last=True,
                                 collate_fn=task.collate, generator=torch.Generator().manual_seed(o.seed))
        self.steps, self.total_steps, steps_per_epoch = task.plan(len(self.loader), o.grad_accum, o.steps, o.total_steps)
        self.scheduler = task.scheduler(self.optimizer, self.total_steps, steps_per_epoch)

    def resume(self) -> None:
        state, core = self.state, self.core
        try:
            load_into(core, state["model"], what=f"training checkpoint {self.last_path}", strict=False)
            missing = [k for k in st.trainable_state(core, self.task.frozen) if k not in state["model"]]
            if missing:
                raise CheckpointError(f"training checkpoint {self.last_path} lacks {len(missing)} trainable entries (e.g. {missing[0]})")
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.step, self.epoch, self.consumed = int(state["step"]), int(state["data"]["epoch"]), int(state["data"]["consumed"])
            st.set_rng_state(state["rng"], self.sampler_gen)
            self.sampler_gen.set_state(state["data"]["epoch_state"])
            self.sampler.skip = self.consumed * self.o.batch_size
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f"training checkpoint {self.last_path} does not fit this run ({type(exc).__name__}: {exc})") from exc
        if int(state.get("total_steps", self.total_steps)) != self.total_steps:
            warnings.warn(f"resuming with total_steps={self.total_steps}, the checkpoint used {state['total_steps']}: the LR schedule changes")
        if self.is_main:
            st.truncate_log(self.log_path, self.step)
            if self.echo is not None:
                self.echo(f"resumed from {self.last_path} at step {self.step}")

    def start_fresh(self) -> None:
        """Only now, with the data and model accepted, is an earlier run replaced."""
        self.created_dir = not self.out_dir.exists()
        if self.o.overwrite:
            st.remove_run(self.out_dir)
        self.earlier = set(st.existing_run(self.out_dir)) - {st.LOG}
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.log_path.unlink(missing_ok=True)  # a fresh run starts a fresh log

    def wrap(self) -> None:
        """DDP fixes its parameter set when built: rebuilt whenever the trainable set changes (as the official train.py)."""
        self.trainable = [p for p in self.core.parameters() if p.requires_grad]
        forward = self.task.forward_module(self.core)
        if self.world == 1:
            self.model = forward
            return
        from torch.nn.parallel import DistributedDataParallel as DDP

        self.model = DDP(forward, device_ids=[self.dev.index] if self.dev.type == "cuda" else None, find_unused_parameters=True)

    # ---- saving -------------------------------------------------------------------------------

    def position(self) -> dict:
        """Where the run stands between optimizer steps: enough to continue from here bit-exactly."""
        epoch_state = self.sampler.epoch_state.clone() if self.sampler.epoch_state is not None else None
        return {"step": self.step, "rng": st.rng_state(self.sampler_gen),
                "data": {"epoch": self.epoch, "consumed": self.consumed, "epoch_state": epoch_state}}

    def save_state(self, at: dict | None = None) -> None:
        at = at or self.position()
        payload = {
            "sspsam_train": st.STATE_VERSION,
            "step": at["step"],
            "total_steps": self.total_steps,
            "seed": self.o.seed,
            "model": st.trainable_state(self.core, self.task.frozen),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": at["rng"],
            "data": at["data"],
        }
        atomic_write(self.last_path, lambda tmp: torch.save(payload, tmp))

    def checkpoint(self) -> None:
        if self.is_main:
            self.save_state()
        self.saved_at = self.step
        if self.world > 1:
            dist.barrier()

    # ---- one step -----------------------------------------------------------------------------

    def out_of_time(self) -> bool:
        limit = self.o.time_limit
        late = limit is not None and time.time() - self.start > limit
        if limit is not None and self.world > 1:  # every rank stops at the same step
            flag = torch.tensor([float(late)], device=self.dev)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            late = bool(flag.item())
        return late

    def next_batch(self) -> dict:
        """The next micro-batch on the device; an exhausted loader starts the next epoch."""
        while True:
            if self.it is None:
                self.it = iter(self.loader)
            try:
                batch = next(self.it)
                break
            except StopIteration:
                self.it, self.epoch, self.consumed = None, self.epoch + 1, 0
        self.consumed += 1
        return {k: v.to(self.dev) if torch.is_tensor(v) else v for k, v in batch.items()}

    def one_step(self) -> dict:
        task, core, accum = self.task, self.core, self.o.grad_accum
        if task.prepare(self.step, core):
            self.wrap()
        self.model.train()
        for name in task.frozen:
            core.get_submodule(name).eval()
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        for micro in range(accum):
            batch = self.next_batch()
            sync = micro == accum - 1 or self.world == 1
            with contextlib.nullcontext() if sync else self.model.no_sync():
                losses = task.loss(self.model, core, batch, self.autocast)
                (losses["total"] / accum).backward()
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach()) / accum
        if task.clip_grad:
            torch.nn.utils.clip_grad_norm_(self.trainable, task.clip_grad)
        fields = task.log_fields(self.optimizer, self.step)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        self.fresh_steps += 1
        return {"step": self.step, **fields, **sums}

    def record(self, rec: dict) -> bool:
        """log.jsonl, TensorBoard, the bar and ``on_step``; True when ``on_step`` asks to stop."""
        step = self.step
        self.history.append(rec)
        if self.log_fh is not None and (step % self.o.log_every == 0 or step == self.steps):
            self.log_fh.write(json.dumps(rec) + "\n")
            self.log_fh.flush()
            log.info("step %d/%d loss %.4f lr %.3g", step, self.steps, rec.get("total", float("nan")), rec.get("lr", float("nan")))
        if self.tb is not None:
            for k, v in rec.items():
                if k != "step":
                    self.tb.add_scalar(f"train/{k}", v, step)
        if self.bar is not None:
            self.bar[0].update(self.bar[1], completed=step, loss=rec.get("total", float("nan")))
        return bool(self.on_step(rec)) if self.on_step is not None and self.is_main else False

    # ---- the run ------------------------------------------------------------------------------

    def run(self) -> dict:
        o = self.o
        self.setup()
        if self.state is not None:
            self.resume()
        elif self.is_main:
            self.start_fresh()
        self.task.prepare(self.step, self.core)
        self.wrap()
        self.autocast = (lambda: torch.autocast(self.dev.type, dtype=torch.bfloat16)) if o.precision == "bf16" else contextlib.nullcontext
        self.saved_at = self.step if self.state is not None else -1
        self.start = time.time()
        if self.is_main:
            self.log_fh = open(self.log_path, "a")
            self.tb = _tensorboard(self.out_dir / "tb", self.step) if o.tensorboard else None
            self.bar = _progress_bar(self.steps, self.step) if o.progress else None
        between = self.position()  # the state after the last completed step; a stopped run is saved from it
        try:
            while self.step < self.steps:
                if self.out_of_time():
                    if self.echo is not None and self.is_main:
                        self.echo(f"time limit reached at step {self.step}")
                    break
                rec = self.one_step()
                between = self.position()
                stop = self.record(rec)
                if o.ckpt_every and (self.step % o.ckpt_every == 0 or self.step == self.steps):
                    self.checkpoint()
                if stop:
                    break
            if o.ckpt_every and self.saved_at != self.step:  # stopped early: the state it stopped in
                self.checkpoint()
            if self.is_main:
                self.task.save_model(self.model_path, self.core, self.step)
            if self.world > 1:
                dist.barrier()
        except BaseException as exc:
            self.stopped(exc, between)
            raise
        finally:
            self.close()
        return {"step": self.step, "module": self.core, "losses": self.history, "last": self.last_path,
                "model": self.model_path, "log": self.log_path, "seconds": time.time() - self.start}

    def stopped(self, exc: BaseException, between: dict) -> None:
        """An error mid-run: keep what the completed steps earned, or nothing if none completed."""
        if not self.is_main or self.world > 1:
            return
        self.close_logs()
        fresh = self.state is None
        unsaved = fresh and not self.last_path.is_file()
        # nothing done, or a full disk before the first checkpoint: nothing to resume, so leave nothing behind
        if fresh and (self.fresh_steps == 0 or (unsaved and isinstance(exc, OutputError))):
            st.remove_run(self.out_dir, keep=self.earlier, remove_dir=self.created_dir)
            return
        if self.o.ckpt_every and between["step"] != self.saved_at:
            try:
                self.save_state(between)
            except OutputError:  # the disk is full: a run with no checkpoint is no run
                if unsaved:
                    st.remove_run(self.out_dir, keep=self.earlier, remove_dir=self.created_dir)
                raise
        if isinstance(exc, Exception) and exc.args and isinstance(exc.args[0], str):
            exc.args = (f"{exc.args[0]} (training stopped; the run is saved at step {between['step']}: "
                        f"fix the cause and continue with --resume)",) + exc.args[1:]

    def close_logs(self) -> None:
        if self.log_fh is not None:
            self.log_fh.close()
            self.log_fh = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None

    def close(self) -> None:
        self.close_logs()
        if self.bar is not None:
            self.bar[0].stop()
            self.bar = None
        if self.own_pg and dist.is_initialized():
            dist.destroy_process_group()


def _too_small(n: int, batch_size: int, world: int) -> OptionError:
    per = f"batch_size {batch_size}" + (f" x {world} processes" if world > 1 else "")
    return OptionError(f"the training split has {n} sample{'s' * (n != 1)}: too few for {per} "
                       f"(give --batch-size {max(1, n // world)} or less)")


def _setup_distributed(device: str) -> tuple[int, int, bool]:
    """(rank, world_size, we_initialised_it). Initialises from torchrun's env when present."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    if dist.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ:
        backend = "nccl" if str(device).startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend)
        return dist.get_rank(), dist.get_world_size(), True
    return 0, 1, False


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
