"""Import the pure-torch model modules of open_clip and segment_anything without torchvision.

Both packages' ``__init__`` pull in torchvision (for image transforms, NMS and a frozen
BatchNorm we never use), and no PyPI torchvision imports beside a CPU-only torch build (its
compiled ops expect CUDA torch). The model code itself is plain torch, so we import the submodules we need
without running the package ``__init__``. If a working torchvision is installed the normal
import path is used unchanged.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

import torch
from torch import nn


def _torchvision_works() -> bool:
    if importlib.util.find_spec("torchvision") is None:
        return False
    try:
        importlib.import_module("torchvision")
        return True
    except Exception:  # a wheel built against another torch raises RuntimeError on import
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        return False


def _bare_package(name: str) -> None:
    """Register package ``name`` in sys.modules without executing its ``__init__``."""
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None or spec.submodule_search_locations is None:
        raise ImportError(
            f"the package '{name}' is not installed; run `pip install -c constraints.txt -e .` in the sspsam "
            f"checkout (or `pip install open_clip_torch segment_anything`)"
        )
    pkg = types.ModuleType(name)
    pkg.__path__ = list(spec.submodule_search_locations)
    pkg.__spec__ = spec
    pkg.__file__ = spec.origin
    sys.modules[name] = pkg


class _FrozenBatchNorm2d(nn.Module):
    """Stand-in for torchvision.ops.misc.FrozenBatchNorm2d, used by open_clip only to freeze ResNet towers."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        for n, v in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
            self.register_buffer(n, torch.full((num_features,), v))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        bias = self.bias - self.running_mean * scale
        return x * scale[None, :, None, None] + bias[None, :, None, None]


def _import_without_torchvision(package: str, submodules: list[str]) -> list[types.ModuleType]:
    if _torchvision_works():
        return [importlib.import_module(f"{package}.{s}") for s in submodules]
    _bare_package(package)
    stubs = {}
    if "torchvision" not in sys.modules:
        tv, ops, misc = (types.ModuleType(n) for n in ("torchvision", "torchvision.ops", "torchvision.ops.misc"))
        misc.FrozenBatchNorm2d = _FrozenBatchNorm2d
        tv.ops, ops.misc = ops, misc
        stubs = {"torchvision": tv, "torchvision.ops": ops, "torchvision.ops.misc": misc}
        sys.modules.update(stubs)
    try:
        return [importlib.import_module(f"{package}.{s}") for s in submodules]
    finally:
        for n in stubs:  # never leave a fake torchvision behind for other libraries to find
            sys.modules.pop(n, None)


def open_clip_modules():
    """(open_clip.model, open_clip.tokenizer)."""
    return tuple(_import_without_torchvision("open_clip", ["model", "tokenizer"]))


def segment_anything_modeling():
    """segment_anything.modeling (ImageEncoderViT, PromptEncoder, MaskDecoder, TwoWayTransformer, Sam)."""
    return _import_without_torchvision("segment_anything", ["modeling"])[0]
