"""How much model work an OVSS request asks for, known before any of it runs.

A request is refused by name when its work is over the limit, so a thousand class names on a
server answer in milliseconds instead of timing out after the model has run for minutes. The work
is counted (torch's FLOP counter on a blank input, once per model) rather than timed, so the bound
is the same on a busy machine and an idle one, and rather than derived from the config, because the
model families spend their per-class work in different places (ESC-Net's SAM blocks, the
training-free path's prompts).
"""

from __future__ import annotations

import math
import os

import torch

from sspsam.errors import WorkLimitError
from sspsam.io.transforms import Letterbox

#: sliding windows overlap by this share of their side (mmseg's slide rule)
OVERLAP = 1 / 3
#: the model work one ``segment`` call may ask for, in GFLOP (multiply-adds × 2 of the text tower
#: and the per-view image and class passes); on a CPU about what two cores run in ten seconds or
#: so with the bundled demo, on an accelerator a hundred times that
MAX_GFLOP_ENV = "SSPSAM_MAX_OVSS_GFLOP"
_CPU_GFLOP = 100.0
_ACCELERATOR_GFLOP = 10_000.0


def default_max_gflop(device: torch.device | str) -> float | None:
    """``SSPSAM_MAX_OVSS_GFLOP`` when set (0 or below: no bound), else the device kind's default."""
    raw = os.environ.get(MAX_GFLOP_ENV, "").strip()
    if raw:
        try:
            value = float(raw)
        except ValueError:
            raise WorkLimitError(f"{MAX_GFLOP_ENV} must be a number of GFLOP, got {raw[:40]!r}") from None
        return value if value > 0 and math.isfinite(value) else None
    return _CPU_GFLOP if torch.device(device).type == "cpu" else _ACCELERATOR_GFLOP


def window_starts(length: int, window: int) -> list[int]:
    """Window starts along one axis (mmseg's slide rule): stride = window × (1 − overlap), last flush."""
    stride = max(1, window - int(round(window * OVERLAP)))
    n = max(length - window + stride - 1, 0) // stride + 1
    return [min(i * stride, max(length - window, 0)) for i in range(n)]


class WorkLimit:
    """The work bound of :class:`~sspsam.predict.ovss.OVSS` (a mixin: it reads the predictor's model,
    device, name, sliding-window settings and ``max_gflop``)."""

    # ---- the work bound ---------------------------------------------------------------------
    def unit_gflop(self) -> tuple[float, float, float]:
        """(image pass per view, class pass per class and view, text tower per class) in GFLOP,
        counted once (torch's FLOP counter) on a blank model input with one and two classes.

        Counted rather than timed so that the bound is the same on a busy machine and an idle one
        and a test can rely on it; counted rather than derived from the config because the three
        model families spend their per-class work in different places (ESC-Net's SAM blocks, the
        training-free path's prompts)."""
        if self._unit_gflop is None:
            from torch.utils.flop_counter import FlopCounterMode

            s = self.model.image_size
            x = torch.zeros(1, 3, s, s, device=self.device)
            valid = torch.tensor([[s, s]], device=self.device)

            def counted(fn) -> tuple[float, object]:
                with FlopCounterMode(display=False) as fc:
                    out = fn()
                return fc.get_total_flops() / 1e9, out

            with torch.inference_mode(), self._autocast():  # the dtype the model runs in, as a request would
                text, emb = counted(lambda: self._embed(["thing"]))
                one, two = emb, emb.expand(2, -1).contiguous()
                # a model that cannot cache its image side does its image work in decode_classes:
                # then k1 holds it, and the per-class cost is what a second class adds
                image, feats = counted(lambda: self.net.encode_image(x, valid))
                k1, _ = counted(lambda: self.net.decode_classes(feats, one))
                k2, _ = counted(lambda: self.net.decode_classes(feats, two))
            per_class = max(k2 - k1, 0.0)
            self._unit_gflop = (max(image + k1 - per_class, 0.0), per_class, text)
        return self._unit_gflop

    def views_for(self, hw: tuple[int, int], slide: bool | None = None) -> int:
        """How many model inputs an image of ``hw`` is cut into (the global view + any windows)."""
        s = self.model.image_size
        h, w = hw
        if not ((max(h, w) > self.slide_above * s) if slide is None else bool(slide)):
            return 1
        work_long = min(max(h, w, s), int(round(self.slide_max_scale * s)))
        wh, ww = Letterbox.fit((h, w), work_long).scaled_hw
        return 1 + len(window_starts(wh, s)) * len(window_starts(ww, s))

    def cost(self, hw: tuple[int, int], n_classes: int, slide: bool | None = None) -> float:
        """The model work, in GFLOP, of labelling an image of ``hw`` with ``n_classes`` classes."""
        img, per_class, text = self.unit_gflop()
        views = self.views_for(hw, slide)
        return views * (img + n_classes * per_class) + n_classes * text

    def check_cost(self, hw: tuple[int, int], n_classes: int, slide: bool | None = None) -> None:
        """Raise :class:`WorkLimitError` when :meth:`cost` is over ``max_gflop``; nothing runs first."""
        if self.max_gflop is None or self.protocol != "sspsam":
            return
        need = self.cost(hw, n_classes, slide)
        if need <= self.max_gflop:
            return
        img, per_class, text = self.unit_gflop()
        views = self.views_for(hw, slide)
        fit = int((self.max_gflop - views * img) // max(views * per_class + text, 1e-12))
        h, w = hw
        raise WorkLimitError(
            f"{n_classes} classes on a {w}x{h} image ({views} model view{'s' * (views != 1)}) need about {need:,.0f} GFLOP "
            f"of {self.name}, over the {self.max_gflop:,.0f} GFLOP work limit ({MAX_GFLOP_ENV}); "
            + (f"at most {fit} classes fit on this image" if fit >= 1 else "use a smaller image"))
