"""Inference speed settings: CPU thread count, opt-in int8 Linear layers, and the switches of the
exact rewrites (SDPA attention, BatchNorm folding, channels-last convolutions, SAM's mask decoder
broadcasting the image embedding and its positional table instead of copying them per phrase,
batch-first attention and GRUs under autocast reading their sequences contiguously).

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
FAST = {"sdpa": True, "fold_bn": True, "channels_last": True, "decoder_broadcast": True, "seq_contiguous": True}


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


class _ContiguousMHA(nn.MultiheadAttention):
    """A batch-first ``nn.MultiheadAttention`` that hands its inputs to the attention sequence-first
    and contiguous while autocast is on.

    Under autocast torch skips MHA's fused inference kernel and projects q/k/v with ``F.linear`` on
    the transposed view of each batch-first input. In a half dtype with more than one sequence
    that view cannot be folded into one matrix product: torch expands the projection weight to
    one copy per sequence position and runs a batched product, so copying weights dominates the
    call. One contiguous copy of each input avoids it; the projections and the attention are the
    same arithmetic (in a half dtype the sums may round differently). Outside autocast
    (fp32, training without AMP) torch's own forward runs unchanged.
    """

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if not (FAST["seq_contiguous"] and self.batch_first and query.dim() == 3 and self._qkv_same_embed_dim
                and torch.is_autocast_enabled(query.device.type)):
            return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal)
        q = query.transpose(0, 1).contiguous()
        k = q if key is query else key.transpose(0, 1).contiguous()
        v = k if value is key else q if value is query else value.transpose(0, 1).contiguous()
        out, weights = torch.nn.functional.multi_head_attention_forward(
            q, k, v, self.embed_dim, self.num_heads, self.in_proj_weight, self.in_proj_bias, self.bias_k, self.bias_v,
            self.add_zero_attn, self.dropout, self.out_proj.weight, self.out_proj.bias, training=self.training,
            key_padding_mask=key_padding_mask, need_weights=need_weights, attn_mask=attn_mask,
            average_attn_weights=average_attn_weights, is_causal=is_causal)
        return out.transpose(1, 0), weights


def gru_batch_first(gru: nn.GRU, x: torch.Tensor) -> torch.Tensor:
    """``gru(x)[0]`` for a batch-first GRU and batch-first ``x`` [B, L, E]: under autocast with
    more than one sequence the recurrence is fed sequence-first and contiguous, for the reason
    :class:`_ContiguousMHA` gives (the input projection of a transposed half-precision view copies
    the weight once per position); the same recurrence, from zero states, as ``nn.GRU.forward``."""
    if not (FAST["seq_contiguous"] and gru.batch_first and x.dim() == 3 and x.shape[0] > 1
            and torch.is_autocast_enabled(x.device.type) and type(gru) is nn.GRU):
        return gru(x)[0]
    seq = x.transpose(0, 1).contiguous()
    hx = torch.zeros(gru.num_layers * (2 if gru.bidirectional else 1), x.shape[0], gru.hidden_size, dtype=seq.dtype, device=seq.device)
    out, _ = torch._VF.gru(seq, hx, gru._flat_weights, gru.bias, gru.num_layers, float(gru.dropout), gru.training,
                           gru.bidirectional, False)
    return out.transpose(0, 1)


def contiguous_attention(root: nn.Module) -> nn.Module:
    """Give every plain ``nn.MultiheadAttention`` in ``root`` the :class:`_ContiguousMHA` forward
    (its class is swapped: parameter names, checkpoints and outputs outside autocast are untouched)."""
    for module in root.modules():
        if type(module) is nn.MultiheadAttention:
            module.__class__ = _ContiguousMHA
    return root


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
