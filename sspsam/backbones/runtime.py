"""Inference speed settings: CPU thread count, opt-in int8 Linear layers, and the switches of the
exact rewrites (SDPA attention, BatchNorm folding, channels-last convolutions).

The rewrites are on by default and compute the same function as the code they replace (max abs
diff of mask logits <= 1e-4, ``tests/test_speed_equivalence.py``). Their switches live in
``FAST`` only so that ``benchmarks/latency.py`` can time before/after in one process with
interleaved repeats and the tests can compare against the reference path; users never need them.

Why a thread default exists at all: on the 2-core machine this was measured on, shared with
other jobs, 2 intra-op threads were *slower* than 1 whenever the other core was busy (the
threads wait on each other at every op boundary). ``benchmarks/latency.py --thread-sweep``
measures it; ``--threads`` on the CLI overrides it.
"""

from __future__ import annotations

import contextlib
import os
import warnings

import torch
from torch import nn

from sspsam.errors import ConfigError

# The exact rewrites; True = fast path. Read at call time by the modules that have one.
FAST = {"sdpa": True, "fold_bn": True, "channels_last": True}


@contextlib.contextmanager
def fast_paths(**flags: bool):
    """Temporarily switch rewrites on/off, e.g. ``with fast_paths(sdpa=False): ...`` (reference path)."""
    unknown = set(flags) - set(FAST)
    if unknown:
        raise ValueError(f"unknown fast path(s) {sorted(unknown)}; known: {sorted(FAST)}")
    old = dict(FAST)
    FAST.update(flags)
    try:
        yield
    finally:
        FAST.clear()
        FAST.update(old)


def set_threads(n: int | None) -> int:
    """Set torch's intra-op CPU threads (None: leave torch's default). Returns the count in use."""
    if n is not None:
        n = int(n)
        if n < 1:
            raise ConfigError(f"--threads must be >= 1, got {n}")
        torch.set_num_threads(n)
    return torch.get_num_threads()


def default_threads() -> int:
    """Threads for a run nobody chose a count for: the cores not already kept busy by other work.

    Measured (``benchmarks/latency.py``, 2 cores): with the other core busy, 2 threads ran every
    stage slower than 1 (each op waits for the slower thread); on a quiet machine 2 win. The
    1-minute load average stands in for "busy". An ``OMP_NUM_THREADS`` the user set wins.
    """
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    cores = available_cores()
    try:
        busy = os.getloadavg()[0]
    except (AttributeError, OSError):  # no load average (Windows)
        return cores
    return max(1, min(cores, int(cores - busy + 0.5)))


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


QUANTIZE_MODES = ("none", "int8")
# Kept fp32 under int8: SAM's mask decoder writes the mask logits that get thresholded, and on the
# SSP-SAM 224 golden fixture its Linear layers alone flipped 2.1 % of the official mask pixels
# (CLIP towers 0.53 %, SSP head 0.73 %, both together 0.54 %); the score heads as in bf16.
INT8_FP32_MODULES = ("mask_decoder", "no_target_head")


def quantize(model: nn.Module, mode: str | None) -> nn.Module:
    """``int8``: dynamic int8 weights for the ``nn.Linear`` layers (activations quantised per call),
    except inside :data:`INT8_FP32_MODULES`.

    CPU only and opt-in: it changes the outputs (mask agreement with fp32 is measured in
    ``tests/test_speed_equivalence.py``, on the golden fixture in ``tests/test_golden_ssp.py`` and
    in ``benchmarks/latency.py``). Convolutions and ``nn.MultiheadAttention``'s output projection
    stay fp32 (torch has no dynamic kernels for them).
    """
    if mode in (None, "none"):
        return model
    if mode != "int8":
        raise ConfigError(f"--quantize must be one of {QUANTIZE_MODES}, got {mode!r}")
    if any(p.device.type != "cpu" for p in model.parameters()):
        raise ConfigError("--quantize int8 runs on CPU only (torch's dynamic int8 kernels are CPU kernels)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice, once per layer
        from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic

        # exact type, as quantize_dynamic({nn.Linear}) matches: MultiheadAttention's out_proj subclass stays fp32
        spec = {name: default_dynamic_qconfig for name, m in model.named_modules()
                if type(m) is nn.Linear and not set(name.split(".")) & set(INT8_FP32_MODULES)}
        return quantize_dynamic(model.eval(), spec, dtype=torch.qint8, inplace=True)


__all__ = ["FAST", "fast_paths", "set_threads", "default_threads", "available_cores", "quantize", "QUANTIZE_MODES", "INT8_FP32_MODULES"]
