"""Everything a GPU can break, in one run: prediction in every dtype and compiled, ONNX Runtime's
CUDA provider, DDP training with AMP and its resume, a cached-feature epoch, and the stage table.

Examples::

    python benchmarks/gpu_check.py              # on a CUDA machine: real-size models, random weights (< 8 min on one H100)
    python benchmarks/gpu_check.py --dry-run    # anywhere: the same steps on the CPU with the *-tiny configs

Steps (each one row of the closing table; any FAIL makes the exit status 1):

1. ``Segmenter`` and ``OVSS``: the bundled demos (trained) and ssp-sam-vitb / escnet-vitb at their
   real input sizes with random weights: the CPU fp32 answer first, then on the GPU in fp32, bf16,
   fp16 and (real size only) ``compile=True``; every answer NaN-free, and >= 99 % of mask pixels / labels equal to
   the CPU's (for the random-weight models only in fp32: their outputs are near-ties everywhere).
2. ``sspsam export onnx`` of ssp-sam-mobile, run with ONNX Runtime's CUDA provider (skipped when
   onnxruntime or its CUDA provider is missing), masks compared with PyTorch's.
3. Under ``torchrun --nproc_per_node=1`` (NCCL; gloo in the dry run): one AMP (bf16) step of
   SSP-SAM and of ESC-Net, then a resume to step 2 from the checkpoint; then a feature cache of
   SAM's embeddings and one epoch trained from it.
4. ``benchmarks/latency.py``'s stage table on the device (fp32 and bf16 rows; FLOPs, and the ratio
   to the card's bf16 matmul peak measured in the same run).

Random weights are enough for everything but a half dtype's agreement: every comparison is of one
model with itself across devices and dtypes.
Without a GPU and without ``--dry-run`` it prints one line and exits 0 (nothing was checked).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # a checkout without an install
    sys.path.insert(0, str(ROOT))

AGREE = 0.99
REAL = {"ssp": "ssp-sam-vitb", "ovss": "escnet-vitb", "onnx": "ssp-sam-mobile", "train_ssp": "ssp-sam-mobile",
        "train_ovss": "escnet-vitb", "latency": ["ssp-sam-vitb", "ssp-sam-mobile"], "zeroshot": ["zeroshot-mobile"]}
TINY = {"ssp": "ssp-sam-tiny", "ovss": "escnet-tiny", "onnx": "ssp-sam-tiny", "train_ssp": "ssp-sam-tiny",
        "train_ovss": "escnet-tiny", "latency": ["ssp-sam-tiny"], "zeroshot": ["zeroshot-tiny"]}
PHRASES = ["the red circle", "the blue square on the left", "the biggest shape"]
CLASSES = ["background", "red", "green", "blue", "yellow"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="run every step on the CPU with the tiny configs (quick)")
    p.add_argument("--out", type=Path, default=None, help="working folder (default: a temporary one, removed)")
    p.add_argument("--skip", nargs="*", default=[], choices=["predict", "onnx", "train", "latency"],
                   help="steps to leave out")
    p.add_argument("--compile", action="store_true", help="in the dry run too: torch.compile (minutes on a CPU)")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # the torchrun side of step 3
    return p.parse_args(argv)


class Table:
    """The rows of the closing table; ``step`` runs a check and records PASS / FAIL / skip."""

    def __init__(self):
        self.rows: list[tuple[str, str, str, float]] = []

    def step(self, name: str, fn) -> None:
        t0 = time.perf_counter()
        try:
            status, detail = fn()
        except Exception as exc:  # noqa: BLE001 — any failure is a FAIL row, and the run goes on
            status, detail = "FAIL", f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            traceback.print_exc(file=sys.stderr)
        self.rows.append((name, status, detail, time.perf_counter() - t0))
        print(f"[{status}] {name}: {detail} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)

    def add(self, name: str, status: str, detail: str, seconds: float = 0.0) -> None:
        self.rows.append((name, status, detail, seconds))

    def print(self) -> None:
        print("| check | result | detail | seconds |")
        print("|---|---|---|---:|")
        for name, status, detail, s in self.rows:
            print(f"| {name} | {status} | {detail.replace('|', '/')} | {s:.1f} |")

    @property
    def failed(self) -> bool:
        return any(r[1] == "FAIL" for r in self.rows)


def _scene(size: tuple[int, int] = (96, 128)):
    from sspsam.data.shapes import make_scene

    return make_scene(0, width=size[1], height=size[0]).render()


def _no_weights(cfg: dict) -> dict:
    """The config without pretrained-weight names: random weights, nothing downloaded."""
    cfg = json.loads(json.dumps(cfg))
    for part in ("clip", "sam"):
        if isinstance(cfg.get(part), dict):
            cfg[part].pop("weights", None)
    return cfg


def _agreement(a, b) -> float:
    import numpy as np

    a, b = np.asarray(a), np.asarray(b)
    return float((a == b).mean()) if a.shape == b.shape else 0.0


# ---- step 1: predictors ----------------------------------------------------------------------
def check_predictors(table: Table, cfgs: dict, device: str, dry: bool, compile_too: bool) -> None:
    """Each predictor twice: the bundled demo (trained weights, so a dtype's agreement with fp32
    means something) and the real-size architecture with random weights (its masks and labels are
    near-ties everywhere, so only fp32 and compiled fp32 are held to the agreement bar; the half
    dtypes must run NaN-free and their agreement is reported)."""
    import copy

    import numpy as np
    import torch

    from sspsam.config import load_config
    from sspsam.models.build import build_model
    from sspsam.predict.ovss import OVSS
    from sspsam.predict.segmenter import Segmenter

    variants = [("fp32", "fp32", False), ("bf16", "bf16", False), ("fp16", "fp16", False), ("compile", "fp32", True)]
    for kind, cls in (("segment", Segmenter), ("ovss", OVSS)):
        demo = cls.from_pretrained("shapes-demo" if kind == "segment" else "ovss-shapes-demo", device="cpu", dtype="fp32")
        torch.manual_seed(0)
        name = cfgs["ssp" if kind == "segment" else "ovss"]
        models = [(demo.name, demo.model, True, (96, 128)),
                  (f"{name} (random)", build_model(_no_weights(load_config(name))).eval(), False,
                   (96, 128) if dry else (480, 640))]
        for label_model, base, trained, size in models:
            rgb = _scene(size)

            def answer(pred, rgb=rgb):
                res = pred.segment(rgb, PHRASES) if kind == "segment" else pred.segment(rgb, CLASSES)
                scores = np.asarray(res.scores, dtype=np.float64)
                if not np.isfinite(scores).all():
                    raise AssertionError("non-finite scores")
                return np.asarray(res.masks if kind == "segment" else res.labels)

            ref = answer(cls(copy.deepcopy(base), "cpu", label_model, dtype="fp32"))
            for label, dtype, comp in variants:
                if comp and trained:  # compile once per predictor, at real size: each compile costs minutes
                    continue

                def run(dtype=dtype, comp=comp, base=base, trained=trained, label_model=label_model, answer=answer):
                    if comp and dry and not compile_too:
                        return "skip", "torch.compile in the dry run: add --compile (minutes on a CPU)"
                    if dtype == "fp16" and device == "cpu":
                        from sspsam.predict.precision import check_dtype

                        try:
                            check_dtype(torch.device("cpu"), torch.float16)
                        except ValueError as exc:
                            return "skip", str(exc)[:120]
                    with warnings.catch_warnings(record=True) as caught:
                        warnings.simplefilter("always")
                        pred = cls(copy.deepcopy(base), device, label_model, dtype=dtype, compile=comp)
                        got = answer(pred)
                    fell_back = [str(w.message)[:100] for w in caught if "compile" in str(w.message)]
                    if comp and fell_back:
                        raise AssertionError(f"torch.compile fell back to eager: {fell_back[0]}")
                    agree = _agreement(ref, got)
                    what = "mask pixels" if kind == "segment" else "labels"
                    judged = trained or dtype == "fp32"
                    if judged and agree < AGREE:
                        raise AssertionError(f"{agree:.2%} of {what} agree with CPU fp32 (< {AGREE:.0%})")
                    return "PASS", f"{agree:.2%} of {what} agree with CPU fp32{'' if judged else ' (random weights: reported, not judged)'}, NaN-free"

                table.step(f"{kind} {label_model} {device} {label}", run)
        del models, demo
        if device.startswith("cuda"):
            torch.cuda.empty_cache()


# ---- step 2: ONNX ----------------------------------------------------------------------------
def check_onnx(table: Table, cfgs: dict, device: str, work: Path) -> None:
    def run():
        import importlib.util

        import torch

        if importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None:
            return "skip", "onnx / onnxruntime not installed"
        import onnxruntime as ort

        from sspsam.config import load_config
        from sspsam.models.build import build_model
        from sspsam.predict.onnx import export_onnx
        from sspsam.predict.onnx_runtime import load_graphs
        from sspsam.predict.segmenter import Segmenter

        provider = "CUDAExecutionProvider" if device.startswith("cuda") else "CPUExecutionProvider"
        if provider not in ort.get_available_providers():
            return "skip", f"onnxruntime has no {provider} (providers: {', '.join(ort.get_available_providers())})"
        name = cfgs["onnx"]
        torch.manual_seed(0)
        model = build_model(_no_weights(load_config(name))).eval()
        folder = work / "onnx"
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            export_onnx(model, folder, name=name)
        graphs = load_graphs(folder, providers=[provider, "CPUExecutionProvider"])
        if graphs.providers[0] != provider:
            raise AssertionError(f"sessions run on {graphs.providers}, not {provider}")
        rgb = _scene()
        ref = Segmenter(model, "cpu", name, dtype="fp32").segment(rgb, PHRASES).masks
        got = Segmenter(graphs, "cpu", name).segment(rgb, PHRASES).masks
        agree = _agreement(ref, got)
        if agree < AGREE:
            raise AssertionError(f"{agree:.2%} of mask pixels agree with PyTorch fp32")
        return "PASS", f"{name} on {provider}: {agree:.2%} of mask pixels agree with PyTorch fp32"

    table.step(f"onnx export + onnxruntime ({'CUDA' if device.startswith('cuda') else 'CPU'})", run)


# ---- step 3: training under torchrun -----------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_training(table: Table, cfgs: dict, device: str, dry: bool, work: Path) -> None:
    t0 = time.perf_counter()
    result = work / "train.json"
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    if dry:
        env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), __file__, "--worker", json.dumps({
               "device": device, "dry": dry, "work": str(work), "result": str(result),
               "ssp": cfgs["train_ssp"], "ovss": cfgs["train_ovss"]})]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    seconds = time.perf_counter() - t0
    rows = json.loads(result.read_text()) if result.is_file() else []
    for row in rows:
        table.add(row["name"], row["status"], row["detail"], row["seconds"])
    if proc.returncode != 0 or not rows:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        table.add("torchrun --nproc_per_node=1", "FAIL", f"exit {proc.returncode}: {tail[0][:200]}", seconds)


def worker(spec: dict) -> int:
    """The torchrun side: a process group of one (NCCL on a GPU), then each training check."""
    import math

    import torch
    import torch.distributed as dist

    from sspsam.config import load_config
    from sspsam.data import generate_refer
    from sspsam.data.semseg import generate_semseg
    from sspsam.engine.train_ovss import train_ovss
    from sspsam.engine.trainer import build_feature_cache, train

    device, dry, work = spec["device"], spec["dry"], Path(spec["work"])
    if device.startswith("cuda"):
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    rows = []

    def step(name, fn):
        t0 = time.perf_counter()
        try:
            status, detail = fn()
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            status, detail = "FAIL", f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        rows.append({"name": name, "status": status, "detail": detail, "seconds": time.perf_counter() - t0})

    refer = work / "refcoco"
    generate_refer(refer, "refcoco", n_images=8, seed=0)
    semseg = work / "semseg"
    generate_semseg(semseg, n=4, size=96, seed=0, splits=("train",))
    backend = dist.get_backend()
    amp = "bf16"

    def finite(losses):
        vals = [r["total"] if isinstance(r, dict) else r for r in losses]
        if not vals or not all(math.isfinite(v) for v in vals):
            raise AssertionError(f"losses {vals}")
        return vals

    def ssp():
        cfg = _no_weights(load_config(spec["ssp"]))
        cfg["train"] = {**(cfg.get("train") or {}), "freeze": ["clip", "sam.image_encoder"], "warmup_steps": 1}
        kw = dict(batch_size=2, lr=1e-4, decoder_lr=1e-4, seed=0, ckpt_every=1, tensorboard=False, device=device,
                  precision=amp, load_backbones=False)
        first = train(cfg, refer, work / "ssp", steps=1, **kw)
        again = train(cfg, refer, work / "ssp", steps=2, resume=True, **kw)
        vals = finite(first["losses"]) + finite(again["losses"])
        if again["step"] != 2 or [r["step"] for r in again["losses"]] != [2]:
            raise AssertionError(f"resume ran steps {[r['step'] for r in again['losses']]}, not [2]")
        return "PASS", f"{backend}, {amp} AMP: losses {', '.join(f'{v:.3f}' for v in vals)}; resumed at step 1"

    def escnet():
        cfg = _no_weights(load_config(spec["ovss"]))
        kw = dict(batch_size=2, seed=0, log_every=0, save_every=1, total_steps=2, tensorboard=False, device=device,
                  precision=amp, log=lambda m: None)
        train_ovss(cfg, semseg, work / "esc", steps=1, **kw)
        again = train_ovss(cfg, semseg, work / "esc", steps=2, resume=True, **kw)
        vals = finite(again["losses"])
        if again["steps"] != 2 or len(vals) != 1:
            raise AssertionError(f"resume ran {len(vals)} steps to step {again['steps']}, not 1 to step 2")
        return "PASS", f"{backend}, {amp} AMP: step 2 loss {vals[0]:.3f} after a resume at step 1"

    def cached():
        cfg = _no_weights(load_config(spec["ssp"]))
        cfg["train"] = {**(cfg.get("train") or {}), "freeze": ["clip", "sam.image_encoder"], "warmup_steps": 1,
                        "augment": False}
        info = build_feature_cache(cfg, refer, work / "cache", seed=0, load_backbones=False, batch_size=2,
                                   shard_size=4, dtype="float16", device=device)
        rows_ = int(info["rows"])
        steps = max(1, math.ceil(rows_ / 2))
        res = train(cfg, refer, work / "cached_run", steps=steps, batch_size=2, lr=1e-4, decoder_lr=1e-4, seed=0,
                    ckpt_every=steps, tensorboard=False, device=device, precision=amp, load_backbones=False,
                    cached_features=work / "cache")
        vals = finite(res["losses"])
        return "PASS", f"cache of {rows_} images ({info['shards']} shards), {len(vals)} steps from it, last loss {vals[-1]:.3f}"

    step(f"train {spec['ssp']} 2 steps + resume (torchrun, 1 process)", ssp)
    step(f"train {spec['ovss']} 2 steps + resume (torchrun, 1 process)", escnet)
    step(f"feature cache + cached epoch {spec['ssp']}", cached)
    if dist.get_rank() == 0:
        Path(spec["result"]).write_text(json.dumps(rows))
    dist.barrier()
    dist.destroy_process_group()
    return 0


# ---- step 4: the stage table -----------------------------------------------------------------
def check_latency(table: Table, cfgs: dict, device: str, dry: bool) -> str:
    text = io.StringIO()

    def run():
        import importlib.util

        spec = importlib.util.spec_from_file_location("sspsam_latency", Path(__file__).with_name("latency.py"))
        latency = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(latency)

        argv = ["--device", "cuda" if device.startswith("cuda") else "cpu", "--dtype", "fp32", "bf16", "--no-ab",
                "--variants", *cfgs["latency"], "--zeroshot", *cfgs["zeroshot"]]
        argv += ["--repeats", "1", "--warmup", "0", "--phrases", "2", "--no-profile", "--threads", "1"] if dry else ["--repeats", "5"]
        with contextlib.redirect_stdout(text):
            latency.main(argv)
        if "| ssp-sam" not in text.getvalue():
            raise AssertionError("no stage rows")
        return "PASS", f"stage table below ({', '.join(cfgs['latency'])}; fp32 and bf16)"

    table.step(f"stage table {device}", run)
    return text.getvalue()


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(json.loads(args.worker))
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here, nothing checked (--dry-run runs every step on the CPU with the tiny configs)")
        return 0
    os.environ.setdefault("SSPSAM_OFFLINE", "1")  # random weights: nothing may be downloaded
    device = "cpu" if args.dry_run else "cuda"
    cfgs = TINY if args.dry_run else REAL
    if args.dry_run:
        torch.set_num_threads(1)
    table = Table()
    latency_text = ""
    with contextlib.ExitStack() as stack:
        work = args.out or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sspsam-gpu-check-")))
        work.mkdir(parents=True, exist_ok=True)
        if "predict" not in args.skip:
            check_predictors(table, cfgs, device, args.dry_run, args.compile)
        if "onnx" not in args.skip:
            check_onnx(table, cfgs, device, work)
        if "train" not in args.skip:
            check_training(table, cfgs, device, args.dry_run, work)
        if "latency" not in args.skip:
            latency_text = check_latency(table, cfgs, device, args.dry_run)
    name = torch.cuda.get_device_name(0) if device == "cuda" else "CPU (dry run, tiny configs)"
    print(f"gpu_check on {name}, torch {torch.__version__}: "
          f"{sum(r[1] == 'PASS' for r in table.rows)} passed, {sum(r[1] == 'FAIL' for r in table.rows)} failed, "
          f"{sum(r[1] == 'skip' for r in table.rows)} skipped")
    print()
    table.print()
    if latency_text:
        print()
        print(latency_text.rstrip())
    return 1 if table.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
