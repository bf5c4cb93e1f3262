"""``--device auto`` and a one-line error for a device this machine does not have.

torch only notices a missing GPU when the first tensor moves (deep inside model loading, as a
multi-line RuntimeError), so the name is checked here, before anything is built.
"""

from __future__ import annotations

from sspsam.errors import SSPSamError


class DeviceError(SSPSamError):
    """The requested torch device is malformed or not available on this machine."""


def _mps_available(torch) -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(name: object = "auto") -> "torch.device":
    """'auto' → CUDA, then MPS, then CPU; any other name is parsed and checked to exist."""
    import torch

    if isinstance(name, torch.device):
        name = str(name)
    if not isinstance(name, str):
        raise DeviceError(f"device must be a name such as auto, cpu, cuda, cuda:1 or mps, got {type(name).__name__}")
    text = name.strip().lower()
    if text in ("", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available(torch):
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        raise DeviceError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build of torch" if torch.version.cuda is None else "no usable CUDA GPU"
            raise DeviceError(f"device {name!r} is not available: this machine has {build}; use 'auto' or 'cpu' (--device on the command line)")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise DeviceError(f"device {name!r} is not available: this machine has {count} CUDA device(s) (cuda:0…cuda:{count - 1})")
        return dev
    if dev.type == "mps":
        if not _mps_available(torch):
            raise DeviceError(f"device {name!r} is not available: MPS needs an Apple-silicon Mac; use 'auto' or 'cpu' (--device on the command line)")
        return dev
    raise DeviceError(f"device {name!r} is not supported: use auto, cpu, cuda, cuda:N or mps")
