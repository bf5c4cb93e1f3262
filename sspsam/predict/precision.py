"""Half precision and torch.compile for the predictors.

Half precision = weights stored in bf16/fp16 AND the forward run under ``torch.autocast`` in that
dtype. Kept in fp32: every normalisation layer (a variance in fp16 overflows, in bf16 it loses the
small differences a norm exists to rescale) and the score heads (the no-target head: its sigmoid
is thresholded, so a rounding step is a flipped answer). Autocast itself keeps softmax and the
reductions it lists in fp32 and casts each matmul/conv input to the half dtype, so fp32 tensors
made inside the model (positional tables, masks) mix with half weights without a dtype error.

``dtype="auto"`` (the predictors' default) picks bf16 only where the hardware has bf16 matrix
units, because elsewhere bf16 is emulated and several times slower than fp32: a CUDA device that
reports bf16 support, or a CPU with AMX-BF16 or AVX512-BF16 that torch dispatches AVX512 kernels
on (oneDNN then runs the bf16 matmuls on those units). Everything else runs fp32. The environment
variable ``SSPSAM_DTYPE`` replaces the automatic choice (the test suite pins fp32 with it, since its
golden comparisons are fp32 numerics); an explicit ``dtype=`` argument wins over both.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import types
import warnings

import torch
from torch import nn

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
FP32_MODULES = ("no_target_head",)  # score heads: thresholded outputs stay fp32


AUTO = "auto"
#: environment variable that replaces what ``dtype="auto"`` picks (any name in DTYPES)
ENV_DTYPE = "SSPSAM_DTYPE"
#: /proc/cpuinfo flags of CPUs whose bf16 matmuls run on bf16 units (AMX tiles, AVX512-BF16 dot products)
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")

_log = logging.getLogger("sspsam")


@functools.lru_cache(maxsize=1)
def host_cpu_flags() -> frozenset[str]:
    """The CPU feature flags Linux reports (empty elsewhere: no claim is made about unknown CPUs)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


def choose_dtype(device, cpu_flags: set[str] | frozenset[str] | None = None, capability: str | None = None,
                 cuda_bf16: bool | None = None) -> tuple[torch.dtype, str]:
    """``(dtype, reason)`` that ``dtype="auto"`` runs on ``device``; pure when every hardware fact
    is passed in (``None``: ask this machine).

    CUDA: bf16 where ``torch.cuda.is_bf16_supported()`` (Ampere and later), else fp32 (fp16 is
    never picked: its range overflows in attention logits). CPU: bf16 when the flags name bf16
    units AND torch dispatches AVX512 kernels; with ``ATEN_CPU_CAPABILITY`` capped lower, or
    without oneDNN, bf16 would be converted element by element and lose to fp32.
    """
    device = torch.device(device)
    if device.type == "cuda":
        if cuda_bf16 is None:
            try:
                with torch.cuda.device(device):
                    cuda_bf16 = bool(torch.cuda.is_bf16_supported())
            except Exception:  # noqa: BLE001 — no usable CUDA: the fp32 answer is always safe
                cuda_bf16 = False
        if cuda_bf16:
            return torch.bfloat16, "CUDA device with bf16 support"
        return torch.float32, "CUDA device without bf16 support"
    if device.type != "cpu":
        return torch.float32, f"no bf16 rule for {device.type} devices"
    live = cpu_flags is None and capability is None
    flags = host_cpu_flags() if cpu_flags is None else frozenset(cpu_flags)
    if capability is None:
        capability = torch.backends.cpu.get_cpu_capability()
    units = [f for f in BF16_CPU_FLAGS if f in flags]
    if not units:
        return torch.float32, "CPU without AMX-BF16/AVX512-BF16"
    if not str(capability).upper().startswith("AVX512"):
        return torch.float32, f"CPU has {units[0]} but torch dispatches {capability} kernels"
    if live and not torch.backends.mkldnn.is_available():
        return torch.float32, f"CPU has {units[0]} but this torch build has no oneDNN"
    return torch.bfloat16, f"CPU has {units[0]}, torch dispatches {capability}"


def auto_dtype(device, cpu_flags=None, capability: str | None = None, cuda_bf16: bool | None = None) -> torch.dtype:
    """The dtype of :func:`choose_dtype`, without the reason."""
    return choose_dtype(device, cpu_flags, capability, cuda_bf16)[0]


def resolve_auto(dtype, device) -> tuple[torch.dtype | None, str]:
    """``(dtype, how it was chosen)`` for a predictor's ``dtype`` argument on ``device``.

    ``None`` stays ``None`` (the weights run as given, a user's ``model.half()`` included);
    ``"auto"`` becomes ``$SSPSAM_DTYPE`` when set, else :func:`choose_dtype`'s pick.
    """
    if isinstance(dtype, str) and dtype.lower() == AUTO:
        env = os.environ.get(ENV_DTYPE, "").strip()
        if env and env.lower() != AUTO:
            try:
                return resolve_dtype(env), f"{ENV_DTYPE}={env}"
            except ValueError as exc:
                raise ValueError(f"{ENV_DTYPE}: {exc}") from None
        picked, why = choose_dtype(device)
        return picked, f"auto: {why}"
    if dtype is None:
        return None, "as the weights are"
    return resolve_dtype(dtype), "asked for"


_said: set[tuple[str, str]] = set()


def log_choice_once(dtype: torch.dtype, how: str) -> None:
    """One log line per process for each automatic choice, so a library user can see why a model
    runs in bf16 without a line per predictor."""
    if not how.startswith(AUTO) or (str(dtype), how) in _said:
        return
    _said.add((str(dtype), how))
    _log.info("sspsam runs in %s (%s); dtype='float32' for the fp32 path", dtype_name(dtype), how)


def dtype_name(dtype: torch.dtype) -> str:
    """'float32', 'bfloat16', 'float16': the names outputs' metadata carries."""
    return str(dtype).replace("torch.", "")


def resolve_dtype(dtype) -> torch.dtype:
    """None/'float32'/torch.float32 → fp32; 'bf16'/torch.bfloat16, 'fp16'/torch.float16 likewise."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, str):
        if dtype.lower() not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}: use auto, float32, bfloat16 or float16")
        return DTYPES[dtype.lower()]
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be torch.float32, torch.bfloat16 or torch.float16, got {dtype}")
    return dtype


def quantize_predictor(predictor, mode: str) -> None:
    """Quantize a loaded predictor's model in place ('none' leaves it): after loading, since the
    checkpoint holds fp32 weights; CPU PyTorch models only (an ONNX export runs its own graphs)."""
    if mode == "none":
        return
    import sspsam.backbones.runtime as runtime
    from sspsam.errors import SSPSamError

    if predictor.device.type != "cpu":
        raise SSPSamError(f"--quantize int8 runs on CPU only; the model is on {predictor.device} (add --device cpu)")
    if not any(True for _ in predictor.model.parameters()):
        raise SSPSamError("--quantize int8 applies to PyTorch models; an ONNX export runs its graphs in fp32")
    runtime.quantize(predictor.model, mode)


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)) or "Norm" in type(module).__name__


def apply_dtype(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast ``model``'s float parameters and buffers to ``dtype`` in place, except norms and score heads."""
    if dtype == torch.float32:
        return model.float()
    keep = set()
    for name, module in model.named_modules():
        if _is_norm(module) or name.split(".")[-1] in FP32_MODULES:
            keep.update(id(m) for m in module.modules())
    for module in model.modules():
        if id(module) in keep:
            continue
        for key, p in module.named_parameters(recurse=False):
            if p.is_floating_point():
                p.data = p.data.to(dtype)
        for key, b in module.named_buffers(recurse=False):
            if b is not None and b.is_floating_point():
                module._buffers[key] = b.to(dtype)
    return model


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype most of the model's float weights have (a user's ``model.half()`` included)."""
    counts: dict[torch.dtype, int] = {}
    for p in model.parameters():
        if p.is_floating_point():
            counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    return max(counts, key=counts.get) if counts else torch.float32


def autocast(device: torch.device, dtype: torch.dtype):
    """``torch.autocast`` for a half dtype on ``device``; a no-op context for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def check_dtype(device: torch.device, dtype: torch.dtype) -> None:
    """Refuse a dtype this device cannot run, in one line (fp16 on a CPU-only torch without support)."""
    if dtype == torch.float32:
        return
    try:
        with torch.autocast(device_type=device.type, dtype=dtype):
            torch.ones(2, 2, device=device) @ torch.ones(2, 2, device=device)
    except (RuntimeError, AssertionError) as exc:
        raise ValueError(f"{dtype} is not supported on {device} by this torch build ({str(exc).splitlines()[0][:160]})") from None


def compile_hot_modules(owner, names: list[str], on_failure=None) -> list[str]:
    """Wrap ``owner.<name>`` modules (dotted names) with ``torch.compile``; returns the ones wrapped.

    compile is lazy: errors surface on a call, the first one or a later one whose new shape makes
    it compile again. With ``on_failure`` set, a compiled call that raises calls
    ``on_failure(exc)`` (which is expected to :func:`uncompile`) and runs the eager module
    instead, so a user's call never fails because of the compiler. Shapes are static
    (``dynamic=False``): the towers see one input size per batch size, and symbolic shapes failed
    on TinyViT at a second batch size (InductorError, torch 2.13). A name the model lacks (no such
    module, or ``None``, e.g. a model built without SAM's image encoder) is skipped; a torch
    without ``compile`` only warns.
    """
    if not hasattr(torch, "compile"):
        warnings.warn("torch.compile is not available in this torch build; running eagerly", stacklevel=3)
        return []
    done = []
    for name in names:
        parent, _, attr = name.rpartition(".")
        try:
            holder = owner.get_submodule(parent) if parent else owner
        except AttributeError:
            continue
        module = getattr(holder, attr, None)
        is_method = isinstance(module, types.MethodType) and module.__self__ is holder
        if not (isinstance(module, nn.Module) or is_method):
            continue
        try:
            compiled = torch.compile(module, dynamic=False)
        except Exception as exc:  # noqa: BLE001 — any failure means "run eagerly", said once
            warnings.warn(f"torch.compile failed for {name} ({type(exc).__name__}: {str(exc)[:160]}); running it eagerly", stacklevel=3)
            continue
        if on_failure is not None:
            compiled = _fall_back_on_failure(compiled, module, on_failure)
        setattr(holder, attr, compiled)  # a method: an instance attribute over the class's method
        done.append(name)
    return done


def _fall_back_on_failure(compiled, eager, on_failure):
    """``compiled`` behind a guard: an exception calls ``on_failure`` and the call is answered by
    ``eager`` (a genuine error then comes from the eager run, as without compile). A module keeps
    its type (its ``forward`` is routed); a compiled method becomes a plain function."""
    compiled_call = compiled.forward if isinstance(compiled, nn.Module) else compiled

    def call(*args, **kwargs):
        try:
            return compiled_call(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 — whatever the compiler raised, eager answers
            on_failure(exc)
            return eager(*args, **kwargs)

    if isinstance(compiled, nn.Module):
        compiled.forward = call
        return compiled
    return call


def uncompile(owner, names: list[str]) -> None:
    """Undo :func:`compile_hot_modules`: put each module's eager original back (a compiled method:
    drop the instance attribute, so the class's method answers again)."""
    for name in names:
        parent, _, attr = name.rpartition(".")
        holder = owner.get_submodule(parent) if parent else owner
        if attr in vars(holder) and callable(vars(holder)[attr]) and not isinstance(vars(holder)[attr], nn.Module):
            del holder.__dict__[attr]
            continue
        module = getattr(holder, attr)
        setattr(holder, attr, getattr(module, "_orig_mod", module))
